"""Load a data set's processed shards from the node's bucket, standardized and split."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from google.cloud import firestore, storage

from shared import gcs_uri
from shared.config import Settings
from shared.datasets import DatasetSpec, FeatureStats
from shared.jobs import DatasetRef
from shared.preprocess import read_shard
from workers.trainer.training import standardize


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int


def load_dataset(
    db: firestore.Client, gcs: storage.Client, settings: Settings, ref: DatasetRef, test_fraction: float, seed: int,
    stats: FeatureStats | None = None,
) -> Split:
    """All shards of the data set (the pinned `ref.version`, else the current complete one),
    standardized with its merged statistics (or `stats`, e.g. a federation's over every node).

    The held-out split is a seeded permutation, so every attempt of a job sees the same split.
    """
    ds_ref = db.collection(settings.datasets_collection).document(ref.id)
    if ref.version:
        doc = ds_ref.collection("versions").document(ref.version).get().to_dict()
        if not doc:
            raise RuntimeError(f"data set {ref.node}/{ref.dataset} has no version {ref.version}")
    else:
        doc = ds_ref.get().to_dict()
        if not doc or doc.get("status") != "complete":
            raise RuntimeError(f"data set {ref.node}/{ref.dataset} is not complete")
    spec = DatasetSpec.model_validate(doc["spec"])
    uris = [uri for name in spec.expected_files for uri in doc["files"][name]["shards"]]
    with ThreadPoolExecutor(max_workers=8) as pool:
        blobs = list(pool.map(lambda u: gcs_uri.read(gcs, u), uris))
    parts = [read_shard(b, spec) for b in blobs]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    mean, std = (stats or FeatureStats.model_validate(doc["stats"])).mean_std()
    x = standardize(x, np.asarray(mean, np.float32), np.asarray(std, np.float32))
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = max(1, int(round(len(y) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test], spec.num_classes)

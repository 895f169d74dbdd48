"""Load a data set's processed shards from the node's bucket, standardized and split."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from google.cloud import storage

from shared import gcs_uri
from shared.dataset_shards import DatasetShards
from shared.datasets import FeatureStats
from shared.envelope import Envelope, Purpose
from shared.preprocess import read_shard
from workers.trainer.node_client import NodeClient
from workers.trainer.training import standardize


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int


def load_dataset(
    api: NodeClient, gcs: storage.Client, envelope: Envelope, job_id: str, test_fraction: float, seed: int, stats: FeatureStats | None = None,
) -> Split:
    """The job's data set (the version the job pins), as the node API names it; see `read_split`."""
    return read_split(gcs, envelope, api.dataset(job_id), test_fraction, seed, stats)


def read_split(
    gcs: storage.Client, envelope: Envelope, dataset: DatasetShards, test_fraction: float, seed: int, stats: FeatureStats | None = None,
) -> Split:
    """All shards of `dataset`, read from the node's own processed bucket, opened with the node's key,
    and standardized with its statistics (or `stats`, e.g. a federation's over every node).

    The held-out split is a seeded permutation, so every attempt of a job sees the same split.
    """
    def read(uri: str) -> bytes:
        bucket, name = gcs_uri.split(uri)
        return envelope.open(gcs_uri.read(gcs, uri), bucket, name, Purpose.SHARD)

    with ThreadPoolExecutor(max_workers=8) as pool:
        blobs = list(pool.map(read, dataset.shards))
    parts = [read_shard(b, dataset.spec) for b in blobs]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    mean, std = (stats or dataset.stats).mean_std()
    x = standardize(x, np.asarray(mean, np.float32), np.asarray(std, np.float32))
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = max(1, int(round(len(y) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test], dataset.spec.num_classes)

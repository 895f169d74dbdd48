"""An in-memory hub for unit tests: the memory store, a versioned bucket and recorded jobs.

A federation `f` of nodes us (100 rows) and eu (50 rows) trains an mlp on 3 features and
2 classes; its round 1 is open. Uploads are written as each node's worker writes them.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import tink
from google.api_core.exceptions import NotFound, PreconditionFailed
from tink import aead

from shared import weights
from shared.config import Settings
from shared.datasets import FeatureStats
from shared.envelope import HUB, Envelope, Purpose
from shared.federation import FederationConfig, FedNode, global_model_object, update_object
from shared.fedstore import Federation, FederationStatus, MemoryFederationStore, Round
from shared.hub.context import Hub
from shared.ingest import RawObject
from shared.jobs import Job
from shared.model_spec import param_spec

_GENERATIONS = itertools.count(1)
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
CONFIG = FederationConfig(id="f", nodes=[FedNode(name="us", dataset="d"), FedNode(name="eu", dataset="d")], hidden=(4,), signed_updates=False)
SPEC = param_spec("mlp", 3, 2, (4,))
ROWS = {"us": 100, "eu": 50}
KEKS: dict[str, aead.Aead] = {}  # each owner's key-encryption key, made once per test session
GOOD_METRICS = {"global_accuracy": 0.5, "global_loss": 0.7, "test_examples": 20, "train_loss": 0.6, "train_accuracy": 0.6,
                "compute_s": 0.25}


class Blob:
    def __init__(self, bucket: Bucket, name: str, generation: int | None = None) -> None:
        self.bucket, self.name, self.generation = bucket, name, generation

    def _held(self) -> dict[int, bytes]:
        return self.bucket.gcs.objects.get((self.bucket.name, self.name), {})

    def download_as_bytes(self, if_generation_match: int | None = None) -> bytes:
        held = self._held()
        if not held:
            raise NotFound(self.name)
        wanted = self.generation or if_generation_match
        if if_generation_match is not None and if_generation_match != max(held):
            raise PreconditionFailed(self.name)
        if wanted is not None and wanted not in held:
            raise NotFound(self.name)
        self.bucket.gcs.downloads.append(self.name)
        return held[wanted or max(held)]

    def upload_from_string(self, data: bytes, content_type: str | None = None, if_generation_match: int | None = None) -> None:
        held = self.bucket.gcs.objects.setdefault((self.bucket.name, self.name), {})
        if if_generation_match == 0 and held:
            raise PreconditionFailed(self.name)
        self.generation = self.bucket.gcs.next_generation()
        held[self.generation] = bytes(data)

    def exists(self) -> bool:
        return bool(self._held())

    def delete(self) -> None:
        self.bucket.gcs.objects.pop((self.bucket.name, self.name), None)


@dataclass
class Bucket:
    gcs: Gcs
    name: str

    def blob(self, name: str, generation: int | None = None) -> Blob:
        return Blob(self, name, generation)


@dataclass
class Gcs:
    """A versioned object store: every write is a new generation, older ones stay readable."""

    objects: dict[tuple[str, str], dict[int, bytes]] = field(default_factory=dict)
    downloads: list[str] = field(default_factory=list)

    @staticmethod
    def next_generation() -> int:
        return next(_GENERATIONS)  # unique across tests, as in a real bucket: the hub keys what it verified by generation

    def bucket(self, name: str) -> Bucket:
        return Bucket(self, name)


@dataclass
class Jobs:
    created: list[Job] = field(default_factory=list)

    def create(self, job: Job) -> bool:
        if any(j.id == job.id for j in self.created):
            return False
        self.created.append(job)
        return True


def running(config: FederationConfig = CONFIG, r: int = 1, global_model_uri: str | None = None) -> Federation:
    stats = FeatureStats(count=sum(ROWS.values()), mean=[0.0] * 3, m2=[1.0] * 3, label_counts=[75, 75])
    return Federation(
        id=config.id, status=FederationStatus.RUNNING, config=config, round=r, n_features=3, num_classes=2, stats=stats,
        node_rows=ROWS, versions={n: "v1" for n in ROWS}, jobs={n: f"fed.{config.id}.{n}" for n in ROWS},
        global_model_uri=global_model_uri, created_at=NOW, updated_at=NOW,
    )


class FakeHub:
    """A hub over memory, with federation `config` running at round `r`."""

    def __init__(self, config: FederationConfig = CONFIG, r: int = 1) -> None:
        self.store, self.gcs, self.jobs, self.keys = MemoryFederationStore(), Gcs(), Jobs(), {}
        self.keks = KEKS  # each owner's key, as Cloud KMS would hold it
        self.hub = Hub(Settings(), self.store, self.gcs, None, self.jobs, self.keys.get, self.envelope)
        self.config = config
        if r:
            self.store.put_federation(running(config, r))
            self.store.put_round(config.id, Round.opened(config, r, NOW))

    def envelope(self, owner: str) -> Envelope:
        if owner not in self.keks:
            self.keks[owner] = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM).primitive(aead.Aead)
        return Envelope(self.keks[owner])

    def upload(self, node: str, data: bytes, metadata: dict[str, str], r: int = 1, attempt: int = 1, evaluate: bool = False,
               size: int | None = None, sealed: bool = True) -> RawObject:
        """An update as `node`'s worker uploads it: sealed under the node's key, unless `sealed` is False."""
        blob = self.gcs.bucket("hub").blob(update_object(self.config.id, r, node, attempt, evaluate))
        stored = self.envelope(node).seal(data, "hub", blob.name, Purpose.UPDATE) if sealed else data
        blob.upload_from_string(stored)
        return RawObject("hub", blob.name, blob.generation, len(stored) if size is None else size, metadata)

    def global_model(self, r: int) -> dict[str, np.ndarray]:
        """The global model after round r, opened with the hub's key."""
        name = global_model_object(self.config.id, r)
        sealed = self.gcs.bucket(self.hub.settings.hub_bucket).blob(name).download_as_bytes()
        return weights.from_bytes(self.envelope(HUB).open(sealed, self.hub.settings.hub_bucket, name, Purpose.GLOBAL_MODEL))[0]


def payload(fill: float = 0.0, node: str = "us", r: int = 1, fid: str = "f", spec: dict = SPEC) -> bytes:
    """A training update as node's worker writes it."""
    params = {name: np.full(shape, fill, np.float32) for name, (shape, _) in spec.items()}
    return weights.to_bytes(params, {"federation": fid, "round": str(r), "node": node})


def meta(examples: str = "40", **metrics) -> dict[str, str]:
    return {"examples": examples, "metrics": json.dumps(GOOD_METRICS | metrics)}

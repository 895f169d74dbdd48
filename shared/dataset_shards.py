"""What a worker trains on: a data set version's spec, statistics and shard URIs.

The node API hands this to a node's worker (for its own jobs only); operator tools
that pool data for a yardstick (the demo's centralized baseline, the federation
benchmark) read it the same way.
"""

from __future__ import annotations

from google.cloud import firestore
from pydantic import BaseModel

from shared.config import Settings
from shared.datasets import DatasetSpec, FeatureStats
from shared.datasetstore import FirestoreDatasetStore
from shared.jobs import DatasetRef


class DatasetShards(BaseModel):
    spec: DatasetSpec
    stats: FeatureStats
    shards: list[str]


def pinned_dataset(db: firestore.Client, settings: Settings, ref: DatasetRef) -> DatasetShards | None:
    """The version `ref` pins (or the current complete one); None if there is no such complete version."""
    version = FirestoreDatasetStore(db, settings).pinned(ref)
    if version is None:
        return None
    shards = [uri for uris in version.shard_uris().values() for uri in uris]
    return DatasetShards(spec=version.spec, stats=version.stats, shards=shards)

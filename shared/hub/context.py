"""The hub's collaborators, handed to its logic as one value so tests can swap any of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Protocol

from google.cloud import firestore, storage

from shared.config import Settings
from shared.envelope import Envelope, node_kek
from shared.fedstore import FederationStore, FirestoreFederationStore
from shared.hub.aggregator_client import AggregatorClient
from shared.ingest import Services
from shared.jobs import Job
from shared.jobstore import JobStore
from shared.node_registry import NodeRegistry


class JobCreator(Protocol):
    def create(self, job: Job) -> bool: ...


@dataclass(frozen=True)
class Hub:
    settings: Settings
    store: FederationStore  # the hub's own documents
    gcs: storage.Client
    db: firestore.Client  # other owners' records the hub reads: data sets, the node registry
    jobs: JobCreator
    public_key: Callable[[str], str | None]  # a node's registered signing key, None if it has none
    envelope: Callable[[str], Envelope]  # an owner's key (a node's, or HUB's): updates open, global models seal under it
    aggregator: AggregatorClient | None = None  # the attested aggregator, for federations with confidential_aggregation

    @classmethod
    def of(cls, svc: Services) -> Hub:
        registry = NodeRegistry(svc.db, svc.settings)

        def public_key(node: str) -> str | None:
            record = registry.get(node)
            return record.public_key if record else None

        return cls(
            svc.settings, FirestoreFederationStore(svc.db, svc.settings), svc.gcs, svc.db, JobStore(svc.db, svc.settings), public_key,
            owner_envelopes(svc.settings), aggregator_client(svc.settings.aggregator_url),
        )


@cache
def aggregator_client(url: str) -> AggregatorClient | None:
    """One client per process (it keeps the hub's ID token and the aggregator's key for a while)."""
    return AggregatorClient(url) if url else None


def owner_envelopes(settings: Settings) -> Callable[[str], Envelope]:
    """Each owner's Envelope, made once per process (a Cloud KMS client per key)."""
    return cache(lambda owner: Envelope(node_kek(settings, owner)))

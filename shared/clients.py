"""Google Cloud clients, created once per process (a function instance reuses them across events).

They honour the emulator variables (STORAGE_EMULATOR_HOST, PUBSUB_EMULATOR_HOST,
FIRESTORE_EMULATOR_HOST), so the same code runs locally and in production.
"""

from __future__ import annotations

from functools import cache

from google.cloud import firestore, pubsub_v1, storage

from shared.config import Settings
from shared.ingest import Services


@cache
def settings() -> Settings:
    return Settings.from_env()


@cache
def db() -> firestore.Client:
    return firestore.Client(project=settings().project)


@cache
def gcs() -> storage.Client:
    return storage.Client(project=settings().project)


@cache
def publisher() -> pubsub_v1.PublisherClient:
    # Functions publish one message and wait for it: the default 10 ms batching window
    # would only add latency to every hop of the chain.
    return pubsub_v1.PublisherClient(batch_settings=pubsub_v1.types.BatchSettings(max_latency=0.001))


def services() -> Services:
    """All of the above, as the domain logic takes them."""
    return Services(settings(), db(), gcs(), publisher())

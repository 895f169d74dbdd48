"""Where CLI commands find the cloud: the running local stack, else the real project."""

from __future__ import annotations

from functools import cache

from google.cloud import firestore, pubsub_v1, storage

from emulators.endpoints import Endpoints, default_state_dir
from shared.config import Settings


@cache
def local_endpoints() -> Endpoints | None:
    """The local cloud started by `fedpipe up` or `fedpipe demo`, if one is running."""
    try:
        ep = Endpoints.load(default_state_dir())
    except FileNotFoundError:
        return None
    ep.activate()
    return ep


@cache
def settings() -> Settings:
    local_endpoints()
    return Settings.from_env()


@cache
def db() -> firestore.Client:
    return firestore.Client(project=settings().project)


@cache
def gcs() -> storage.Client:
    return storage.Client(project=settings().project)


@cache
def publisher() -> pubsub_v1.PublisherClient:
    return pubsub_v1.PublisherClient()

"""Where CLI commands find the cloud: the running local stack if there is one, else the real project.

The local stack's endpoints are put into the environment before the first client is
made, so `shared.clients` (the functions' own clients) serve the CLI too.
"""

from __future__ import annotations

from functools import cache

from google.cloud import firestore, pubsub_v1, storage

from emulators.endpoints import Endpoints, default_state_dir
from shared import clients
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


def settings() -> Settings:
    local_endpoints()
    return clients.settings()


def db() -> firestore.Client:
    local_endpoints()
    return clients.db()


def gcs() -> storage.Client:
    local_endpoints()
    return clients.gcs()


def publisher() -> pubsub_v1.PublisherClient:
    local_endpoints()
    return clients.publisher()

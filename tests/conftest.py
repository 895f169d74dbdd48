"""Shared fixtures: one local cloud per test session (emulator start-up is slow)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_for(probe: Callable[[], T], timeout_s: float = 60, what: str = "condition", interval_s: float = 0.1) -> T:
    """Poll until `probe` returns something truthy; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture(scope="session")
def cloud(tmp_path_factory):
    """The real local cloud: Pub/Sub, Firestore, fake-gcs-server, router, functions."""
    from emulators.router_config import RetryPolicy, RouterConfig
    from emulators.stack import LocalCloud, StackOptions

    saved = dict(os.environ)
    # Fast heartbeats and retries so lease and retry behaviour shows up in seconds.
    os.environ["FEDPIPE_HEARTBEAT_S"] = "0.3"
    os.environ["FEDPIPE_REATTEST_S"] = "1"  # workers re-attest every second, with 1-second tokens
    state_dir = Path(tmp_path_factory.mktemp("fedpipe-state"))
    os.environ["FEDPIPE_STATE_DIR"] = str(state_dir)  # where CLI commands find this stack
    # mallory is a registered node that runs a hostile worker of its own (tests/emulator/hostile_worker.py).
    os.environ["FEDPIPE_NODES"] = "us,eu,mallory"
    options = StackOptions(
        state_dir=state_dir,
        router=RouterConfig(retry=RetryPolicy(min_backoff_s=0.3, max_backoff_s=2.0, max_attempts=6), reaper_interval_s=0.5),
        worker_modules={"mallory": "tests.emulator.hostile_worker"},
        attestation_token_s=1,
    )
    with LocalCloud(options) as local:
        yield local
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def clients(cloud):
    from google.cloud import firestore, pubsub_v1, storage

    from shared.config import Settings

    settings = Settings.from_env()
    return SimpleNamespace(
        settings=settings,
        db=firestore.Client(project=settings.project),
        gcs=storage.Client(project=settings.project),
        publisher=pubsub_v1.PublisherClient(),
        subscriber=pubsub_v1.SubscriberClient(),
    )

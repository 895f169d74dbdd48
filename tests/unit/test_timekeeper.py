"""shared.timekeeper: one failing part of the clock does not stop the other."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

import shared.timekeeper as timekeeper
from shared.hub import SweepOutcome

pytestmark = pytest.mark.unit

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def test_rounds_close_even_when_reaping_jobs_fails(monkeypatch):
    swept = []

    class FailingStore:
        def __init__(self, db, settings) -> None:
            pass

        def reap(self, now):
            raise RuntimeError("firestore unavailable")

    monkeypatch.setattr(timekeeper, "JobStore", FailingStore)
    monkeypatch.setattr(timekeeper, "sweep_deadlines", lambda svc, now: swept.append(now) or [SweepOutcome("fed-1", error="RuntimeError")])
    with pytest.raises(RuntimeError, match="firestore unavailable"):  # still reported, for the caller to log
        timekeeper.tick(SimpleNamespace(db=None, settings=None), NOW)
    assert swept == [NOW]

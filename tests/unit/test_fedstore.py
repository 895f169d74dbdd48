"""shared.fedstore: the hub's documents, their transition tables and the store's guarantees."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from shared.federation import RoundStatus, UpdateMetrics
from shared.fedstore import (
    FEDERATION_TRANSITIONS,
    ROUND_TRANSITIONS,
    CloseMarker,
    Federation,
    FederationStatus,
    InvalidTransition,
    MemoryFederationStore,
    RefusalReason,
    RefusedUpdate,
    Round,
    Update,
)
from tests.unit.hub_fakes import CONFIG, NOW, running

pytestmark = pytest.mark.unit
F, R = FederationStatus, RoundStatus


def test_federation_transitions_are_exactly_running_to_completed_or_failed():
    assert FEDERATION_TRANSITIONS == {(F.RUNNING, F.COMPLETED), (F.RUNNING, F.FAILED)}
    fed = running()
    assert fed.moved(F.COMPLETED, NOW).status is F.COMPLETED
    for start, target in [(F.COMPLETED, F.RUNNING), (F.FAILED, F.COMPLETED), (F.RUNNING, F.REJECTED), (F.REJECTED, F.RUNNING)]:
        with pytest.raises(InvalidTransition):
            fed.model_copy(update={"status": start}).moved(target, NOW)


def test_round_transitions_are_exactly_open_to_closed_or_failed():
    assert ROUND_TRANSITIONS == {(R.OPEN, R.CLOSED), (R.OPEN, R.FAILED)}
    rd = Round.opened(CONFIG, 1, NOW)
    assert rd.moved(R.FAILED, reason="x").status is R.FAILED
    with pytest.raises(InvalidTransition, match="round 1: cannot go from closed to open"):
        rd.moved(R.CLOSED).moved(R.OPEN)


def test_a_rejected_federation_needs_no_config_but_a_started_one_does():
    assert Federation.rejected("bad", "no such data set", NOW).config is None
    with pytest.raises(ValidationError):
        Federation(id="f", status=F.RUNNING, created_at=NOW, updated_at=NOW)


def test_documents_survive_their_firestore_form():
    fed = running()
    assert Federation.from_doc("f", fed.to_doc()) == fed
    assert fed.to_doc()["config"]["hidden"] == [4]  # JSON-shaped config, as Firestore stores it
    rd = Round.opened(CONFIG, 3, NOW)
    assert rd.to_doc()["deadline_at"] - rd.to_doc()["opened_at"] == timedelta(seconds=CONFIG.round_deadline_s)
    update = Update(node="us", object="gs://h/u", generation=3, attempt=1, examples=5,
                    metrics=UpdateMetrics(global_accuracy=0.5, global_loss=1.0, test_examples=2), at=NOW)
    assert "train_loss" not in update.to_doc()["metrics"]  # absent stays absent
    assert Update.model_validate(update.to_doc()) == update


def test_each_refused_version_has_its_own_record():
    store = MemoryFederationStore()
    base = {"node": "us", "object": "gs://h/u", "attempt": 1, "at": NOW, "message": "m"}
    store.record_refusal("f", 1, RefusedUpdate(generation=1, reason=RefusalReason.TOO_BIG, **base))
    store.record_refusal("f", 1, RefusedUpdate(generation=2, reason=RefusalReason.NOT_FINITE, **base))
    store.record_refusal("f", 1, RefusedUpdate(generation=2, reason=RefusalReason.NOT_FINITE, **base))  # a redelivery
    assert [(x.generation, x.reason) for x in store.refusals("f", 1)] == [(1, RefusalReason.TOO_BIG), (2, RefusalReason.NOT_FINITE)]


def test_creates_fail_on_existing_documents():
    store = MemoryFederationStore()
    assert store.create_federation(running(), Round.opened(CONFIG, 1, NOW))
    assert not store.create_federation(running(), Round.opened(CONFIG, 1, NOW))
    assert not store.create_rejected(Federation.rejected("f", "x", NOW))
    marker = CloseMarker(status=R.CLOSED, reason="r", participants=["us"], at=NOW)
    assert store.create_marker("f", 1, marker) and not store.create_marker("f", 1, marker.model_copy(update={"participants": []}))
    assert store.marker("f", 1).participants == ["us"]
    assert store.running() == ["f"]


def test_a_close_commits_only_against_the_federation_as_read():
    store = MemoryFederationStore()
    store.create_federation(running(), Round.opened(CONFIG, 1, NOW))
    seen = store.round_view("f", 1).federation
    store.put_federation(seen.doc.model_copy(update={"updated_at": NOW + timedelta(seconds=1)}))  # someone moved it meanwhile
    closed, opened = Round.opened(CONFIG, 1, NOW).moved(R.CLOSED), Round.opened(CONFIG, 2, NOW)
    assert not store.commit_close("f", closed, opened, seen.doc.model_copy(update={"round": 2}), seen.version)
    assert store.round("f", 2) is None and store.federation("f").round == 1
    fresh = store.round_view("f", 1).federation
    assert store.commit_close("f", closed, opened, fresh.doc.model_copy(update={"round": 2}), fresh.version)
    assert (store.federation("f").round, store.round("f", 1).status, store.round("f", 2).status) == (2, R.CLOSED, R.OPEN)

"""shared.hub closing rounds against the in-memory store: the races the emulator tests meet by
chance, here on purpose (two deliveries closing one round, a late update racing a close, a
duplicate delivery, a recovering closer) and the deadline sweep."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from shared.aggregation import clip_update, update_norm
from shared.envelope import HUB, Purpose
from shared.federation import RoundStatus, global_model_object
from shared.fedstore import CloseMarker, FederationStatus, RefusalReason, Update, UpdateMetrics
from shared.hub import STALE_CLOSE_S, AdvanceKind, UpdateKind, closing
from shared.hub.recording import record_update
from shared.model_spec import initial_params
from shared.privacy import PrivacyConfig, PrivacySpent, spent
from tests.unit.hub_fakes import CONFIG, NOW, SPEC, FakeHub, meta, payload

pytestmark = pytest.mark.unit
LATER = NOW + timedelta(seconds=1)


def report(h: FakeHub, node: str, fill: float = 0.0, examples: int = 40, r: int = 1, attempt: int = 1, now=NOW):
    obj = h.upload(node, payload(fill, node=node, r=r), meta(str(examples), test_examples=10), r=r, attempt=attempt)
    return record_update(h.hub, obj, "f", r, node, attempt, now)


def global_model(h: FakeHub, r: int) -> dict[str, np.ndarray]:
    return h.global_model(r)


def test_the_last_report_closes_the_round_and_opens_the_next_with_the_weighted_mean():
    h = FakeHub()
    assert report(h, "us", 1.0, examples=30).message == "recorded; round 1: 1 of 2 reported"
    outcome = report(h, "eu", 4.0, examples=10)
    assert (outcome.kind, outcome.advance.kind) == (UpdateKind.RECORDED, AdvanceKind.ROUND_CLOSED)
    assert outcome.message == "recorded; round 1 closed (all 2 nodes reported); round 2 opened"
    fed, closed, opened = h.store.federation("f"), h.store.round("f", 1), h.store.round("f", 2)
    assert (fed.status, fed.round, fed.global_model_uri) == (FederationStatus.RUNNING, 2, f"gs://{h.hub.settings.hub_bucket}/{global_model_object('f', 1)}")
    assert (closed.status, closed.participants, opened.status) == (RoundStatus.CLOSED, ["eu", "us"], RoundStatus.OPEN)
    assert closed.train_metrics.examples == 40.0 and closed.global_metrics.round == 0
    for value in global_model(h, 1).values():
        np.testing.assert_allclose(value, (1.0 * 30 + 4.0 * 10) / 40)


def test_a_duplicate_delivery_counts_once():
    h = FakeHub()
    first = h.upload("us", payload(0.5), meta())
    assert record_update(h.hub, first, "f", 1, "us", 1, NOW).kind is UpdateKind.RECORDED
    again = record_update(h.hub, first, "f", 1, "us", 1, NOW)
    assert (again.kind, again.counted, again.message) == (UpdateKind.DUPLICATE, True, "duplicate; round 1: 1 of 2 reported")
    assert h.store.refusals("f", 1) == []


def test_a_replaced_update_is_refused_and_the_counted_version_stays():
    h = FakeHub()
    first = h.upload("us", payload(0.5), meta())
    record_update(h.hub, first, "f", 1, "us", 1, NOW)
    second = h.upload("us", payload(0.9), meta())  # the same object name, a new generation
    outcome = record_update(h.hub, second, "f", 1, "us", 1, NOW)
    assert (outcome.kind, outcome.reason) == (UpdateKind.REFUSED, RefusalReason.REPLACES_COUNTED)
    assert h.store.update_view("f", 1, "us").counted.generation == first.generation
    assert [(x.generation, x.reason) for x in h.store.refusals("f", 1)] == [(second.generation, RefusalReason.REPLACES_COUNTED)]


class HookedStore:
    """The memory store, with a hook run once just before one of its methods: another actor's move."""

    def __init__(self, h: FakeHub, method: str, hook) -> None:
        self._store, self._method, self._hook = h.store, method, hook
        object.__setattr__(h.hub, "store", self)

    def __getattr__(self, name):
        real = getattr(self._store, name)
        if name != self._method or self._hook is None:
            return real

        def hooked(*args, **kwargs):
            hook, self._hook = self._hook, None
            hook()
            return real(*args, **kwargs)

        return hooked


def count(h: FakeHub, node: str, fill: float, r: int = 1) -> None:
    """`node`'s update counted in round r, as a delivery that has not closed the round yet leaves it."""
    blob = h.gcs.bucket("hub").blob(f"{node}-{r}")
    blob.upload_from_string(h.envelope(node).seal(payload(fill, node=node, r=r), "hub", blob.name, Purpose.UPDATE))
    metrics = UpdateMetrics(global_accuracy=0.5, global_loss=1.0, test_examples=10, train_loss=1.0, train_accuracy=0.5)
    h.store.add_update("f", r, Update(node=node, object=f"gs://hub/{blob.name}", generation=blob.generation, attempt=1, examples=10,
                                      metrics=metrics, at=NOW))


def test_two_deliveries_closing_one_round_aggregate_once():
    h = FakeHub()
    count(h, "us", 1.0)
    count(h, "eu", 3.0)
    others = []
    HookedStore(h, "create_marker", lambda: others.append(closing.advance(h.hub, "f", 1, NOW)))  # the other delivery closes first
    mine = closing.advance(h.hub, "f", 1, NOW)
    assert [o.kind for o in others] == [AdvanceKind.ROUND_CLOSED]
    assert mine.kind is AdvanceKind.BEING_CLOSED
    assert h.store.federation("f").round == 2 and h.store.round("f", 2).status is RoundStatus.OPEN
    for value in global_model(h, 1).values():
        np.testing.assert_allclose(value, 2.0)


def test_a_late_update_racing_a_close_is_recorded_late_never_dropped():
    h = FakeHub(CONFIG.model_copy(update={"min_nodes": 1}))
    report(h, "us", 1.0)
    closer = CloseMarker(status=RoundStatus.CLOSED, reason="deadline passed with 1 of 2 nodes (quorum 1)", participants=["us"], at=NOW)
    HookedStore(h, "close_inputs", lambda: h.store.create_marker("f", 1, closer))  # after our write, before our close
    outcome = report(h, "eu", 2.0)
    assert (outcome.kind, outcome.reason, outcome.message) == (UpdateKind.LATE, RefusalReason.LATE, "late: round 1 is closed")
    assert [(x.node, x.reason) for x in h.store.refusals("f", 1)] == [("eu", RefusalReason.LATE)]
    assert h.store.marker("f", 1).participants == ["us"]


def test_an_update_after_the_close_marker_is_late():
    h = FakeHub()
    h.store.create_marker("f", 1, CloseMarker(status=RoundStatus.CLOSED, reason="r", participants=[], at=NOW))
    outcome = report(h, "eu", 2.0)
    assert outcome.kind is UpdateKind.LATE and not h.store.is_counted("f", 1, "eu")


def test_a_close_whose_closer_died_is_finished_from_its_marker_once_stale():
    h = FakeHub(CONFIG.model_copy(update={"rounds": 1}), r=2)  # round 2 evaluates
    for node, accuracy in (("eu", 0.6), ("us", 0.8)):
        metrics = UpdateMetrics(global_accuracy=accuracy, global_loss=1.0, test_examples=10)
        h.store.add_update("f", 2, Update(node=node, object=f"gs://x/{node}", generation=1, attempt=1, examples=10, metrics=metrics, at=NOW))
    h.store.create_marker("f", 2, CloseMarker(status=RoundStatus.CLOSED, reason="all 2 nodes reported", participants=["eu", "us"], at=NOW))

    assert closing.advance(h.hub, "f", 2, LATER, recover=True).kind is AdvanceKind.BEING_CLOSED
    assert closing.advance(h.hub, "f", 2, NOW + timedelta(seconds=STALE_CLOSE_S)).kind is AdvanceKind.BEING_CLOSED  # only a sweep recovers
    done = closing.advance(h.hub, "f", 2, NOW + timedelta(seconds=STALE_CLOSE_S), recover=True)
    assert done.message == "federation completed (all 2 nodes reported)"
    fed = h.store.federation("f")
    assert fed.status is FederationStatus.COMPLETED and fed.final.accuracy == pytest.approx(0.7) and fed.final.round == 1


def test_a_recovering_closer_and_the_original_commit_once():
    h = FakeHub(CONFIG.model_copy(update={"rounds": 1}))
    report(h, "us", 1.0)
    recovered = []
    stale = NOW + timedelta(seconds=STALE_CLOSE_S)
    HookedStore(h, "commit_close", lambda: recovered.append(closing.advance(h.hub, "f", 1, stale, recover=True)))
    outcome = report(h, "eu", 3.0)  # closes, and while it commits a sweep finishes the same close
    assert [r.kind for r in recovered] == [AdvanceKind.ROUND_CLOSED]
    assert outcome.advance.kind is AdvanceKind.ALREADY_CLOSED
    assert h.store.federation("f").round == 2
    for value in global_model(h, 1).values():
        np.testing.assert_allclose(value, 2.0)  # one model, written once


def test_after_the_deadline_a_quorum_closes_and_a_shortfall_fails_the_federation():
    h = FakeHub(CONFIG.model_copy(update={"min_nodes": 1}))
    report(h, "us", 1.0)
    deadline = NOW + timedelta(seconds=CONFIG.round_deadline_s)
    assert closing.advance(h.hub, "f", 1, deadline).message == "round 1 closed (deadline passed with 1 of 2 nodes (quorum 1)); round 2 opened"

    h = FakeHub()
    report(h, "us", 1.0)
    failed = closing.advance(h.hub, "f", 1, deadline)
    assert (failed.kind, failed.reason) == (AdvanceKind.FAILED, "round 1: 1 of 2 nodes reported by the deadline; quorum is 2")
    assert h.store.federation("f").status is FederationStatus.FAILED and h.store.round("f", 1).status is RoundStatus.FAILED


@pytest.mark.parametrize(("strategy", "expected"), [("median", 2.0), ("trimmed_mean", 2.0), ("fedavg", (1 + 2 + 60) / 3)])
def test_robust_strategies_resist_one_scaled_update(strategy, expected):
    config = CONFIG.model_copy(update={"strategy": strategy, "trim_fraction": 0.34, "min_nodes": 3,
                                       "nodes": [*CONFIG.nodes, CONFIG.nodes[0].model_copy(update={"name": "asia"})]})
    h = FakeHub(config)
    h.store.put_federation(h.store.federation("f").model_copy(update={"node_rows": {"us": 100, "eu": 100, "asia": 100}}))
    for node, fill in (("us", 1.0), ("eu", 2.0), ("asia", 60.0)):
        report(h, node, fill, examples=40)
    for value in global_model(h, 1).values():
        np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_from_round_two_updates_are_clipped_to_the_norm_around_the_previous_model():
    h = FakeHub(CONFIG.model_copy(update={"clip_norm": 1.0}), r=2)
    previous = h.gcs.bucket("hub").blob("previous")
    previous.upload_from_string(h.envelope(HUB).seal(payload(0.0), "hub", "previous", Purpose.GLOBAL_MODEL))
    h.store.put_federation(h.store.federation("f").model_copy(update={"global_model_uri": "gs://hub/previous"}))
    report(h, "us", 3.0, r=2)
    report(h, "eu", 3.0, r=2)
    model = global_model(h, 2)
    assert np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in model.values())) == pytest.approx(1.0, rel=1e-5)


def test_the_sweep_isolates_a_failing_federation_and_names_only_the_errors_class():
    h = FakeHub()
    h.store.put_federation(h.store.federation("f").model_copy(update={"id": "g"}))  # running, but round 1 of g is missing ...
    real_view = h.store.round_view

    def broken(fid, r):
        if fid == "g":
            raise RuntimeError("secret-777 in a document")
        return real_view(fid, r)

    h.store.round_view = broken
    outcomes = {o.federation: o for o in closing.sweep_deadlines(h.hub, NOW + timedelta(hours=1))}
    assert outcomes["g"].error == "RuntimeError" and "777" not in outcomes["g"].message
    assert outcomes["f"].advance.kind is AdvanceKind.FAILED and outcomes["f"].moved  # nobody reported by the deadline


def _dp(h: FakeHub, r: int) -> tuple:
    return h.store.round("f", r).privacy, h.store.federation("f").privacy


def test_with_privacy_round_one_clips_against_the_seed_model_and_averages_unweighted():
    privacy = PrivacyConfig(clip_norm=0.5, noise_multiplier=0.0)
    h = FakeHub(CONFIG.model_copy(update={"privacy": privacy}))
    report(h, "us", 1.0, examples=90)
    report(h, "eu", 4.0, examples=10)  # the example counts do not weigh in
    seed = initial_params(SPEC, CONFIG.seed)
    clipped = [clip_update({n: np.full(s, fill, np.float32) for n, (s, _) in SPEC.items()}, seed, 0.5) for fill in (1.0, 4.0)]
    model = global_model(h, 1)
    for name in SPEC:
        np.testing.assert_allclose(model[name], (clipped[0][name] + clipped[1][name]) / 2, atol=1e-6)
    assert update_norm(model, seed) <= 0.5 + 1e-6
    closed, fed = _dp(h, 1)
    assert closed == fed == PrivacySpent(rounds=1, epsilon=None, delta=1e-5, noise_std=0.0)


def test_with_privacy_each_round_reports_the_epsilon_spent_so_far_and_the_evaluation_round_spends_none():
    privacy = PrivacyConfig(clip_norm=1.0, noise_multiplier=2.0, delta=1e-6)
    h = FakeHub(CONFIG.model_copy(update={"privacy": privacy, "rounds": 2}))
    for r in (1, 2):
        report(h, "us", 1.0, r=r)
        report(h, "eu", 3.0, r=r)
        closed, fed = _dp(h, r)
        assert closed == fed == spent(privacy, r, 2)
        assert (fed.rounds, fed.noise_std, fed.delta) == (r, 1.0, 1e-6)
    assert _dp(h, 1)[0].epsilon < _dp(h, 2)[0].epsilon
    for node in ("us", "eu"):
        obj = h.upload(node, b'{"global_accuracy": 0.5}', meta(test_examples=10), r=3, evaluate=True)
        record_update(h.hub, obj, "f", 3, node, 1, NOW)
    fed = h.store.federation("f")
    assert fed.status is FederationStatus.COMPLETED and fed.privacy == spent(privacy, 2, 2) and h.store.round("f", 3).privacy is None


def test_with_privacy_the_same_updates_give_differently_noised_models():
    privacy = PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0)
    models = []
    for _ in range(2):
        h = FakeHub(CONFIG.model_copy(update={"privacy": privacy}))  # same federation seed both times
        report(h, "us", 1.0)
        report(h, "eu", 3.0)
        models.append(global_model(h, 1))
    assert not np.array_equal(models[0]["dense_0.kernel"], models[1]["dense_0.kernel"])

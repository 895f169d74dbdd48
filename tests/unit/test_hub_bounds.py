"""shared.hub admission: what a node's upload may claim, and how big it may be, before it counts.

A node and its uploads may be hostile: every claim (example count, metrics) is typed and
bounded, tensors must be this model's, finite and bounded, and an upload of the wrong size
is never downloaded. Each refusal is recorded with a reason code and a message that never
quotes the value. One test per rule, each against the in-memory hub.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared import signing, weights
from shared.envelope import SEAL_OVERHEAD_MAX, SEAL_OVERHEAD_MIN, Purpose
from shared.federation import update_object
from shared.fedstore import RefusalReason
from shared.hub import UpdateKind, admission
from shared.hub.recording import EAGER_DOWNLOAD_BYTES, record_update
from shared.ingest import RawObject
from shared.model_spec import param_spec
from tests.unit.hub_fakes import CONFIG, GOOD_METRICS, NOW, SPEC, FakeHub, meta, payload

pytestmark = pytest.mark.unit
R = RefusalReason


def record(h: FakeHub, obj, node: str = "us", r: int = 1, attempt: int = 1):
    return record_update(h.hub, obj, "f", r, node, attempt, NOW)


def refusals(h: FakeHub, r: int = 1) -> list[tuple[str, RefusalReason, str]]:
    return [(x.node, x.reason, x.message) for x in h.store.refusals("f", r)]


def test_a_good_update_is_counted_with_its_claims():
    h = FakeHub()
    outcome = record(h, h.upload("us", payload(0.5), meta()))
    assert (outcome.kind, outcome.reason, outcome.message) == (UpdateKind.RECORDED, None, "recorded; round 1: 1 of 2 reported")
    counted = h.store.update_view("f", 1, "us").counted
    assert (counted.examples, counted.metrics.model_dump(exclude_none=True)) == (40, GOOD_METRICS)
    assert refusals(h) == []


@pytest.mark.parametrize(("examples", "test_examples", "reason"), [
    ("101", 20, R.TOO_MANY_EXAMPLES),  # us has 100 rows
    ("40", 101, R.TOO_MANY_EXAMPLES),
    ("4611686018427387904", 20, R.TOO_MANY_EXAMPLES),  # 2**62
    ("0", 20, R.BAD_EXAMPLES),
    ("-5", 20, R.BAD_EXAMPLES),
    ("1e3", 20, R.BAD_EXAMPLES),
    ("9" * 5000, 20, R.BAD_EXAMPLES),
])
def test_an_example_count_beyond_the_nodes_rows_is_refused_and_recorded(examples, test_examples, reason):
    h = FakeHub()
    outcome = record(h, h.upload("us", payload(), meta(examples, test_examples=test_examples)))
    assert (outcome.kind, outcome.reason) == (UpdateKind.REFUSED, reason)
    assert [(node, why) for node, why, _ in refusals(h)] == [("us", reason)]
    assert not h.store.is_counted("f", 1, "us")


def test_the_row_bound_is_each_nodes_own():
    h = FakeHub()
    assert record(h, h.upload("eu", payload(node="eu"), meta("50", test_examples=50)), node="eu").kind is UpdateKind.RECORDED
    assert record(h, h.upload("eu", payload(node="eu"), meta("51"), attempt=2), node="eu", attempt=2).reason is R.TOO_MANY_EXAMPLES


@pytest.fixture
def default_recursion_limit():
    """JSON nested past the interpreter's recursion limit does not parse. cel-python, imported by other
    tests in the same process, raises the limit, so these tests pin CPython's default."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(previous)


@pytest.mark.parametrize(("metrics_text", "message"), [
    (json.dumps([1, 2, 3]), "metrics metadata is not a JSON object"),
    ("[" * 2000 + "]" * 2000, "metrics metadata is not JSON"),
    (json.dumps(GOOD_METRICS | {"pad": "x" * 5000}), "metrics metadata exceeds 4096 characters"),
    (json.dumps({"global_accuracy": 0.5}), "metrics lack ['global_loss', 'test_examples']"),
    (json.dumps(GOOD_METRICS | {"test_examples": 1e9}), "metrics out of range or of the wrong type: test_examples"),
    (json.dumps(GOOD_METRICS | {"test_examples": True}), "metrics out of range or of the wrong type: test_examples"),
    (json.dumps(GOOD_METRICS | {"global_accuracy": 1.5}), "metrics out of range or of the wrong type: global_accuracy"),
    (json.dumps(GOOD_METRICS | {"global_loss": float("nan")}), "metrics out of range or of the wrong type: global_loss"),
    (json.dumps(GOOD_METRICS | {"train_accuracy": [0.5]}), "metrics out of range or of the wrong type: train_accuracy"),
    (json.dumps(GOOD_METRICS | {"secret-777": 1}), "metrics out of range or of the wrong type: an unknown metric"),
])
def test_malformed_metrics_are_refused_unread_and_recorded_without_their_values(metrics_text, message, default_recursion_limit):
    h = FakeHub()
    outcome = record(h, h.upload("us", payload(), {"examples": "40", "metrics": metrics_text}))
    assert (outcome.kind, outcome.reason, outcome.detail) == (UpdateKind.REFUSED, R.BAD_METRICS, message)
    [refused] = h.store.refusals("f", 1)
    assert refused.metrics is None and refused.examples is None and "777" not in refused.message
    assert h.gcs.downloads == []  # refused on its claims: never read


def test_a_training_update_without_training_metrics_is_refused():
    h = FakeHub()
    metrics = {k: v for k, v in GOOD_METRICS.items() if k != "train_loss"}
    outcome = record(h, h.upload("us", payload(), {"examples": "40", "metrics": json.dumps(metrics)}))
    assert (outcome.reason, outcome.detail) == (R.BAD_METRICS, "metrics lack ['train_loss']")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_with_nan_or_inf_are_refused(bad):
    params = {name: np.zeros(shape, np.float32) for name, (shape, _) in SPEC.items()}
    params["dense_0.kernel"][1, 2] = bad
    h = FakeHub()
    outcome = record(h, h.upload("us", weights.to_bytes(params, {"federation": "f", "round": "1", "node": "us"}), meta()))
    assert (outcome.reason, outcome.detail) == (R.NOT_FINITE, "weights contain NaN or infinite values")
    assert [why for _, why, _ in refusals(h)] == [R.NOT_FINITE]


def test_weights_beyond_the_federations_bound_are_refused():
    h = FakeHub()
    outcome = record(h, h.upload("us", payload(1e6), meta()))  # a 1e6-scaled update
    assert (outcome.kind, outcome.reason) == (UpdateKind.REFUSED, R.OUT_OF_BOUNDS)
    assert outcome.detail == "a weight's magnitude exceeds the federation's bound of 10000"
    assert record(h, h.upload("us", payload(-1e4), meta(), attempt=2), attempt=2).kind is UpdateKind.RECORDED  # the bound itself is in


def test_the_weight_bound_is_the_federations_own():
    h = FakeHub(CONFIG.model_copy(update={"max_abs_weight": 2.0}))
    assert record(h, h.upload("us", payload(2.5), meta())).reason is R.OUT_OF_BOUNDS
    assert record(h, h.upload("us", payload(2.0), meta(), attempt=2), attempt=2).kind is UpdateKind.RECORDED


@pytest.mark.parametrize(("model", "n_features", "hidden", "fid", "node", "r"), [
    ("mlp", 3, (4,), "f", "us", 1), ("mlp", 64, (64, 32), "a-much-longer-federation-id", "node_with-long-name", 1000),
    ("logreg", 10, (), "x", "eu", 7), ("cnn", 64, (), "fed-cnn", "us", 12),
])
def test_the_size_bound_is_exactly_what_the_worker_writes(model, n_features, hidden, fid, node, r):
    spec = param_spec(model, n_features, 10, hidden)
    written = payload(0.25, node=node, r=r, fid=fid, spec=spec)
    assert admission.weights_size(spec, {"federation": fid, "round": str(r), "node": node}) == len(written)


def test_an_upload_bigger_than_the_workers_update_is_never_downloaded():
    h = FakeHub()
    exact = len(payload())
    limit = exact + admission.METADATA_SLACK + SEAL_OVERHEAD_MAX
    for size in (2**40, EAGER_DOWNLOAD_BYTES + 1, limit + 1):
        outcome = record(h, h.upload("us", payload(), meta(), size=size))
        assert (outcome.reason, outcome.detail) == (R.TOO_BIG, f"the upload is larger than this round's update (at most {limit} bytes)")
    assert h.gcs.downloads == []
    assert len(h.store.refusals("f", 1)) == 3  # one record per uploaded version: none overwritten


def test_an_upload_too_small_to_hold_the_tensors_is_never_downloaded():
    h = FakeHub()
    least = admission.weights_size(SPEC, {}) - 7 + SEAL_OVERHEAD_MIN
    small = weights.to_bytes({"dense_0.kernel": np.zeros((3, 4), np.float32)})
    outcome = record(h, h.upload("us", small, meta()))
    assert (outcome.reason, outcome.detail) == (R.TOO_SMALL, f"the upload is smaller than this round's update (at least {least} bytes)")
    assert record(h, h.upload("us", payload(), meta(), size=least - 1)).reason is R.TOO_SMALL
    assert h.gcs.downloads == []


def test_tensors_of_another_model_are_refused_naming_only_the_expected_tensors():
    h = FakeHub()
    params = {name: np.zeros(shape, np.float32) for name, (shape, _) in SPEC.items()}
    renamed = params | {"dense_1.bias": np.zeros((1,), np.float32), "secret-777": np.zeros((1,), np.float32)}
    assert record(h, h.upload("us", weights.to_bytes(renamed), meta())).detail == "tensor 'dense_1.bias' is not of this model's shape and dtype"
    extra = params | {"secret-777": np.zeros((1,), np.float32)}
    outcome = record(h, h.upload("us", weights.to_bytes(extra), meta(), attempt=2), attempt=2)
    assert (outcome.reason, outcome.detail) == (R.WRONG_SHAPE, "1 tensors this model does not have")
    assert all("777" not in message for _, _, message in refusals(h))


def test_a_big_model_is_downloaded_once_its_size_matches(monkeypatch):
    from shared.hub import recording

    monkeypatch.setattr(recording, "EAGER_DOWNLOAD_BYTES", 16)  # this model's updates are "big": read only after the size check
    h = FakeHub()
    assert record(h, h.upload("us", payload(0.5), meta())).kind is UpdateKind.RECORDED
    assert len(h.gcs.downloads) == 1


def test_an_evaluation_upload_keeps_a_small_cap():
    h = FakeHub(CONFIG.model_copy(update={"rounds": 1}), r=2)  # round 2 evaluates the final model
    body = json.dumps(GOOD_METRICS).encode()
    cap = admission.MAX_EVALUATION_BYTES + SEAL_OVERHEAD_MAX
    for size in (cap + 1, 2**40):
        outcome = record(h, h.upload("us", body, meta(), r=2, evaluate=True, size=size), r=2)
        assert (outcome.reason, outcome.detail) == (R.TOO_BIG, f"the upload is larger than this round's update (at most {cap} bytes)")
    assert record(h, h.upload("us", body, meta(), r=2, evaluate=True), r=2).kind is UpdateKind.RECORDED


def test_a_sealed_update_fits_the_size_bound_and_one_not_sealed_under_the_nodes_key_is_refused():
    h = FakeHub()
    sealed = h.upload("us", payload(0.5), meta())
    fed = h.store.federation("f")
    assert admission.size_refusal(fed, 1, "us", sealed.size) is None  # the bound allows what sealing adds
    plain = record(h, h.upload("us", payload(0.5) + b"\0" * SEAL_OVERHEAD_MIN, meta(), sealed=False))
    eu_key = h.gcs.bucket("hub").blob(update_object("f", 1, "us", 2, False))
    eu_key.upload_from_string(h.envelope("eu").seal(payload(0.5), "hub", eu_key.name, Purpose.UPDATE))  # us's update, eu's key
    foreign = record(h, RawObject("hub", eu_key.name, eu_key.generation, len(eu_key.download_as_bytes()), meta()), attempt=2)

    assert (plain.kind, plain.reason) == (UpdateKind.REFUSED, R.NOT_SEALED)
    assert (foreign.kind, foreign.reason, foreign.detail) == (UpdateKind.REFUSED, R.NOT_SEALED, "the update does not open under the node's key")
    assert record(h, h.upload("us", payload(0.5), meta(), attempt=3), attempt=3).kind is UpdateKind.RECORDED


def test_a_node_outside_the_federation_is_refused_and_recorded():
    h = FakeHub()
    outcome = record(h, h.upload("mars", payload(node="mars"), meta()), node="mars")
    assert (outcome.kind, outcome.reason) == (UpdateKind.REFUSED, R.NOT_A_MEMBER)
    assert refusals(h) == [("mars", R.NOT_A_MEMBER, "mars is not in federation f")]


def test_an_update_for_a_round_that_does_not_exist_is_refused_and_nothing_is_written():
    h = FakeHub()
    outcome = record(h, h.upload("us", payload(r=5), meta(), r=5), r=5)
    assert (outcome.kind, outcome.reason) == (UpdateKind.REFUSED, R.UNKNOWN_ROUND)
    assert h.store.refusals("f", 5) == [] and h.store.round("f", 5) is None


class TestSignatures:
    @pytest.fixture
    def signed(self):
        h = FakeHub(CONFIG.model_copy(update={"signed_updates": True}))
        key = Ed25519PrivateKey.generate()
        h.keys["us"] = signing.public_key_b64(key.public_key())
        return h, signing.LocalKeySigner(key)

    def upload(self, h, signer, examples: int = 40, claimed: int | None = None, data: bytes | None = None):
        data = data if data is not None else payload()
        claims = signing.update_claims(federation="f", round=1, node="us", attempt=1, examples=examples, metrics=GOOD_METRICS, payload=data)
        metadata = meta(str(claimed or examples)) | signing.signature_metadata(signer, claims)
        return h.upload("us", data, metadata)

    def test_an_update_signed_with_the_nodes_key_counts(self, signed):
        h, signer = signed
        assert record(h, self.upload(h, signer)).kind is UpdateKind.RECORDED

    def test_an_unsigned_update_is_refused(self, signed):
        h, _ = signed
        assert record(h, h.upload("us", payload(), meta())).reason is R.UNSIGNED

    def test_an_inflated_claim_breaks_the_signature(self, signed):
        h, signer = signed
        outcome = record(h, self.upload(h, signer, claimed=90))
        assert (outcome.reason, outcome.detail) == (R.BAD_SIGNATURE, "bad signature: not signed with us's registered key")

    def test_another_key_is_refused(self, signed):
        h, _ = signed
        assert record(h, self.upload(h, signing.LocalKeySigner(Ed25519PrivateKey.generate()))).reason is R.BAD_SIGNATURE

    def test_a_node_without_a_registered_key_is_refused(self, signed):
        h, signer = signed
        del h.keys["us"]
        assert record(h, self.upload(h, signer)).detail == "node us has no registered signing key"

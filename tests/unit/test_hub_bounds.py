"""shared.hub: what a node's upload may claim, and how big it may be, before it counts.

A node and its uploads may be hostile: every claim (example count, metrics) is typed and
bounded, tensors must be finite, and an upload of the wrong size is never downloaded.
Each refusal is recorded in the round's `late` collection with a reason that never
quotes the value.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from unittest.mock import MagicMock

import numpy as np
import pytest

from shared import hub, weights
from shared.federation import FederationConfig, FedNode
from shared.ingest import RawObject
from shared.model_spec import param_spec

pytestmark = pytest.mark.unit

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
CONFIG = FederationConfig(id="f", nodes=[FedNode(name="us", dataset="d"), FedNode(name="eu", dataset="d")], hidden=(4,),
                          signed_updates=False)
FED = {"config": CONFIG.model_dump(mode="json"), "status": "running", "round": 1, "n_features": 3, "num_classes": 2,
       "node_rows": {"us": 100, "eu": 50}, "stats": {"count": 150}}
SPEC = param_spec("mlp", 3, 2, (4,))
GOOD_METRICS = {"global_accuracy": 0.5, "global_loss": 0.7, "test_examples": 20, "train_loss": 0.6, "train_accuracy": 0.6,
                "compute_s": 0.25}


def payload(fill: float = 0.0) -> bytes:
    return weights.to_bytes({name: np.full(shape, fill, np.float32) for name, (shape, _) in SPEC.items()}, {"node": "us"})


def meta(examples="40", **metrics) -> dict[str, str]:
    return {"examples": examples, "metrics": json.dumps(GOOD_METRICS | metrics)}


class Snap:
    def __init__(self, doc: dict | None):
        self.doc, self.exists = doc, doc is not None

    def to_dict(self):
        return self.doc

    def get(self, key):
        return self.doc[key]


class Hub:
    """record_update against in-memory documents: what it read, downloaded and recorded."""

    def __init__(self, monkeypatch, data: bytes, kind: str = "train", fed: dict = FED):
        self.svc, self.data, self.downloads = MagicMock(), data, 0
        self.updates, self.late, self.marker = MagicMock(), MagicMock(), MagicMock()
        round_doc = {"round": 1, "kind": kind, "status": "open", "expected": ["us", "eu"]}
        monkeypatch.setattr(hub, "_round_parts", lambda svc, fid, r: (self.updates, self.late, self.marker))
        monkeypatch.setattr(hub, "get_documents", lambda svc, *refs: [Snap(round_doc), Snap(None), Snap(None), Snap(fed), Snap(None)])
        monkeypatch.setattr(hub, "_advance", lambda *a, **k: ("round 1: 1 of 2 reported", None))

        def download(**kwargs):
            self.downloads += 1
            return self.data

        self.svc.gcs.bucket.return_value.blob.return_value.download_as_bytes.side_effect = download

    def record(self, metadata: dict, size: int | None = None) -> str:
        obj = RawObject("hub", "updates/us/f/round-0001-a1.safetensors", 7, len(self.data) if size is None else size, metadata)
        return hub.record_update(self.svc, obj, "f", 1, "us", 1, NOW)

    @property
    def refusals(self) -> list[dict]:
        return [c.args[0] for c in self.late.document.return_value.set.call_args_list]


def test_a_good_update_is_counted(monkeypatch):
    h = Hub(monkeypatch, payload(0.5))
    assert h.record(meta()) == "recorded; round 1: 1 of 2 reported"
    (counted,), _ = h.updates.document.return_value.create.call_args
    assert (counted["examples"], counted["metrics"]) == (40, GOOD_METRICS)
    assert h.refusals == []


@pytest.mark.parametrize(("examples", "test_examples", "reason"), [
    ("101", 20, "examples claimed exceed the 100 rows of us's data set"),
    ("40", 101, "examples claimed exceed the 100 rows of us's data set"),
    ("4611686018427387904", 20, "examples must be a whole number from 1 to 1000000000"),  # 2**62
    ("0", 20, "examples must be a whole number from 1 to 1000000000"),
    ("-5", 20, "examples must be a whole number from 1 to 1000000000"),
    ("1e3", 20, "examples must be a whole number from 1 to 1000000000"),
    ("9" * 5000, 20, "examples must be a whole number from 1 to 1000000000"),
])
def test_an_example_count_beyond_the_nodes_data_is_refused_and_recorded(monkeypatch, examples, test_examples, reason):
    h = Hub(monkeypatch, payload())
    assert h.record(meta(examples, test_examples=test_examples)) == f"refused: {reason}"
    assert [(r["node"], r["refused"]) for r in h.refusals] == [("us", reason)]
    h.updates.document.return_value.create.assert_not_called()


def test_without_per_node_rows_the_merged_count_bounds_the_claim(monkeypatch):
    fed = {k: v for k, v in FED.items() if k != "node_rows"}  # a federation document from before node_rows
    h = Hub(monkeypatch, payload(), fed=fed)
    assert h.record(meta("151")) == "refused: examples claimed exceed the 150 rows of us's data set"
    assert h.record(meta("150", test_examples=30)).startswith("recorded")


@pytest.mark.parametrize(("metrics_text", "reason"), [
    (json.dumps([1, 2, 3]), "metrics metadata is not a JSON object"),
    ("[" * 2000 + "]" * 2000, "metrics metadata is not JSON"),
    ("{", "metrics metadata is not JSON"),
    (json.dumps(GOOD_METRICS | {"pad": "x" * 5000}), "metrics metadata exceeds 4096 characters"),
    (json.dumps({"global_accuracy": 0.5}), "metrics lack ['global_loss', 'test_examples']"),
    (json.dumps(GOOD_METRICS | {"test_examples": 1e9}), "metrics out of range or of the wrong type: test_examples"),
    (json.dumps(GOOD_METRICS | {"test_examples": 10**12}), "metrics out of range or of the wrong type: test_examples"),
    (json.dumps(GOOD_METRICS | {"test_examples": True}), "metrics out of range or of the wrong type: test_examples"),
    (json.dumps(GOOD_METRICS | {"test_examples": "20"}), "metrics out of range or of the wrong type: test_examples"),
    (json.dumps(GOOD_METRICS | {"global_accuracy": 1.5}), "metrics out of range or of the wrong type: global_accuracy"),
    (json.dumps(GOOD_METRICS | {"global_loss": -1.0}), "metrics out of range or of the wrong type: global_loss"),
    (json.dumps(GOOD_METRICS | {"global_loss": float("nan")}), "metrics out of range or of the wrong type: global_loss"),
    (json.dumps(GOOD_METRICS | {"train_loss": float("inf")}), "metrics out of range or of the wrong type: train_loss"),
    (json.dumps(GOOD_METRICS | {"train_accuracy": [0.5]}), "metrics out of range or of the wrong type: train_accuracy"),
    (json.dumps(GOOD_METRICS | {"secret-777": 1}), "metrics out of range or of the wrong type: an unknown metric"),
])
def test_malformed_metrics_are_refused_and_recorded_without_their_values(monkeypatch, metrics_text, reason):
    h = Hub(monkeypatch, payload())
    assert h.record({"examples": "40", "metrics": metrics_text}) == f"refused: {reason}"
    [refusal] = h.refusals
    assert refusal["refused"] == reason and refusal["metrics"] is None and refusal["examples"] is None
    assert "777" not in reason and "1.5" not in reason
    assert h.downloads == 0  # refused on its claims: never read
    h.updates.document.return_value.create.assert_not_called()


def test_a_training_update_without_training_metrics_is_refused(monkeypatch):
    h = Hub(monkeypatch, payload())
    metrics = {k: v for k, v in GOOD_METRICS.items() if k != "train_loss"}
    assert h.record({"examples": "40", "metrics": json.dumps(metrics)}) == "refused: metrics lack ['train_loss']"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_with_nan_or_inf_are_refused_and_recorded(monkeypatch, bad):
    params = {name: np.zeros(shape, np.float32) for name, (shape, _) in SPEC.items()}
    params["dense_0.kernel"][1, 2] = bad
    h = Hub(monkeypatch, weights.to_bytes(params))
    assert h.record(meta()) == "refused: weights contain NaN or infinite values"
    assert [r["refused"] for r in h.refusals] == ["weights contain NaN or infinite values"]
    h.updates.document.return_value.create.assert_not_called()


def test_an_upload_too_big_for_the_model_is_never_downloaded(monkeypatch):
    h = Hub(monkeypatch, payload())
    tensors = sum(int(np.prod(shape)) * 4 for shape, _ in SPEC.values())
    reason = f"the upload's size is not that of this round's update (at most {tensors + hub.HEADER_ALLOWANCE} bytes)"
    for size in (2**40, hub.EAGER_DOWNLOAD_BYTES + 1):
        assert h.record(meta(), size=size) == f"refused: {reason}"
    assert h.downloads == 0
    assert [r["refused"] for r in h.refusals] == [reason, reason]


def test_an_upload_smaller_than_the_model_is_read_and_refused_by_the_tensor_check(monkeypatch):
    h = Hub(monkeypatch, weights.to_bytes({"dense_0.kernel": np.zeros((3, 4), np.float32)}))
    assert h.record(meta()) == "refused: missing tensor 'dense_0.bias'"
    assert h.record(meta(), size=0) == "refused: the upload's size is not that of this round's update (at most 65640 bytes)"
    h.updates.document.return_value.create.assert_not_called()


def test_a_big_model_is_downloaded_once_its_size_matches(monkeypatch):
    monkeypatch.setattr(hub, "EAGER_DOWNLOAD_BYTES", 16)  # this model's updates are "big": read only after the size check
    h = Hub(monkeypatch, payload(0.5))
    assert h.record(meta()).startswith("recorded")
    assert h.downloads == 1


def test_an_evaluation_upload_is_bounded_too(monkeypatch):
    h = Hub(monkeypatch, json.dumps(GOOD_METRICS).encode(), kind="evaluate")
    for size in (hub.MAX_EVALUATION_BYTES + 1, 2**40):
        assert h.record(meta(), size=size) == "refused: the upload's size is not that of this round's update (at most 65536 bytes)"
    assert h.downloads <= 1  # only the first, small enough to read alongside the documents
    assert h.record(meta()).startswith("recorded")


def test_per_node_rows_are_stored_when_the_federation_starts(monkeypatch):
    from shared.datasets import FeatureStats

    stats = {"us": FeatureStats(count=100, mean=[0.0] * 3, m2=[1.0] * 3, label_counts=[50, 50]),
             "eu": FeatureStats(count=50, mean=[1.0] * 3, m2=[1.0] * 3, label_counts=[25, 25])}
    spec = {"features": ["a", "b", "c"], "num_classes": 2}
    snaps = {node: Snap({"status": "complete", "spec": spec, "stats": s.model_dump(), "version": "v1"}) for node, s in stats.items()}
    monkeypatch.setattr(hub.DatasetSpec, "model_validate", classmethod(lambda cls, v: MagicMock(features=v["features"], num_classes=2)))
    monkeypatch.setattr(hub, "get_documents", lambda svc, *refs: [snaps["us"], snaps["eu"]])
    config = CONFIG.model_copy(update={"signed_updates": False})
    *_, rows = hub._node_inputs(MagicMock(), config)
    assert rows == {"us": 100, "eu": 50}

"""shared.federation: the federation config and the round protocol's pure decisions.

Also pins that shared.model_spec (what the hub demands of an update) agrees with the
params workers/trainer/models.py builds, and fed_demo's Dirichlet label-skew split.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from pydantic import ValidationError

from fedpipe.fed_demo import dirichlet_split
from shared.federation import (
    REQUEST_PATH,
    UPDATE_PATH,
    FederationConfig,
    FedNode,
    RoundStatus,
    close_decision,
    global_model_object,
    round_key,
    server_state_object,
    update_object,
    weighted_metrics,
)
from shared.fedstore import Round
from shared.jobs import TrainSpec
from shared.model_spec import param_spec
from shared.privacy import PrivacyConfig
from shared.weights import spec_of

pytestmark = pytest.mark.unit

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def nodes(*names: str) -> list[FedNode]:
    return [FedNode(name=n, dataset=f"ds-{n}") for n in names]


def config(**overrides) -> FederationConfig:
    fields = {"id": "fed-1", "nodes": nodes("us", "eu", "asia")} | overrides
    return FederationConfig(**fields)


# --- FederationConfig -------------------------------------------------------------


class TestConfigValidation:
    @pytest.mark.parametrize("fid", ["fed-1", "a", "0abc", "a" * 63, "x-y-z-9"])
    def test_good_ids(self, fid):
        assert config(id=fid).id == fid

    @pytest.mark.parametrize(
        "fid",
        ["Fed", "FED-1", "fed 1", " fed", "fed_1", "fed.1", "-fed", "", "a" * 64, "fed/1", "fédé"],
    )
    def test_bad_ids_refused(self, fid):
        with pytest.raises(ValidationError, match="federation id"):
            config(id=fid)

    def test_duplicate_node_names_refused(self):
        with pytest.raises(ValidationError, match="listed twice"):
            config(nodes=[FedNode(name="us", dataset="a"), FedNode(name="eu", dataset="b"), FedNode(name="us", dataset="c")])

    def test_same_dataset_on_different_nodes_is_fine(self):
        cfg = config(nodes=[FedNode(name="us", dataset="d"), FedNode(name="eu", dataset="d")])
        assert cfg.node_names == ["us", "eu"]

    def test_no_nodes_refused(self):
        with pytest.raises(ValidationError):
            config(nodes=[])

    def test_min_nodes_above_node_count_refused(self):
        with pytest.raises(ValidationError, match="min_nodes=4 exceeds the 3 nodes"):
            config(min_nodes=4)

    def test_min_nodes_zero_refused(self):
        with pytest.raises(ValidationError):
            config(min_nodes=0)

    def test_min_nodes_equal_to_node_count_allowed(self):
        assert config(min_nodes=3).quorum == 3

    @pytest.mark.parametrize("mu", [0.0])
    def test_fedprox_needs_positive_mu(self, mu):
        with pytest.raises(ValidationError, match="fedprox needs prox_mu > 0"):
            config(strategy="fedprox", prox_mu=mu)

    def test_negative_mu_refused(self):
        with pytest.raises(ValidationError):
            config(strategy="fedprox", prox_mu=-0.1)

    def test_fedprox_with_mu_allowed(self):
        assert config(strategy="fedprox", prox_mu=0.01).prox_mu == 0.01

    def test_unknown_strategy_and_model_refused(self):
        with pytest.raises(ValidationError):
            config(strategy="fedsgd")
        with pytest.raises(ValidationError):
            config(model="resnet")

    @pytest.mark.parametrize("field,value", [("rounds", 0), ("rounds", 1001), ("local_epochs", 0), ("batch_size", 0),
                                             ("learning_rate", 0), ("test_fraction", 0), ("test_fraction", 1),
                                             ("round_deadline_s", 0), ("max_attempts", 0), ("lease_seconds", 0),
                                             ("server_lr", 0)])
    def test_field_bounds(self, field, value):
        with pytest.raises(ValidationError):
            config(**{field: value})

    @pytest.mark.parametrize("field,value", [
        ("round_deadline_s", math.inf), ("round_deadline_s", 1e12), ("round_deadline_s", 86400.5),
        ("lease_seconds", math.inf), ("lease_seconds", 1e12), ("learning_rate", math.inf),
        ("server_lr", math.inf), ("server_lr", 1e12), ("prox_mu", math.inf),
        ("max_attempts", 10**9), ("batch_size", 10**9), ("seed", -1), ("seed", 2**64),
        ("hidden", (64, -1)), ("hidden", (0,)), ("hidden", (10**6,)), ("hidden", (4,) * 9),
    ])
    def test_unbounded_or_non_finite_values_refused(self, field, value):
        with pytest.raises(ValidationError):
            config(**{field: value})

    @pytest.mark.parametrize("field,value", [
        ("trim_fraction", -0.1), ("trim_fraction", 0.5), ("trim_fraction", math.nan),
        ("clip_norm", 0), ("clip_norm", -1.0), ("clip_norm", math.inf), ("clip_norm", 1e13),
        ("max_abs_weight", 0), ("max_abs_weight", math.inf), ("max_abs_weight", 1e13),
    ])
    def test_admission_and_robustness_options_are_bounded(self, field, value):
        with pytest.raises(ValidationError):
            config(**{field: value})

    def test_robust_strategies_and_their_defaults(self):
        cfg = config(strategy="trimmed_mean", trim_fraction=0.49, clip_norm=5.0)
        assert (cfg.strategy, cfg.trim_fraction, cfg.clip_norm, cfg.max_abs_weight) == ("trimmed_mean", 0.49, 5.0, 1e4)
        assert config(strategy="median").clip_norm is None

    def test_bounds_admit_their_limits(self):
        cfg = config(round_deadline_s=86400, lease_seconds=3600, hidden=(4096,) * 8, max_attempts=100, learning_rate=10, server_lr=10)
        assert (cfg.round_deadline_s, cfg.hidden, cfg.max_attempts) == (86400.0, (4096,) * 8, 100)

    def test_infinite_deadline_in_json_refused(self):
        doc = '{"id": "f", "nodes": [{"name": "us", "dataset": "d"}], "round_deadline_s": Infinity}'
        with pytest.raises(ValidationError):
            FederationConfig.model_validate_json(doc)

    def test_node_count_and_names_bounded(self):
        with pytest.raises(ValidationError):
            config(nodes=nodes(*(f"n{i}" for i in range(1001))))
        with pytest.raises(ValidationError):
            FedNode(name="a" * 64, dataset="d")
        with pytest.raises(ValidationError):
            FedNode(name="a", dataset="d" * 201)

    def test_config_is_frozen(self):
        cfg = config()
        with pytest.raises(ValidationError):
            cfg.rounds = 3

    def test_privacy_is_off_by_default_and_round_trips_through_json(self):
        assert config().privacy is None
        doc = '{"id": "f", "nodes": [{"name": "us", "dataset": "d"}], "privacy": {"clip_norm": 0.5, "noise_multiplier": 1.1}}'
        cfg = FederationConfig.model_validate_json(doc)
        assert cfg.privacy == PrivacyConfig(clip_norm=0.5, noise_multiplier=1.1, delta=1e-5)
        assert FederationConfig.model_validate_json(cfg.model_dump_json()) == cfg

    @pytest.mark.parametrize("strategy", ["median", "trimmed_mean"])
    def test_privacy_needs_a_mean_strategy(self, strategy):
        with pytest.raises(ValidationError, match=f"strategy {strategy} takes no mean: use fedavg, fedprox, fedadam or fedyogi"):
            config(strategy=strategy, privacy={"clip_norm": 1.0, "noise_multiplier": 1.0})

    @pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedyogi"])
    def test_privacy_with_the_mean_strategies(self, strategy):
        assert config(strategy=strategy, privacy={"clip_norm": 1.0, "noise_multiplier": 1.0}).privacy.clip_norm == 1.0

    def test_privacy_clips_on_its_own(self):
        with pytest.raises(ValidationError, match="leave clip_norm unset"):
            config(clip_norm=1.0, privacy={"clip_norm": 1.0, "noise_multiplier": 1.0})

    @pytest.mark.parametrize("privacy", [{"clip_norm": 1.0}, {"clip_norm": 1.0, "noise_multiplier": 1e3}, {"noise": 1.0, "clip_norm": 1.0}])
    def test_privacy_settings_are_complete_and_bounded(self, privacy):
        with pytest.raises(ValidationError):
            config(privacy=privacy)


class TestConfigDerived:
    def test_quorum_defaults_to_node_count(self):
        assert config().min_nodes is None
        assert config().quorum == 3
        assert config(nodes=nodes("solo")).quorum == 1

    def test_quorum_from_min_nodes(self):
        assert config(min_nodes=2).quorum == 2
        assert config(min_nodes=1).quorum == 1

    def test_node_names_in_declared_order(self):
        assert config().node_names == ["us", "eu", "asia"]
        assert config(nodes=nodes("z", "a", "m")).node_names == ["z", "a", "m"]

    def test_train_spec_carries_local_training_settings(self):
        cfg = config(model="cnn", hidden=(32, 16), local_epochs=5, batch_size=17, learning_rate=0.05, seed=42,
                     test_fraction=0.3)
        spec = cfg.train_spec()
        assert isinstance(spec, TrainSpec)
        assert spec == TrainSpec(model="cnn", hidden=(32, 16), epochs=5, batch_size=17, learning_rate=0.05, seed=42,
                                 test_fraction=0.3, prox_mu=0.0)
        assert spec.epochs == 5  # local_epochs, not rounds
        assert spec.epochs != cfg.rounds

    def test_train_spec_defaults(self):
        spec = config().train_spec()
        assert (spec.model, spec.hidden, spec.epochs, spec.batch_size, spec.learning_rate, spec.seed, spec.test_fraction,
                spec.prox_mu) == ("mlp", (64,), 2, 32, 3e-3, 0, 0.2, 0.0)

    def test_prox_mu_only_for_fedprox(self):
        assert config(strategy="fedprox", prox_mu=0.25).train_spec().prox_mu == 0.25
        # Set but not used: every other strategy trains plainly on the node.
        for strategy in ("fedavg", "fedadam", "fedyogi"):
            assert config(strategy=strategy, prox_mu=0.25).train_spec().prox_mu == 0.0


# --- object names -----------------------------------------------------------------


class TestObjectNames:
    @pytest.mark.parametrize("r,key", [(0, "0000"), (1, "0001"), (42, "0042"), (999, "0999"), (1001, "1001"), (9999, "9999")])
    def test_round_key_zero_padding(self, r, key):
        assert round_key(r) == key

    def test_round_keys_sort_like_rounds(self):
        rounds = [1, 2, 9, 10, 11, 100, 1001]
        assert sorted(round_key(r) for r in rounds) == [round_key(r) for r in rounds]

    def test_update_object_names(self):
        assert update_object("fed-1", 3, "us", 1, evaluate=False) == "updates/us/fed-1/round-0003-a1.safetensors"
        assert update_object("fed-1", 11, "eu", 2, evaluate=True) == "updates/eu/fed-1/round-0011-a2.json"

    @pytest.mark.parametrize(
        "fid,r,node,attempt,evaluate",
        [
            ("fed-1", 1, "us", 1, False),
            ("fed-1", 11, "eu", 3, True),
            ("x", 1000, "node_7", 12, False),
            ("a" * 63, 1001, "EU-West", 1, True),
            ("f", 5, "node-a1", 2, False),  # a node name that itself ends like an attempt suffix
            ("9", 2, "a", 10, True),
        ],
    )
    def test_update_path_round_trip(self, fid, r, node, attempt, evaluate):
        m = UPDATE_PATH.match(update_object(fid, r, node, attempt, evaluate))
        assert m is not None
        assert m["fid"] == fid
        assert int(m["round"]) == r
        assert m["node"] == node
        assert int(m["attempt"]) == attempt
        assert m["kind"] == ("json" if evaluate else "safetensors")

    @pytest.mark.parametrize(
        "name",
        [
            "federations/x/global/round-0001.safetensors",
            "federations/x/global/server-state-0001.safetensors",
            "requests/x.json",
            "federations/x/round-0001/us-a1.json",  # the old layout: no per-node prefix
            "updates/us/x/round-0001-a1.npz",
            "updates/us/x/round-0001.safetensors",  # no attempt
            "updates/us/x/round-0001-a.json",
            "updates/us/x/round-0001-a0.json",  # attempts start at 1
            "updates/us/x/round-0001-a1000.json",  # beyond any attempt a job may make
            f"updates/us/x/round-0001-a{'9' * 5000}.json",
            f"updates/{'n' * 64}/x/round-0001-a1.json",  # longer than a node name may be
            f"updates/us/{'f' * 64}/round-0001-a1.json",
            "updates/us/x/round-1-a1.json",  # round not padded
            "updates/us/x/round-00001-a1.json",
            "updates/us/X/round-0001-a1.json",  # upper-case federation id
            "updates/us/x/sub/round-0001-a1.json",
            "updates/u.s/x/round-0001-a1.json",
            "other/updates/us/x/round-0001-a1.json",
            "updates/x/round-0001-a1.json",  # no node
            "update/us/x/round-0001-a1.json",
            "updates/us/x/round-0001-a1.json.tmp",
            "updates/us//round-0001-a1.json",
            "",
        ],
    )
    def test_update_path_refuses_other_objects(self, name):
        assert UPDATE_PATH.match(name) is None

    def test_global_objects_are_not_updates(self):
        for r in (0, 1, 10, 1001):
            assert UPDATE_PATH.match(global_model_object("fed-1", r)) is None
            assert UPDATE_PATH.match(server_state_object("fed-1", r)) is None
            assert REQUEST_PATH.match(global_model_object("fed-1", r)) is None

    def test_global_model_and_server_state_names(self):
        assert global_model_object("fed-1", 0) == "federations/fed-1/global/round-0000.safetensors"
        assert global_model_object("fed-1", 12) == "federations/fed-1/global/round-0012.safetensors"
        assert server_state_object("fed-1", 7) == "federations/fed-1/global/server-state-0007.safetensors"
        assert global_model_object("fed-1", 7) != server_state_object("fed-1", 7)

    @pytest.mark.parametrize("fid", ["fed-1", "x", "0-0", "a" * 63])
    def test_request_path_matches(self, fid):
        m = REQUEST_PATH.match(f"requests/{fid}.json")
        assert m is not None and m["fid"] == fid

    @pytest.mark.parametrize(
        "name",
        ["requests/Fed.json", "requests/x.yaml", "requests/x.json.bak", "requests/a/b.json", "requests/.json",
         "other/requests/x.json", "updates/us/x/round-0001-a1.json", "requests/x_y.json"],
    )
    def test_request_path_refuses(self, name):
        assert REQUEST_PATH.match(name) is None

    def test_update_path_refuses_trailing_newline(self):
        assert UPDATE_PATH.match("updates/us/x/round-0001-a1.json\n") is None

    def test_request_path_refuses_trailing_newline(self):
        assert REQUEST_PATH.match("requests/x.json\n") is None

    def test_id_refuses_trailing_newline(self):
        with pytest.raises(ValidationError):
            config(id="fed\n")

    @pytest.mark.parametrize("name", ["eu.west", "eu west", "eu/west", "eu\n"])
    def test_node_names_the_hub_could_not_read_back_are_refused(self, name):
        with pytest.raises(ValidationError):
            config(nodes=nodes(name, "us"))


# --- rounds -----------------------------------------------------------------------


class TestNewRound:
    def test_train_rounds_then_one_evaluate_round(self):
        cfg = config(rounds=3)
        assert [Round.opened(cfg, r, T0).kind for r in (1, 2, 3, 4)] == ["train", "train", "train", "evaluate"]

    def test_single_round_federation(self):
        cfg = config(rounds=1)
        assert Round.opened(cfg, 1, T0).kind == "train"
        assert Round.opened(cfg, 2, T0).kind == "evaluate"

    def test_round_document(self):
        cfg = config(rounds=5, round_deadline_s=90.5)
        doc = Round.opened(cfg, 2, T0).to_doc()
        assert doc == {
            "round": 2,
            "kind": "train",
            "status": "open",
            "expected": ["us", "eu", "asia"],
            "opened_at": T0,
            "deadline_at": T0 + timedelta(seconds=90.5),
        }
        assert doc["status"] == RoundStatus.OPEN
        assert doc["deadline_at"] - doc["opened_at"] == timedelta(seconds=90.5)

    def test_expected_is_a_fresh_list(self):
        cfg = config()
        doc = Round.opened(cfg, 1, T0).to_doc()
        doc["expected"].append("intruder")
        assert cfg.node_names == ["us", "eu", "asia"]


def open_round(expected=("us", "eu", "asia"), deadline_s: float = 600.0, r: int = 4, status: str = "open") -> Round:
    return Round(round=r, kind="train", status=status, expected=list(expected), opened_at=T0, deadline_at=T0 + timedelta(seconds=deadline_s))


BEFORE = T0 + timedelta(seconds=10)
DEADLINE = T0 + timedelta(seconds=600)
AFTER = T0 + timedelta(seconds=601)


class TestCloseDecision:
    def test_all_reported_closes_before_the_deadline(self):
        assert close_decision(open_round(), ["us", "eu", "asia"], 3, BEFORE) == (RoundStatus.CLOSED, "all 3 nodes reported")

    def test_all_reported_in_any_order_even_with_low_quorum(self):
        assert close_decision(open_round(), ["asia", "us", "eu"], 1, T0) == (RoundStatus.CLOSED, "all 3 nodes reported")

    def test_all_reported_after_the_deadline_is_still_all(self):
        assert close_decision(open_round(), ["us", "eu", "asia"], 3, AFTER) == (RoundStatus.CLOSED, "all 3 nodes reported")

    @pytest.mark.parametrize("reported", [[], ["us"], ["us", "eu"]])
    def test_waits_before_the_deadline(self, reported):
        assert close_decision(open_round(), reported, 1, BEFORE) is None

    def test_waits_one_microsecond_before_the_deadline(self):
        assert close_decision(open_round(), ["us", "eu"], 2, DEADLINE - timedelta(microseconds=1)) is None

    def test_quorum_after_the_deadline_closes(self):
        decision = close_decision(open_round(), ["us", "asia"], 2, AFTER)
        assert decision == (RoundStatus.CLOSED, "deadline passed with 2 of 3 nodes (quorum 2)")
        assert "2 of 3" in decision[1] and "quorum 2" in decision[1]

    def test_above_quorum_after_the_deadline_closes(self):
        assert close_decision(open_round(), ["eu", "us"], 1, AFTER) == (
            RoundStatus.CLOSED, "deadline passed with 2 of 3 nodes (quorum 1)")

    def test_below_quorum_after_the_deadline_fails(self):
        decision = close_decision(open_round(r=7), ["us"], 2, AFTER)
        assert decision == (RoundStatus.FAILED, "round 7: 1 of 3 nodes reported by the deadline; quorum is 2")
        assert "quorum is 2" in decision[1]

    def test_nobody_after_the_deadline_fails(self):
        assert close_decision(open_round(r=1), [], 1, AFTER) == (
            RoundStatus.FAILED, "round 1: 0 of 3 nodes reported by the deadline; quorum is 1")

    def test_exactly_at_the_deadline_counts_as_passed(self):
        # `now < deadline_at` keeps waiting, so now == deadline_at decides.
        assert close_decision(open_round(), ["us", "eu"], 2, DEADLINE) == (
            RoundStatus.CLOSED, "deadline passed with 2 of 3 nodes (quorum 2)")
        assert close_decision(open_round(), ["us"], 2, DEADLINE)[0] == RoundStatus.FAILED

    def test_unexpected_reporters_are_not_counted(self):
        # Three names reported, but only one of them is expected.
        assert close_decision(open_round(), ["us", "mars", "venus"], 3, BEFORE) is None
        assert close_decision(open_round(), ["us", "mars", "venus"], 2, AFTER) == (
            RoundStatus.FAILED, "round 4: 1 of 3 nodes reported by the deadline; quorum is 2")

    def test_duplicates_are_not_double_counted(self):
        assert close_decision(open_round(), ["us", "us", "us"], 3, BEFORE) is None
        assert close_decision(open_round(), ["us", "us", "eu", "eu"], 3, AFTER) == (
            RoundStatus.FAILED, "round 4: 2 of 3 nodes reported by the deadline; quorum is 3")
        assert close_decision(open_round(), ["us", "us", "eu", "asia", "asia"], 3, BEFORE) == (
            RoundStatus.CLOSED, "all 3 nodes reported")

    @pytest.mark.parametrize("status", ["closed", "failed", RoundStatus.CLOSED, RoundStatus.FAILED])
    def test_round_not_open_is_left_alone(self, status):
        rd = open_round(status=status)
        assert close_decision(rd, ["us", "eu", "asia"], 1, AFTER) is None
        assert close_decision(rd, [], 3, AFTER) is None

    def test_enum_status_open_is_open(self):
        assert close_decision(open_round(status=RoundStatus.OPEN), ["us", "eu", "asia"], 3, T0) == (
            RoundStatus.CLOSED, "all 3 nodes reported")

    def test_works_on_a_new_round_document(self):
        cfg = config(min_nodes=2, round_deadline_s=30)
        rd = Round.opened(cfg, 1, T0)
        assert close_decision(rd, ["us", "eu"], cfg.quorum, T0 + timedelta(seconds=29)) is None
        assert close_decision(rd, ["us", "eu"], cfg.quorum, T0 + timedelta(seconds=30)) == (
            RoundStatus.CLOSED, "deadline passed with 2 of 3 nodes (quorum 2)")


# --- metrics ----------------------------------------------------------------------


def update(examples: int, **metrics) -> dict:
    return {"examples": examples, "metrics": metrics}


class TestWeightedMetrics:
    def test_global_weighs_by_test_examples(self):
        updates = {
            "us": update(1000, global_accuracy=0.9, global_loss=0.2, test_examples=10),
            "eu": update(1, global_accuracy=0.5, global_loss=1.0, test_examples=30),
        }
        out = weighted_metrics(updates, "global_")
        # (0.9*10 + 0.5*30) / 40, (0.2*10 + 1.0*30) / 40; training examples play no part.
        assert out == pytest.approx({"examples": 40.0, "accuracy": 0.6, "loss": 0.8})

    def test_train_weighs_by_update_examples(self):
        updates = {
            "us": update(100, train_accuracy=0.8, train_loss=0.4, test_examples=999),
            "eu": update(300, train_accuracy=0.4, train_loss=1.2, test_examples=1),
        }
        out = weighted_metrics(updates, "train_")
        # (0.8*100 + 0.4*300) / 400, (0.4*100 + 1.2*300) / 400
        assert out == pytest.approx({"examples": 400.0, "accuracy": 0.5, "loss": 1.0})

    def test_three_nodes_hand_computed(self):
        updates = {
            "a": update(50, train_accuracy=0.2, train_loss=2.0),
            "b": update(25, train_accuracy=0.6, train_loss=1.0),
            "c": update(25, train_accuracy=1.0, train_loss=0.0),
        }
        out = weighted_metrics(updates, "train_")
        assert out["examples"] == 100.0
        assert out["accuracy"] == pytest.approx((0.2 * 50 + 0.6 * 25 + 1.0 * 25) / 100)  # 0.5
        assert out["loss"] == pytest.approx((2.0 * 50 + 1.0 * 25) / 100)  # 1.25

    def test_updates_without_train_metrics_are_skipped(self):
        updates = {
            "us": update(100, train_accuracy=0.8, train_loss=0.4, global_accuracy=0.1, global_loss=9.0, test_examples=10),
            "eu": update(300, global_accuracy=0.7, global_loss=0.3, test_examples=30),  # an evaluate-round update
        }
        assert weighted_metrics(updates, "train_") == pytest.approx({"examples": 100.0, "accuracy": 0.8, "loss": 0.4})
        assert weighted_metrics(updates, "global_") == pytest.approx(
            {"examples": 40.0, "accuracy": (0.1 * 10 + 0.7 * 30) / 40, "loss": (9.0 * 10 + 0.3 * 30) / 40})

    def test_no_reporting_updates_gives_nan(self):
        updates = {"eu": update(300, global_accuracy=0.7, global_loss=0.3, test_examples=30)}
        out = weighted_metrics(updates, "train_")
        assert out["examples"] == 0.0
        assert math.isnan(out["accuracy"]) and math.isnan(out["loss"])
        empty = weighted_metrics({}, "global_")
        assert empty["examples"] == 0.0 and math.isnan(empty["accuracy"]) and math.isnan(empty["loss"])

    def test_zero_weight_total_gives_nan_not_zero_division(self):
        out = weighted_metrics({"us": update(0, train_accuracy=1.0, train_loss=0.0)}, "train_")
        assert out["examples"] == 0.0 and math.isnan(out["accuracy"])

    def test_examples_is_a_float(self):
        out = weighted_metrics({"us": update(7, train_accuracy=1.0, train_loss=0.5)}, "train_")
        assert out == {"examples": 7.0, "accuracy": 1.0, "loss": 0.5}
        assert isinstance(out["examples"], float)


# --- model spec vs the trainer's params --------------------------------------------


@pytest.mark.parametrize(
    "model,n_features,n_classes,hidden",
    [
        ("logreg", 64, 10, (64,)),  # hidden ignored
        ("logreg", 64, 10, ()),
        ("mlp", 64, 10, (64,)),
        ("mlp", 64, 10, (32, 16)),
        ("mlp", 4, 3, ()),
        ("cnn", 64, 10, (64,)),  # 8x8
        ("cnn", 784, 10, (64,)),  # 28x28
        ("cnn", 49, 2, ()),  # 7x7: odd sides pool with 'SAME' (ceil)
    ],
)
def test_param_spec_matches_trainer_init(model, n_features, n_classes, hidden):
    from workers.trainer.models import init_params

    assert param_spec(model, n_features, n_classes, hidden) == spec_of(init_params(model, n_features, n_classes, hidden, seed=0))


def test_param_spec_known_shapes():
    assert param_spec("logreg", 64, 10, (64,)) == {"dense_0.kernel": ((64, 10), "float32"), "dense_0.bias": ((10,), "float32")}
    assert param_spec("mlp", 64, 10, (32, 16)) == {
        "dense_0.kernel": ((64, 32), "float32"), "dense_0.bias": ((32,), "float32"),
        "dense_1.kernel": ((32, 16), "float32"), "dense_1.bias": ((16,), "float32"),
        "dense_2.kernel": ((16, 10), "float32"), "dense_2.bias": ((10,), "float32"),
    }
    cnn = param_spec("cnn", 784, 10, ())
    assert cnn["conv_0.kernel"] == ((5, 5, 1, 32), "float32")
    assert cnn["conv_1.kernel"] == ((5, 5, 32, 64), "float32")
    assert cnn["dense_0.kernel"] == ((7 * 7 * 64, 512), "float32")  # 28 -> 14 -> 7
    assert cnn["dense_1.kernel"] == ((512, 10), "float32")
    assert param_spec("cnn", 64, 10, ())["dense_0.kernel"] == ((2 * 2 * 64, 512), "float32")  # 8 -> 4 -> 2


def test_param_spec_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        param_spec("resnet", 64, 10, ())


@pytest.mark.parametrize("n_features", [63, 10, 0, -4])
def test_param_spec_cnn_needs_a_square_image(n_features):
    with pytest.raises(ValueError, match="square"):
        param_spec("cnn", n_features, 10, ())


# --- dirichlet_split --------------------------------------------------------------


def balanced_labels(n_classes: int = 10, per_class: int = 500, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(n_classes), per_class))


def label_shares(labels: np.ndarray, parts: list[np.ndarray], n_classes: int) -> np.ndarray:
    """[node, class] -> fraction of that node's rows with that class."""
    counts = np.stack([np.bincount(labels[p], minlength=n_classes) for p in parts]).astype(float)
    return counts / counts.sum(axis=1, keepdims=True)


class TestDirichletSplit:
    def test_deterministic_for_a_seed(self):
        labels = balanced_labels()
        a = dirichlet_split(labels, 4, 0.5, seed=7)
        b = dirichlet_split(labels, 4, 0.5, seed=7)
        assert len(a) == len(b) == 4
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)

    def test_different_seeds_differ(self):
        labels = balanced_labels()
        a = dirichlet_split(labels, 4, 0.5, seed=1)
        b = dirichlet_split(labels, 4, 0.5, seed=2)
        assert any(len(x) != len(y) or not np.array_equal(x, y) for x, y in zip(a, b))

    @pytest.mark.parametrize("n_nodes,alpha", [(2, 0.1), (3, 1.0), (5, 100.0), (7, 0.5)])
    def test_partitions_every_index_exactly_once(self, n_nodes, alpha):
        labels = balanced_labels(n_classes=6, per_class=123)
        parts = dirichlet_split(labels, n_nodes, alpha, seed=3)
        assert len(parts) == n_nodes
        everything = np.concatenate(parts)
        assert len(everything) == len(labels)  # no index twice
        np.testing.assert_array_equal(np.sort(everything), np.arange(len(labels)))  # union = all
        for p in parts:
            assert p.dtype == np.int64
            np.testing.assert_array_equal(p, np.sort(p))
            assert len(np.unique(p)) == len(p)

    def test_unbalanced_and_sparse_labels(self):
        labels = np.array([5] * 30 + [2] * 3 + [9] * 1)
        parts = dirichlet_split(labels, 3, 1.0, seed=0)
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))

    def test_large_alpha_is_close_to_uniform(self):
        labels = balanced_labels(n_classes=10, per_class=500)
        parts = dirichlet_split(labels, 5, 100.0, seed=0)
        shares = label_shares(labels, parts, 10)
        assert np.abs(shares - 0.1).max() < 0.05  # every node sees every class about equally
        sizes = np.array([len(p) for p in parts])
        assert np.abs(sizes / len(labels) - 0.2).max() < 0.05  # and nodes are about equal in size

    def test_small_alpha_is_strongly_skewed(self):
        labels = balanced_labels(n_classes=10, per_class=500)
        parts = dirichlet_split(labels, 5, 0.1, seed=0)
        counts = np.stack([np.bincount(labels[p], minlength=10) for p in parts])  # [node, class]
        # How much of each class lands on its single biggest node: ~0.2 if uniform.
        top_node_share_per_class = counts.max(axis=0) / counts.sum(axis=0)
        assert top_node_share_per_class.mean() > 0.6  # 0.76 for this seed; ~0.22 at alpha=100
        # And each (non-empty) node is dominated by few classes.
        shares = label_shares(labels, [p for p in parts if len(p)], 10)
        assert shares.max() > 0.5
        uniform_top = label_shares(labels, dirichlet_split(labels, 5, 100.0, seed=0), 10).max(axis=1)
        assert shares.max(axis=1).mean() > 2 * uniform_top.mean()

    def test_one_node_gets_everything(self):
        labels = balanced_labels(n_classes=3, per_class=10)
        for alpha in (0.1, 1.0, 100.0):
            (only,) = dirichlet_split(labels, 1, alpha, seed=5)
            np.testing.assert_array_equal(only, np.arange(len(labels)))


# --- the hub's verified updates, held for aggregation ------------------------------


class TestVerifiedUpdates:
    def test_an_update_is_returned_once_by_object_and_generation(self):
        from shared.bytes_cache import BytesCache as VerifiedUpdates

        held = VerifiedUpdates(max_bytes=100)
        held.put("gs://hub/updates/us/f/round-0001-a1.safetensors", 7, b"weights")
        assert held.pop("gs://hub/updates/us/f/round-0001-a1.safetensors", 8) is None  # another generation: download that one
        assert held.pop("gs://hub/updates/us/f/round-0001-a1.safetensors", 7) == b"weights"
        assert held.pop("gs://hub/updates/us/f/round-0001-a1.safetensors", 7) is None

    def test_bounded_oldest_out_first(self):
        from shared.bytes_cache import BytesCache as VerifiedUpdates

        held = VerifiedUpdates(max_bytes=10)
        for i in range(4):
            held.put(f"gs://u/{i}", 1, b"abcd")
        assert [held.pop(f"gs://u/{i}", 1) for i in range(4)] == [None, None, b"abcd", b"abcd"]
        held.put("gs://u/big", 1, b"x" * 11)  # bigger than the bound: never held
        assert held.pop("gs://u/big", 1) is None
        held.put("gs://u/a", 1, b"x" * 10)  # room again once popped
        assert held.pop("gs://u/a", 1) == b"x" * 10

    def test_a_global_model_served_again_is_kept_and_made_the_newest(self):
        from shared.bytes_cache import BytesCache

        held = BytesCache(max_bytes=8)
        held.put("fed", 1, b"abcd")
        held.put("fed", 2, b"efgh")
        assert held.get("fed", 1) == b"abcd"  # kept, and now the newest
        held.put("fed", 3, b"ijkl")  # evicts round 2, the oldest
        assert [held.get("fed", r) for r in (1, 2, 3)] == [b"abcd", None, b"ijkl"]


# --- the demo's round clock -----------------------------------------------------------


def test_round_clock_times_rounds_by_their_recorded_closes():
    from fedpipe.fed_demo import round_clock

    started, dropped = T0, T0 + timedelta(seconds=2)
    closes = [4.5, 4.7, 4.95, 5.1]  # s after the start: rounds 1-3 train, round 4 evaluates
    rounds = [{"round": r, "kind": "train" if r <= 3 else "evaluate", "committed_at": T0 + timedelta(seconds=c)} for r, c in enumerate(closes, 1)]

    clock = round_clock(rounds, dropped, started)

    assert clock["round_closed_s"] == [4.5, 4.7, 4.95, 5.1]
    assert clock["round_s"] == [2.5, 0.2, 0.25, 0.15]
    assert clock["first_round_s"] == 2.5  # config drop -> round 1 closed
    assert clock["steady_round_s"] == 0.225  # median of training rounds 2..3; the evaluate-only round is not one
    assert clock["federation_s"] == 3.1  # config drop -> the last close, which completes the federation


def test_member_ids_never_collide_across_federations_and_nodes():
    from shared.federation import member_id

    assert member_id("study-us", "east") != member_id("study", "us-east")
    fids, nodes = ["study", "study-us", "a", "a-b"], ["us", "east", "us-east", "b", "b-c"]
    ids = {member_id(f, n) for f in fids for n in nodes}
    assert len(ids) == len(fids) * len(nodes)
    assert all("/" not in i and not i.startswith("__") for i in ids)  # a valid Firestore id and subscription name

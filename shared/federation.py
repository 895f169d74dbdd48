"""Federations: the config a user declares, and the round protocol's pure decisions.

A federation trains one model over several nodes. Each node's worker trains on its
own shards only and uploads weights; the hub records each update in the round
document, closes the round when every node reported (or a quorum did by the
deadline), aggregates, and opens the next round. Rounds 1..R train; round R+1 only
evaluates the final global model on every node's held-out split.

Everything here is pure (documents in, decisions out), so the protocol is tested
without a cloud; shared/fedstore.py holds the documents and shared/hub/ does the I/O.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.aggregation import Strategy
from shared.datasets import DATASET_NAME
from shared.jobs import NODE_NAME, TrainSpec
from shared.privacy import PrivacyConfig

if TYPE_CHECKING:
    from shared.fedstore import Round

MIN_AGGREGATED = 2  # the fewest nodes an attested aggregator combines: one node's "aggregate" is its update

# Anchored with \Z: `$` would also accept a trailing newline.
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
# Each node writes under its own prefix, so the hub can trust the node a name claims:
# the node's identity may create objects under updates/<node>/ only (infra/main.tf).
# Every part is bounded: each becomes part of a document id or a number the hub stores (max_attempts <= 100).
UPDATE_PATH = re.compile(
    r"^updates/(?P<node>[A-Za-z0-9_-]{1,63})/(?P<fid>[a-z0-9][a-z0-9-]{0,62})/round-(?P<round>\d{4})-a(?P<attempt>[1-9][0-9]{0,2})"
    r"\.(?P<kind>safetensors|json)\Z"
)
REQUEST_PATH = re.compile(r"^requests/(?P<fid>[a-z0-9][a-z0-9-]{0,62})\.json\Z")




class FedNode(BaseModel, frozen=True):
    name: str = Field(pattern=NODE_NAME)  # it appears in update object names (UPDATE_PATH)
    dataset: str = Field(pattern=DATASET_NAME)  # a data set's name, as its raw-bucket prefix allows


MAX_NODES = 1000
MAX_WIDTH = 4096  # units in one hidden layer
MAX_LAYERS = 8
MAX_DEADLINE_S = 86400.0  # a day; the deadline sweep must see every round end
MAX_WEIGHT_BOUND = 1e12  # the largest |weight| a federation may admit; float32 reaches 3.4e38


class FederationConfig(BaseModel, frozen=True):
    """What a user declares to start a federation (`fedpipe fed start config.json`)."""

    # Every number is finite and bounded: an Infinity or a 1e12 would keep a round (and the sweeper) busy forever.
    model_config = ConfigDict(allow_inf_nan=False)

    id: str
    nodes: list[FedNode] = Field(min_length=1, max_length=MAX_NODES)
    model: Literal["logreg", "mlp", "cnn"] = "mlp"
    hidden: tuple[Annotated[int, Field(ge=1, le=MAX_WIDTH)], ...] = Field(default=(64,), max_length=MAX_LAYERS)
    rounds: int = Field(default=10, ge=1, le=1000)
    local_epochs: int = Field(default=2, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=65536)
    learning_rate: float = Field(default=3e-3, gt=0, le=10)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    strategy: Strategy = "fedavg"
    prox_mu: float = Field(default=0.0, ge=0, le=1000)
    server_lr: float = Field(default=1e-2, gt=0, le=10, description="fedadam/fedyogi only")
    trim_fraction: float = Field(
        default=0.1, ge=0, lt=0.5, description="trimmed_mean only: the share of values dropped at each end of every coordinate"
    )
    clip_norm: float | None = Field(
        default=None, gt=0, le=MAX_WEIGHT_BOUND,
        description="clip each update's change from the previous global model to this L2 norm before aggregating; from round 2 on, "
        "since round 1 starts from the shared seed, which the hub never holds",
    )
    max_abs_weight: float = Field(
        default=1e4, gt=0, le=MAX_WEIGHT_BOUND, description="an update with any weight beyond this magnitude is refused"
    )
    min_nodes: int | None = Field(default=None, ge=1, le=MAX_NODES, description="quorum after the deadline; default: every node")
    round_deadline_s: float = Field(default=600.0, gt=0, le=MAX_DEADLINE_S)
    max_attempts: int = Field(default=3, ge=1, le=100)
    lease_seconds: float = Field(default=120.0, gt=0, le=3600)
    signed_updates: bool = Field(default=True, description="count only updates signed with the node's registered key")
    confidential_aggregation: bool = Field(
        default=False,
        description="updates are sealed to an attested aggregator workload (workers/aggregator) that only releases aggregates of "
        f"at least {MIN_AGGREGATED} nodes: the hub and its operator never see one node's update",
    )
    privacy: PrivacyConfig | None = Field(
        default=None,
        description="client-level differential privacy (shared/privacy.py): each node's change clipped, the mean unweighted and "
        "noised; (epsilon, delta) accounted over the training rounds with every node in every round (sampling rate 1)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        if not _ID.match(self.id):
            raise ValueError(f"federation id {self.id!r}: use lower-case letters, digits and '-' (max 63)")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"a node is listed twice: {names}")
        if self.min_nodes is not None and self.min_nodes > len(self.nodes):
            raise ValueError(f"min_nodes={self.min_nodes} exceeds the {len(self.nodes)} nodes")
        if self.strategy == "fedprox" and self.prox_mu <= 0:
            raise ValueError("strategy fedprox needs prox_mu > 0")
        if self.privacy is not None and self.strategy in ("median", "trimmed_mean"):
            raise ValueError(f"privacy adds Gaussian noise to the mean of clipped updates, and strategy {self.strategy} takes no mean: "
                             "use fedavg, fedprox, fedadam or fedyogi")
        if self.confidential_aggregation and (not self.signed_updates or len(self.nodes) < MIN_AGGREGATED or self.quorum < MIN_AGGREGATED):
            raise ValueError(f"confidential_aggregation needs signed updates and at least {MIN_AGGREGATED} nodes in every round "
                             f"(min_nodes >= {MIN_AGGREGATED}): an aggregate of one node is that node's update")
        if self.privacy is not None and self.clip_norm is not None:
            raise ValueError("privacy clips each update to privacy.clip_norm: leave clip_norm unset")
        return self

    @property
    def quorum(self) -> int:
        return self.min_nodes or len(self.nodes)

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def train_spec(self) -> TrainSpec:
        return TrainSpec(
            model=self.model, hidden=self.hidden, epochs=self.local_epochs, batch_size=self.batch_size,
            learning_rate=self.learning_rate, seed=self.seed, test_fraction=self.test_fraction,
            prox_mu=self.prox_mu if self.strategy == "fedprox" else 0.0,
        )


class RoundStatus(StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    FAILED = "failed"


def round_key(r: int) -> str:
    return f"{r:04d}"


def member_id(fid: str, node: str) -> str:
    """A node's place in a federation: its job's id and its round subscription's name.

    '.' is in neither a federation id (REQUEST_PATH) nor a node name (NODE_NAME), so no two
    (federation, node) pairs share it: with '-', `study-us` + `east` and `study` + `us-east`
    would be one job.
    """
    return f"fed.{fid}.{node}"


def update_object(fid: str, r: int, node: str, attempt: int, evaluate: bool) -> str:
    """Where a node's worker uploads its update; the attempt keeps a retry from overwriting."""
    return f"updates/{node}/{fid}/round-{round_key(r)}-a{attempt}.{'json' if evaluate else 'safetensors'}"


def global_model_object(fid: str, r: int) -> str:
    return f"federations/{fid}/global/round-{round_key(r)}.safetensors"


def server_state_object(fid: str, r: int) -> str:
    return f"federations/{fid}/global/server-state-{round_key(r)}.safetensors"


def round_kind(config: FederationConfig, r: int) -> Literal["train", "evaluate"]:
    """Rounds 1..R train; round R+1 only evaluates the final model."""
    return "evaluate" if r > config.rounds else "train"


def close_decision(rd: Round, reported: list[str], quorum: int, now: datetime) -> tuple[RoundStatus, str] | None:
    """Whether the round can close now with the nodes that `reported`, and why; None to keep waiting."""
    if rd.status is not RoundStatus.OPEN:
        return None
    count, expected = len(set(reported) & set(rd.expected)), len(rd.expected)
    if count == expected:
        return RoundStatus.CLOSED, f"all {expected} nodes reported"
    if now < rd.deadline_at:
        return None
    if count >= quorum:
        return RoundStatus.CLOSED, f"deadline passed with {count} of {expected} nodes (quorum {quorum})"
    return RoundStatus.FAILED, f"round {rd.round}: {count} of {expected} nodes reported by the deadline; quorum is {quorum}"


MAX_EXAMPLES = 10**9  # any node's examples; each is bounded further by its data set's rows


class UpdateMetrics(BaseModel):
    """The metrics an update may carry; anything else, or any value out of range, refuses it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, frozen=True)

    global_accuracy: float = Field(ge=0, le=1)
    global_loss: float = Field(ge=0, le=1e6)
    test_examples: int = Field(ge=1, le=MAX_EXAMPLES)
    train_accuracy: float | None = Field(default=None, ge=0, le=1)
    train_loss: float | None = Field(default=None, ge=0, le=1e6)
    compute_s: float | None = Field(default=None, ge=0, le=1e6)


class RoundMetrics(BaseModel, frozen=True):
    """The pooled accuracy and loss of a round's updates; `round` names the global model evaluated."""

    examples: float
    accuracy: float
    loss: float
    round: int | None = None


def weighted_metrics(updates: dict[str, dict], prefix: str) -> dict[str, float]:
    """Example-weighted mean of each node's `{prefix}accuracy` / `{prefix}loss`: the pooled value.

    Evaluations of the global model ("global_") weigh by each node's held-out examples,
    local training metrics ("train_") by its training examples.
    """
    weight = (lambda u: u["metrics"]["test_examples"]) if prefix == "global_" else (lambda u: u["examples"])
    reporting = [u for u in updates.values() if f"{prefix}loss" in u["metrics"]]
    total = sum(weight(u) for u in reporting)
    out: dict[str, float] = {"examples": float(total)}
    for key in ("accuracy", "loss"):
        out[key] = sum(u["metrics"][f"{prefix}{key}"] * weight(u) for u in reporting) / total if total else float("nan")
    return out

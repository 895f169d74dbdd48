"""Federations: the config a user declares, and the round protocol's pure decisions.

A federation trains one model over several nodes. Each node's worker trains on its
own shards only and uploads weights; the hub records each update in the round
document, closes the round when every node reported (or a quorum did by the
deadline), aggregates, and opens the next round. Rounds 1..R train; round R+1 only
evaluates the final global model on every node's held-out split.

Everything here is pure (documents in, decisions out), so the protocol is tested
without a cloud; shared/hub.py does the I/O.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.datasets import DATASET_NAME
from shared.jobs import TrainSpec

# Anchored with \Z: `$` would also accept a trailing newline.
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
# Each node writes under its own prefix, so the hub can trust the node a name claims:
# the node's identity may create objects under updates/<node>/ only (infra/main.tf).
UPDATE_PATH = re.compile(
    r"^updates/(?P<node>[A-Za-z0-9_-]+)/(?P<fid>[a-z0-9][a-z0-9-]*)/round-(?P<round>\d{4})-a(?P<attempt>\d+)\.(?P<kind>safetensors|json)\Z"
)
REQUEST_PATH = re.compile(r"^requests/(?P<fid>[a-z0-9][a-z0-9-]*)\.json\Z")


NODE_NAME = r"[A-Za-z0-9_-]+"


class FedNode(BaseModel, frozen=True):
    name: str = Field(pattern=f"^{NODE_NAME}$", max_length=63)  # it appears in update object names (UPDATE_PATH)
    dataset: str = Field(pattern=DATASET_NAME)  # a data set's name, as its raw-bucket prefix allows


MAX_NODES = 1000
MAX_WIDTH = 4096  # units in one hidden layer
MAX_LAYERS = 8
MAX_DEADLINE_S = 86400.0  # a day; the deadline sweep must see every round end


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
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi"] = "fedavg"
    prox_mu: float = Field(default=0.0, ge=0, le=1000)
    server_lr: float = Field(default=1e-2, gt=0, le=10, description="fedadam/fedyogi only")
    min_nodes: int | None = Field(default=None, ge=1, le=MAX_NODES, description="quorum after the deadline; default: every node")
    round_deadline_s: float = Field(default=600.0, gt=0, le=MAX_DEADLINE_S)
    max_attempts: int = Field(default=3, ge=1, le=100)
    lease_seconds: float = Field(default=120.0, gt=0, le=3600)
    signed_updates: bool = Field(default=True, description="count only updates signed with the node's registered key")

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


def new_round(config: FederationConfig, r: int, now: datetime) -> dict:
    return {
        "round": r,
        "kind": round_kind(config, r),
        "status": RoundStatus.OPEN.value,
        "expected": config.node_names,
        "opened_at": now,
        "deadline_at": now + timedelta(seconds=config.round_deadline_s),
    }


def close_decision(round_doc: dict, reported: list[str], quorum: int, now: datetime) -> tuple[RoundStatus, str] | None:
    """Whether the round can close now with the nodes that `reported`, and why; None to keep waiting."""
    if round_doc["status"] != RoundStatus.OPEN:
        return None
    count, expected = len(set(reported) & set(round_doc["expected"])), len(round_doc["expected"])
    if count == expected:
        return RoundStatus.CLOSED, f"all {expected} nodes reported"
    if now < round_doc["deadline_at"]:
        return None
    if count >= quorum:
        return RoundStatus.CLOSED, f"deadline passed with {count} of {expected} nodes (quorum {quorum})"
    return RoundStatus.FAILED, f"round {round_doc['round']}: {count} of {expected} nodes reported by the deadline; quorum is {quorum}"


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

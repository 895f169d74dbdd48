"""What workers and the node API say to each other: request bodies and replies, typed and bounded.

Both sides import these, so the API's answers and the worker's reading of them cannot drift
(shared/node_api.py answers, workers/trainer/node_client.py asks).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.aggregator_messages import KeyReply
from shared.datasets import FeatureStats
from shared.jobs import TrainSpec

Finite = Annotated[float, Field(allow_inf_nan=False, ge=-1e12, le=1e12)]
Attempt = Annotated[int, Field(ge=1, le=1000)]
Count = Annotated[int, Field(ge=-(2**53), le=2**53)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class AttemptBody(_Body):
    attempt: Attempt


class HeartbeatBody(_Body):
    attempt: Attempt
    progress: dict[Annotated[str, Field(max_length=64)], Finite] = Field(default_factory=dict, max_length=32)


class FinishBody(_Body):
    attempt: Attempt
    outcome: Literal["completed", "failed", "retry"]
    results: dict[Annotated[str, Field(max_length=64)], Count | Finite | Annotated[str, Field(max_length=1024)] | None] = Field(
        default_factory=dict, max_length=64
    )
    error: Annotated[str, Field(max_length=4000)] | None = None
    reason: Literal["worker error", "attestation"] = "worker error"


class UpdateReport(_Body):
    object: Annotated[str, Field(max_length=1024)]
    generation: int = Field(ge=1, le=2**63 - 1)


class FederationView(BaseModel):
    """What the hub tells a member of its federation; nothing about the other nodes."""

    status: str
    round: int | None
    rounds: int
    kind: Literal["train", "evaluate"] | None
    global_model_round: int | None
    train: TrainSpec
    signed_updates: bool
    stats: FeatureStats | None
    error: str | None = None
    counted: bool = False  # this node's update for `round` is counted already
    final: dict[str, float] | None = None
    # With confidential_aggregation: the attested aggregator's key, to seal training updates to once the worker has
    # checked its token against its node's own policy (shared/attested_seal.py). None while the aggregator is unreachable.
    confidential_aggregation: bool = False
    aggregator: KeyReply | None = None


class UpdateReply(BaseModel):
    outcome: Literal["recorded", "duplicate", "refused", "late", "ignored"]
    counted: bool
    message: str
    reason: str | None = None

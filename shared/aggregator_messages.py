"""What the hub and the attested aggregator (workers/aggregator) say to each other, as one module both import."""

from __future__ import annotations

from pydantic import BaseModel, Field

from shared.fedstore import Federation, RefusalReason, Round, Update

MAX_BODY_BYTES = 4 * 2**20  # a request carries documents, never weights: the largest is a 1,000-node federation's


class KeyReply(BaseModel):
    """The aggregator's public key and the attestation token whose nonce is its fingerprint."""

    public_keyset: str = Field(max_length=4096)  # Tink's JSON public keyset
    attestation_token: str = Field(max_length=16384)


class AdmitRequest(BaseModel):
    """Check one reported training update as the hub would, inside the TEE: the hub cannot open it."""

    federation: Federation
    round: Round
    node: str
    object: str  # gs://hub-bucket/updates/<node>/<fid>/round-....safetensors
    generation: int
    attempt: int
    metadata: dict[str, str]
    public_key: str | None  # the node's registered signing key


class AdmitRefusal(BaseModel):
    reason: RefusalReason
    message: str


class AdmitReply(BaseModel):
    refusal: AdmitRefusal | None = None
    gone: bool = False  # deleted or replaced since it was reported: nothing to admit (a replacement is reported itself)


class AggregateRequest(BaseModel):
    federation: Federation
    round: int
    participants: dict[str, Update]
    recover: bool = False


class AggregateReply(BaseModel):
    global_model_uri: str

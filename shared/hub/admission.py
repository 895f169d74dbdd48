"""What an update must be before it counts: each check returns a Refusal (a reason code and a
message that never quotes what the node sent) or None.

A node and its uploads may be hostile. Its claims (example count, metrics) are typed and
bounded before anything is read; the object's size must be that of this model's update
before it is downloaded; the signature must verify against the node's registered key; and
the tensors must be this model's, finite and within the federation's bound.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from shared import signing, weights
from shared.envelope import SEAL_OVERHEAD_MAX, SEAL_OVERHEAD_MIN
from shared.federation import MAX_EXAMPLES, FederationConfig, UpdateMetrics, round_kind
from shared.fedstore import Federation, RefusalReason, Round
from shared.model_spec import Spec, param_spec

MAX_METRICS_CHARS = 4096  # the metrics metadata a worker writes is about 200 characters
MAX_EVALUATION_BYTES = 4096  # an evaluate round's upload is its metrics as JSON, about 100 bytes
METADATA_SLACK = 64  # bytes beyond the header the worker writes: room for its metadata strings to vary
REQUIRED_METRICS = {"global_accuracy", "global_loss", "test_examples"}
TRAINING_METRICS = {"train_loss", "train_accuracy"}
_COUNT = re.compile(r"[0-9]{1,19}\Z")


@dataclass(frozen=True)
class Refusal:
    reason: RefusalReason
    message: str


@dataclass(frozen=True)
class Claims:
    """What an upload claims, checked. `signed` is the metrics as sent: the signature covers that form."""

    examples: int
    metrics: UpdateMetrics
    signed: dict[str, Any]


def read_claims(metadata: dict[str, str]) -> Claims | Refusal:
    """The example count and metrics an upload claims: bounded in size, typed and in range."""
    examples_text, metrics_text = metadata.get("examples"), metadata.get("metrics")
    if not isinstance(examples_text, str) or not isinstance(metrics_text, str):
        return Refusal(RefusalReason.BAD_METRICS, "no examples/metrics metadata")
    if not _COUNT.match(examples_text) or int(examples_text) < 1:
        return Refusal(RefusalReason.BAD_EXAMPLES, f"examples must be a whole number from 1 to {MAX_EXAMPLES}")
    if int(examples_text) > MAX_EXAMPLES:
        return Refusal(RefusalReason.TOO_MANY_EXAMPLES, f"examples must be a whole number from 1 to {MAX_EXAMPLES}")
    if len(metrics_text) > MAX_METRICS_CHARS:
        return Refusal(RefusalReason.BAD_METRICS, f"metrics metadata exceeds {MAX_METRICS_CHARS} characters")
    try:
        metrics = json.loads(metrics_text)
    except (ValueError, RecursionError):
        return Refusal(RefusalReason.BAD_METRICS, "metrics metadata is not JSON")
    if not isinstance(metrics, dict):
        return Refusal(RefusalReason.BAD_METRICS, "metrics metadata is not a JSON object")
    if missing := REQUIRED_METRICS - metrics.keys():
        return Refusal(RefusalReason.BAD_METRICS, f"metrics lack {sorted(missing)}")
    try:
        typed = UpdateMetrics.model_validate(metrics)
    except ValidationError as exc:
        fields = sorted({str(e["loc"][0]) if e["loc"] and e["loc"][0] in UpdateMetrics.model_fields else "an unknown metric" for e in exc.errors()})
        return Refusal(RefusalReason.BAD_METRICS, f"metrics out of range or of the wrong type: {', '.join(fields)}")
    return Claims(int(examples_text), typed, metrics)


def model_spec(fed: Federation) -> Spec:
    assert fed.config is not None and fed.n_features is not None and fed.num_classes is not None  # a started federation
    return param_spec(fed.config.model, fed.n_features, fed.num_classes, fed.config.hidden)


def weights_size(spec: Spec, metadata: dict[str, str]) -> int:
    """The exact size of `weights.to_bytes` for `spec` with `metadata`, computed without the tensors.

    safetensors writes an 8-byte header length, a compact JSON header (metadata, then each
    tensor sorted by name with its dtype, shape and byte offsets) padded with spaces to a
    multiple of 8, then the float32 tensors back to back.
    """
    entries, offset = {}, 0
    for name in sorted(spec):
        size = math.prod(spec[name][0]) * 4  # to_bytes writes float32
        entries[name] = {"dtype": "F32", "shape": list(spec[name][0]), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": {**metadata, "format": weights.FORMAT}, **entries}, separators=(",", ":"), ensure_ascii=False)
    return 8 + -(-len(header.encode()) // 8) * 8 + offset


def size_refusal(fed: Federation, r: int, node: str, size: int) -> Refusal | None:
    """Why an upload of `size` bytes cannot be round r's update; checked before it is downloaded.

    A training update is what the node's worker writes (workers/trainer/federated.py:
    this model's tensors, tagged with federation, round and node), give or take
    METADATA_SLACK bytes of header, sealed under the node's key (shared/envelope.py).
    """
    assert fed.config is not None
    if round_kind(fed.config, r) != "train":
        low, high = 1, MAX_EVALUATION_BYTES
    else:
        spec = model_spec(fed)
        low = weights_size(spec, {}) - 7  # no metadata but the format tag, and the header left unpadded
        high = weights_size(spec, {"federation": fed.id, "round": str(r), "node": node}) + METADATA_SLACK
    low, high = low + SEAL_OVERHEAD_MIN, high + SEAL_OVERHEAD_MAX  # sealed under the node's key, or to the attested aggregator
    if size > high:
        return Refusal(RefusalReason.TOO_BIG, f"the upload is larger than this round's update (at most {high} bytes)")
    if size < low:
        return Refusal(RefusalReason.TOO_SMALL, f"the upload is smaller than this round's update (at least {low} bytes)")
    return None


def signature_refusal(
    config: FederationConfig, fid: str, r: int, node: str, attempt: int, claims: Claims, data: bytes, metadata: dict[str, str],
    public_key: str | None,
) -> Refusal | None:
    """Why the signature does not admit the update (None if it does, or the federation takes unsigned updates).

    The signature covers the weights and the claims the hub acts on (example count, metrics,
    round, node, attempt), and is checked against the node's registered key, never a key the
    upload names.
    """
    if not config.signed_updates:
        return None
    if public_key is None:
        return Refusal(RefusalReason.BAD_SIGNATURE, f"node {node} has no registered signing key")
    try:
        signed = signing.read_metadata(metadata)
        message = signing.update_claims(
            federation=fid, round=r, node=node, attempt=attempt, examples=claims.examples, metrics=claims.signed, payload=data
        )
    except (TypeError, ValueError):
        return Refusal(RefusalReason.BAD_SIGNATURE, "the signature metadata is malformed")
    if signed is None:
        return Refusal(RefusalReason.UNSIGNED, "unsigned update")
    if not signing.verify(public_key, message, signed[1]):
        return Refusal(RefusalReason.BAD_SIGNATURE, f"bad signature: not signed with {node}'s registered key")
    return None


def content_refusal(fed: Federation, rd: Round, node: str, claims: Claims, data: bytes) -> Refusal | None:
    """Why this update could not be aggregated: claims beyond the node's data, missing training
    metrics, or tensors that are not this model's, not finite or out of bounds. Checked before
    it counts, so a bad upload can never leave a round closed-but-unfinishable."""
    rows = fed.node_rows.get(node, 0)
    if claims.examples > rows or claims.metrics.test_examples > rows:
        return Refusal(RefusalReason.TOO_MANY_EXAMPLES, f"examples claimed exceed the {rows} rows of {node}'s data set")
    if rd.kind != "train":
        return None
    if missing := sorted(name for name in TRAINING_METRICS if getattr(claims.metrics, name) is None):
        return Refusal(RefusalReason.BAD_METRICS, f"metrics lack {missing}")
    params = read_params(data, model_spec(fed))
    if isinstance(params, Refusal):
        return params
    assert fed.config is not None
    if not all(np.isfinite(p).all() for p in params.values()):
        return Refusal(RefusalReason.NOT_FINITE, "weights contain NaN or infinite values")
    if any(np.abs(p).max(initial=0.0) > fed.config.max_abs_weight for p in params.values()):
        return Refusal(RefusalReason.OUT_OF_BOUNDS, f"a weight's magnitude exceeds the federation's bound of {fed.config.max_abs_weight:g}")
    return None


def read_params(data: bytes, spec: Spec) -> dict[str, np.ndarray] | Refusal:
    """The tensors, if they are exactly `spec`'s; the refusal names only the expected tensors."""
    try:
        params, _ = weights.from_bytes(data)
    except weights.WeightsMismatch:
        return Refusal(RefusalReason.WRONG_SHAPE, "not fedpipe weights (safetensors tagged with the fedpipe format)")
    for name in sorted(spec):
        if name not in params:
            return Refusal(RefusalReason.WRONG_SHAPE, f"missing tensor {name!r}")
        if params[name].shape != tuple(spec[name][0]) or params[name].dtype != np.dtype(spec[name][1]):
            return Refusal(RefusalReason.WRONG_SHAPE, f"tensor {name!r} is not of this model's shape and dtype")
    if extra := len(params.keys() - spec.keys()):
        return Refusal(RefusalReason.WRONG_SHAPE, f"{extra} tensors this model does not have")
    return params

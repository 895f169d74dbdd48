"""Weights on the wire: safetensors only, never pickle.

Weights cross trust boundaries (site -> hub -> site), so the format must be
plain data that cannot execute code on load, and every received file is
checked against the tensor names/shapes/dtypes the receiver expects before it
is used (a malformed or hostile upload fails loudly instead of broadcasting).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

FORMAT = "fedpipe-weights-v1"
Spec = dict[str, tuple[tuple[int, ...], str]]

# safetensors itself refuses headers above 100 MB; a smaller cap here keeps a
# garbage length prefix from making us try to decode a huge blob as JSON.
_MAX_HEADER = 100_000_000


class WeightsMismatch(ValueError):
    """The bytes are not fedpipe weights, or not the tensors the receiver expects."""


def spec_of(params: Mapping[str, Any]) -> Spec:
    """name -> (shape, dtype name): what a receiver should demand of incoming weights."""
    return {name: (tuple(int(d) for d in p.shape), np.dtype(p.dtype).name) for name, p in params.items()}


def to_bytes(params: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize params as float32 safetensors, tagged with the format and caller metadata."""
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"weights metadata must be str -> str; bad keys: {bad}")
    if meta.get("format", FORMAT) != FORMAT:
        raise ValueError(f"metadata key 'format' is reserved (got {meta['format']!r})")
    meta["format"] = FORMAT
    arrays = {name: np.ascontiguousarray(np.asarray(p, dtype=np.float32)) for name, p in params.items()}
    return _st_save(arrays, metadata=meta)


def read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (the numpy loader does not expose it)."""
    if len(data) < 8:
        raise WeightsMismatch(f"not safetensors: only {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER, len(data) - 8):
        raise WeightsMismatch(f"not safetensors: header length {n} exceeds the {len(data)} bytes given")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsMismatch(f"not safetensors: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise WeightsMismatch("not safetensors: header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise WeightsMismatch("safetensors metadata is not a str -> str map")
    return dict(meta)


def check_spec(params: Mapping[str, Any], expected: Spec) -> None:
    """Raise WeightsMismatch naming the first missing, extra, wrong-shape or wrong-dtype tensor."""
    got = spec_of(params)
    for name in sorted(expected):
        if name not in got:
            raise WeightsMismatch(f"missing tensor {name!r}")
    for name in sorted(got):
        if name not in expected:
            raise WeightsMismatch(f"unexpected tensor {name!r}")
    for name in sorted(expected):
        shape, dtype = expected[name]
        got_shape, got_dtype = got[name]
        if got_shape != tuple(shape):
            raise WeightsMismatch(f"tensor {name!r} has shape {got_shape}, expected {tuple(shape)}")
        if got_dtype != np.dtype(dtype).name:
            raise WeightsMismatch(f"tensor {name!r} has dtype {got_dtype}, expected {np.dtype(dtype).name}")


def from_bytes(data: bytes, expected: Spec | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Params and metadata from `to_bytes` output; WeightsMismatch for anything else.

    With `expected`, the tensors must match it exactly (names, shapes, dtypes).
    """
    meta = read_metadata(bytes(data))
    if meta.get("format") != FORMAT:
        raise WeightsMismatch(f"weights format is {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        params = _st_load(bytes(data))
    except (SafetensorError, ValueError, TypeError) as e:
        raise WeightsMismatch(f"not valid safetensors: {e}") from None
    if expected is not None:
        check_spec(params, expected)
    return params, meta

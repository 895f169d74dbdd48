"""The key a worker opens its node's sealed shards with (shared/envelope.py)."""

from __future__ import annotations

from shared.config import Settings
from shared.envelope import Envelope, node_kek


def node_envelope(settings: Settings, node: str) -> Envelope:
    """`node`'s key-encryption key as this worker may use it: its Cloud KMS key in production, the
    local stand-in key store locally."""
    return Envelope(node_kek(settings, node))

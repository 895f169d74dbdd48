"""The public key each node signs its updates with, registered as `nodes/{node}` in Firestore.

The hub trusts an update only if it verifies against the key registered here, so
registering is the step that admits a node to federations: `fedpipe nodes register`
in production (the key comes from the node's Cloud KMS key version), automatic for
the local stack, which creates one key file per node.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime

from google.cloud import firestore

from shared.config import Settings

ED25519_PUBLIC_KEY_BYTES = 32


def node_ref(db: firestore.Client, settings: Settings, node: str) -> firestore.DocumentReference:
    return db.collection(settings.nodes_collection).document(node)


def check_public_key(public_key: str) -> str:
    """The key as registered (base64 of the 32 raw Ed25519 bytes); ValueError for anything else."""
    try:
        raw = base64.b64decode(public_key, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the public key is not base64") from None
    if len(raw) != ED25519_PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has {ED25519_PUBLIC_KEY_BYTES} bytes, this one {len(raw)}")
    return public_key


def register(db: firestore.Client, settings: Settings, node: str, public_key: str, source: str, now: datetime) -> None:
    """Admit `node`'s key (replacing an earlier one: rotation); `source` says where it came from."""
    node_ref(db, settings, node).set({"public_key": check_public_key(public_key), "source": source, "registered_at": now})

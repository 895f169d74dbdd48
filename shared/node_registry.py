"""The node registry, `nodes/{node}` in Firestore: each node's worker identity and update-signing key.

Registering is the step that admits a node to federations, and only the operator
does it (`fedpipe nodes register`; automatic for the local stack). Each node's entry is a NodeRecord:
- `identity` is the service account the node's workers run as. The node API maps a
  verified ID token's email to its node through it, so a worker can speak only for
  its own node.
- `public_key` verifies the node's updates: the hub trusts an update only if it
  verifies against the key registered here (Cloud KMS holds the private key in
  production, a key file in the local stack).
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime

from google.cloud import firestore
from pydantic import BaseModel, ConfigDict, Field

from shared.config import Settings

ED25519_PUBLIC_KEY_BYTES = 32
SERVICE_ACCOUNT = r"^[a-z0-9][a-z0-9.@_-]{2,253}$"  # pydantic patterns are Rust regexes: $ is the very end


class NodeRecord(BaseModel):
    """One node's entry in the registry."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    public_key: str | None = None
    identity: str | None = Field(default=None, pattern=SERVICE_ACCOUNT)
    source: str = ""
    registered_at: datetime | None = None


def check_public_key(public_key: str) -> str:
    """The key as registered (base64 of the 32 raw Ed25519 bytes); ValueError for anything else."""
    try:
        raw = base64.b64decode(public_key, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the public key is not base64") from None
    if len(raw) != ED25519_PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has {ED25519_PUBLIC_KEY_BYTES} bytes, this one {len(raw)}")
    return public_key


class NodeRegistry:
    """The `nodes` collection: one NodeRecord per node, written by the operator (and the local stack)."""

    def __init__(self, db: firestore.Client, settings: Settings) -> None:
        self.collection = db.collection(settings.nodes_collection)

    def ref(self, node: str) -> firestore.DocumentReference:
        return self.collection.document(node)

    def get(self, node: str) -> NodeRecord | None:
        snap = self.ref(node).get()
        return NodeRecord.model_validate(snap.to_dict()) if snap.exists else None

    def register_key(self, node: str, public_key: str, source: str, now: datetime) -> None:
        """Admit `node`'s signing key (replacing an earlier one: rotation); `source` says where it came from."""
        self.ref(node).set({"public_key": check_public_key(public_key), "source": source, "registered_at": now}, merge=True)

    def register_identity(self, node: str, identity: str, now: datetime) -> None:
        """Name the service account `node`'s workers run as: its ID tokens speak for `node`, and for no other."""
        record = NodeRecord(identity=identity.lower())
        self.ref(node).set({"identity": record.identity, "identity_registered_at": now}, merge=True)

    def node_of_identity(self, identity: str) -> str | None:
        """The node whose workers run as `identity`, or None. Two nodes claiming one identity is a
        registry error, and then the identity speaks for neither."""
        query = self.collection.where(filter=firestore.FieldFilter("identity", "==", identity.lower())).limit(2)
        nodes = [snap.id for snap in query.stream()]
        return nodes[0] if len(nodes) == 1 else None

    def list(self) -> dict[str, NodeRecord]:
        return {snap.id: NodeRecord.model_validate(snap.to_dict()) for snap in self.collection.stream()}

"""Signed weight updates: each node signs what it uploads; the hub verifies before counting it.

The hub weights updates by their claimed example counts and records their
metrics, so the signature covers those claims *and* the weights (by SHA-256),
not just the payload: otherwise anyone with write access to the hub bucket
could inflate a node's weight or swap its tensors. Signatures are Ed25519,
from a local PEM key (local stack) or a Cloud KMS key version (production).

The hub must check against the public key *registered* for the node, never a
key named by the upload itself (`KEY_ID_KEY` is informational only).

Only `cryptography` is imported at module load: the hub's Cloud Function only
verifies, and the KMS client is imported when a node first signs with KMS.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

if TYPE_CHECKING:
    from google.cloud import kms_v1

__all__ = [
    "ENV_VAR",
    "FORMAT_VERSION",
    "KEY_ID_KEY",
    "PURPOSE",
    "SIGNATURE_KEY",
    "KmsSigner",
    "LocalKeySigner",
    "Signer",
    "SigningError",
    "create_node_key",
    "decode",
    "encode",
    "kms_sign_request",
    "public_key_b64",
    "read_metadata",
    "signature_metadata",
    "signer_from_env",
    "update_claims",
    "verify",
]

FORMAT_VERSION = 1
# Domain separation: a signature over these claims can't be passed off as one over anything else.
PURPOSE = "fedpipe/weight-update"
# GCS object metadata keys (values are text).
SIGNATURE_KEY = "signature"
KEY_ID_KEY = "signing_key"
ENV_VAR = "FEDPIPE_SIGNING_KEY"

_KMS_VERSION = re.compile(r"^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+/cryptoKeyVersions/[^/]+$")


class SigningError(RuntimeError):
    """Signing failed in a way that must not yield a signature (e.g. corrupted in transit to/from KMS)."""


def _int(name: str, value: Any) -> int:
    # bool is an int subclass; `True` examples would sign as `true` and never match the hub's int.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _reject_non_finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value!r}: NaN/inf have no canonical JSON form, so they can't be signed")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _reject_non_finite(v, f"{where}[{k!r}]")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _reject_non_finite(v, f"{where}[{i}]")


def update_claims(
    *, federation: str, round: int, node: str, attempt: int, examples: int, metrics: Mapping[str, Any], payload: bytes
) -> bytes:
    """The canonical bytes a node signs for one update; the hub rebuilds them from what it received.

    Deterministic JSON (sorted keys, no whitespace, UTF-8) so signer and verifier agree byte for byte.
    Keyword-only: round/attempt/examples are all ints and easy to swap positionally.
    """
    for name, text in (("federation", federation), ("node", node)):
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    if not isinstance(metrics, Mapping) or not all(isinstance(k, str) for k in metrics):
        raise TypeError("metrics must be a mapping with str keys")
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    _reject_non_finite(metrics, "metrics")
    claims = {
        "v": FORMAT_VERSION,
        "purpose": PURPOSE,
        "federation": federation,
        "round": _int("round", round),
        "node": node,
        "attempt": _int("attempt", attempt),
        "examples": _int("examples", examples),
        "metrics": dict(metrics),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    try:
        text = json.dumps(claims, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except TypeError as err:  # e.g. numpy scalars: the hub would read back a different type
        raise TypeError(f"metrics must hold plain JSON values (str, int, float, bool, None, list, dict): {err}") from None
    return text.encode("utf-8")


class Signer(Protocol):
    """Anything that signs update claims with Ed25519; `key_id` goes into the object metadata."""

    key_id: str

    def sign(self, message: bytes) -> bytes: ...


def public_key_b64(key: Ed25519PublicKey) -> str:
    """The form public keys are registered in: base64 of the 32 raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


class LocalKeySigner:
    """Signs with an Ed25519 key held in a local file (local stack and tests)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = public_key_b64(key.public_key())
        self.key_id = self.public_key  # self-describing; the hub still checks the registered key

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LocalKeySigner:
        """Load an unencrypted PKCS8 PEM Ed25519 private key."""
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
        return cls(key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def create_node_key(path: str | os.PathLike[str]) -> str:
    """Create the node's key at `path` (mode 0600) unless one is there; return its public key (base64).

    Idempotent and race-safe: the key is written to a temp file and hard-linked into place, which
    fails if `path` exists, so concurrent callers all end up returning the one key that won.
    """
    path = Path(path)
    if path.exists():
        return LocalKeySigner.from_file(path).public_key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return LocalKeySigner.from_file(path).public_key
    finally:
        os.unlink(tmp)
    return public_key_b64(key.public_key())


def _crc32c(data: bytes) -> int:
    import google_crc32c

    return int(google_crc32c.value(bytes(data)))


def kms_sign_request(name: str, message: bytes) -> kms_v1.AsymmetricSignRequest:
    """The KMS request for an Ed25519 key: the raw message goes in `data` (KMS Ed25519 takes no digest)."""
    from google.cloud import kms_v1

    return kms_v1.AsymmetricSignRequest(name=name, data=message, data_crc32c=_crc32c(message))


class KmsSigner:
    """Signs with a Cloud KMS `EC_SIGN_ED25519` key version; the private key never leaves KMS.

    Checks Google's integrity fields both ways, so a request or signature corrupted in
    transit raises `SigningError` instead of uploading an update the hub will reject.
    """

    def __init__(self, name: str, client: Any = None) -> None:
        if not _KMS_VERSION.match(name):
            raise ValueError(f"not a KMS key version resource name (projects/.../cryptoKeyVersions/N): {name!r}")
        self.key_id = name
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:  # lazily, so building a signer needs no credentials
            from google.cloud import kms_v1

            self._client = kms_v1.KeyManagementServiceClient()
        return self._client

    def sign(self, message: bytes) -> bytes:
        response = self.client.asymmetric_sign(request=kms_sign_request(self.key_id, message))
        if not response.verified_data_crc32c:
            raise SigningError(f"KMS did not verify the request's data_crc32c for {self.key_id}: request corrupted in transit")
        if response.name != self.key_id:
            raise SigningError(f"KMS signed with {response.name!r}, not the requested {self.key_id!r}")
        signature = bytes(response.signature)
        if "signature_crc32c" not in response or _crc32c(signature) != int(response.signature_crc32c):
            raise SigningError(f"KMS signature from {self.key_id} failed its signature_crc32c check: response corrupted in transit")
        return signature

    def public_key(self) -> str:
        """The key version's public key, base64 of the raw 32 bytes (what the hub registers)."""
        response = self.client.get_public_key(request={"name": self.key_id})
        pem = response.pem.encode("utf-8")
        if "pem_crc32c" not in response or _crc32c(pem) != int(response.pem_crc32c):
            raise SigningError(f"KMS public key for {self.key_id} failed its pem_crc32c check")
        key = serialization.load_pem_public_key(pem)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{self.key_id} is not an Ed25519 key ({type(key).__name__})")
        return public_key_b64(key)


def signer_from_env(env: Mapping[str, str], kms_client: Any = None) -> Signer | None:
    """`FEDPIPE_SIGNING_KEY`: a PEM file path, `kms://projects/...` or `projects/...`; unset or empty means unsigned."""
    value = env.get(ENV_VAR, "").strip()
    if not value:
        return None
    if value.startswith("kms://"):
        return KmsSigner(value.removeprefix("kms://"), client=kms_client)
    if value.startswith("projects/"):
        return KmsSigner(value, client=kms_client)
    return LocalKeySigner.from_file(value)


def verify(public_key: str, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is `message` signed by the registered `public_key` (base64 raw); False (never raises) on any bad input."""
    try:
        raw = base64.b64decode(public_key, validate=True)
        Ed25519PublicKey.from_public_bytes(raw).verify(bytes(signature), bytes(message))
    except (InvalidSignature, ValueError, TypeError):  # binascii.Error is a ValueError
        return False
    return True


def encode(signature: bytes) -> str:
    """Signature -> metadata text (standard base64)."""
    return base64.b64encode(signature).decode("ascii")


def decode(text: str) -> bytes:
    """Metadata text -> signature; ValueError on anything but non-empty, well-formed base64."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"malformed base64 signature: {err}") from None
    if not raw:
        raise ValueError("empty signature")
    return raw


def signature_metadata(signer: Signer, message: bytes) -> dict[str, str]:
    """Sign `message` and return the GCS object metadata entries that carry the signature."""
    return {SIGNATURE_KEY: encode(signer.sign(message)), KEY_ID_KEY: signer.key_id}


def read_metadata(metadata: Mapping[str, str] | None) -> tuple[str, bytes] | None:
    """(key_id, signature) from GCS object metadata; None if unsigned; ValueError if the signature is malformed."""
    if not metadata or SIGNATURE_KEY not in metadata:
        return None
    return metadata.get(KEY_ID_KEY, ""), decode(metadata[SIGNATURE_KEY])

"""Envelope encryption of what fedpipe stores: a fresh data key per object, wrapped by its owner's key.

Each object is sealed with Tink's KMS envelope AEAD: a new AES-256-GCM data key encrypts
the bytes, and the owning node's key-encryption key (KEK) wraps that data key. The
associated data binds the ciphertext to its bucket, object name and purpose, so a sealed
shard copied under another name, or offered as an update, does not open.

Where the KEK lives:
- production: the node's Cloud KMS key (`gcp-kms://projects/.../cryptoKeys/...`), in the
  node's region, rotated every 30 days; older versions still decrypt. Ingest may only
  encrypt with it; the node's attested workers may encrypt and decrypt (infra/attestation.tf);
  the hub may decrypt, to open the updates it aggregates, but reads no node bucket. Global
  models are under the hub's own key;
- the local stack: `LocalKeyStore`, a Tink keyset per node under the stack's state dir. It
  is a LOCAL STAND-IN for Cloud KMS, with cleartext keysets on disk, and says so. Rotating
  adds a key and makes it primary; older keys stay in the keyset and still decrypt.
"""

from __future__ import annotations

import io
from enum import StrEnum
from pathlib import Path

import google.auth.credentials
import tink
from tink import aead, cleartext_keyset_handle
from tink.proto import tink_pb2

from shared.config import Settings

aead.register()

GCP_KMS_PREFIX = "gcp-kms://"
MAGIC = b"FPE1"  # sealed objects start with this, so a plain object is never mistaken for one


class Purpose(StrEnum):
    """What an object is: part of its associated data, so one kind never opens as another."""

    SHARD = "processed-shard"
    UPDATE = "weight-update"
    GLOBAL_MODEL = "global-model"
    SERVER_STATE = "server-optimizer-state"
    CHECKPOINT = "training-checkpoint"  # a worker's resumable training state: its node's, like a shard


HUB = "hub"  # the owner of global models and the server optimizer's state: the hub's own key
# What sealing adds to an object, bounds for the hub's size check before it downloads an update. Under
# a node's key: the magic, the wrapped data key (its length, Tink's prefix, and a local keyset's or
# Cloud KMS's ciphertext of 32 bytes), the data's nonce and tag, at least 68 bytes. Sealed to the
# attested aggregator (shared/attested_seal.py): the magic, Tink's prefix, the encapsulated key and
# the tag, 57 bytes, the smaller.
SEAL_OVERHEAD_MIN = 4 + 5 + 32 + 16
SEAL_OVERHEAD_MAX = 1024


class EnvelopeError(ValueError):
    """The object does not open with this key and name: another node's, altered, or not sealed."""


def associated_data(bucket: str, name: str, purpose: Purpose) -> bytes:
    return f"fedpipe/v1|{purpose.value}|gs://{bucket}/{name}".encode()


class Envelope:
    """Seal and open objects under one key-encryption key (any Tink AEAD: Cloud KMS, local, the key broker)."""

    def __init__(self, kek: aead.Aead) -> None:
        self._aead = aead.KmsEnvelopeAead(aead.aead_key_templates.AES256_GCM, kek)

    def seal(self, data: bytes, bucket: str, name: str, purpose: Purpose) -> bytes:
        return MAGIC + self._aead.encrypt(data, associated_data(bucket, name, purpose))

    def open(self, sealed: bytes, bucket: str, name: str, purpose: Purpose) -> bytes:
        where = f"gs://{bucket}/{name}"
        if not sealed.startswith(MAGIC):
            raise EnvelopeError(f"{where} is not a sealed {purpose.value}")
        try:
            return self._aead.decrypt(sealed[len(MAGIC):], associated_data(bucket, name, purpose))
        except tink.TinkError:
            raise EnvelopeError(f"{where} does not open: sealed under another key, for another object or purpose, or altered") from None


def local_key_id(sealed: bytes) -> int:
    """The id of the local keyset key that wrapped this object's data key (Tink's 5-byte prefix on
    the wrapped key). For the local stand-in only: Cloud KMS keeps its key versions to itself."""
    wrapped = sealed[len(MAGIC) + 4:]  # after the magic, Tink's envelope puts the wrapped key's length
    if len(wrapped) < 5 or wrapped[0] != 1:
        raise EnvelopeError("not sealed under a local keyset")
    return int.from_bytes(wrapped[1:5], "big")


def cloud_kms_kek(key_uri: str, credentials: google.auth.credentials.Credentials | None = None) -> aead.Aead:
    """The KEK of a Cloud KMS key (`gcp-kms://projects/P/locations/L/keyRings/R/cryptoKeys/K`), with the
    caller's default credentials, or `credentials` (an attested worker's, through its node's pool)."""
    from tink.integration import gcpkms

    if not key_uri.startswith(GCP_KMS_PREFIX):
        raise ValueError(f"a Cloud KMS key URI starts with {GCP_KMS_PREFIX}")
    return gcpkms.GcpKmsClient(key_uri, None, credentials=credentials).get_aead(key_uri)


def node_kek(settings: Settings, node: str) -> aead.Aead:
    """`node`'s key-encryption key as this process may use it: its Cloud KMS key, else the local stand-in's."""
    if uri := settings.node_keks.get(node):
        return cloud_kms_kek(uri)
    if settings.local_keystore:
        return LocalKeyStore(Path(settings.local_keystore)).kek(node)
    raise EnvelopeError(f"no key-encryption key is configured for node {node} (FEDPIPE_NODE_KEKS)")


class LocalKeyStore:
    """LOCAL STAND-IN for the nodes' Cloud KMS keys: one cleartext Tink keyset per node on disk."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, node: str) -> Path:
        return self.directory / f"kek-{node}.json"

    def ensure(self, node: str) -> Path:
        """The node's keyset, made on first use."""
        path = self.path(node)
        if not path.exists():
            self._write(path, tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM))
        return path

    def rotate(self, node: str) -> int:
        """Add a new key and make it primary: new objects use it, older ones still open. Its key id."""
        path = self.ensure(node)
        keyset = _read_keyset(path)
        fresh = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM)
        new_key = _keyset_proto(fresh).key[0]
        while any(k.key_id == new_key.key_id for k in keyset.key):
            new_key = _keyset_proto(tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM)).key[0]
        keyset.key.append(new_key)
        keyset.primary_key_id = new_key.key_id
        self._write(path, cleartext_keyset_handle.from_keyset(keyset))
        return new_key.key_id

    def primary_key_id(self, node: str) -> int:
        return _read_keyset(self.ensure(node)).primary_key_id

    def kek(self, node: str) -> aead.Aead:
        return _handle(self.ensure(node)).primitive(aead.Aead)

    @staticmethod
    def _write(path: Path, handle: tink.KeysetHandle) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = io.StringIO()
        cleartext_keyset_handle.write(tink.JsonKeysetWriter(out), handle)
        tmp = path.with_suffix(".tmp")
        tmp.touch(mode=0o600)
        tmp.write_text(out.getvalue())
        tmp.replace(path)


def _handle(path: Path) -> tink.KeysetHandle:
    return cleartext_keyset_handle.read(tink.JsonKeysetReader(path.read_text()))


def _keyset_proto(handle: tink.KeysetHandle) -> tink_pb2.Keyset:
    out = io.BytesIO()
    cleartext_keyset_handle.write(tink.BinaryKeysetWriter(out), handle)
    return tink_pb2.Keyset.FromString(out.getvalue())


def _read_keyset(path: Path) -> tink_pb2.Keyset:
    return _keyset_proto(_handle(path))

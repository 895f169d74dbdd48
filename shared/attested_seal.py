"""Sealing an update to an attested workload: only the aggregator running an allowed image can open it.

With `confidential_aggregation`, the hub's aggregation runs as its own Confidential Space
workload (workers/aggregator). At start it makes an HPKE key pair inside the TEE (Tink hybrid
encryption: X25519, HKDF-SHA256, AES-256-GCM) and asks its launcher for an attestation token
whose nonce is the public key's fingerprint. A node's worker seals its update to that public
key only after checking the token itself: signed by the attestation verifier, unexpired, for
the aggregator's audience, its claims passing the node's own policy for aggregators (the same
CEL clauses as a key-release policy, with the aggregator images the node trusts), and its
nonce naming this very key. The private key never leaves the workload, so the hub, its
operator and the other nodes see only what the aggregator releases: the aggregate.
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass

import jwt
import tink
from tink import hybrid

from shared.attestation import AttestationClaims, NodePolicy, Reason, Refused, aggregator_audience, verify_token
from shared.envelope import EnvelopeError, Purpose, associated_data
from shared.key_release import PolicyProgram

hybrid.register()

MAGIC = b"FPH1"  # an update sealed to the aggregator: never mistaken for an envelope (FPE1) or a plain object
TEMPLATE = hybrid.hybrid_key_templates.DHKEM_X25519_HKDF_SHA256_HKDF_SHA256_AES_256_GCM
# MAGIC, Tink's 5-byte key prefix, the 32-byte encapsulated key and the 16-byte tag: for the hub's size check.
OVERHEAD = len(MAGIC) + 5 + 32 + 16
MAX_PUBLIC_KEYSET_CHARS = 4096
AGGREGATOR = "aggregator"  # its workload's name at the attestation simulator, and in audit records


def fingerprint(public_keyset: bytes) -> str:
    """The key's nonce in the aggregator's token: base64url SHA-256, 43 characters (the launcher takes 8-88 bytes)."""
    return base64.urlsafe_b64encode(hashlib.sha256(public_keyset).digest()).rstrip(b"=").decode()


class RecipientKey:
    """The aggregator's key pair, made in its TEE; only the public half leaves."""

    def __init__(self) -> None:
        self._private = tink.new_keyset_handle(TEMPLATE)
        out = io.StringIO()
        self._private.public_keyset_handle().write_no_secret(tink.JsonKeysetWriter(out))
        self.public_keyset = out.getvalue().encode()
        self.fingerprint = fingerprint(self.public_keyset)
        self._decrypt = self._private.primitive(hybrid.HybridDecrypt)

    def open(self, sealed: bytes, bucket: str, name: str, purpose: Purpose) -> bytes:
        where = f"gs://{bucket}/{name}"
        if not sealed.startswith(MAGIC):
            raise EnvelopeError(f"{where} is not sealed to the aggregator")
        try:
            return self._decrypt.decrypt(sealed[len(MAGIC):], associated_data(bucket, name, purpose))
        except tink.TinkError:
            raise EnvelopeError(f"{where} does not open: sealed to another aggregator key, for another object, or altered") from None


def seal_to(public_keyset: bytes, data: bytes, bucket: str, name: str, purpose: Purpose) -> bytes:
    """Seal `data` so that only the holder of the key pair behind `public_keyset` opens it, at this name and purpose."""
    handle = tink.read_no_secret_keyset_handle(tink.JsonKeysetReader(public_keyset.decode()))
    return MAGIC + handle.primitive(hybrid.HybridEncrypt).encrypt(data, associated_data(bucket, name, purpose))


@dataclass(frozen=True)
class AttestedKey:
    """What the node API relays from the aggregator: its public key and the token that vouches for it."""

    public_keyset: bytes
    attestation_token: str


class AggregatorVerifier:
    """A node's check of an aggregator key before sealing to it; its policy is the node's, not the hub's."""

    def __init__(self, project: str, image_digests: tuple[str, ...], jwks: jwt.PyJWKClient, issuer: str) -> None:
        self.policy = PolicyProgram(NodePolicy(node=AGGREGATOR, audience=aggregator_audience(project), image_digests=image_digests))
        self.jwks, self.issuer = jwks, issuer

    def verify(self, key: AttestedKey) -> AttestationClaims:
        """The token's claims, if it vouches for exactly this key; else Refused with the reason."""
        if len(key.public_keyset) > MAX_PUBLIC_KEYSET_CHARS:
            raise Refused(Reason.BAD_SIGNATURE)
        raw, claims = verify_token(key.attestation_token, self.jwks, self.policy.policy.audience, self.issuer)
        if (reason := self.policy.refusal(raw)) is not None:
            raise Refused(reason, claims)
        if fingerprint(key.public_keyset) not in claims.nonces:
            raise Refused(Reason.WRONG_KEY, claims)
        return claims

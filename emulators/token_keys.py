"""The RS256 keys the local stand-ins sign their tokens with, and the JWKS that publishes them.

The metadata server's ID-token issuer and the attestation simulator each make one at
start, under the stack's state dir (tests mint expired or foreign tokens with it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm


def new_key(path: Path) -> rsa.RSAPrivateKey:
    """A fresh signing key, written to `path` readable by its owner only."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return key


def load_key(path: Path) -> rsa.RSAPrivateKey:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def key_id(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "local-" + hashlib.sha256(der).hexdigest()[:16]


def jwks(key: rsa.RSAPrivateKey) -> dict:
    """The key's public half as a JWK Set, in the format of Google's v3 certs."""
    public = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return {"keys": [{**public, "kid": key_id(key), "alg": "RS256", "use": "sig"}]}

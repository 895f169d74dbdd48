"""Signed weight updates: canonical claims, local and KMS signers, verification, metadata."""

from __future__ import annotations

import base64
import hashlib
import stat
import subprocess
import sys
from pathlib import Path

import google_crc32c
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.cloud import kms_v1

from shared import signing
from shared.signing import (
    KEY_ID_KEY,
    SIGNATURE_KEY,
    KmsSigner,
    LocalKeySigner,
    SigningError,
    create_node_key,
    decode,
    encode,
    kms_sign_request,
    read_metadata,
    signature_metadata,
    signer_from_env,
    update_claims,
    verify,
)

pytestmark = pytest.mark.unit

KMS_NAME = "projects/p/locations/europe-west4/keyRings/fedpipe/cryptoKeys/node-a/cryptoKeyVersions/1"
BASE = dict(
    federation="fed-1", round=3, node="site-a", attempt=0, examples=128, metrics={"loss": 0.25, "accuracy": 0.875}, payload=b"weights-bytes"
)


def claims(**changes) -> bytes:
    return update_claims(**{**BASE, **changes})


@pytest.fixture()
def signer() -> LocalKeySigner:
    return LocalKeySigner(Ed25519PrivateKey.generate())


# --- canonical claims ---------------------------------------------------------------------------


def test_claims_known_bytes():
    got = update_claims(federation="f", round=1, node="n", attempt=0, examples=3, metrics={"loss": 0.5, "acc": 1.0}, payload=b"")
    assert got == (
        b'{"attempt":0,"examples":3,"federation":"f","metrics":{"acc":1.0,"loss":0.5},"node":"n",'
        b'"purpose":"fedpipe/weight-update","round":1,'
        b'"sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","v":1}'
    )


def test_claims_ignore_dict_order():
    a = claims(metrics={"loss": 0.1, "accuracy": 0.9, "nested": {"x": 1, "y": [1.5, 2]}})
    b = claims(metrics={"nested": {"y": [1.5, 2], "x": 1}, "accuracy": 0.9, "loss": 0.1})
    assert a == b


def test_claims_bind_payload_by_sha256():
    assert f'"sha256":"{hashlib.sha256(b"weights-bytes").hexdigest()}"'.encode() in claims()


def test_claims_are_utf8_not_escaped():
    assert "site-ø".encode() in claims(node="site-ø")


def test_claims_float_round_trip_exactly():
    value = 0.1 + 0.2  # 0.30000000000000004: repr is shortest round-trip, so the hub rebuilds the same bytes
    assert b'"loss":0.30000000000000004' in claims(metrics={"loss": value})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_metric_rejected(bad):
    with pytest.raises(ValueError, match="NaN/inf"):
        claims(metrics={"loss": bad})


def test_non_finite_nested_metric_rejected():
    with pytest.raises(ValueError, match=r"metrics\['per_class'\]\[1\]"):
        claims(metrics={"per_class": [0.5, float("nan")]})


@pytest.mark.parametrize("field", ["round", "attempt", "examples"])
def test_int_fields_reject_bool_and_float(field):
    with pytest.raises(TypeError, match=field):
        claims(**{field: True})
    with pytest.raises(TypeError, match=field):
        claims(**{field: 3.0})


def test_non_json_metric_rejected_clearly():
    with pytest.raises(TypeError, match="plain JSON"):
        claims(metrics={"loss": object()})


def test_claims_are_keyword_only():
    with pytest.raises(TypeError):
        update_claims("f", 1, "n", 0, 3, {}, b"")  # type: ignore[misc]


# --- sign / verify ------------------------------------------------------------------------------


def test_round_trip(signer):
    message = claims()
    assert verify(signer.public_key, message, signer.sign(message))


CHANGES = [
    ("payload", b"weights-bytez"),
    ("payload", b"weights-bytes\x00"),
    ("examples", 129),
    ("metrics", {"loss": 0.26, "accuracy": 0.875}),
    ("metrics", {"loss": 0.25, "accuracy": 0.875, "extra": 1}),
    ("round", 4),
    ("node", "site-b"),
    ("attempt", 1),
    ("federation", "fed-2"),
]


@pytest.mark.parametrize(("field", "value"), CHANGES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CHANGES)])
def test_any_changed_claim_fails(signer, field, value):
    signature = signer.sign(claims())
    assert verify(signer.public_key, claims(), signature)  # the unchanged claims do verify
    assert not verify(signer.public_key, claims(**{field: value}), signature)


def test_other_nodes_key_fails(signer):
    other = LocalKeySigner(Ed25519PrivateKey.generate())
    message = claims()
    assert not verify(signer.public_key, message, other.sign(message))
    assert verify(other.public_key, message, other.sign(message))


def test_flipped_signature_bit_fails(signer):
    signature = bytearray(signer.sign(claims()))
    signature[10] ^= 1
    assert not verify(signer.public_key, claims(), bytes(signature))


@pytest.mark.parametrize(
    ("public_key", "signature"),
    [
        ("not base64!", None),
        (base64.b64encode(b"short").decode(), None),
        ("", None),
        (None, b""),
        (None, b"\x00" * 63),
        (None, b"\x00" * 64),
        (None, b"\xff" * 200),
    ],
)
def test_verify_never_raises_on_bad_input(signer, public_key, signature):
    message = claims()
    public_key = signer.public_key if public_key is None else public_key
    signature = signer.sign(message) if signature is None else signature
    assert verify(public_key, message, signature) is False


def test_public_key_is_base64_of_32_raw_bytes(signer):
    assert len(base64.b64decode(signer.public_key, validate=True)) == 32


# --- local key files ----------------------------------------------------------------------------


def test_create_node_key_writes_0600_and_signs(tmp_path):
    path = tmp_path / "keys" / "node.pem"
    public = create_node_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = LocalKeySigner.from_file(path)
    assert loaded.public_key == public
    assert verify(public, b"m", loaded.sign(b"m"))
    assert [p.name for p in path.parent.iterdir()] == ["node.pem"]  # no temp file left behind


def test_create_node_key_is_idempotent(tmp_path):
    path = tmp_path / "node.pem"
    first = create_node_key(path)
    pem = path.read_bytes()
    assert create_node_key(path) == first
    assert path.read_bytes() == pem


def test_create_node_key_distinct_per_path(tmp_path):
    assert create_node_key(tmp_path / "a.pem") != create_node_key(tmp_path / "b.pem")


def test_local_signer_rejects_non_ed25519_key(tmp_path):
    path = tmp_path / "ec.pem"
    ec = generate_private_key(SECP256R1())
    path.write_bytes(ec.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ValueError, match="not an Ed25519"):
        LocalKeySigner.from_file(path)


# --- KMS ----------------------------------------------------------------------------------------


def crc(data: bytes) -> int:
    return google_crc32c.value(data)


class FakeKms:
    """Signs like KMS with a local Ed25519 key; `tamper` corrupts the response the way transit could."""

    def __init__(self, tamper=None):
        self.key = Ed25519PrivateKey.generate()
        self.requests: list = []
        self.tamper = tamper or (lambda response: response)

    def asymmetric_sign(self, request):
        self.requests.append(request)
        signature = self.key.sign(request.data)
        response = kms_v1.AsymmetricSignResponse(
            signature=signature,
            signature_crc32c=crc(signature),
            verified_data_crc32c=request.data_crc32c == crc(request.data),
            name=request.name,
            protection_level=kms_v1.ProtectionLevel.HSM,
        )
        return self.tamper(response)

    def get_public_key(self, request):
        pem = self.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        return kms_v1.PublicKey(
            pem=pem,
            pem_crc32c=crc(pem.encode()),
            name=request["name"],
            algorithm=kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm.EC_SIGN_ED25519,
        )


def test_kms_request_by_value():
    request = kms_sign_request(KMS_NAME, b"claims")
    assert isinstance(request, kms_v1.AsymmetricSignRequest)
    assert request == kms_v1.AsymmetricSignRequest(name=KMS_NAME, data=b"claims", data_crc32c=crc(b"claims"))
    assert request.digest == kms_v1.Digest()  # Ed25519 in KMS signs raw data, never a digest


def test_kms_request_crc_known_value():
    # CRC32C("123456789") is the standard check value 0xE3069283.
    assert kms_sign_request(KMS_NAME, b"123456789").data_crc32c == 0xE3069283


def test_kms_signer_signs_via_client():
    client = FakeKms()
    signer = KmsSigner(KMS_NAME, client=client)
    message = claims()
    signature = signer.sign(message)
    assert client.requests == [kms_sign_request(KMS_NAME, message)]
    assert signer.key_id == KMS_NAME
    public = signer.public_key()
    assert verify(public, message, signature)
    assert not verify(public, claims(examples=1), signature)


def _set(**fields):
    def tamper(response):
        for k, v in fields.items():
            setattr(response, k, v)
        return response

    return tamper


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (_set(verified_data_crc32c=False), "data_crc32c"),
        (_set(signature_crc32c=12345), "signature_crc32c"),
        (_set(signature=b"\x00" * 64), "signature_crc32c"),
        (_set(signature_crc32c=None), "signature_crc32c"),
        (_set(name=KMS_NAME.replace("Versions/1", "Versions/2")), "not the requested"),
    ],
    ids=["data-not-verified", "bad-signature-crc", "corrupted-signature", "missing-signature-crc", "wrong-key-version"],
)
def test_kms_signer_rejects_corrupted_responses(tamper, match):
    with pytest.raises(SigningError, match=match):
        KmsSigner(KMS_NAME, client=FakeKms(tamper)).sign(b"claims")


def test_kms_public_key_checks_pem_crc():
    class BadPem(FakeKms):
        def get_public_key(self, request):
            response = super().get_public_key(request)
            response.pem_crc32c = response.pem_crc32c ^ 1
            return response

    with pytest.raises(SigningError, match="pem_crc32c"):
        KmsSigner(KMS_NAME, client=BadPem()).public_key()


@pytest.mark.parametrize("name", ["projects/p/locations/l/keyRings/r/cryptoKeys/k", "projects/p", "node.pem", ""])
def test_kms_signer_requires_a_key_version(name):
    with pytest.raises(ValueError, match="cryptoKeyVersions"):
        KmsSigner(name, client=FakeKms())


# --- signer_from_env ----------------------------------------------------------------------------


def test_signer_from_env_unset_or_empty():
    assert signer_from_env({}) is None
    assert signer_from_env({"FEDPIPE_SIGNING_KEY": "  "}) is None


def test_signer_from_env_file(tmp_path):
    path = tmp_path / "node.pem"
    public = create_node_key(path)
    signer = signer_from_env({"FEDPIPE_SIGNING_KEY": str(path)})
    assert isinstance(signer, LocalKeySigner)
    assert signer.public_key == public


def test_signer_from_env_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        signer_from_env({"FEDPIPE_SIGNING_KEY": str(tmp_path / "absent.pem")})


@pytest.mark.parametrize("value", [f"kms://{KMS_NAME}", KMS_NAME])
def test_signer_from_env_kms(value):
    client = FakeKms()
    signer = signer_from_env({"FEDPIPE_SIGNING_KEY": value}, kms_client=client)
    assert isinstance(signer, KmsSigner)
    assert signer.key_id == KMS_NAME
    signer.sign(b"m")
    assert client.requests[0].name == KMS_NAME


def test_kms_signer_builds_no_client_until_used(monkeypatch):
    signer = signer_from_env({"FEDPIPE_SIGNING_KEY": f"kms://{KMS_NAME}"})
    assert isinstance(signer, KmsSigner)
    assert signer._client is None


# --- metadata -----------------------------------------------------------------------------------


def test_encode_decode_round_trip():
    raw = bytes(range(64))
    assert decode(encode(raw)) == raw
    assert encode(raw).isascii()


@pytest.mark.parametrize("text", ["not base64!", "abc", "", "ä"])
def test_decode_rejects_malformed(text):
    with pytest.raises(ValueError):
        decode(text)


def test_metadata_round_trip(signer):
    message = claims()
    metadata = signature_metadata(signer, message)
    assert set(metadata) == {SIGNATURE_KEY, KEY_ID_KEY} == {"signature", "signing_key"}
    assert all(isinstance(v, str) for v in metadata.values())
    key_id, signature = read_metadata(metadata)
    assert key_id == signer.key_id
    assert verify(signer.public_key, message, signature)


def test_read_metadata_unsigned_and_malformed():
    assert read_metadata(None) is None
    assert read_metadata({"other": "x"}) is None
    with pytest.raises(ValueError):
        read_metadata({SIGNATURE_KEY: "%%%"})


def test_module_does_not_import_kms_at_load():
    """The hub only verifies: importing shared.signing must not pull in the KMS client (cold starts)."""
    code = "import sys, shared.signing; print('google.cloud.kms_v1' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(signing.__file__).parents[1], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"

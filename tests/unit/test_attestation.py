"""Key release end to end, in process: simulator tokens, the broker's verdicts, the worker's AEAD and re-attestation."""

from __future__ import annotations

import threading
import time
import urllib.request

import jwt
import pytest
import tink

from emulators.attestation_simulator import SIMULATOR
from shared import signing
from shared.attestation import STS_AUDIENCE, Reason, node_audience
from shared.audit import AuditEvent
from shared.envelope import Envelope, Purpose
from tests.unit.attestation_stack import OTHER_DIGEST, PROJECT, start_stack
from workers.trainer.attestation import BROKER_ENV, SOCKET_ENV, TOKEN_FILE_ENV, AttestationFailed, BrokerAead, Reattestation
from workers.trainer.signing_key import BrokerSigner, node_signer

pytestmark = pytest.mark.unit


@pytest.fixture
def stack():
    stack, server = start_stack()
    yield stack
    server.shutdown()
    server.server_close()
    stack.close()


def seal(stack, data: bytes = b"weights") -> bytes:
    return Envelope(BrokerAead(stack.attestor())).seal(data, "bucket-us", "updates/us/r1", Purpose.UPDATE)


def released(stack) -> list:
    return [r for r in stack.audit.records if r.event is AuditEvent.KEY_RELEASED]


def test_a_good_token_round_trips_through_the_envelope(stack):
    sealed = seal(stack, b"the update")
    assert Envelope(BrokerAead(stack.attestor())).open(sealed, "bucket-us", "updates/us/r1", Purpose.UPDATE) == b"the update"
    records = released(stack)
    assert [r.operation for r in records] == ["encrypt", "decrypt"]
    assert records[0].node == "us" and records[0].image_digest.startswith("sha256:1111") and records[0].hwmodel == "GCP_AMD_SEV_SNP"
    assert records[0].key_id == stack.keystore.primary_key_id("us")


@pytest.mark.parametrize(
    ("workload", "reason"),
    [
        ({"image_digest": OTHER_DIGEST}, Reason.WRONG_IMAGE),
        ({"debug": True}, Reason.DEBUG_IMAGE),
        ({"hwmodel": "GCP_AMD_SEV"}, Reason.WRONG_HARDWARE),
        ({"lifetime_s": -60}, Reason.EXPIRED),
        ({"audience": node_audience(PROJECT, "eu")}, Reason.WRONG_AUDIENCE),
        ({"support_attributes": ["USABLE"]}, Reason.NOT_STABLE),
    ],
)
def test_a_bad_token_gets_no_key_and_is_audited(stack, workload, reason):
    sealed = seal(stack)
    stack.configure("us", **workload)
    with pytest.raises(AttestationFailed) as failed:
        Envelope(BrokerAead(stack.attestor())).open(sealed, "bucket-us", "updates/us/r1", Purpose.UPDATE)
    assert failed.value.reason == reason.value
    assert [r.operation for r in released(stack)] == ["encrypt"]  # nothing decrypted
    last = stack.audit.records[-1]
    assert (last.node, last.operation, last.reason) == ("us", "decrypt", reason.value)
    expected = AuditEvent.ATTESTATION_FAILED if reason is Reason.EXPIRED else AuditEvent.KEY_REFUSED
    assert last.event is expected


def test_a_replayed_nonce_gets_no_key(stack):
    attestor = stack.attestor()
    token = attestor.fresh_token()
    attestor.broker.call("encrypt", token, plaintext=b"k", associated_data=b"")
    with pytest.raises(AttestationFailed) as failed:
        attestor.broker.call("encrypt", token, plaintext=b"k", associated_data=b"")
    assert failed.value.reason == Reason.REPLAYED_NONCE
    assert stack.audit.records[-1].reason == Reason.REPLAYED_NONCE


def test_a_nonce_the_broker_never_issued_gets_no_key(stack):
    attestor = stack.attestor()
    token = attestor.launcher.token(attestor.audience, ["made-up-nonce-0001"])
    with pytest.raises(AttestationFailed) as failed:
        attestor.broker.call("encrypt", token, plaintext=b"k", associated_data=b"")
    assert failed.value.reason == Reason.REPLAYED_NONCE


def test_another_nodes_nonce_gets_no_key(stack):
    attestor = stack.attestor("us")
    eu_nonce = stack.attestor("eu").broker.nonce()
    token = attestor.launcher.token(attestor.audience, [eu_nonce])
    with pytest.raises(AttestationFailed) as failed:
        attestor.broker.call("encrypt", token, plaintext=b"k", associated_data=b"")
    assert failed.value.reason == Reason.REPLAYED_NONCE


def test_a_token_signed_by_another_key_gets_no_key(stack):
    from cryptography.hazmat.primitives.asymmetric import rsa

    attestor = stack.attestor()
    good = jwt.decode(attestor.fresh_token(), options={"verify_signature": False})
    forged = jwt.encode(good, rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256",
                        headers={"kid": stack.simulator.attester.kid})
    with pytest.raises(AttestationFailed) as failed:
        attestor.broker.call("decrypt", forged, ciphertext=b"x", associated_data=b"")
    assert failed.value.reason == Reason.BAD_SIGNATURE
    assert stack.audit.records[-1].event is AuditEvent.ATTESTATION_FAILED


def test_a_ciphertext_under_other_associated_data_is_a_tink_error(stack):
    sealed = seal(stack)
    with pytest.raises(Exception, match="does not open"):
        Envelope(BrokerAead(stack.attestor())).open(sealed, "bucket-us", "updates/us/r2", Purpose.UPDATE)
    aead = BrokerAead(stack.attestor())
    with pytest.raises(tink.TinkError):
        aead.decrypt(aead.encrypt(b"k", b"one"), b"two")


def test_rotation_takes_effect_and_old_objects_still_open(stack):
    old = seal(stack, b"old")
    new_id = stack.keystore.rotate("us")
    new = seal(stack, b"new")
    assert released(stack)[-1].key_id == new_id
    env = Envelope(BrokerAead(stack.attestor()))
    assert env.open(old, "bucket-us", "updates/us/r1", Purpose.UPDATE) == b"old"
    assert env.open(new, "bucket-us", "updates/us/r1", Purpose.UPDATE) == b"new"


def test_the_simulator_says_what_it_is_and_writes_the_launcher_token_file(stack):
    with urllib.request.urlopen(stack.simulator.attester.url + "/", timeout=5) as reply:
        assert reply.read().decode().strip() == SIMULATOR
        assert "proves nothing" in reply.headers["X-Fedpipe-Simulator"]
    claims = jwt.decode(stack.attestor().launcher.default_token(), options={"verify_signature": False})
    assert claims["aud"] == STS_AUDIENCE and claims["swname"] == "CONFIDENTIAL_SPACE"
    assert claims["submods"]["container"]["image_digest"] == "sha256:" + "1" * 64
    stack.configure("us", issuing=False)
    stack.simulator.write_token_files()
    assert not (stack.simulator.config.launcher_dir / "us" / "attestation_verifier_claims_token").exists()


# -- re-attestation ------------------------------------------------------------------


@pytest.fixture
def short_lived():
    """Tokens valid 1 s: shorter than the 1.5 s checks below."""
    stack, server = start_stack(lifetime_s=1)
    yield stack
    server.shutdown()
    server.server_close()
    stack.close()


@pytest.mark.parametrize(("revoke", "reason"), [({"issuing": False}, Reason.MISSED_CHECK), ({"debug": True}, Reason.DEBUG_IMAGE)])
def test_a_revoked_workload_stops_the_job_within_one_check_and_drops_its_keys(short_lived, revoke, reason):
    attestor = short_lived.attestor()
    aead = BrokerAead(attestor)
    stopped: list[AttestationFailed] = []
    called = threading.Event()
    check_s = 1.5

    def stop_job(exc: AttestationFailed) -> None:
        stopped.append(exc)
        called.set()

    with Reattestation(attestor.check, check_s, stop_job, holders=[aead], node="us") as watch:
        assert aead.decrypt(aead.encrypt(b"key", b""), b"") == b"key"
        short_lived.configure("us", lifetime_s=1, **revoke)
        revoked_at = time.monotonic()
        assert called.wait(2 * check_s + 1)
        assert time.monotonic() - revoked_at <= check_s + 1.0  # the next check, not a later one
    assert [e.reason for e in stopped] == [reason.value] and watch.failure is stopped[0]
    with pytest.raises(AttestationFailed):
        aead.encrypt(b"key", b"")  # the released state is gone


def test_a_token_outliving_the_check_period_is_refused_at_start(stack):
    holder_dropped = []

    class Holder:
        def drop(self) -> None:
            holder_dropped.append(True)

    with pytest.raises(AttestationFailed) as failed:
        Reattestation(stack.attestor().check, 1.0, lambda exc: None, holders=[Holder()]).start()
    assert failed.value.reason == Reason.TOKEN_OUTLIVES_CHECK and holder_dropped == [True]


def test_a_check_that_cannot_complete_is_a_missed_check():
    stopped: list[AttestationFailed] = []
    checks = iter([lambda: 100.01, lambda: (_ for _ in ()).throw(TimeoutError())])

    watch = Reattestation(lambda: next(checks)(), 0.05, stopped.append, clock=lambda: 100.0).start()
    assert watch.failed.wait(2)
    watch.stop()
    assert [e.reason for e in stopped] == [Reason.MISSED_CHECK]


def test_the_signing_key_signs_only_for_an_attested_worker_and_each_signature_is_audited(stack):
    public = signing.LocalKeySigner.from_file(stack.broker.config.signing_keys["us"]).public_key
    signer = BrokerSigner(stack.attestor("us"), "us")
    signature = signer.sign(b"update claims")
    assert signing.verify(public, b"update claims", signature)
    assert [(r.node, r.operation) for r in released(stack)] == [("us", "sign")]

    stack.configure("us", image_digest=OTHER_DIGEST)
    with pytest.raises(AttestationFailed) as failed:
        signer.sign(b"forged claims")
    assert failed.value.reason == Reason.WRONG_IMAGE.value
    assert (stack.audit.records[-1].operation, stack.audit.records[-1].reason) == ("sign", "wrong_image")
    assert len(released(stack)) == 1  # nothing more was signed


def test_a_worker_signs_through_the_broker_unless_given_a_key_of_its_own(stack, tmp_path):
    env = {BROKER_ENV: stack.broker_url, SOCKET_ENV: "unused", TOKEN_FILE_ENV: "unused"}
    assert isinstance(node_signer(PROJECT, "us", env), BrokerSigner)
    own = tmp_path / "own.pem"
    signing.create_node_key(own)
    assert isinstance(node_signer(PROJECT, "us", {**env, signing.ENV_VAR: str(own)}), signing.LocalKeySigner)
    assert node_signer(PROJECT, "us", {}) is None

"""Updates sealed to the attested aggregator: only its key opens them, and a node seals to a key only after
its own policy admits the token vouching for it."""

from __future__ import annotations

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from emulators.attestation_simulator import Attester, Workload
from shared.aggregator_messages import KeyReply
from shared.attestation import INTEL_TDX, Reason, Refused, aggregator_audience
from shared.attested_seal import AGGREGATOR, OVERHEAD, AggregatorVerifier, AttestedKey, RecipientKey, seal_to
from shared.envelope import SEAL_OVERHEAD_MIN, Envelope, EnvelopeError, LocalKeyStore, Purpose
from shared.federation import TrainSpec
from shared.node_api_messages import FederationView
from workers.trainer.attestation import AttestationFailed
from workers.trainer.update_seal import DIGESTS_ENV, ISSUER_ENV, JWKS_ENV, seal_upload

PROJECT = "fedpipe-test"
TRUSTED = "sha256:" + "a" * 64
ISSUER = "http://attestation.test"


class StaticJwks:
    """The simulator's JWKS without HTTP: what jwt.PyJWKClient gives the verifier."""

    def __init__(self, attester: Attester) -> None:
        self.keys = jwt.PyJWKSet.from_dict(attester.jwks())

    def get_signing_key_from_jwt(self, token: str) -> jwt.PyJWK:
        kid = jwt.get_unverified_header(token)["kid"]
        return next(k for k in self.keys.keys if k.key_id == kid)


@pytest.fixture
def attester() -> Attester:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Attester(ISSUER, key, PROJECT, {AGGREGATOR: Workload(image_digest=TRUSTED)})


@pytest.fixture
def verifier(attester) -> AggregatorVerifier:
    return AggregatorVerifier(PROJECT, (TRUSTED,), StaticJwks(attester), ISSUER)


def vouched(attester: Attester, key: RecipientKey, audience: str | None = None, nonce: str | None = None, **workload) -> AttestedKey:
    attester.configure(AGGREGATOR, Workload(**{"image_digest": TRUSTED, **workload}))
    token = attester.token(AGGREGATOR, audience or aggregator_audience(PROJECT), [nonce or key.fingerprint])
    return AttestedKey(key.public_keyset, token)


def test_only_the_recipient_key_opens_what_is_sealed_to_it_at_its_name_and_purpose():
    key, other = RecipientKey(), RecipientKey()
    sealed = seal_to(key.public_keyset, b"weights", "hub", "updates/us/f/round-0001-a1.safetensors", Purpose.UPDATE)

    assert key.open(sealed, "hub", "updates/us/f/round-0001-a1.safetensors", Purpose.UPDATE) == b"weights"
    with pytest.raises(EnvelopeError):
        other.open(sealed, "hub", "updates/us/f/round-0001-a1.safetensors", Purpose.UPDATE)
    with pytest.raises(EnvelopeError):
        key.open(sealed, "hub", "updates/eu/f/round-0001-a1.safetensors", Purpose.UPDATE)  # copied as eu's
    with pytest.raises(EnvelopeError):
        key.open(sealed, "hub", "updates/us/f/round-0001-a1.safetensors", Purpose.GLOBAL_MODEL)
    assert len(sealed) - len(b"weights") == OVERHEAD >= SEAL_OVERHEAD_MIN  # the hub's size bound admits it


def test_the_hub_cannot_open_an_update_sealed_to_the_aggregator_with_any_key_it_holds(tmp_path):
    keys = LocalKeyStore(tmp_path)
    sealed = seal_to(RecipientKey().public_keyset, b"weights", "hub", "u", Purpose.UPDATE)
    for owner in ("us", "eu", "hub"):
        with pytest.raises(EnvelopeError, match="not a sealed"):
            Envelope(keys.kek(owner)).open(sealed, "hub", "u", Purpose.UPDATE)


def test_a_token_vouching_for_the_key_from_a_trusted_image_passes(attester, verifier):
    key = RecipientKey()
    claims = verifier.verify(vouched(attester, key))
    assert claims.image_digest == TRUSTED and key.fingerprint in claims.nonces


@pytest.mark.parametrize(("change", "reason"), [
    ({"image_digest": "sha256:" + "b" * 64}, Reason.WRONG_IMAGE),
    ({"debug": True}, Reason.DEBUG_IMAGE),
    ({"hwmodel": "GCP_SHIELDED_VM"}, Reason.WRONG_HARDWARE),
    ({"support_attributes": ["LATEST"]}, Reason.NOT_STABLE),
    ({"lifetime_s": -60}, Reason.EXPIRED),
])
def test_a_token_the_nodes_policy_refuses_vouches_for_nothing(attester, verifier, change, reason):
    with pytest.raises(Refused) as refused:
        verifier.verify(vouched(attester, RecipientKey(), **change))
    assert refused.value.reason is reason


def test_a_token_for_another_key_another_audience_or_from_another_signer_vouches_for_nothing(attester, verifier):
    key, substitute = RecipientKey(), RecipientKey()
    genuine = vouched(attester, key)
    with pytest.raises(Refused) as refused:
        verifier.verify(AttestedKey(substitute.public_keyset, genuine.attestation_token))  # the operator's own key, the real token
    assert refused.value.reason is Reason.WRONG_KEY
    with pytest.raises(Refused) as refused:
        verifier.verify(vouched(attester, key, audience="https://fedpipe.fedpipe-test/nodes/us/key-release"))
    assert refused.value.reason is Reason.WRONG_AUDIENCE
    forger = Attester(ISSUER, rsa.generate_private_key(public_exponent=65537, key_size=2048), PROJECT, {AGGREGATOR: Workload(image_digest=TRUSTED)})
    forger.kid = attester.kid  # claims the genuine signer's key id
    with pytest.raises(Refused) as refused:
        verifier.verify(AttestedKey(key.public_keyset, forger.token(AGGREGATOR, aggregator_audience(PROJECT), [key.fingerprint])))
    assert refused.value.reason is Reason.BAD_SIGNATURE
    assert verifier.verify(vouched(attester, key, hwmodel=INTEL_TDX)).hwmodel == INTEL_TDX


def view(confidential: bool, kind: str = "train", aggregator: KeyReply | None = None) -> FederationView:
    return FederationView(status="running", round=1, rounds=3, kind=kind, global_model_round=None, train=TrainSpec(), signed_updates=True,
                          stats=None, confidential_aggregation=confidential, aggregator=aggregator)


def test_a_worker_seals_to_the_aggregator_only_what_its_policy_admits(attester, tmp_path, monkeypatch):
    node = Envelope(LocalKeyStore(tmp_path).kek("us"))
    key = RecipientKey()
    good = vouched(attester, key)
    reply = KeyReply(public_keyset=key.public_keyset.decode(), attestation_token=good.attestation_token)
    monkeypatch.setattr(jwt, "PyJWKClient", lambda url, cache_keys: StaticJwks(attester))
    env = {DIGESTS_ENV: TRUSTED, ISSUER_ENV: ISSUER, JWKS_ENV: "http://unused"}

    sealed = seal_upload(view(True, aggregator=reply), PROJECT, node, b"w", "hub", "n", env)
    assert key.open(sealed, "hub", "n", Purpose.UPDATE) == b"w"
    assert node.open(seal_upload(view(True, kind="evaluate", aggregator=reply), PROJECT, node, b"m", "hub", "n", env), "hub", "n",
                     Purpose.UPDATE) == b"m"  # evaluation metrics stay under the node's key, for the hub
    assert node.open(seal_upload(view(False), PROJECT, node, b"w", "hub", "n", env), "hub", "n", Purpose.UPDATE) == b"w"
    with pytest.raises(AttestationFailed, match="wrong_image"):
        seal_upload(view(True, aggregator=reply), PROJECT, node, b"w", "hub", "n", {**env, DIGESTS_ENV: "sha256:" + "c" * 64})
    with pytest.raises(AttestationFailed, match="trusts no aggregator"):
        seal_upload(view(True, aggregator=reply), PROJECT, node, b"w", "hub", "n", {**env, DIGESTS_ENV: ""})
    with pytest.raises(AttestationFailed, match="offers no attested aggregator key"):
        seal_upload(view(True), PROJECT, node, b"w", "hub", "n", env)

"""How a federated worker seals what it uploads: under its node's key, or to the attested aggregator.

With `confidential_aggregation`, a training update goes to the aggregator's key only once this
worker has checked, itself, the attestation token the hub relays with it: signed by the
attestation verifier, for the aggregator's audience, its claims passing the Confidential Space
clauses with an aggregator image this node trusts (FEDPIPE_AGGREGATOR_IMAGE_DIGESTS: the node's
own setting, not the hub's), and its nonce naming that key. A node that trusts no aggregator
image, or a key that does not verify, uploads nothing: its job fails with reason `attestation`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from functools import cache

import jwt

from shared.attestation import PRODUCTION_ISSUER, Reason, Refused
from shared.attested_seal import AggregatorVerifier, AttestedKey, seal_to
from shared.envelope import Envelope, Purpose
from workers.trainer.attestation import AttestationFailed
from workers.trainer.node_client import FederationView

DIGESTS_ENV = "FEDPIPE_AGGREGATOR_IMAGE_DIGESTS"  # "sha256:...,sha256:..."
ISSUER_ENV, JWKS_ENV = "FEDPIPE_ATTESTATION_ISSUER", "FEDPIPE_ATTESTATION_JWKS_URL"
KEY_WAIT_S = 60.0  # how long a worker waits for the hub to offer the aggregator's key before it gives up
PRODUCTION_JWKS = "https://www.googleapis.com/service_accounts/v1/metadata/jwk/signer@confidentialspace-sign.iam.gserviceaccount.com"


@cache
def aggregator_verifier(project: str, digests: str, issuer: str, jwks_url: str) -> AggregatorVerifier:
    trusted = tuple(d.strip() for d in digests.split(",") if d.strip())
    if not trusted:
        raise AttestationFailed(Reason.WRONG_IMAGE, f"this node trusts no aggregator image ({DIGESTS_ENV} is empty)")
    return AggregatorVerifier(project, trusted, jwt.PyJWKClient(jwks_url, cache_keys=True), issuer)


def seal_upload(view: FederationView, project: str, envelope: Envelope, payload: bytes, bucket: str, name: str,
                env: Mapping[str, str] = os.environ, refetch: Callable[[], FederationView] | None = None,
                wait_s: float = KEY_WAIT_S) -> bytes:
    """The sealed bytes to upload at gs://bucket/name for the current round; `refetch` asks the node API again
    while the hub has no aggregator key to offer (the aggregator starting, or restarting)."""
    if not (view.confidential_aggregation and view.kind == "train"):
        return envelope.seal(payload, bucket, name, Purpose.UPDATE)
    deadline = time.monotonic() + wait_s
    while view.aggregator is None and refetch is not None and time.monotonic() < deadline:
        time.sleep(1.0)
        view = refetch()
    if view.aggregator is None:
        raise AttestationFailed(Reason.MISSED_CHECK, "the hub offers no attested aggregator key for this confidential federation")
    verifier = aggregator_verifier(project, env.get(DIGESTS_ENV, ""), env.get(ISSUER_ENV, PRODUCTION_ISSUER), env.get(JWKS_ENV, PRODUCTION_JWKS))
    key = AttestedKey(view.aggregator.public_keyset.encode(), view.aggregator.attestation_token)
    try:
        verifier.verify(key)
    except Refused as refused:
        raise AttestationFailed(refused.reason, "the aggregator's attestation does not pass this node's policy") from None
    return seal_to(key.public_keyset, payload, bucket, name, Purpose.UPDATE)

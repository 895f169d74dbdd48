"""The key a worker opens its node's sealed shards with (shared/envelope.py), and what keeps it attested.

- Locally (wherever FEDPIPE_KEY_BROKER_URL is set) the node's key is used only through the key
  broker, which releases it for each use to a worker whose fresh attestation token passes the
  node's policy, and the worker re-attests every `REATTEST_S` (a failure stops the job).
- In Confidential Space (FEDPIPE_KEY_RELEASE_PROVIDER names the node's pool provider) the key is
  the node's Cloud KMS key, used with credentials that STS issues for the launcher's attestation
  token: the pool's condition is the node's key-release policy, checked at every exchange.
- Elsewhere, the caller's own credentials: a worker outside Confidential Space gets no key.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from google.auth import identity_pool

from shared.attestation import node_audience
from shared.config import Settings
from shared.envelope import Envelope, cloud_kms_kek, node_kek
from workers.trainer.attestation import (
    BROKER_ENV,
    DEFAULT_SOCKET,
    DEFAULT_TOKEN_FILE,
    SOCKET_ENV,
    TOKEN_FILE_ENV,
    AttestationFailed,
    Attestor,
    BrokerAead,
    BrokerClient,
    Launcher,
    Reattestation,
)

PROVIDER_ENV = "FEDPIPE_KEY_RELEASE_PROVIDER"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
STS_TOKEN_URL = "https://sts.googleapis.com/v1/token"
REATTEST_ENV = "FEDPIPE_REATTEST_S"
REATTEST_S = 30.0  # check_frequency: the launcher's tokens must expire sooner


@dataclass
class NodeKeys:
    envelope: Envelope
    watch: Reattestation | None  # None where Cloud KMS itself checks the attestation

    def __enter__(self) -> NodeKeys:
        if self.watch is not None:
            self.watch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.watch is not None:
            self.watch.stop()

    @property
    def failure(self) -> AttestationFailed | None:
        return self.watch.failure if self.watch is not None else None


class LauncherToken(identity_pool.SubjectTokenSupplier):
    """The launcher's attestation token for the node's audience: what STS exchanges for KMS access."""

    def __init__(self, launcher: Launcher, audience: str) -> None:
        self.launcher, self.audience = launcher, audience

    def get_subject_token(self, context, request) -> str:
        return self.launcher.token(self.audience, [])


def attested_credentials(provider: str, launcher: Launcher, audience: str) -> identity_pool.Credentials:
    """Federated credentials of the node's workload identity pool (`provider`: projects/N/locations/global/
    workloadIdentityPools/P/providers/Q) for this workload's attestation."""
    return identity_pool.Credentials(
        audience=f"//iam.googleapis.com/{provider}", subject_token_type=JWT_TOKEN_TYPE, token_url=STS_TOKEN_URL,
        subject_token_supplier=LauncherToken(launcher, audience), scopes=["https://www.googleapis.com/auth/cloud-platform"],
    )


def node_keys(settings: Settings, node: str, on_failure: Callable[[AttestationFailed], None]) -> NodeKeys:
    env = os.environ
    if provider := env.get(PROVIDER_ENV):
        launcher = Launcher(env.get(SOCKET_ENV, DEFAULT_SOCKET), env.get(TOKEN_FILE_ENV, DEFAULT_TOKEN_FILE))
        credentials = attested_credentials(provider, launcher, node_audience(settings.project, node))
        return NodeKeys(Envelope(cloud_kms_kek(settings.node_keks[node], credentials)), None)
    if url := env.get(BROKER_ENV):
        launcher = Launcher(env.get(SOCKET_ENV, DEFAULT_SOCKET), env.get(TOKEN_FILE_ENV, DEFAULT_TOKEN_FILE))
        attestor = Attestor(launcher, BrokerClient(url, node), node_audience(settings.project, node))
        kek = BrokerAead(attestor)
        watch = Reattestation(attestor.check, float(env.get(REATTEST_ENV, REATTEST_S)), on_failure, holders=[kek], node=node)
        return NodeKeys(Envelope(kek), watch)
    return NodeKeys(Envelope(node_kek(settings, node)), None)

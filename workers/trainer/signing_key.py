"""The key a worker signs its updates with, released like its node's key-encryption key: only to an attested workload.

- In Confidential Space (FEDPIPE_KEY_RELEASE_PROVIDER set) FEDPIPE_SIGNING_KEY names the node's Cloud
  KMS signing key, used with the STS credentials of the node's attested pool: infra grants that key's
  signer role to the pool's principal set, not to the worker's service account.
- Locally (FEDPIPE_KEY_BROKER_URL set, no FEDPIPE_SIGNING_KEY) the key broker signs for a worker whose
  fresh attestation passes the node's policy, as it decrypts.
- FEDPIPE_SIGNING_KEY alone (a PEM file or a KMS key version) signs with the caller's own credentials:
  for tests and for deployments without confidential workers.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping

from shared import signing
from shared.attestation import node_audience
from workers.trainer.attestation import (
    BROKER_ENV,
    DEFAULT_SOCKET,
    DEFAULT_TOKEN_FILE,
    SOCKET_ENV,
    TOKEN_FILE_ENV,
    Attestor,
    BrokerClient,
    Launcher,
)
from workers.trainer.keys import PROVIDER_ENV, attested_credentials


class BrokerSigner:
    """The node's signing key behind the local key broker: every signature needs a fresh attestation."""

    def __init__(self, attestor: Attestor, node: str) -> None:
        self.attestor = attestor
        self.key_id = f"key-broker:{node}"  # the hub verifies against the node's registered key, not this

    def sign(self, message: bytes) -> bytes:
        reply = self.attestor.broker.call("sign", self.attestor.fresh_token(), message=message)
        return base64.b64decode(reply["signature"])


def node_signer(project: str, node: str, env: Mapping[str, str] = os.environ) -> signing.Signer | None:
    """How this worker signs for `node`; None when it has no signing key (unsigned updates)."""
    launcher = lambda: Launcher(env.get(SOCKET_ENV, DEFAULT_SOCKET), env.get(TOKEN_FILE_ENV, DEFAULT_TOKEN_FILE))  # noqa: E731
    configured = env.get(signing.ENV_VAR, "").strip()
    if configured and (provider := env.get(PROVIDER_ENV)):
        from google.cloud import kms_v1

        credentials = attested_credentials(provider, launcher(), node_audience(project, node))
        client = kms_v1.KeyManagementServiceClient(credentials=credentials)
        return signing.KmsSigner(configured.removeprefix("kms://"), client=client)
    if configured:
        return signing.signer_from_env(env)
    if url := env.get(BROKER_ENV):
        return BrokerSigner(Attestor(launcher(), BrokerClient(url, node), node_audience(project, node)), node)
    return None

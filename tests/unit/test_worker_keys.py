"""Which key a worker gets, and with what credentials, in each place it can run."""

from __future__ import annotations

from google.auth import identity_pool

from shared.config import Settings
from workers.trainer import keys

PROVIDER = "projects/123456789012/locations/global/workloadIdentityPools/fedpipe-us-attested/providers/attestation-verifier"
KEK = "gcp-kms://projects/p/locations/us-central1/keyRings/fedpipe-data/cryptoKeys/fedpipe-us-kek"


class RecordingLauncher:
    def __init__(self) -> None:
        self.asked: list[tuple[str, list[str]]] = []

    def token(self, audience: str, nonces: list[str]) -> str:
        self.asked.append((audience, nonces))
        return "attestation-token"


def test_confidential_space_workers_use_the_nodes_kms_key_with_credentials_of_its_attested_pool(monkeypatch):
    used = {}
    monkeypatch.setattr(keys, "cloud_kms_kek", lambda uri, credentials=None: used.update(uri=uri, credentials=credentials) or object())
    monkeypatch.setenv(keys.PROVIDER_ENV, PROVIDER)
    monkeypatch.delenv(keys.BROKER_ENV, raising=False)

    node = keys.node_keys(Settings(project="acme", node_keks={"us": KEK}), "us", on_failure=lambda _: None)

    assert node.watch is None  # the pool's condition is checked at every token exchange
    assert used["uri"] == KEK
    credentials = used["credentials"]
    assert isinstance(credentials, identity_pool.Credentials)
    assert credentials.info["audience"] == f"//iam.googleapis.com/{PROVIDER}"
    assert credentials.info["subject_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
    assert credentials.info["token_url"] == "https://sts.googleapis.com/v1/token"


def test_the_subject_token_is_the_launchers_attestation_for_the_nodes_audience():
    launcher = RecordingLauncher()
    credentials = keys.attested_credentials(PROVIDER, launcher, "https://fedpipe.acme/nodes/us/key-release")

    assert credentials._subject_token_supplier.get_subject_token(None, None) == "attestation-token"
    assert launcher.asked == [("https://fedpipe.acme/nodes/us/key-release", [])]


def test_without_a_broker_or_a_pool_the_worker_has_only_its_own_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv(keys.PROVIDER_ENV, raising=False)
    monkeypatch.delenv(keys.BROKER_ENV, raising=False)
    node = keys.node_keys(Settings(local_keystore=str(tmp_path)), "us", on_failure=lambda _: None)
    assert node.watch is None and node.envelope is not None

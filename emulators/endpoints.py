"""Where the local cloud listens, saved to the state directory so every CLI command finds it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

GCS_NOTIFICATIONS_TOPIC = "gcs-notifications"  # fake-gcs-server publishes every object event here
FIRESTORE_EVENTS_TOPIC = "eventarc-firestore"  # the router parks Firestore events here before acking them
REPLAY_TOPIC = "eventarc-replay"  # `fedpipe events replay` puts a stored CloudEvent back here
DELIVERIES_COLLECTION = "eventarc_deliveries"  # the router's delivery log (local Eventarc only)


def launcher_dir(state_dir: Path) -> Path:
    """The attestation simulator's stand-in for /run/container_launcher, a folder per node."""
    return state_dir / "tee"


def keystore_dir(state_dir: Path) -> Path:
    """Where the local stand-in keeps each node's key-encryption key."""
    return state_dir / "keys" / "kek"


def default_state_dir() -> Path:
    return Path(os.environ.get("FEDPIPE_STATE_DIR", ".fedpipe")).resolve()


@dataclass
class Endpoints:
    project: str
    state_dir: str
    pubsub_port: int
    firestore_port: int
    gcs_port: int
    router_port: int
    issuer_port: int = 0  # the local ID-token issuer (emulators/metadata_server.py)
    metadata_ports: dict[str, int] = field(default_factory=dict)  # each node's local metadata endpoint
    worker_modules: dict[str, str] = field(default_factory=dict)  # nodes that run a worker of their own (StackOptions)
    attestation_port: int = 0  # the attestation simulator (emulators/attestation_simulator.py)
    key_broker_port: int = 0  # the key broker (emulators/key_broker.py)
    hub_metadata_port: int = 0  # the hub functions' metadata endpoint (their ID tokens)
    aggregator_port: int = 0  # the attested aggregator (workers/aggregator)
    worker_digest: str = ""  # the local stand-in for the trainer image's digest, which the key-release policies allow
    aggregator_digests: str = ""  # the aggregator images the nodes trust: the local stand-in's digest
    function_ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    supervisor_pid: int | None = None  # the `fedpipe up`/`demo` process that owns the children

    def client_env(self) -> dict[str, str]:
        """What a client (ours, gcloud, a user's script) needs to talk to the local cloud."""
        return {
            "GOOGLE_CLOUD_PROJECT": self.project,
            "FEDPIPE_PROJECT": self.project,
            "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{self.pubsub_port}",
            "FIRESTORE_EMULATOR_HOST": f"127.0.0.1:{self.firestore_port}",
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{self.gcs_port}",
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": f"http://127.0.0.1:{self.gcs_port}/",
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB": f"http://127.0.0.1:{self.pubsub_port}/",
            "CLOUDSDK_AUTH_ACCESS_TOKEN": "dummy",
            "CLOUDSDK_CORE_PROJECT": self.project,
            # The LOCAL STAND-IN for the nodes' Cloud KMS keys (shared/envelope.py LocalKeyStore).
            "FEDPIPE_LOCAL_KEYSTORE": str(keystore_dir(Path(self.state_dir))),
        }

    def function_url(self, function: str) -> str:
        return f"http://127.0.0.1:{self.function_ports[function]}/"

    @property
    def aggregator_url(self) -> str:
        return f"http://127.0.0.1:{self.aggregator_port}/"

    def identity_env(self) -> dict[str, str]:
        """Where the functions find the node API's audience and the token issuer's keys, and the attested aggregator."""
        return {
            "FEDPIPE_NODE_API_URL": self.function_url("node_api"),
            "FEDPIPE_ID_TOKEN_CERTS_URL": f"http://127.0.0.1:{self.issuer_port}/oauth2/v3/certs",
            "FEDPIPE_ID_TOKEN_ISSUER": f"http://127.0.0.1:{self.issuer_port}",
            "FEDPIPE_AGGREGATOR_URL": self.aggregator_url,
            "FEDPIPE_HUB_IDENTITY": f"hub@{self.project}.iam.gserviceaccount.com",
        }

    def hub_env(self) -> dict[str, str]:
        """The hub functions' own metadata endpoint: google-auth gets the hub identity's ID tokens there, as on Cloud Run."""
        host = f"127.0.0.1:{self.hub_metadata_port}"
        return {"GCE_METADATA_HOST": host, "GCE_METADATA_IP": host}

    def worker_env(self, node: str) -> dict[str, str]:
        """What a worker of `node` is told: the node API, and the metadata endpoint that gives it `node`'s ID tokens."""
        host = f"127.0.0.1:{self.metadata_ports[node]}"
        launcher = launcher_dir(Path(self.state_dir))
        return {
            "FEDPIPE_NODE_API_URL": self.function_url("node_api"), "GCE_METADATA_HOST": host, "GCE_METADATA_IP": host,
            # Where Confidential Space's launcher would be, played by the simulator, and the key broker.
            "FEDPIPE_TEESERVER_SOCKET": str(launcher / node / "teeserver.sock"),
            "FEDPIPE_ATTESTATION_TOKEN_FILE": str(launcher / node / "attestation_verifier_claims_token"),
            "FEDPIPE_KEY_BROKER_URL": f"http://127.0.0.1:{self.key_broker_port}",
            # The aggregator images this node trusts with its updates, and where their tokens' signing keys are.
            "FEDPIPE_AGGREGATOR_IMAGE_DIGESTS": self.aggregator_digests,
            "FEDPIPE_ATTESTATION_ISSUER": f"http://127.0.0.1:{self.attestation_port}",
            "FEDPIPE_ATTESTATION_JWKS_URL": f"http://127.0.0.1:{self.attestation_port}/v1/certs",
        }

    @property
    def path(self) -> Path:
        return Path(self.state_dir) / "stack.json"

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(self.path)

    @classmethod
    def load(cls, state_dir: Path | None = None) -> Endpoints:
        path = (state_dir or default_state_dir()) / "stack.json"
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"no local cloud is running (no {path}); start one with `fedpipe up`") from None

    def activate(self) -> None:
        """Point this process's Google clients at the local cloud."""
        os.environ.update(self.client_env())

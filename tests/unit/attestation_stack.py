"""The attestation simulator and key broker, started in this process on free ports, for the unit tests."""

from __future__ import annotations

import io
import json
import shutil
import socket
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from emulators.attestation_simulator import CERTS_PATH, Simulator, SimulatorConfig, Workload, issuer_url
from emulators.key_broker import BrokerConfig, KeyBroker, serve
from shared.attestation import NodePolicy, node_audience
from shared.audit import Auditor, AuditRecord
from shared.envelope import LocalKeyStore
from shared.signing import create_node_key
from workers.trainer.attestation import Attestor, BrokerClient, Launcher

GOOD_DIGEST = "sha256:" + "1" * 64
OTHER_DIGEST = "sha256:" + "2" * 64
PROJECT = "fedpipe-test"
NODES = ("us", "eu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ListStore:
    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    def add(self, record: AuditRecord) -> None:
        self.records.append(record)


@dataclass
class Stack:
    directory: Path
    simulator: Simulator
    broker: KeyBroker
    broker_url: str
    keystore: LocalKeyStore
    audit: ListStore

    def configure(self, node: str, **workload) -> None:
        """Reconfigure a node's workload as an operator would, through the simulator's HTTP port."""
        body = Workload(**{"image_digest": GOOD_DIGEST, **workload}).model_dump_json().encode()
        request = urllib.request.Request(f"{self.simulator.attester.url}/v1/workloads/{node}", body, method="PUT")
        with urllib.request.urlopen(request, timeout=5) as reply:
            assert json.loads(reply.read())["node"] == node

    def attestor(self, node: str = "us") -> Attestor:
        launcher_dir = self.simulator.config.launcher_dir
        launcher = Launcher(str(launcher_dir / node / "teeserver.sock"), str(launcher_dir / node / "attestation_verifier_claims_token"))
        return Attestor(launcher, BrokerClient(self.broker_url, node), node_audience(PROJECT, node))

    def close(self) -> None:
        self.simulator.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_stack(lifetime_s: int = 3600) -> tuple[Stack, object]:
    """Both services with a good workload per node; returns the stack and the broker's HTTP server."""
    directory = Path(tempfile.mkdtemp(prefix="fpa-", dir="/tmp"))  # short: unix socket paths are limited to 108 bytes
    keystore = LocalKeyStore(directory / "keys")
    sim_port, broker_port = free_port(), free_port()
    simulator = Simulator(SimulatorConfig(
        project=PROJECT, port=sim_port, key_path=directory / "keys" / "attestation-simulator.pem", launcher_dir=directory / "launcher",
        workloads={n: Workload(image_digest=GOOD_DIGEST, service_account=f"worker-{n}@{PROJECT}.iam", lifetime_s=lifetime_s) for n in NODES},
    )).start()
    store = ListStore()
    config = BrokerConfig(
        project=PROJECT, port=broker_port, issuer=issuer_url(sim_port), jwks_url=issuer_url(sim_port) + CERTS_PATH,
        policies=[NodePolicy(node=n, audience=node_audience(PROJECT, n), image_digests=(GOOD_DIGEST,)) for n in NODES],
        keysets={n: keystore.ensure(n) for n in NODES}, audit_to_firestore=False,
        signing_keys={n: directory / "keys" / f"sign-{n}.pem" for n in NODES},
    )
    for path in config.signing_keys.values():
        create_node_key(path)
    broker = KeyBroker(config, Auditor(store, stream=io.StringIO()))
    server = serve(broker, broker_port)
    return Stack(directory, simulator, broker, f"http://127.0.0.1:{broker_port}", keystore, store), server

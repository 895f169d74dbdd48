"""The key a worker opens its node's sealed shards with (shared/envelope.py), and what keeps it attested.

Locally (and wherever FEDPIPE_KEY_BROKER_URL is set) the node's key is used only through the key
broker, which releases it for each use to a worker whose fresh attestation token passes the
node's policy, and the worker re-attests every `REATTEST_S` (a failure stops the job). In
production without a broker, the key is the node's Cloud KMS key, which the node's workload
identity pool releases only to attested workloads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from shared.attestation import node_audience
from shared.config import Settings
from shared.envelope import Envelope, node_kek
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


def node_keys(settings: Settings, node: str, on_failure: Callable[[AttestationFailed], None]) -> NodeKeys:
    env = os.environ
    if url := env.get(BROKER_ENV):
        launcher = Launcher(env.get(SOCKET_ENV, DEFAULT_SOCKET), env.get(TOKEN_FILE_ENV, DEFAULT_TOKEN_FILE))
        attestor = Attestor(launcher, BrokerClient(url, node), node_audience(settings.project, node))
        kek = BrokerAead(attestor)
        watch = Reattestation(attestor.check, float(env.get(REATTEST_ENV, REATTEST_S)), on_failure, holders=[kek], node=node)
        return NodeKeys(Envelope(kek), watch)
    return NodeKeys(Envelope(node_kek(settings, node)), None)

"""The worker's side of key release: attestation tokens, the node's key through the broker, re-attestation.

A worker never holds its node's key-encryption key. `BrokerAead` is a Tink AEAD whose every
call asks the key broker, with a fresh token: a nonce from the broker, then a token from
the launcher's teeserver socket for the node's audience carrying that nonce (on Confidential
Space the real launcher, locally emulators/attestation_simulator.py). The envelope code uses
it exactly like a Cloud KMS AEAD. `Reattestation` asks the broker to re-verify the workload
every `check_frequency_s`; a failed or missed check drops what was released and calls the
stop callback (failure action stop_job). A refusal is `AttestationFailed` with its reason.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from typing import Protocol

import jwt
import tink
from tink import aead

from shared.attestation import Reason
from shared.audit import AuditEvent, Auditor

log = logging.getLogger("fedpipe.worker.attestation")

DEFAULT_SOCKET = "/run/container_launcher/teeserver.sock"
DEFAULT_TOKEN_FILE = "/run/container_launcher/attestation_verifier_claims_token"
SOCKET_ENV, TOKEN_FILE_ENV, BROKER_ENV = "FEDPIPE_TEESERVER_SOCKET", "FEDPIPE_ATTESTATION_TOKEN_FILE", "FEDPIPE_KEY_BROKER_URL"


class AttestationFailed(RuntimeError):
    """No key for this worker: the job fails with reason `attestation` and this code (a shared.attestation.Reason value)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"attestation failed: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Launcher:
    """The Confidential Space launcher, as a workload sees it: its teeserver socket and its token file."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, token_file: str = DEFAULT_TOKEN_FILE, timeout_s: float = 10.0) -> None:
        self.socket_path, self.token_file, self.timeout_s = socket_path, token_file, timeout_s

    def token(self, audience: str, nonces: list[str]) -> str:
        """A custom-audience OIDC token carrying `nonces`. AttestationFailed(missed_check) if the launcher gives none."""
        conn = _UnixConnection(self.socket_path, self.timeout_s)
        try:
            conn.request("POST", "/v1/token", json.dumps({"audience": audience, "nonces": nonces, "token_type": "OIDC"}),
                         {"Content-Type": "application/json"})
            reply = conn.getresponse()
            body = reply.read().decode()
        except OSError as exc:
            raise AttestationFailed(Reason.MISSED_CHECK, f"launcher unreachable: {type(exc).__name__}") from None
        finally:
            conn.close()
        if reply.status != 200:
            raise AttestationFailed(Reason.MISSED_CHECK, f"launcher answered {reply.status}")
        return body.strip()

    def default_token(self) -> str:
        """The launcher's hourly token for STS (audience https://sts.googleapis.com)."""
        with open(self.token_file) as fh:
            return fh.read().strip()


class BrokerClient:
    """The key broker's HTTP API for one node (emulators/key_broker.py)."""

    def __init__(self, url: str, node: str, timeout_s: float = 10.0) -> None:
        self.url, self.node, self.timeout_s = url.rstrip("/"), node, timeout_s

    def _post(self, path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                return reply.status, json.loads(reply.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except OSError as exc:
            raise AttestationFailed(Reason.MISSED_CHECK, f"key broker unreachable: {type(exc).__name__}") from None

    def nonce(self) -> str:
        status, body = self._post("/v1/nonces", {"node": self.node})
        if status != 200:
            raise AttestationFailed(Reason.MISSED_CHECK, f"no nonce from the key broker ({status})")
        return body["nonce"]

    def call(self, operation: str, token: str, **data: bytes) -> dict:
        body = {"attestation_token": token, **{k: base64.b64encode(v).decode() for k, v in data.items()}}
        status, reply = self._post(f"/v1/nodes/{self.node}:{operation}", body)
        if status == 403:
            raise AttestationFailed(reply.get("reason", "refused"))
        if status == 400 and operation == "decrypt":
            raise tink.TinkError("the key broker could not decrypt: another key, other associated data, or altered")
        if status != 200:
            raise AttestationFailed(Reason.MISSED_CHECK, f"key broker answered {status}")
        return reply


class Attestor:
    """Fresh attestation for one node: a broker nonce, then a launcher token for the node's audience carrying it."""

    def __init__(self, launcher: Launcher, broker: BrokerClient, audience: str) -> None:
        self.launcher, self.broker, self.audience = launcher, broker, audience

    def fresh_token(self) -> str:
        return self.launcher.token(self.audience, [self.broker.nonce()])

    def check(self) -> int:
        """Have the broker verify this workload now; the token's expiry (unix seconds)."""
        token = self.fresh_token()
        self.broker.call("attest", token)
        return int(jwt.decode(token, options={"verify_signature": False})["exp"])  # the broker verified it


class Droppable(Protocol):
    def drop(self) -> None: ...


class BrokerAead(aead.Aead):
    """The node's KEK as a Tink AEAD: each call is released by the broker for a fresh token, until dropped."""

    def __init__(self, attestor: Attestor) -> None:
        self._attestor: Attestor | None = attestor

    def _use(self, operation: str, field: str, data: bytes, associated_data: bytes) -> bytes:
        attestor = self._attestor
        if attestor is None:
            raise AttestationFailed(Reason.MISSED_CHECK, "released keys were dropped after a failed re-attestation")
        reply = attestor.broker.call(operation, attestor.fresh_token(), **{field: data, "associated_data": associated_data})
        return base64.b64decode(reply["ciphertext" if operation == "encrypt" else "plaintext"])

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        return self._use("encrypt", "plaintext", plaintext, associated_data)

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes:
        return self._use("decrypt", "ciphertext", ciphertext, associated_data)

    def drop(self) -> None:
        self._attestor = None


class Reattestation:
    """Re-attests every `check_frequency_s` in the background; the first failure stops the job.

    A check fails when the broker refuses the workload, when the launcher or broker cannot be
    reached within the check (a missed check), or when the token would stay valid past the
    next check (`token_outlives_check`): as NVIDIA FLARE's SEV-SNP authorizer requires, a token
    must expire before the check that could revoke it. On failure: every holder is dropped, then
    `on_failure(exc)` runs (stop_job). `start()` checks once before returning, so a job never
    starts on a workload that is refused already.
    """

    def __init__(self, check: Callable[[], int], check_frequency_s: float, on_failure: Callable[[AttestationFailed], None],
                 holders: Iterable[Droppable] = (), node: str | None = None, auditor: Auditor | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.check, self.check_frequency_s, self.on_failure, self.clock = check, check_frequency_s, on_failure, clock
        self.holders, self.node = list(holders), node
        self.audit = auditor or Auditor(None, source="worker")  # workers write no Firestore: the log entry is their record
        self.failure: AttestationFailed | None = None
        self.failed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="reattestation")

    def start(self) -> Reattestation:
        if (failure := self._verdict()) is not None:
            self._drop(failure)
            raise failure
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:  # on_failure may call stop()
            self._thread.join()

    def __enter__(self) -> Reattestation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.check_frequency_s):
            if (failure := self._verdict()) is not None:
                self._drop(failure)
                self.on_failure(failure)
                return

    def _verdict(self) -> AttestationFailed | None:
        try:
            expires = self.check()
        except AttestationFailed as exc:
            return exc
        except Exception as exc:  # anything else that kept the check from completing is a missed check
            return AttestationFailed(Reason.MISSED_CHECK, type(exc).__name__)
        if expires > self.clock() + self.check_frequency_s:
            return AttestationFailed(Reason.TOKEN_OUTLIVES_CHECK, f"token valid {expires - self.clock():.0f}s, checks every {self.check_frequency_s:g}s")
        return None

    def _drop(self, failure: AttestationFailed) -> None:
        log.error("attestation failed: %s; dropping released keys and stopping the job", failure.reason)
        for holder in self.holders:
            holder.drop()
        self.failure = failure
        self.failed.set()
        self.audit(AuditEvent.ATTESTATION_FAILED, node=self.node, operation="reattest", reason=str(failure.reason))

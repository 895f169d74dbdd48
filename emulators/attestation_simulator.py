"""ATTESTATION SIMULATOR: plays the Confidential Space launcher for each node's worker. Proves nothing.

On a Confidential Space VM the launcher obtains attestation tokens from Google's attestation
service, which checks the TEE's hardware evidence. Here no hardware is checked: this process
signs whatever claims its configuration says, with an RS256 key made at start (kept under the
stack's state dir), so the key broker and the worker run the same code as in production:
- the launcher's default token (audience https://sts.googleapis.com), rewritten before it
  expires, at `token_file(...)` (production: /run/container_launcher/attestation_verifier_claims_token);
- the launcher's teeserver socket, one per node, for custom-audience tokens with nonces:
  `POST /v1/token {"audience", "nonces", "token_type": "OIDC"}` (production:
  /run/container_launcher/teeserver.sock);
- an HTTP port with the banner, the OpenID configuration and the JWKS the broker verifies
  against, and `PUT /v1/workloads/{node}`: replace a node's workload configuration (a new image
  digest, a debug image, another TEE, `issuing: false` to revoke it).
What a token claims is the node's `Workload`: that is how the stack and the tests get a
wrong digest, a debug image, the wrong hardware, an expired token or another audience.

Run as `python -m emulators.attestation_simulator CONFIG_JSON` (a SimulatorConfig).
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import BaseModel, Field, ValidationError

from emulators.token_keys import jwks, key_id, new_key
from shared.attestation import AMD_SEV_SNP, CONFIDENTIAL_SPACE, DEBUG_DBGSTAT, INTEL_TDX, PRODUCTION_DBGSTAT, STS_AUDIENCE

log = logging.getLogger("fedpipe.attestation_simulator")

SIMULATOR = (
    "fedpipe local stack: ATTESTATION SIMULATOR. It plays the Confidential Space launcher and signs "
    "whatever claims its configuration says; no hardware is attested and its tokens prove nothing."
)
CERTS_PATH = "/v1/certs"
TOKEN_FILE = "attestation_verifier_claims_token"
SOCKET_FILE = "teeserver.sock"
MAX_NONCES, NONCE_BYTES = 6, (8, 88)  # the launcher's limits on custom-token nonces


class Workload(BaseModel):
    """What a node's launcher attests: the image that runs, on what, how. Defaults: a good production workload."""

    image_digest: str
    image_reference: str = "local/fedpipe-trainer"
    hwmodel: str = AMD_SEV_SNP
    debug: bool = False  # a debug Confidential Space image: dbgstat enabled, no support attributes
    support_attributes: list[str] = Field(default_factory=lambda: ["LATEST", "STABLE", "USABLE"])
    service_account: str = ""
    lifetime_s: int = 3600  # as the launcher's tokens; <= 0 issues tokens already expired
    audience: str | None = None  # set: every custom token claims this audience, whatever was asked
    issuing: bool = True  # false: the launcher answers no token (a revoked workload)


class SimulatorConfig(BaseModel):
    project: str = "fedpipe-local"
    port: int
    key_path: Path
    launcher_dir: Path  # per node: <launcher_dir>/<node>/{attestation_verifier_claims_token,teeserver.sock}; keep it short (socket paths)
    workloads: dict[str, Workload]
    refresh_s: float = 60.0  # how often the default token files are rewritten


def token_file(launcher_dir: Path, node: str) -> Path:
    return launcher_dir / node / TOKEN_FILE


def socket_path(launcher_dir: Path, node: str) -> Path:
    return launcher_dir / node / SOCKET_FILE


def issuer_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


class Attester:
    """Signs tokens with the documented Confidential Space claim set for each node's configured workload."""

    def __init__(self, url: str, key: rsa.RSAPrivateKey, project: str, workloads: dict[str, Workload]) -> None:
        self.url, self._key, self.project, self.kid = url, key, project, key_id(key)
        self._workloads = dict(workloads)
        self._lock = threading.Lock()

    def jwks(self) -> dict:
        return jwks(self._key)

    def workload(self, node: str) -> Workload | None:
        with self._lock:
            return self._workloads.get(node)

    def configure(self, node: str, workload: Workload) -> None:
        with self._lock:
            self._workloads[node] = workload

    def token(self, node: str, audience: str, nonces: list[str], now: float | None = None) -> str | None:
        """A signed token for `node`'s workload; None while it is not issuing."""
        w = self.workload(node)
        if w is None or not w.issuing:
            return None
        now = int(time.time() if now is None else now)
        claims = {
            "iss": self.url, "aud": w.audience or audience, "iat": now, "nbf": now, "exp": now + w.lifetime_s,
            "sub": f"https://www.googleapis.com/compute/v1/projects/{self.project}/zones/local/instances/{node}-simulated",
            "eat_profile": "https://cloud.google.com/confidential-computing/confidential-space/docs/reference/token-claims",
            "secboot": True, "oemid": 11129, "hwmodel": w.hwmodel, "swname": CONFIDENTIAL_SPACE, "swversion": ["simulated"],
            "dbgstat": DEBUG_DBGSTAT if w.debug else PRODUCTION_DBGSTAT,
            "google_service_accounts": [w.service_account] if w.service_account else [],
            "submods": {
                "confidential_space": {"support_attributes": [] if w.debug else list(w.support_attributes)},
                "container": {"image_reference": f"{w.image_reference}@{w.image_digest}", "image_digest": w.image_digest,
                              "restart_policy": "Never", "args": [], "env": {}},
                "gce": {"zone": "local", "project_id": self.project, "instance_name": f"{node}-simulated"},
            },
        }
        if w.hwmodel == INTEL_TDX:
            claims["attester_tcb"] = ["INTEL"]
        if nonces:
            claims["eat_nonce"] = nonces[0] if len(nonces) == 1 else nonces
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})


def _bad_nonces(nonces: object) -> str | None:
    if not isinstance(nonces, list) or len(nonces) > MAX_NONCES or not all(isinstance(n, str) for n in nonces):
        return f"nonces: a list of at most {MAX_NONCES} strings"
    if any(not NONCE_BYTES[0] <= len(n.encode()) <= NONCE_BYTES[1] for n in nonces):
        return f"each nonce is {NONCE_BYTES[0]} to {NONCE_BYTES[1]} bytes"
    return None


class _Handler(BaseHTTPRequestHandler):
    attester: Attester
    node: str | None = None  # set on a node's teeserver socket; None on the HTTP port

    def log_message(self, fmt: str, *args) -> None:
        log.debug(fmt, *args)

    def address_string(self) -> str:  # a unix socket's peer has no host
        return self.node or super().address_string()

    def _reply(self, status: int, body: str, content_type: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("X-Fedpipe-Simulator", "attestation simulator: proves nothing")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 65536))

    def do_GET(self) -> None:
        if self.path in ("", "/"):
            return self._reply(HTTPStatus.OK, SIMULATOR + "\n")
        if self.node is None and self.path == CERTS_PATH:
            return self._reply(HTTPStatus.OK, json.dumps(self.attester.jwks()), "application/json")
        if self.node is None and self.path == "/.well-known/openid-configuration":
            url = self.attester.url
            doc = {"issuer": url, "jwks_uri": url + CERTS_PATH, "id_token_signing_alg_values_supported": ["RS256"], "simulator": SIMULATOR}
            return self._reply(HTTPStatus.OK, json.dumps(doc), "application/json")
        return self._reply(HTTPStatus.NOT_FOUND, "not found\n")

    def do_POST(self) -> None:
        if self.node is None or self.path != "/v1/token":
            return self._reply(HTTPStatus.NOT_FOUND, "not found\n")
        try:
            request = json.loads(self._body() or b"{}")
        except ValueError:
            return self._reply(HTTPStatus.BAD_REQUEST, "body is not JSON\n")
        audience, nonces = request.get("audience"), request.get("nonces", [])
        if not isinstance(audience, str) or not 0 < len(audience) <= 512:
            return self._reply(HTTPStatus.BAD_REQUEST, "audience: 1 to 512 characters\n")
        if (problem := _bad_nonces(nonces)) is not None:
            return self._reply(HTTPStatus.BAD_REQUEST, problem + "\n")
        token = self.attester.token(self.node, audience, nonces)
        if token is None:
            log.warning("node %s: not issuing (simulator configuration)", self.node)
            return self._reply(HTTPStatus.SERVICE_UNAVAILABLE, "this workload is not being attested (simulator configuration)\n")
        return self._reply(HTTPStatus.OK, token)

    def do_PUT(self) -> None:
        prefix = "/v1/workloads/"
        if self.node is not None or not self.path.startswith(prefix):
            return self._reply(HTTPStatus.NOT_FOUND, "not found\n")
        node = self.path.removeprefix(prefix)
        try:
            workload = Workload.model_validate_json(self._body())
        except ValidationError as exc:
            return self._reply(HTTPStatus.BAD_REQUEST, f"malformed workload: {exc.error_count()} problems\n")
        self.attester.configure(node, workload)
        log.warning("node %s: workload reconfigured (digest %s, hwmodel %s, debug %s, issuing %s)",
                    node, workload.image_digest, workload.hwmodel, workload.debug, workload.issuing)
        return self._reply(HTTPStatus.OK, json.dumps({"node": node, "simulator": SIMULATOR}), "application/json")


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _handler(attester: Attester, node: str | None) -> type[_Handler]:
    return type("Handler", (_Handler,), {"attester": attester, "node": node})


class Simulator:
    """The running simulator: the HTTP port, one teeserver socket per node, the token-file refresher."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.attester = Attester(issuer_url(config.port), new_key(config.key_path), config.project, config.workloads)
        self._servers: list[socketserver.BaseServer] = [ThreadingHTTPServer(("127.0.0.1", config.port), _handler(self.attester, None))]
        for node in config.workloads:
            path = socket_path(config.launcher_dir, node)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            self._servers.append(_UnixServer(str(path), _handler(self.attester, node)))
        self._stop = threading.Event()

    def start(self) -> Simulator:
        for server in self._servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True, name="attestation-simulator").start()
        self.write_token_files()
        threading.Thread(target=self._refresh, daemon=True, name="attestation-token-files").start()
        return self

    def stop(self) -> None:
        self._stop.set()
        stopping = [threading.Thread(target=server.shutdown) for server in self._servers]  # each waits out a poll interval
        for thread in stopping:
            thread.start()
        for thread, server in zip(stopping, self._servers, strict=True):
            thread.join()
            server.server_close()

    def write_token_files(self) -> None:
        """The launcher's default tokens (for STS), one per node; removed while a node is not issuing."""
        for node in self.config.workloads:
            path = token_file(self.config.launcher_dir, node)
            token = self.attester.token(node, STS_AUDIENCE, [])
            if token is None:
                path.unlink(missing_ok=True)
                continue
            tmp = path.with_suffix(".tmp")
            tmp.write_text(token)
            os.replace(tmp, path)

    def _refresh(self) -> None:
        while not self._stop.wait(self.config.refresh_s):
            self.write_token_files()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = SimulatorConfig.model_validate_json(sys.argv[1])
    Simulator(cfg).start()
    log.warning("%s", SIMULATOR)
    log.info("issuer %s (JWKS %s); launcher sockets and token files under %s for %s",
             issuer_url(cfg.port), CERTS_PATH, cfg.launcher_dir, ", ".join(cfg.workloads))
    threading.Event().wait()

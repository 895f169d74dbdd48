"""LOCAL STAND-IN for Google's metadata server and ID-token issuer. Not a security boundary.

In production a worker gets its ID token from the metadata server of the VM or
Cloud Run instance it runs on, signed by Google for the worker's service account.
Locally, this process plays both parts so that the same code runs:
- one metadata endpoint per node, on its own port: a worker launched for node N gets
  GCE_METADATA_HOST pointing at N's port, and google-auth fetches ID tokens for N's
  local identity (`local_identity`) from it, as it would from a real metadata server;
- a token issuer that signs those tokens with a key made at start, and publishes the
  public half as a JWKS at /oauth2/v3/certs (the format of Google's v3 certs), which
  the node API verifies tokens against.

Anyone on this machine can ask any port for a token: it proves nothing beyond the
local stack. It says so in its log and on every page it serves.

Run as `python -m emulators.metadata_server CONFIG_JSON` (the stack does).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import BaseModel

from emulators.token_keys import jwks, key_id, load_key, new_key

log = logging.getLogger("fedpipe.metadata_server")

STAND_IN = (
    "fedpipe local stack: a LOCAL STAND-IN for Google's metadata server and ID-token issuer. "
    "Its tokens are valid only for this stack and prove nothing about who asked for them."
)
TOKEN_LIFETIME_S = 3600  # as Google's ID tokens
CERTS_PATH = "/oauth2/v3/certs"
IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"
EMAIL_PATH = "/computeMetadata/v1/instance/service-accounts/default/email"
ACCESS_TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
PROJECT_PATH = "/computeMetadata/v1/project/project-id"
ACCOUNT_PATH = "/computeMetadata/v1/instance/service-accounts/default/"  # ?recursive=true: google-auth reads the email here


class MetadataConfig(BaseModel):
    project: str
    issuer_port: int
    node_ports: dict[str, int]
    hub_port: int = 0  # the hub functions' endpoint: their ID tokens for the attested aggregator
    key_path: Path  # the issuer's signing key, made at start (tests mint expired or foreign tokens with it)


def issuer_key_file(state_dir: Path) -> Path:
    return state_dir / "keys" / "token-issuer.pem"


def local_identity(project: str, node: str) -> str:
    """The service account email node `node`'s workers have in the local stack."""
    return f"worker-{node.lower().replace('_', '-')}@{project}.iam.gserviceaccount.com"


def local_hub_identity(project: str) -> str:
    """The service account email the hub's functions have in the local stack."""
    return f"hub@{project}.iam.gserviceaccount.com"


def issuer_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def metadata_host(port: int) -> str:
    return f"127.0.0.1:{port}"


class Issuer:
    """Signs ID tokens with a key made for this start of the stack, kept in its state dir."""

    def __init__(self, url: str, key: rsa.RSAPrivateKey) -> None:
        self.url = url
        self._key = key
        self.kid = key_id(key)

    @classmethod
    def create(cls, url: str, key_path: Path) -> Issuer:
        return cls(url, new_key(key_path))

    @classmethod
    def load(cls, url: str, key_path: Path) -> Issuer:
        return cls(url, load_key(key_path))

    def jwks(self) -> dict:
        return jwks(self._key)

    def id_token(self, email: str, audience: str, now: float | None = None, **override) -> str:
        now = int(time.time() if now is None else now)
        claims = {
            "iss": self.url, "aud": audience, "sub": str(int(hashlib.sha256(email.encode()).hexdigest(), 16) % 10**21), "azp": email,
            "email": email, "email_verified": True, "iat": now, "exp": now + TOKEN_LIFETIME_S, **override,
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})


def _handler(issuer: Issuer, project: str, email: str | None) -> type[BaseHTTPRequestHandler]:
    """Requests to one port: the issuer's (email None) or one node's metadata endpoint."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args) -> None:  # requests go to our log, not stderr
            log.debug(fmt, *args)

        def _reply(self, status: int, body: str, content_type: str = "text/plain") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Metadata-Flavor", "Google")  # what google-auth's ping looks for
            self.send_header("X-Fedpipe-Stand-In", "local metadata server and token issuer")
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path in ("", "/"):
                return self._reply(HTTPStatus.OK, STAND_IN + "\n")
            if email is None:
                if url.path == CERTS_PATH:
                    return self._reply(HTTPStatus.OK, json.dumps(issuer.jwks()), "application/json")
                return self._reply(HTTPStatus.NOT_FOUND, "not found\n")
            if self.headers.get("Metadata-Flavor") != "Google":  # as the real server: no header, no answer
                return self._reply(HTTPStatus.FORBIDDEN, "missing Metadata-Flavor: Google header\n")
            if url.path == IDENTITY_PATH:
                audience = parse_qs(url.query).get("audience", [""])[0]
                if not audience:
                    return self._reply(HTTPStatus.BAD_REQUEST, "audience is required\n")
                return self._reply(HTTPStatus.OK, issuer.id_token(email, audience))
            if url.path == EMAIL_PATH:
                return self._reply(HTTPStatus.OK, email)
            if url.path in (ACCOUNT_PATH, ACCOUNT_PATH.rstrip("/")):
                account = {"email": email, "aliases": ["default"], "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}
                return self._reply(HTTPStatus.OK, json.dumps(account), "application/json")
            if url.path == ACCESS_TOKEN_PATH:  # for clients that ask; the emulators ignore it
                return self._reply(HTTPStatus.OK, json.dumps({"access_token": "local-stand-in", "expires_in": 3599, "token_type": "Bearer"}))
            if url.path == PROJECT_PATH:
                return self._reply(HTTPStatus.OK, project)
            return self._reply(HTTPStatus.NOT_FOUND, "not found\n")

    return Handler


def serve(config: MetadataConfig) -> list[ThreadingHTTPServer]:
    """Start the issuer and one metadata endpoint per node, each on its own thread."""
    issuer = Issuer.create(issuer_url(config.issuer_port), config.key_path)
    servers = [ThreadingHTTPServer(("127.0.0.1", config.issuer_port), _handler(issuer, config.project, None))]
    identities = {port: local_identity(config.project, node) for node, port in config.node_ports.items()}
    if config.hub_port:
        identities[config.hub_port] = local_hub_identity(config.project)
    for port, email in identities.items():
        servers.append(ThreadingHTTPServer(("127.0.0.1", port), _handler(issuer, config.project, email)))
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True, name=f"port-{server.server_address[1]}").start()
    return servers


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = MetadataConfig.model_validate_json(sys.argv[1])
    serve(cfg)
    log.warning("%s", STAND_IN)
    log.info("token issuer %s (JWKS %s); metadata endpoints: %s", issuer_url(cfg.issuer_port), CERTS_PATH,
             ", ".join(f"{n}={metadata_host(p)}" for n, p in cfg.node_ports.items()))
    threading.Event().wait()

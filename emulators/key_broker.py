"""LOCAL STAND-IN for Cloud KMS behind a workload identity pool: each node's key, released only to attested workers.

In production a worker exchanges its Confidential Space token at STS through the node's pool
provider, whose attribute_condition is the node's rendered key-release policy
(shared/key_release.py, infra/attestation.tf), and only the matching principal set may
decrypt with the node's Cloud KMS key. Locally this process plays that whole path:

  POST /v1/nonces                      {"node"} -> {"nonce", "expires_in_s"}
  POST /v1/nodes/{node}:encrypt        {"plaintext", "associated_data", "attestation_token"} -> {"ciphertext"}
  POST /v1/nodes/{node}:decrypt        {"ciphertext", "associated_data", "attestation_token"} -> {"plaintext"}
  POST /v1/nodes/{node}:sign           {"message", "attestation_token"} -> {"signature"}   (its update-signing key)
  POST /v1/nodes/{node}:attest         {"attestation_token"} -> {"attested": true}   (re-attestation: no key used)

(bytes as standard base64). A token is used only if its signature verifies against the
attestation simulator's JWKS, it is unexpired, its audience is the node's, it carries a
nonce this broker issued for the node and nobody used yet (consumed now, whatever the
outcome), and the node's rendered CEL expression holds for its claims. Otherwise: 403
with a reason code, nothing encrypted or decrypted. Every release and refusal is audited
(shared/audit.py). The node's key is a Tink AEAD keyset on disk (shared/envelope.py's
LocalKeyStore), re-read when the file changes, so a rotation takes effect at once.

Run as `python -m emulators.key_broker CONFIG_JSON` (a BrokerConfig).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import tink
from pydantic import BaseModel
from tink import aead, cleartext_keyset_handle

from shared import signing
from shared.attestation import AttestationClaims, NodePolicy, Reason, Refused, verify_token
from shared.audit import AuditEvent, Auditor, BackgroundSink, FirestoreAuditStore
from shared.key_release import PolicyProgram

aead.register()
log = logging.getLogger("fedpipe.key_broker")

STAND_IN = (
    "fedpipe local stack: a LOCAL STAND-IN for Cloud KMS behind a workload identity pool. Its keys are "
    "cleartext keysets on this machine, and the attestation tokens it checks come from a simulator."
)
NONCE_TTL_S = 300.0
MAX_OUTSTANDING_NONCES = 1024  # per node: nonces nobody redeemed are forgotten oldest first
INPUT_FIELD = {"encrypt": "plaintext", "decrypt": "ciphertext", "sign": "message"}
# A token that fails verification is an attestation failure; one that verifies but is not allowed is a refusal.
FAILURES = {Reason.BAD_SIGNATURE, Reason.EXPIRED}


class BrokerConfig(BaseModel):
    project: str = "fedpipe-local"
    port: int
    issuer: str  # the attestation simulator's URL: the `iss` of every token
    jwks_url: str
    policies: list[NodePolicy]
    keysets: dict[str, Path]  # node -> its KEK keyset (LocalKeyStore.path(node))
    signing_keys: dict[str, Path] = {}  # node -> its update-signing key (PEM); Cloud KMS's asymmetric key in production
    audit_to_firestore: bool = True  # FIRESTORE_EMULATOR_HOST says where


class Nonces:
    """Nonces issued per node, each redeemable once before it expires."""

    def __init__(self, ttl_s: float = NONCE_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.clock = ttl_s, clock
        self._issued: dict[str, OrderedDict[str, float]] = {}
        self._lock = threading.Lock()

    def issue(self, node: str) -> str:
        nonce = secrets.token_urlsafe(32)  # 43 bytes: within the launcher's 8-88
        with self._lock:
            issued = self._issued.setdefault(node, OrderedDict())
            issued[nonce] = self.clock() + self.ttl_s
            while len(issued) > MAX_OUTSTANDING_NONCES:
                issued.popitem(last=False)
        return nonce

    def redeem(self, node: str, presented: list[str]) -> bool:
        """Consume the first presented nonce that was issued for `node`, unused and unexpired."""
        with self._lock:
            issued = self._issued.get(node, OrderedDict())
            for nonce in presented:
                expires = issued.pop(nonce, None)
                if expires is not None and expires > self.clock():
                    return True
        return False


class KeysetFile:
    """A node's KEK, read again whenever its file changes (rotation by shared/envelope.py)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._aead: aead.Aead | None = None
        self.primary_key_id: int | None = None
        self._lock = threading.Lock()

    def aead(self) -> aead.Aead:
        stat = self.path.stat()
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if seen != self._seen or self._aead is None:
                handle = cleartext_keyset_handle.read(tink.JsonKeysetReader(self.path.read_text()))
                self._aead, self._seen = handle.primitive(aead.Aead), seen
                self.primary_key_id = handle.keyset_info().primary_key_id
            return self._aead


class KeyBroker:
    """The decisions, without HTTP: verify, check the nonce, evaluate the node's policy, then use its key."""

    def __init__(self, config: BrokerConfig, auditor: Auditor, jwks: jwt.PyJWKClient | None = None, nonces: Nonces | None = None) -> None:
        self.config, self.audit = config, auditor
        self.jwks = jwks or jwt.PyJWKClient(config.jwks_url, cache_keys=True)
        self.nonces = nonces or Nonces()
        self.programs = {p.node: PolicyProgram(p) for p in config.policies}
        if missing := sorted(set(self.programs) - set(config.keysets)):
            raise ValueError(f"nodes {missing} have a key-release policy but no keyset")
        self.keys = {node: KeysetFile(path) for node, path in config.keysets.items()}
        self.signers = {node: signing.LocalKeySigner.from_file(path) for node, path in config.signing_keys.items()}

    def has_node(self, node: str) -> bool:
        return node in self.programs

    def verify(self, node: str, token: str) -> AttestationClaims:
        """The token's claims if it may use `node`'s key; else Refused with the reason."""
        program = self.programs[node]
        raw, claims = verify_token(token, self.jwks, program.policy.audience, self.config.issuer)
        if not self.nonces.redeem(node, claims.nonces):
            raise Refused(Reason.REPLAYED_NONCE, claims)
        if (reason := program.refusal(raw)) is not None:
            raise Refused(reason, claims)
        return claims

    def use_key(self, node: str, operation: str, token: str, data: bytes = b"", associated_data: bytes = b"") -> bytes:
        """Encrypt, decrypt or only attest for `node`; audited either way. tink.TinkError: a ciphertext that does not open."""
        try:
            claims = self.verify(node, token)
        except Refused as refused:
            self._record(refused.reason, node, operation, refused.claims)
            raise
        if operation == "attest":
            return b""
        if operation == "sign":
            if node not in self.signers:
                self._record(Reason.WRONG_KEY, node, operation, claims)
                raise Refused(Reason.WRONG_KEY, claims)
            signature = self.signers[node].sign(data)
            self.audit(AuditEvent.KEY_RELEASED, node=node, operation=operation, key_id=None, **_workload(claims))
            return signature
        kek = self.keys[node]
        result = kek.aead().encrypt(data, associated_data) if operation == "encrypt" else kek.aead().decrypt(data, associated_data)
        self.audit(AuditEvent.KEY_RELEASED, node=node, operation=operation, key_id=kek.primary_key_id, **_workload(claims))
        return result

    def _record(self, reason: Reason, node: str, operation: str, claims: AttestationClaims | None) -> None:
        event = AuditEvent.ATTESTATION_FAILED if reason in FAILURES else AuditEvent.KEY_REFUSED
        log.warning("403 %s for node %s: %s", operation, node, reason.value)
        self.audit(event, node=node, operation=operation, reason=reason.value, **_workload(claims))


def _workload(claims: AttestationClaims | None) -> dict:
    """Who asked, as the token says: for the audit trail (never the token or its nonces)."""
    if claims is None:
        return {}
    accounts = claims.google_service_accounts
    return {"image_digest": claims.image_digest[:80] or None, "hwmodel": claims.hwmodel[:40] or None,
            "service_account": accounts[0][:200] if accounts else None}


def _b64(body: dict, field: str) -> bytes:
    value = body.get(field, "")
    if not isinstance(value, str):
        raise ValueError(field)
    return base64.b64decode(value, validate=True)


def _handler(broker: KeyBroker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args) -> None:
            log.debug(fmt, *args)

        def _reply(self, status: int, body: dict | str) -> None:
            data = (json.dumps(body) if isinstance(body, dict) else body).encode()
            self.send_response(status)
            self.send_header("X-Fedpipe-Stand-In", "local key broker (Cloud KMS behind a workload identity pool)")
            self.send_header("Content-Type", "application/json" if isinstance(body, dict) else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._reply(HTTPStatus.OK, STAND_IN + "\n") if self.path in ("", "/") else self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def do_POST(self) -> None:
            try:
                body = json.loads(self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 64 * 2**20)) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("body")
            except ValueError:
                return self._reply(HTTPStatus.BAD_REQUEST, {"error": "body is not a JSON object"})
            if self.path == "/v1/nonces":
                node = body.get("node")
                if not isinstance(node, str) or not broker.has_node(node):
                    return self._reply(HTTPStatus.NOT_FOUND, {"error": "no such node"})
                return self._reply(HTTPStatus.OK, {"nonce": broker.nonces.issue(node), "expires_in_s": broker.nonces.ttl_s})
            node, _, operation = self.path.removeprefix("/v1/nodes/").partition(":")
            if not self.path.startswith("/v1/nodes/") or operation not in ("encrypt", "decrypt", "sign", "attest"):
                return self._reply(HTTPStatus.NOT_FOUND, {"error": "no such route"})
            if not broker.has_node(node):
                return self._reply(HTTPStatus.NOT_FOUND, {"error": "no such node"})
            self._use_key(node, operation, body)

        def _use_key(self, node: str, operation: str, body: dict) -> None:
            token = body.get("attestation_token")
            try:
                data = _b64(body, INPUT_FIELD[operation]) if operation in INPUT_FIELD else b""
                associated = _b64(body, "associated_data") if operation in ("encrypt", "decrypt") else b""
            except (ValueError, binascii.Error):
                return self._reply(HTTPStatus.BAD_REQUEST, {"error": "bytes fields must be standard base64"})
            if not isinstance(token, str) or not token:
                return self._reply(HTTPStatus.UNAUTHORIZED, {"error": "attestation_token is required"})
            try:
                out = broker.use_key(node, operation, token, data, associated)
            except Refused as refused:
                return self._reply(HTTPStatus.FORBIDDEN, {"error": "key not released", "reason": refused.reason.value})
            except tink.TinkError:
                return self._reply(HTTPStatus.BAD_REQUEST, {"error": "the ciphertext does not open under this node's key with this associated data"})
            field = {"encrypt": "ciphertext", "decrypt": "plaintext", "sign": "signature"}.get(operation)
            reply = {field: base64.b64encode(out).decode()} if field else {"attested": True}
            self._reply(HTTPStatus.OK, reply)

    return Handler


def serve(broker: KeyBroker, port: int) -> ThreadingHTTPServer:
    """Start the broker's HTTP server on its own thread."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(broker))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="key-broker").start()
    return server


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = BrokerConfig.model_validate_json(sys.argv[1])
    store = None
    if cfg.audit_to_firestore:
        from google.cloud import firestore

        store = BackgroundSink(FirestoreAuditStore(firestore.Client(project=cfg.project)))
    serve(KeyBroker(cfg, Auditor(store)), cfg.port)
    log.warning("%s", STAND_IN)
    log.info("key broker on :%d for nodes %s; tokens from %s", cfg.port, ", ".join(p.node for p in cfg.policies), cfg.issuer)
    threading.Event().wait()

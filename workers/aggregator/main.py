"""The attested aggregator's HTTP face (functions-framework, `--target aggregator_api`), one instance per Confidential Space VM.

  GET  /v1/key        -> KeyReply: the public key made in this TEE and the launcher's token whose nonce is its fingerprint
  POST /v1/admit      AdmitRequest -> AdmitReply
  POST /v1/aggregate  AggregateRequest -> AggregateReply

Only the hub identity (FEDPIPE_HUB_IDENTITY) may call; its Google-signed ID token must be for
this service's URL (FEDPIPE_AGGREGATOR_URL). The key is made when the instance starts and
never leaves it: a restarted aggregator has a new key, and updates sealed to the old one are
refused as not sealed to it (their nodes' next round uses the new key).
"""

from __future__ import annotations

import logging
import os
import threading
from functools import cache

import flask
import functions_framework
from google.cloud import storage
from pydantic import ValidationError

from shared.aggregator_messages import MAX_BODY_BYTES, AdmitRequest, AggregateRequest, KeyReply
from shared.attestation import aggregator_audience
from shared.attested_seal import RecipientKey
from shared.config import Settings
from shared.hub.context import owner_envelopes
from shared.identity import TokenVerifier, Unauthenticated
from workers.aggregator.service import AggregatorService, Host, Rejected
from workers.trainer.attestation import DEFAULT_SOCKET, DEFAULT_TOKEN_FILE, SOCKET_ENV, TOKEN_FILE_ENV, AttestationFailed, Launcher

log = logging.getLogger("fedpipe.aggregator")
TOKEN_REFRESH_S = 300.0  # the launcher's tokens live an hour (locally: as the simulator is configured); refreshed well before


class AttestedKey:
    """This instance's key and a current token vouching for it, refreshed on a timer."""

    def __init__(self, launcher: Launcher, audience: str) -> None:
        self.key, self.launcher, self.audience = RecipientKey(), launcher, audience
        self._token = self._fetch()
        threading.Thread(target=self._refresh, daemon=True, name="aggregator-token").start()

    def _fetch(self) -> str:
        return self.launcher.token(self.audience, [self.key.fingerprint])

    def _refresh(self) -> None:
        while not threading.Event().wait(TOKEN_REFRESH_S):
            try:
                self._token = self._fetch()
            except AttestationFailed as exc:
                log.error("could not refresh the aggregator's attestation token: %s", exc)

    def reply(self) -> KeyReply:
        return KeyReply(public_keyset=self.key.public_keyset.decode(), attestation_token=self._token)


_STARTING = threading.Lock()


def state() -> tuple[Settings, TokenVerifier, AttestedKey, AggregatorService]:
    """Made once per instance, under a lock: two first requests at once must not make two keys."""
    with _STARTING:
        return _state()


@cache
def _state() -> tuple[Settings, TokenVerifier, AttestedKey, AggregatorService]:
    settings = Settings.from_env()
    if not settings.aggregator_url or not settings.hub_identity:
        raise RuntimeError("FEDPIPE_AGGREGATOR_URL and FEDPIPE_HUB_IDENTITY must be set: whom to serve, for which audience")
    launcher = Launcher(os.environ.get(SOCKET_ENV, DEFAULT_SOCKET), os.environ.get(TOKEN_FILE_ENV, DEFAULT_TOKEN_FILE))
    attested = AttestedKey(launcher, aggregator_audience(settings.project))
    host = Host(settings, storage.Client(project=settings.project), owner_envelopes(settings))
    return settings, TokenVerifier(settings, audience=settings.aggregator_url), attested, AggregatorService(host, attested.key)


@functions_framework.http
def aggregator_api(request: flask.Request) -> flask.Response:
    if request.path in ("", "/"):
        return flask.Response("fedpipe attested aggregator\n", mimetype="text/plain")
    settings, verifier, attested, service = state()
    try:
        caller = verifier.verify(request.headers.get("Authorization"))
    except Unauthenticated as exc:
        return _error(401, f"unauthenticated: {exc}")
    if caller != settings.hub_identity:
        log.warning("403 for %s: not the hub identity", caller)
        return _error(403, "only the hub identity may call the aggregator")
    route = (request.method, request.path)
    if route == ("GET", "/v1/key"):
        return _ok(attested.reply())
    request.max_content_length = MAX_BODY_BYTES
    try:
        if route == ("POST", "/v1/admit"):
            return _ok(service.admit(AdmitRequest.model_validate_json(request.get_data(cache=False))))
        if route == ("POST", "/v1/aggregate"):
            return _ok(service.aggregate(AggregateRequest.model_validate_json(request.get_data(cache=False))))
    except ValidationError as exc:
        return _error(400, f"not a valid request ({exc.error_count()} problems)")
    except Rejected as exc:
        log.warning("409 %s: %s", request.path, exc)
        return _error(409, str(exc))
    return _error(404, "no such route")


def _ok(reply) -> flask.Response:
    return flask.Response(reply.model_dump_json(), status=200, mimetype="application/json")


def _error(status: int, message: str) -> flask.Response:
    return flask.make_response(flask.jsonify({"error": message}), status)

"""The hub's side of the attested aggregator: ask it to admit and to aggregate what the hub cannot open.

Calls carry a Google-signed ID token of the hub's identity for the aggregator's URL (from
the metadata server, as every Cloud Run service has one). An unreachable or failing
aggregator raises AggregatorUnavailable: the delivery fails and is retried, and the round
waits; nothing is counted or refused on its behalf.
"""

from __future__ import annotations

import threading
import time
from typing import TypeVar

import google.auth.exceptions
import google.auth.transport.requests
import requests
from google.oauth2 import id_token
from pydantic import BaseModel, ValidationError

from shared.aggregator_messages import AdmitReply, AdmitRequest, AggregateReply, AggregateRequest, KeyReply

R = TypeVar("R", bound=BaseModel)
TOKEN_REUSE_S = 45 * 60  # Google's ID tokens live an hour
KEY_REUSE_S = 30.0  # the key is the aggregator instance's; its token is refreshed long before it expires
TIMEOUT_S = (5.0, 120.0)  # connect, read: aggregating a round of large models takes a while


class AggregatorUnavailable(RuntimeError):
    """The aggregator did not answer usefully: retry later (the message never quotes an update)."""


class AggregatorClient:
    def __init__(self, url: str, session: requests.Session | None = None) -> None:
        self.url = url  # as configured: the audience of the hub's ID tokens, which the aggregator checks byte for byte
        self.session = session or requests.Session()
        self._token: tuple[float, str] | None = None
        self._key: tuple[float, KeyReply] | None = None
        self._lock = threading.Lock()

    def key(self) -> KeyReply:
        """The aggregator's attested public key, as the node API relays it to members (they verify it themselves)."""
        with self._lock:
            if self._key is not None and time.monotonic() - self._key[0] < KEY_REUSE_S:
                return self._key[1]
        reply = self._call("GET", "/v1/key", None, KeyReply)
        with self._lock:
            self._key = (time.monotonic(), reply)
        return reply

    def admit(self, request: AdmitRequest) -> AdmitReply:
        return self._call("POST", "/v1/admit", request, AdmitReply)

    def aggregate(self, request: AggregateRequest) -> AggregateReply:
        return self._call("POST", "/v1/aggregate", request, AggregateReply)

    def _call(self, method: str, path: str, body: BaseModel | None, reply: type[R]) -> R:
        headers = {"Authorization": f"Bearer {self._id_token()}"}
        try:
            response = self.session.request(
                method, self.url.rstrip("/") + path, data=body.model_dump_json() if body is not None else None,
                headers={**headers, "Content-Type": "application/json"}, timeout=TIMEOUT_S,
            )
        except requests.RequestException as exc:
            raise AggregatorUnavailable(f"the aggregator at {self.url} is unreachable ({type(exc).__name__})") from None
        if response.status_code != 200:
            raise AggregatorUnavailable(f"the aggregator answered {response.status_code} to {path}: {response.text[:200]}")
        try:
            return reply.model_validate_json(response.content)
        except ValidationError:
            raise AggregatorUnavailable(f"the aggregator's answer to {path} is not a {reply.__name__}") from None

    def _id_token(self) -> str:
        with self._lock:
            if self._token is not None and time.monotonic() - self._token[0] < TOKEN_REUSE_S:
                return self._token[1]
        try:
            token = id_token.fetch_id_token(google.auth.transport.requests.Request(), self.url)
        except google.auth.exceptions.GoogleAuthError as exc:
            raise AggregatorUnavailable(f"no ID token for the aggregator ({type(exc).__name__})") from None
        with self._lock:
            self._token = (time.monotonic(), token)
        return token

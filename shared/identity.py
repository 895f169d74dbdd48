"""Who is calling the node API: a Google-signed ID token, verified, mapped to a node.

The node is never a field of the request: it is the verified token's service account,
looked up in the node registry (shared/node_registry.py). Verification is google-auth's,
against the certificates URL and issuers in Settings: Google's in production, the
local stack's token issuer (emulators/metadata_server.py) locally. The certificates
are fetched once per CERTS_TTL_S per instance, and again at once when a token names
a key this instance has not seen (Google rotates its keys).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from enum import StrEnum

import google.auth.exceptions
import google.auth.transport.requests
import jwt
from google.oauth2 import id_token

from shared.config import Settings

CERTS_TTL_S = 300.0
CLOCK_SKEW_S = 10
MAX_TOKEN_CHARS = 8192


class Unauthenticated(Exception):
    """No valid ID token: answered 401, with this reason (never the token itself)."""


class Refusal(StrEnum):
    """Why an authenticated caller may not do what it asked: answered 403 and recorded."""

    UNREGISTERED = "unregistered_identity"
    NOT_YOUR_JOB = "not_your_job"
    NOT_A_MEMBER = "not_a_member"
    NOT_YOUR_OBJECT = "not_your_object"


@dataclass(frozen=True)
class Caller:
    identity: str  # the verified token's service account email
    node: str | None  # its node in the registry; None if it is no node's


class CachedCertsRequest:
    """A google-auth transport that keeps the certificates URL's answer for CERTS_TTL_S."""

    def __init__(self, certs_url: str) -> None:
        self.certs_url = certs_url
        self._request = google.auth.transport.requests.Request()
        self._lock = threading.Lock()
        self._cached: tuple[float, object] | None = None

    def __call__(self, url: str, method: str = "GET", **kwargs):
        if url != self.certs_url or method != "GET":
            return self._request(url, method=method, **kwargs)
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > CERTS_TTL_S:
                self._cached = (time.monotonic(), self._request(url, method=method, **kwargs))
            return self._cached[1]

    def forget(self) -> None:
        with self._lock:
            self._cached = None


class TokenVerifier:
    """ID tokens for one audience: the node API's by default, or another service's (the attested aggregator's)."""

    def __init__(self, settings: Settings, audience: str | None = None) -> None:
        self.audience = audience if audience is not None else settings.node_api_url
        if not self.audience:
            raise ValueError("no audience configured (FEDPIPE_NODE_API_URL): a token's audience cannot be checked")
        self.settings = settings
        self.request = CachedCertsRequest(settings.id_token_certs_url)

    def verify(self, authorization: str | None) -> str:
        """The verified service account email of an `Authorization: Bearer <ID token>` header."""
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthenticated("no bearer token")
        token = authorization.removeprefix("Bearer ").strip()
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated("token too long")
        try:
            claims = self._verify(token)
        except jwt.PyJWKClientError:  # a key this instance has not seen: rotated since the last fetch?
            self.request.forget()
            claims = self._verify_or_raise(token)
        if not isinstance(claims.get("exp"), int | float):  # pyjwt checks an expiry only when there is one
            raise Unauthenticated("token has no expiry")
        if claims.get("iss") not in self.settings.id_token_issuers:
            raise Unauthenticated("token from an issuer this deployment does not trust")
        email = claims.get("email")
        if not isinstance(email, str) or claims.get("email_verified") is not True:
            raise Unauthenticated("token carries no verified service account email")
        return email.lower()

    def _verify_or_raise(self, token: str) -> dict:
        try:
            return self._verify(token)
        except jwt.PyJWKClientError:
            raise Unauthenticated("token signed by a key the issuer does not publish") from None

    def _verify(self, token: str) -> dict:
        try:
            return dict(
                id_token.verify_token(
                    token, self.request, audience=self.audience, certs_url=self.settings.id_token_certs_url,
                    clock_skew_in_seconds=CLOCK_SKEW_S,
                )
            )
        except jwt.PyJWKClientError:
            raise
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("token is for another audience") from None
        except (jwt.PyJWTError, ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            raise Unauthenticated(f"invalid token ({type(exc).__name__})") from None

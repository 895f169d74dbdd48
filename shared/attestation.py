"""Confidential Space attestation tokens: the claims a key-release policy reads, and why a token is refused.

The claim names follow Google's Confidential Space token reference: `swname`, `dbgstat`,
`hwmodel`, `eat_nonce`, `google_service_accounts`, and the submodules
`submods.container.image_digest` / `image_reference` and
`submods.confidential_space.support_attributes` (where the launcher puts `STABLE`).
A debug image has `dbgstat` "enabled" and no support attributes at all.

`hwmodel` values: the token reference lists GCP_AMD_SEV, GCP_AMD_SEV_ES, GCP_SHIELDED_VM and
GCP_INTEL_TDX; Google's verifier code names SEV-SNP machines GCP_AMD_SEV_SNP. The default
allowlist holds the two TEEs fedpipe launches on (SEV-SNP, TDX); a node may declare others.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

import jwt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

CONFIDENTIAL_SPACE = "CONFIDENTIAL_SPACE"  # swname of hardened and debug Confidential Space images
PRODUCTION_DBGSTAT = "disabled-since-boot"
DEBUG_DBGSTAT = "enabled"
STABLE = "STABLE"  # support attribute: a supported image, monitored for vulnerabilities
AMD_SEV_SNP = "GCP_AMD_SEV_SNP"
INTEL_TDX = "GCP_INTEL_TDX"
ALLOWED_TEES = (AMD_SEV_SNP, INTEL_TDX)
PRODUCTION_ISSUER = "https://confidentialcomputing.googleapis.com"
STS_AUDIENCE = "https://sts.googleapis.com"  # the launcher's default token, refreshed hourly, is for STS

IMAGE_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# What may appear inside a quoted CEL string without escaping: the policy is rendered, never
# concatenated from untrusted text, so anything else is refused at declaration.
SAFE_LITERAL = re.compile(r"^[A-Za-z0-9_.:/@+-]{1,512}$")


class Reason(StrEnum):
    """Why no key was released: the 403's reason code and the audit record's."""

    WRONG_IMAGE = "wrong_image"
    DEBUG_IMAGE = "debug_image"
    WRONG_HARDWARE = "wrong_hardware"
    NOT_STABLE = "not_stable"
    WRONG_SOFTWARE = "wrong_software"  # swname is not CONFIDENTIAL_SPACE
    EXPIRED = "expired"
    REPLAYED_NONCE = "replayed_nonce"  # no nonce this broker issued and has not seen used
    WRONG_AUDIENCE = "wrong_audience"
    BAD_SIGNATURE = "bad_signature"  # also: malformed, unknown key, wrong issuer
    MISSED_CHECK = "missed_check"  # worker side: a re-attestation that could not complete in time
    TOKEN_OUTLIVES_CHECK = "token_outlives_check"  # worker side: a token valid past the next check
    WRONG_KEY = "wrong_key"  # node side: an aggregator token whose nonce is not the offered key's fingerprint


class _Claims(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ContainerSubmod(_Claims):
    image_digest: str = ""
    image_reference: str = ""


class ConfidentialSpaceSubmod(_Claims):
    support_attributes: list[str] = Field(default_factory=list)


class Submods(_Claims):
    container: ContainerSubmod = Field(default_factory=ContainerSubmod)
    confidential_space: ConfidentialSpaceSubmod = Field(default_factory=ConfidentialSpaceSubmod)


class AttestationClaims(_Claims):
    """The claims of a verified token that fedpipe reads; others are kept in the raw claims only."""

    iss: str
    aud: str
    exp: int
    iat: int
    nbf: int | None = None
    eat_nonce: str | list[str] = Field(default_factory=list)
    swname: str = ""
    dbgstat: str = ""
    hwmodel: str = ""
    google_service_accounts: list[str] = Field(default_factory=list)
    submods: Submods = Field(default_factory=Submods)

    @property
    def nonces(self) -> list[str]:
        return [self.eat_nonce] if isinstance(self.eat_nonce, str) else list(self.eat_nonce)

    @property
    def image_digest(self) -> str:
        return self.submods.container.image_digest


Literal_ = Annotated[str, Field(pattern=SAFE_LITERAL.pattern)]


class NodePolicy(BaseModel, frozen=True):
    """One node's key-release policy: which workloads may use its key. Rendered into CEL (shared/key_release.py)."""

    node: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]
    audience: Literal_  # the node's: a token for another node's audience opens nothing here
    image_digests: tuple[str, ...] = Field(min_length=1)
    hwmodels: tuple[Literal_, ...] = ALLOWED_TEES

    @field_validator("image_digests")
    @classmethod
    def _digests(cls, digests: tuple[str, ...]) -> tuple[str, ...]:
        bad = [d for d in digests if not IMAGE_DIGEST.match(d)]
        if bad:
            raise ValueError(f"image digests must be sha256:<64 hex>, not {bad}")
        return tuple(sorted(set(digests)))  # sorted: the rendered expression does not depend on declaration order


def node_audience(project: str, node: str) -> str:
    """The audience a node's worker asks the launcher for, and the node's pool provider accepts."""
    return f"https://fedpipe.{project}/nodes/{node}/key-release"


def aggregator_audience(project: str) -> str:
    """The audience of the attested aggregator's tokens: what a node checks before it seals an update to it."""
    return f"https://fedpipe.{project}/aggregator"


MAX_TOKEN_CHARS = 16384
CLOCK_SKEW_S = 10


class Refused(Exception):
    """A token that may not have what it asked for, with the reason (and its claims, once they verified)."""

    def __init__(self, reason: Reason, claims: AttestationClaims | None = None) -> None:
        super().__init__(reason.value)
        self.reason, self.claims = reason, claims


def verify_token(token: str, jwks: jwt.PyJWKClient, audience: str, issuer: str) -> tuple[dict, AttestationClaims]:
    """A token's raw and typed claims if it is signed by the issuer's JWKS, unexpired and for `audience`; else Refused.

    What the policy says about those claims is the caller's to check (shared/key_release.py).
    """
    if len(token) > MAX_TOKEN_CHARS:
        raise Refused(Reason.BAD_SIGNATURE)
    try:
        key = jwks.get_signing_key_from_jwt(token).key
        raw = jwt.decode(token, key, algorithms=["RS256"], audience=audience, issuer=issuer, leeway=CLOCK_SKEW_S,
                         options={"require": ["exp", "iat", "aud", "iss"]})
    except jwt.ExpiredSignatureError:
        raise Refused(Reason.EXPIRED) from None
    except jwt.InvalidAudienceError:
        raise Refused(Reason.WRONG_AUDIENCE) from None
    except (jwt.PyJWTError, jwt.PyJWKClientError, ValueError):
        raise Refused(Reason.BAD_SIGNATURE) from None
    try:
        return raw, AttestationClaims.model_validate(raw)
    except ValidationError:
        raise Refused(Reason.BAD_SIGNATURE) from None

"""The key-release policy, declared once as CEL and used twice.

CLAUSES is the declaration: each clause is a CEL template over `assertion` (the token's
claims, as a workload identity pool provider's attribute_condition sees them) and the
reason a token failing it is refused. `render(policy)` fills in one node's allowed
digests, TEEs and audience and joins the clauses with `&&`. That one string goes
- into Terraform (`terraform_vars`, infra/attestation.tf): the node's pool provider's
  attribute_condition, so Cloud KMS decrypts only for tokens that satisfy it;
- into the local key broker (emulators/key_broker.py), which evaluates the very same
  string with cel-python (`PolicyProgram`).
On a refusal the broker evaluates each rendered clause alone to name the first one
that failed; the decision itself is always the whole expression's.

Not in the expression, because an attribute condition cannot express them: the
signature and issuer (the provider's issuer_uri and JWKS), expiry (STS refuses expired
tokens; the broker checks `exp` itself), and nonce freshness (nothing in Google's path
checks that a nonce was used once: the broker issues nonces and accepts each once).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import celpy

from shared.attestation import CONFIDENTIAL_SPACE, PRODUCTION_DBGSTAT, STABLE, NodePolicy, Reason

CLAUSES: tuple[tuple[Reason, str], ...] = (
    (Reason.WRONG_SOFTWARE, f"assertion.swname == '{CONFIDENTIAL_SPACE}'"),
    (Reason.DEBUG_IMAGE, f"assertion.dbgstat == '{PRODUCTION_DBGSTAT}'"),
    (Reason.NOT_STABLE, f"'{STABLE}' in assertion.submods.confidential_space.support_attributes"),
    (Reason.WRONG_HARDWARE, "assertion.hwmodel in {hwmodels}"),
    (Reason.WRONG_IMAGE, "assertion.submods.container.image_digest in {image_digests}"),
    (Reason.WRONG_AUDIENCE, "assertion.aud == {audience}"),
)


def _string(value: str) -> str:
    return f"'{value}'"  # NodePolicy admits only characters that need no escaping


def _list(values: Iterable[str]) -> str:
    return "[" + ", ".join(map(_string, values)) + "]"


def render_clauses(policy: NodePolicy) -> list[tuple[Reason, str]]:
    values = {"hwmodels": _list(policy.hwmodels), "image_digests": _list(policy.image_digests), "audience": _string(policy.audience)}
    return [(reason, template.format(**values)) for reason, template in CLAUSES]


def render(policy: NodePolicy) -> str:
    """The node's attribute condition: byte for byte what Terraform deploys and the broker evaluates."""
    return " && ".join(f"({clause})" for _, clause in render_clauses(policy))


def terraform_vars(policies: Iterable[NodePolicy]) -> dict[str, dict]:
    """`var.key_release` of infra/attestation.tf: per node, its audience and rendered attribute condition."""
    return {p.node: {"audience": p.audience, "attribute_condition": render(p)} for p in policies}


class PolicyProgram:
    """One node's rendered policy, compiled once; evaluated against a verified token's raw claims."""

    def __init__(self, policy: NodePolicy) -> None:
        self.policy = policy
        self.expression = render(policy)
        env = celpy.Environment()
        self._whole = env.program(env.compile(self.expression))
        self._clauses = [(reason, env.program(env.compile(clause))) for reason, clause in render_clauses(policy)]

    def refusal(self, claims: Mapping) -> Reason | None:
        """None if the token's claims satisfy the whole expression, else the reason of the first failed clause."""
        activation = {"assertion": celpy.json_to_cel(dict(claims))}
        if _holds(self._whole, activation):
            return None
        for reason, program in self._clauses:
            if not _holds(program, activation):
                return reason
        raise AssertionError(f"node {self.policy.node}: the expression failed but every clause held")


def _holds(program, activation: dict) -> bool:
    """True only for a CEL `true`: a missing claim is an evaluation error, and refuses, as in IAM."""
    try:
        result = program.evaluate(activation)
    except celpy.CELEvalError:
        return False
    return isinstance(result, celpy.celtypes.BoolType) and bool(result)

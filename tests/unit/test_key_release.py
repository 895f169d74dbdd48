"""The key-release policy: declared once, rendered per node, the same bytes in Terraform and in the broker."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.attestation import AMD_SEV_SNP, INTEL_TDX, NodePolicy, Reason
from shared.key_release import CLAUSES, PolicyProgram, render, terraform_vars
from tests.unit.infra_hcl import parse_files

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64
POLICY = NodePolicy(node="us", audience="https://fedpipe.p/nodes/us/key-release", image_digests=(DIGEST,))


def claims(**override) -> dict:
    good = {
        "iss": "http://127.0.0.1:1", "aud": POLICY.audience, "exp": 2, "iat": 1, "swname": "CONFIDENTIAL_SPACE",
        "dbgstat": "disabled-since-boot", "hwmodel": AMD_SEV_SNP,
        "submods": {"container": {"image_digest": DIGEST}, "confidential_space": {"support_attributes": ["LATEST", "STABLE", "USABLE"]}},
    }
    return {**good, **override}


def test_rendered_expression_is_pinned():
    assert render(POLICY) == (
        "(assertion.swname == 'CONFIDENTIAL_SPACE') && (assertion.dbgstat == 'disabled-since-boot') && "
        "('STABLE' in assertion.submods.confidential_space.support_attributes) && "
        "(assertion.hwmodel in ['GCP_AMD_SEV_SNP', 'GCP_INTEL_TDX']) && "
        f"(assertion.submods.container.image_digest in ['{DIGEST}']) && "
        "(assertion.aud == 'https://fedpipe.p/nodes/us/key-release')"
    )


def test_terraform_gets_byte_for_byte_what_the_broker_evaluates():
    other = NodePolicy(node="eu", audience="https://fedpipe.p/nodes/eu/key-release", image_digests=(OTHER, DIGEST), hwmodels=(INTEL_TDX,))
    rendered = terraform_vars([POLICY, other])
    for policy in (POLICY, other):
        assert rendered[policy.node]["attribute_condition"].encode() == PolicyProgram(policy).expression.encode()
        assert rendered[policy.node]["audience"] == policy.audience
    # and infra/attestation.tf puts that variable, untouched, into each node's provider
    provider = parse_files()["attestation.tf"]["resource"]
    body = next(b for item in provider for t, named in item.items() if t == "google_iam_workload_identity_pool_provider"
                for b in named.values())
    assert body["attribute_condition"] == "${var.key_release[each.key].attribute_condition}"
    assert body["oidc"][0]["allowed_audiences"] == ["${var.key_release[each.key].audience}"]


def test_digest_order_does_not_change_the_expression():
    a = NodePolicy(node="us", audience=POLICY.audience, image_digests=(DIGEST, OTHER))
    b = NodePolicy(node="us", audience=POLICY.audience, image_digests=(OTHER, DIGEST, OTHER))
    assert render(a) == render(b)


def test_good_claims_pass():
    assert PolicyProgram(POLICY).refusal(claims()) is None


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"swname": "GCE"}, Reason.WRONG_SOFTWARE),
        ({"dbgstat": "enabled", "submods": {"container": {"image_digest": DIGEST}, "confidential_space": {"support_attributes": []}}},
         Reason.DEBUG_IMAGE),
        ({"submods": {"container": {"image_digest": DIGEST}, "confidential_space": {"support_attributes": ["USABLE"]}}}, Reason.NOT_STABLE),
        ({"hwmodel": "GCP_AMD_SEV"}, Reason.WRONG_HARDWARE),
        ({"submods": {"container": {"image_digest": OTHER}, "confidential_space": {"support_attributes": ["STABLE"]}}}, Reason.WRONG_IMAGE),
        ({"aud": "https://fedpipe.p/nodes/eu/key-release"}, Reason.WRONG_AUDIENCE),
    ],
)
def test_each_clause_names_its_refusal(override, reason):
    assert PolicyProgram(POLICY).refusal(claims(**override)) is reason


def test_a_missing_claim_refuses_instead_of_raising():
    bare = claims()
    del bare["submods"]
    assert PolicyProgram(POLICY).refusal(bare) is Reason.NOT_STABLE  # the first clause that reads submods


def test_every_reason_in_the_declaration_is_distinct():
    reasons = [r for r, _ in CLAUSES]
    assert len(reasons) == len(set(reasons)) == 6


@pytest.mark.parametrize(
    "bad",
    [
        {"image_digests": ("sha256:" + "a" * 63 + "'",)},
        {"image_digests": ("latest",)},
        {"audience": "x' || true || '"},
        {"hwmodels": ("GCP_INTEL_TDX', 'X",)},
        {"image_digests": ()},
    ],
)
def test_values_that_could_change_the_expression_are_refused(bad):
    with pytest.raises(ValidationError):
        NodePolicy(**{"node": "us", "audience": POLICY.audience, "image_digests": (DIGEST,), **bad})

"""infra/*.tf against the providers' own schemas, offline; `terraform fmt`; checkov's findings against the README's list.

`terraform validate` needs the providers, which cannot be downloaded here. Their
schemas ship inside the prebuilt CDK for Terraform bindings (PyPI
`cdktf-cdktf-provider-google` and friends, ~50 MB each), from which
infra/scripts/extract_schema.py keeps just the resource types infra/ uses in
tests/data/terraform_provider_schema.json. Every resource, data source and
provider block, every argument and every nested block (dynamic ones included) is
checked against it: unknown names, a block written as an argument or the reverse,
a missing required argument or block, two of a block that allows one.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.unit.infra_hcl import INFRA, check_document, check_infra, load_schema, parse_raw_files, parse_text

pytestmark = pytest.mark.unit

REPO = INFRA.parent
EXTRACT_SCRIPT = INFRA / "scripts" / "extract_schema.py"


@pytest.fixture(scope="module")
def schema() -> dict:
    return load_schema()


def _extract_module():
    spec = importlib.util.spec_from_file_location("fedpipe_extract_schema", EXTRACT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the check itself


def test_every_resource_argument_and_block_of_infra_is_in_the_provider_schema(schema):
    errors = check_infra(schema)
    assert errors == [], "infra/*.tf does not match the provider schema:\n" + "\n".join(errors)


def test_the_extract_covers_exactly_the_types_infra_uses(schema):
    used = _extract_module().used_types(INFRA)
    extracted = {p: {"resources": set(s["resources"]), "data_sources": set(s["data_sources"])} for p, s in schema["providers"].items()}
    assert extracted == used, "re-run infra/scripts/extract_schema.py (see its docstring) after changing the resource types infra/ uses"


def test_the_extract_says_where_it_came_from(schema):
    assert schema["generated_by"] == "infra/scripts/extract_schema.py"
    expected = {
        "google": ("hashicorp/google", "cdktf-cdktf-provider-google"),
        "google-beta": ("hashicorp/google-beta", "cdktf-cdktf-provider-google-beta"),
        "archive": ("hashicorp/archive", "cdktf-cdktf-provider-archive"),
    }
    for provider, found in schema["providers"].items():
        assert (found["source"], found["package"]) == expected[provider], provider
        assert re.fullmatch(r"\d+\.\d+\.\d+", found["version"]) and re.fullmatch(r"\d+\.\d+\.\d+", found["package_version"])
        assert re.fullmatch(r"[0-9a-f]{64}", found["assembly_sha256"]), provider
        assert found["wheel_sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", found["wheel_sha256"])
    assert schema["providers"]["google"]["version"] == schema["providers"]["google-beta"]["version"]


def _constraint_admits(constraint: str, version: str) -> bool:
    """Terraform's `~> X.Y`, `>= X.Y.Z` and `= X.Y.Z`, comma-separated, for release versions."""
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("."))

    got = parts(version)
    for clause in (c.strip() for c in constraint.split(",")):
        op, _, wanted = re.fullmatch(r"(~>|>=|=|<=|<|>)?\s*([\d.]+)", clause).group(1, 0, 2)
        want = parts(wanted)
        padded = got + (0,) * (len(want) - len(got))
        if op == "~>":
            if padded[: len(want)] < want or got[: len(want) - 1] != want[:-1]:
                return False
        elif op in (None, "="):
            if padded[: len(want)] != want:
                return False
        elif not {">=": padded >= want, "<=": padded <= want, ">": padded > want, "<": padded < want}[op]:
            return False
    return True


def test_constraint_reader():
    assert _constraint_admits("~> 6.50", "6.50.0") and _constraint_admits("~> 6.50", "6.99.1")
    assert not _constraint_admits("~> 6.50", "6.49.0") and not _constraint_admits("~> 6.50", "7.0.0")
    assert _constraint_admits(">= 6.50, < 7", "6.50.0") and not _constraint_admits("= 6.50.0", "6.50.1")


def test_versions_pin_each_provider_at_the_schema_checked(schema):
    (terraform,) = parse_raw_files()["versions.tf"]["terraform"]
    (required,) = terraform["required_providers"]
    required = {k: v for k, v in required.items() if not k.startswith("__")}
    assert set(required) == set(schema["providers"]), "every provider infra/ uses is pinned, and has an extracted schema"
    for provider, spec in required.items():
        extracted = schema["providers"][provider]
        assert spec["source"] == extracted["source"], provider
        assert _constraint_admits(spec["version"], extracted["version"]), (provider, spec["version"], extracted["version"])
        # The lowest version the pin admits is the schema's minor: nothing older, whose schema may lack what infra/ uses.
        major, minor, _ = extracted["version"].split(".")
        assert spec["version"] == f"~> {major}.{minor}", (provider, spec["version"])




# ---------------------------------------------------------------- it can fail


def _errors(schema: dict, text: str) -> list[str]:
    return check_document(parse_text(text), schema)


BUCKET = """
resource "google_storage_bucket" "b" {
  name     = "x"
  location = "EU"
  %s
}
"""


def test_a_misspelt_argument_is_reported_with_the_right_name(schema):
    assert _errors(schema, BUCKET % "") == []
    (error,) = _errors(schema, BUCKET % 'storage_clas = "STANDARD"')
    assert error == "google_storage_bucket.b.storage_clas: unknown argument (did you mean 'storage_class'?)"


def test_an_unknown_block_is_reported(schema):
    (error,) = _errors(schema, BUCKET % "retention { days = 3 }")
    assert error.startswith("google_storage_bucket.b.retention: unknown block")


def test_nested_and_dynamic_blocks_are_checked_too(schema):
    assert _errors(schema, BUCKET % "versioning {\n enabled = true\n }") == []
    assert _errors(schema, BUCKET % "versioning {\n enable = true\n }") == [
        "google_storage_bucket.b.versioning.enable: unknown argument (did you mean 'enabled'?)",
        "google_storage_bucket.b.versioning: required argument 'enabled' is missing",
    ]
    dynamic = 'dynamic "cors" {\n for_each = []\n content {\n origins = []\n }\n }'
    assert _errors(schema, BUCKET % dynamic) == ["google_storage_bucket.b.dynamic[cors].content.origins: unknown argument (did you mean 'origin'?)"]
    assert _errors(schema, BUCKET % dynamic.replace('"cors"', '"corz"').replace("origins", "origin")) == [
        "google_storage_bucket.b.dynamic[corz]: 'corz' is not a block of this type (did you mean 'cors'?)"
    ]


def test_blocks_and_arguments_are_not_interchangeable(schema):
    assert _errors(schema, BUCKET % "labels {\n a = \"b\"\n }") == ["google_storage_bucket.b.labels: an argument, not a block: write `labels = ...`"]
    assert _errors(schema, BUCKET % "versioning = { enabled = true }") == [
        "google_storage_bucket.b.versioning: a block, not an argument: write `versioning { ... }`"
    ]
    assert _errors(schema, BUCKET % "versioning {\n enabled = true\n }\n versioning {\n enabled = false\n }") == [
        "google_storage_bucket.b.versioning: at most one versioning block, found 2"
    ]


def test_missing_required_arguments_and_literal_types_are_reported(schema):
    assert _errors(schema, 'resource "google_storage_bucket" "b" {\n name = "x"\n }') == [
        "google_storage_bucket.b: required argument 'location' is missing"
    ]
    assert _errors(schema, BUCKET % 'force_destroy = "yes"') == ["google_storage_bucket.b.force_destroy: expects a bool, got 'yes'"]
    assert _errors(schema, BUCKET % "force_destroy = var.force") == []  # expressions are Terraform's to evaluate


def test_unknown_types_providers_and_meta_arguments(schema):
    assert _errors(schema, 'data "google_projectt" "p" {}')[0].startswith("data.google_projectt.p: google 6.50.0 has no data type 'google_projectt'")
    # A google-beta type declared without its provider is named for what it is.
    assert _errors(schema, 'resource "google_project_service_identity" "p" {\n service = "x"\n }') == [
        "google_project_service_identity.p: google 6.50.0 has no resource type 'google_project_service_identity' (it is google-beta's: set provider = google-beta)"
    ]
    assert _errors(schema, 'resource "google_project_service_identity" "p" {\n provider = google-beta\n service = "x"\n }') == []
    assert _errors(schema, 'provider "google" {\n projct = "x"\n }') == ["provider.google.projct: unknown argument (did you mean 'project'?)"]
    # Terraform's own meta-arguments and lifecycle are Terraform's, and lifecycle is checked as such.
    meta = 'count = 1\n depends_on = []\n lifecycle {\n prevent_destroy = true\n precondition {\n condition = true\n }\n }'
    assert _errors(schema, BUCKET % meta) == ["google_storage_bucket.b.lifecycle[0].precondition: required argument 'error_message' is missing"]


# ---------------------------------------------------------------- terraform fmt


TERRAFORM = shutil.which("terraform")


@pytest.mark.skipif(TERRAFORM is None, reason="terraform CLI not installed (CI has it)")
def test_terraform_fmt_check_passes():
    done = subprocess.run([TERRAFORM, "fmt", "-check", "-recursive", "-diff", str(INFRA)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"run `terraform fmt -recursive infra`:\n{done.stdout}{done.stderr}"


# ---------------------------------------------------------------- checkov


def _checkov() -> str | None:
    local = REPO / ".venv-checkov" / "bin" / "checkov"
    return str(local) if local.exists() else shutil.which("checkov")


def justified_checks() -> dict[str, set[str]]:
    """infra/README.md's checkov table: check id -> the resources (type.name) it fails on, each on purpose."""
    text = (INFRA / "README.md").read_text()
    section = re.split(r"^## checkov$", text, maxsplit=1, flags=re.MULTILINE)[1].split("\n## ", 1)[0]
    found = {}
    for check, resources, why in re.findall(r"^\| (CKV_[A-Z0-9_]+) \| ([^|]+) \| ([^|]+) \|$", section, re.MULTILINE):
        assert why.strip(), check
        found[check] = set(re.findall(r"`([a-z0-9_]+\.[a-z0-9_]+)`", resources))
    return found


def test_the_readme_justifies_each_failing_check_once():
    justified = justified_checks()
    assert justified, "infra/README.md has no checkov table"
    assert all(resources for resources in justified.values())


# Every switch on, so that checkov sees what only exists with one (checkov skips a resource whose count
# is 0 for the defaults): the confidential workers, every accelerator backend, the attested aggregator,
# the perimeter.
EVERY_SWITCH = """
confidential_workers      = true
confidential_worker_image = "us-central1-docker.pkg.dev/acme-fl/fedpipe/trainer-cs@sha256:{a}"
gpu_worker_enabled        = true
gke_enabled               = true
vertex_enabled            = true
batch_enabled             = true
attested_aggregation      = true
aggregator_image          = "us-central1-docker.pkg.dev/acme-fl/fedpipe/aggregator@sha256:{a}"
vpc_sc_access_policy      = "123456789"
""".format(a="a" * 64)


def _checkov_failures(*extra: str) -> tuple[dict[str, set[str]], dict]:
    """checkov's failures (check id -> resources, `type.name` without instance keys) and its summary."""
    checkov = _checkov()
    assert checkov is not None, "checkov is not installed: `make test` installs it in .venv-checkov"
    done = subprocess.run(
        [checkov, "-d", str(INFRA), "--framework", "terraform", "--output", "json", "--quiet", "--compact", "--skip-download", *extra],
        capture_output=True, text=True, timeout=300,
    )
    report = json.loads(done.stdout)
    failed: dict[str, set[str]] = {}
    for check in report["results"]["failed_checks"]:
        failed.setdefault(check["check_id"], set()).add(re.sub(r"\[[^]]*\]$", "", check["resource"]))
    return failed, report["summary"]


def test_checkov_fails_only_what_the_readme_justifies(tmp_path):
    default, summary = _checkov_failures()
    assert summary["parsing_errors"] == 0
    var_file = tmp_path / "every-switch.tfvars"
    var_file.write_text(EVERY_SWITCH)
    switched_on, summary_on = _checkov_failures("--var-file", str(var_file))
    assert summary_on["parsing_errors"] == 0
    assert summary_on["resource_count"] > summary["resource_count"], "the var file switched nothing on"
    union = {check: default.get(check, set()) | switched_on.get(check, set()) for check in {*default, *switched_on}}
    assert union == justified_checks(), "checkov's failures and infra/README.md's justified list differ: fix the infra or the list"
    # What fails by default still fails (or is gone) with everything on: switching on never hides a failure.
    for check, found in default.items():
        assert found <= switched_on.get(check, set()), check

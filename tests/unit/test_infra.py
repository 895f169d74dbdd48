"""infra_render and the Terraform in infra/: the names agree, and the HCL is wired right.

There is no terraform binary here, so the HCL is checked by parsing it
(python-hcl2) and by the cross-references `terraform validate` would catch first:
every var./local./resource reference is declared, every rendered variable is
declared, and every trigger becomes a function with the right event filters.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import Settings
from shared.infra_render import dumps, render, settings_env, write
from shared.triggers import (
    FIRESTORE_WRITTEN,
    PUBSUB_PUBLISHED,
    STORAGE_FINALIZED,
    function_names,
    triggers,
)
from tests.unit.infra_hcl import parse_files
from tests.unit.infra_hcl import resources as resources_of

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
TFVARS = INFRA / "fedpipe.auto.tfvars.json"


# ---------------------------------------------------------------- render


def test_committed_tfvars_equal_render_of_default_settings():
    committed = json.loads(TFVARS.read_text())
    assert committed == render(Settings()), (
        "infra/fedpipe.auto.tfvars.json is stale: run "
        "`python -m shared.infra_render > infra/fedpipe.auto.tfvars.json` with no FEDPIPE_* set"
    )


def test_render_names_every_bucket_topic_collection_and_trigger():
    s = Settings(project="acme-fl", region="europe-west1", nodes=("us", "eu", "ch"), bucket_prefix="acme")
    out = render(s)

    assert out["project"] == "acme-fl" and out["region"] == "europe-west1"
    assert out["nodes"] == {
        node: {
            "raw_bucket": f"acme-{node}-raw",
            "processed_bucket": f"acme-{node}-processed",
            "quarantine_bucket": f"acme-{node}-quarantine",
        }
        for node in ("us", "eu", "ch")
    }
    assert out["hub_bucket"] == "acme-hub"
    assert out["topics"] == {
        "shard_ready": "shard-ready",
        "tick": "fedpipe-tick",
        "dead_letter": "fedpipe-dead-letter",
    }
    assert out["collections"] == {"jobs": "jobs", "datasets": "datasets", "quarantine": "quarantine", "federations": "federations"}
    assert [t["name"] for t in out["triggers"]] == [
        "raw-upload-us", "raw-upload-eu", "raw-upload-ch", "hub-upload", "shard-ready", "tick", "job-written",
    ]
    assert out["triggers"][2] == {
        "name": "raw-upload-ch",
        "function": "on_raw_upload",
        "kind": "storage",
        "event_type": STORAGE_FINALIZED,
        "bucket": "acme-ch-raw",
        "topic": None,
        "document": None,
    }
    assert out["triggers"][3]["bucket"] == "acme-hub" and out["triggers"][3]["function"] == "on_hub_upload"
    assert out["triggers"][3]["kind"] == "storage" and out["triggers"][3]["event_type"] == STORAGE_FINALIZED
    assert out["triggers"][4]["topic"] == "shard-ready" and out["triggers"][4]["event_type"] == PUBSUB_PUBLISHED
    assert out["triggers"][4]["function"] == "on_shard_ready"
    assert out["triggers"][5] == {
        "name": "tick",
        "function": "on_tick",
        "kind": "pubsub",
        "event_type": PUBSUB_PUBLISHED,
        "bucket": None,
        "topic": "fedpipe-tick",
        "document": None,
    }
    assert out["triggers"][6]["document"] == "jobs/{jobId}" and out["triggers"][6]["event_type"] == FIRESTORE_WRITTEN
    # Every trigger's topic is one infra creates (google_pubsub_topic.topic is
    # for_each over the values of var.topics).
    assert {t["topic"] for t in out["triggers"] if t["kind"] == "pubsub"} <= set(out["topics"].values())
    # Every bucket Settings knows is created by infra, and no other.
    rendered_buckets = {b for n in out["nodes"].values() for b in n.values()} | {out["hub_bucket"]}
    assert rendered_buckets == set(s.all_buckets())


def test_settings_env_round_trips_through_settings_from_env():
    for s in (
        Settings(),
        Settings(project="acme-fl", region="europe-west4", nodes=("eu",), bucket_prefix="acme", max_upload_bytes=1024),
    ):
        assert Settings.from_env(settings_env(s)).model_dump() == s.model_dump()
    assert "FEDPIPE_BUCKET_PREFIX" not in settings_env(Settings())


def test_render_is_json_and_write_produces_the_same_text(tmp_path):
    s = Settings(project="p1")
    assert json.loads(dumps(s)) == render(s)
    path = write(tmp_path / "x.tfvars.json", s)
    assert path.read_text() == dumps(s)


def test_module_entry_point_prints_the_default_render():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDPIPE_") and k != "GOOGLE_CLOUD_PROJECT"}
    out = subprocess.run(
        [sys.executable, "-m", "shared.infra_render"], capture_output=True, text=True, check=True, cwd=REPO, env=env
    )
    assert out.stdout == TFVARS.read_text()
    custom = subprocess.run(
        [sys.executable, "-m", "shared.infra_render"],
        capture_output=True, text=True, check=True, cwd=REPO, env={**env, "FEDPIPE_PROJECT": "acme-fl"},
    )
    assert json.loads(custom.stdout)["hub_bucket"] == "acme-fl-hub"


# ---------------------------------------------------------------- HCL as text


def tf_text(name: str) -> str:
    return (INFRA / name).read_text()


def all_tf() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(INFRA.glob("*.tf"))}


def all_code() -> str:
    """Every .tf file of infra/, comments stripped, as one text."""
    return "\n".join(strip_comments(text) for text in all_tf().values())


def strip_comments(text: str) -> str:
    # infra/ keeps '#' out of strings, so a '#' always starts a comment.
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def declared_variables() -> dict[str, str]:
    """name -> the text of its block, from whichever .tf file of infra/ declares it (a feature's file may declare its own)."""
    found: dict[str, str] = {}
    for file_name, raw in all_tf().items():
        text = strip_comments(raw)
        starts = [(m.group(1), m.start()) for m in re.finditer(r'^variable "([a-z0-9_]+)" \{', text, re.MULTILINE)]
        for name, start in starts:
            end = re.compile(r"^\}", re.MULTILINE).search(text, start).end()
            assert name not in found, f"variable {name} declared twice (again in {file_name})"
            found[name] = text[start:end]
    return found


def test_every_rendered_variable_is_declared_and_every_required_one_rendered():
    variables = declared_variables()
    rendered = render(Settings())
    assert set(rendered) <= set(variables), f"undeclared: {set(rendered) - set(variables)}"
    required = {name for name, block in variables.items() if "default" not in block}
    assert required == set(rendered), "a variable without default must come from the render"


def test_trigger_variable_type_has_every_trigger_field():
    block = declared_variables()["triggers"]
    for field in render(Settings())["triggers"][0]:
        assert re.search(rf"\b{field}\s*=", block), f"var.triggers lacks {field}"


def test_every_node_has_a_default_region():
    block = declared_variables()["node_regions"]
    for node in Settings().nodes:
        assert re.search(rf'\b{node}\s*=\s*"[a-z]+-[a-z]+\d"', block), node


def test_every_reference_is_declared():
    code = {name: strip_comments(text) for name, text in all_tf().items()}
    joined = "\n".join(code.values())

    variables = set(declared_variables())
    locals_ = set()
    for block in re.findall(r"^locals \{\n(.*?)^\}", joined, re.MULTILINE | re.DOTALL):
        locals_ |= set(re.findall(r"^  ([a-z0-9_]+)\s*=", block, re.MULTILINE))
    resources = set(re.findall(r'^resource "([a-z0-9_]+)" "([a-z0-9_]+)"', joined, re.MULTILINE))
    datas = set(re.findall(r'^data "([a-z0-9_]+)" "([a-z0-9_]+)"', joined, re.MULTILINE))

    used_vars = set(re.findall(r"\bvar\.([a-z0-9_]+)", joined))
    used_locals = set(re.findall(r"\blocal\.([a-z0-9_]+)", joined))
    used_datas = set(re.findall(r"\bdata\.([a-z0-9_]+)\.([a-z0-9_]+)", joined))
    used_resources = set(re.findall(r"(?<![.\w])((?:google|archive)_[a-z0-9_]+)\.([a-z0-9_]+)", joined))

    assert used_vars - variables == set(), "undeclared variables"
    assert used_locals - locals_ == set(), "undefined locals"
    assert used_datas - datas == set(), "undeclared data sources"
    assert used_resources - resources == set(), "undeclared resources"
    assert variables - used_vars <= {"collections"}, "unused variables"


def test_one_function_resource_per_trigger_with_its_entry_point():
    main = tf_text("main.tf")
    functions = re.findall(r'^resource "google_cloudfunctions2_function" "([a-z0-9_]+)" \{(.*?)^\}', main, re.MULTILINE | re.DOTALL)
    assert [name for name, _ in functions] == ["fn", "node_api"], "one for_each resource deploys every trigger; the node API is its own"
    body = dict(functions)["fn"]
    assert re.search(r"for_each\s*=\s*local\.triggers\b", body)
    assert re.search(r"locals \{\n  triggers\s*=\s*\{ for t in var\.triggers : t\.name => t \}", main)
    assert re.search(r"entry_point\s*=\s*each\.value\.function\b", body)
    assert re.search(r'retry_policy\s*=\s*"RETRY_POLICY_RETRY"', body)
    for _, fn_body in functions:
        assert re.search(r'ingress_settings\s*=\s*"ALLOW_INTERNAL_ONLY"', fn_body)
    # Every function named in the triggers is deployed: for_each over every
    # trigger, and each entry point (the node API's too) is re-exported in the source's main.py.
    assert set(function_names(Settings())) == {t["function"] for t in render(Settings())["triggers"]}
    assert '"from functions.main import ${f}' in main
    assert 'node_api_entry_point  = "node_api"' in main


def test_generated_root_main_re_exports_every_entry_point():
    # infra zips a root main.py of `from functions.main import <fn>` lines.
    functions_main = pytest.importorskip("functions.main")
    for name in function_names(Settings()):
        assert callable(getattr(functions_main, name, None)), f"functions/main.py lacks {name}"


def test_each_trigger_kind_has_its_delivery():
    code = all_code()
    # Storage and Firestore: Eventarc (the event types the local router reproduces); Pub/Sub: our push subscriptions.
    # (tests/unit/test_infra_delivery.py evaluates these for every rendered trigger.)
    assert 'eventarc_triggers = { for name, t in local.triggers : name => t if t.kind != "pubsub" }' in code
    assert 'push_triggers = { for name, t in local.triggers : name => t if t.kind == "pubsub" }' in code
    assert 'for_each = each.value.kind != "pubsub" ? [each.value] : []' in code
    assert "event_type            = event_trigger.value.event_type" in code
    assert 'resource "google_storage_notification"' not in code, "storage events come through Eventarc, not notifications of our own"
    assert {t.kind for t in triggers(Settings())} == {"storage", "pubsub", "firestore"}


def test_buckets_are_private_cmek_and_in_their_nodes_region():
    main = tf_text("main.tf")
    buckets = re.findall(r'^resource "google_storage_bucket" "([a-z_]+)" \{(.*?)^\}', main, re.MULTILINE | re.DOTALL)
    assert {name for name, _ in buckets} == {"node", "hub", "functions_source"}
    for name, body in buckets:
        assert "uniform_bucket_level_access = true" in body, name
        assert 'public_access_prevention    = "enforced"' in body, name
        assert "versioning {\n    enabled = true" in body, name
        assert "days_since_noncurrent_time = var.noncurrent_retention_days" in body, name
        if name != "functions_source":  # code only; data buckets use CMEK
            assert "default_kms_key_name = google_kms_crypto_key.data[" in body, name
            assert "depends_on = [google_kms_crypto_key_iam_member.gcs_uses_data_key]" in body, name
    node_body = dict(buckets)["node"]
    assert "location = each.value.region" in node_body
    assert "node_region = { for node, _ in var.nodes : node => var.node_regions[node] }" in main


def test_keys_rotate_and_the_storage_agent_may_use_them():
    main = tf_text("main.tf")
    key = re.search(r'^resource "google_kms_crypto_key" "data" \{(.*?)^\}', main, re.MULTILINE | re.DOTALL).group(1)
    assert re.search(r"rotation_period\s*=\s*var\.kms_rotation_period", key)
    assert "prevent_destroy = true" in key
    assert re.search(r'default\s*=\s*"\d+s"', declared_variables()["kms_rotation_period"])
    assert re.search(
        r'resource "google_kms_crypto_key_iam_member" "gcs_uses_data_key" \{.*?'
        r'role\s*=\s*"roles/cloudkms\.cryptoKeyEncrypterDecrypter".*?'
        r"data\.google_storage_project_service_account\.gcs\.email_address",
        main,
        re.DOTALL,
    )


def test_each_node_signs_with_its_own_kms_key_that_only_its_worker_may_use():
    from shared import signing

    main = tf_text("main.tf")
    key = re.search(r'^resource "google_kms_crypto_key" "signing" \{(.*?)^\}', main, re.MULTILINE | re.DOTALL).group(1)
    assert "for_each = var.nodes" in key and 'purpose  = "ASYMMETRIC_SIGN"' in key
    assert 'algorithm = "EC_SIGN_ED25519"' in key and "prevent_destroy = true" in key
    assert "key_ring = google_kms_key_ring.data[local.node_region[each.key]].id" in key  # in the node's own region
    grant = re.search(r'^resource "google_kms_crypto_key_iam_member" "worker_signs_updates" \{(.*?)^\}', main, re.MULTILINE | re.DOTALL).group(1)
    assert "google_kms_crypto_key.signing[each.key].id" in grant and 'role          = "roles/cloudkms.signer"' in grant
    assert "google_service_account.worker[each.key].email" in grant
    # With confidential workers the signer is the node's attested pool instead (attestation.tf; by value in
    # test_infra_identities.py's test_update_signing_keys_are_released_only_on_attestation_with_confidential_workers).
    assert "for_each      = var.confidential_workers ? {} : var.nodes" in grant
    attested = re.search(r'^resource "google_kms_crypto_key_iam_member" "attested_signs_updates" \{(.*?)^\}', tf_text("attestation.tf"), re.MULTILINE | re.DOTALL).group(1)
    assert "for_each      = var.confidential_workers ? var.key_release : {}" in attested
    # Both worker jobs hand the node's key version (and the node API's URL) to the worker under the names it reads.
    assert re.search(rf'{signing.ENV_VAR}\s+= "\$\{{google_kms_crypto_key\.signing\[node\]\.id\}}/cryptoKeyVersions/1"', main)
    assert re.search(r"FEDPIPE_NODE_API_URL = local\.node_api_url$", main, re.MULTILINE)
    assert main.count("for_each = local.worker_env[each.key]") == 2
    assert "signing_key_versions" in tf_text("outputs.tf")


def test_worker_jobs_match_the_launcher():
    from shared.launchers import cloud_run

    main = tf_text("main.tf")
    assert 'worker_job_base = "${var.name_prefix}-worker"' in main
    assert cloud_run.DEFAULT_JOB_NAME == "fedpipe-worker"
    assert 'name                = "${local.worker_job_base}-${each.key}"' in main
    assert f'name                = "${{local.worker_job_base}}-${{each.key}}{cloud_run.GPU_SUFFIX}"' in main
    assert main.count(f'name  = "{cloud_run.CONTAINER_NAME}"') == 2
    assert main.count("max_retries           = 0") == 2  # the job queue owns retries
    assert "for_each            = var.gpu_worker_enabled ? var.nodes : {}" in main
    assert re.search(r'default\s*=\s*false', declared_variables()["gpu_worker_enabled"])
    assert re.search(r'default\s*=\s*"nvidia-l4"', declared_variables()["gpu_accelerator"])
    assert "node_selector {\n        accelerator = var.gpu_accelerator" in main
    # The env names the launcher reads are the ones infra sets (all of the routing launcher's, by value:
    # tests/unit/test_infra_launchers.py).
    for env_name in (cloud_run.ENV_JOB_NAME, cloud_run.ENV_NODE_REGIONS, "FEDPIPE_LAUNCHER"):
        assert re.search(rf"^      {env_name}\s+= ", main, re.MULTILINE), env_name
    assert 'FEDPIPE_LAUNCHER     = local.accelerators_enabled ? "cloud" : "cloud-run"' in main
    assert 'role     = "roles/run.jobsExecutorWithOverrides"' in main


def test_service_accounts_get_only_named_roles():
    code = all_code()
    roles = set(re.findall(r'"(roles/[A-Za-z0-9_.]+)"', code))
    assert roles == set(re.findall(r"roles/[A-Za-z0-9_.]+", code)), "every role is a literal this test reads"
    assert roles == {
        "roles/cloudkms.cryptoKeyEncrypterDecrypter",
        "roles/cloudkms.signer",
        "roles/storage.objectViewer",
        "roles/storage.objectUser",
        "roles/storage.objectCreator",
        "roles/pubsub.publisher",
        "roles/pubsub.subscriber",
        "roles/datastore.user",
        "roles/eventarc.eventReceiver",
        "roles/logging.logWriter",
        "roles/artifactregistry.writer",
        "roles/iam.serviceAccountTokenCreator",
        "roles/eventarc.serviceAgent",
        "roles/run.invoker",
        "roles/run.jobsExecutorWithOverrides",
        # confidential.tf, only with var.confidential_workers (test_infra_identities.py says on what)
        "roles/iam.serviceAccountUser",
        "roles/compute.instanceAdmin.v1",
        "roles/compute.networkUser",
        "roles/batch.jobsEditor",
        "roles/confidentialcomputing.workloadUser",
        "roles/batch.agentReporter",
        # key-encryption keys (main.tf, attestation.tf): ingest seals, the hub opens node updates
        "roles/cloudkms.cryptoKeyEncrypter",
        "roles/cloudkms.cryptoKeyDecrypter",
        # accelerators.tf, only with its switches (test_infra_identities.py says who holds them, on what)
        "roles/container.defaultNodeServiceAccount",
        "roles/artifactregistry.reader",
        "roles/iam.workloadIdentityUser",  # each node's KSA on its own worker identity only
        "roles/container.developer",
        "roles/aiplatform.user",
    }
    for broad in ("roles/owner", "roles/editor", "roles/storage.admin", "roles/run.admin", "roles/pubsub.editor", "roles/pubsub.admin",
                  "roles/cloudbuild.builds.builder", "roles/compute.admin", "roles/compute.instanceAdmin", "roles/batch.admin",
                  "roles/iam.serviceAccountAdmin", "roles/cloudkms.admin", "roles/container.admin", "roles/container.clusterAdmin",
                  "roles/aiplatform.admin", "roles/container.nodeServiceAccount"):
        assert not re.search(rf"{re.escape(broad)}(?![\w.])", code), broad
    assert "google_service_account_key" not in code  # attached identities only
    assert "google_project_iam_custom_role" not in code


def test_tick_scheduler_as_text():
    main = strip_comments(tf_text("main.tf"))
    job = re.search(r'^resource "google_cloud_scheduler_job" "tick" \{(.*?)^\}', main, re.MULTILINE | re.DOTALL)
    assert job, "a Cloud Scheduler job publishes the tick"
    assert re.search(r"pubsub_target \{\s*topic_name = google_pubsub_topic\.topic\[var\.topics\.tick\]\.id\b", job.group(1))
    assert re.search(r"schedule\s*=\s*var\.tick_schedule\b", job.group(1))
    assert re.search(r'default\s*=\s*"\* \* \* \* \*"', declared_variables()["tick_schedule"])
    assert '"cloudscheduler.googleapis.com"' in main


def test_budget_and_alert_are_guarded_and_present():
    main = tf_text("main.tf")
    assert 'count           = var.billing_account == null ? 0 : 1' in main
    assert re.search(r"default\s*=\s*null", declared_variables()["billing_account"])
    assert 'resource "google_monitoring_alert_policy" "errors"' in main
    assert 'metric.type = \\"run.googleapis.com/job/completed_execution_count\\"' in main


def test_versions_pin_google_provider_6():
    versions = tf_text("versions.tf")
    assert re.search(r'source\s*=\s*"hashicorp/google"\s*\n\s*#[^\n]*\n\s*version\s*=\s*"~> 6\.\d+"', versions)


# ---------------------------------------------------------------- HCL parsed


@pytest.fixture(scope="module")
def parsed() -> dict[str, dict]:
    return parse_files()




KNOWN_TF_FILES = {
    "main.tf", "iam.tf", "delivery.tf", "network.tf", "outputs.tf", "variables.tf", "versions.tf",
    "confidential.tf", "attestation.tf", "accelerators.tf", "vpc_sc.tf",
}


def test_every_tf_file_parses(parsed):
    # Terraform reads every .tf file of the directory, so every one must parse (and be read by the other tests).
    on_disk = {p.name for p in INFRA.glob("*.tf")}
    assert set(parsed) == on_disk
    assert KNOWN_TF_FILES <= on_disk, f"missing: {KNOWN_TF_FILES - on_disk}"
    for name, doc in parsed.items():
        assert doc, f"{name} parsed to nothing"


def _all_resources(parsed: dict) -> dict[tuple[str, str], dict]:
    return {key: body for doc in parsed.values() for key, body in resources_of(doc).items()}


def test_parsed_function_resource(parsed):
    fn = resources_of(parsed["main.tf"])[("google_cloudfunctions2_function", "fn")]
    assert fn["for_each"] == "${local.triggers}"
    (build,) = fn["build_config"]
    assert build["entry_point"] == "${each.value.function}"
    (dynamic,) = fn["dynamic"]
    trigger = dynamic["event_trigger"]
    assert trigger["for_each"] == '${each.value.kind != "pubsub" ? [each.value] : []}'
    (content,) = trigger["content"]
    assert content["event_type"] == "${event_trigger.value.event_type}"
    assert content["trigger_region"] == "${local.trigger_region[each.key]}"
    assert content["retry_policy"] == "RETRY_POLICY_RETRY"
    assert content["service_account_email"] == "${google_service_account.delivery.email}"
    (filters,) = content["dynamic"]
    assert filters["event_filters"]["for_each"] == "${local.event_filters[each.key]}"
    (each_filter,) = filters["event_filters"]["content"]
    assert {k: v for k, v in each_filter.items() if k != "__is_block__"} == {
        "attribute": "${event_filters.value.attribute}",
        "value": "${event_filters.value.value}",
        "operator": "${event_filters.value.operator}",
    }


def test_parsed_resources_include_the_required_kinds(parsed):
    kinds = {rtype for rtype, _ in _all_resources(parsed)}
    assert {
        "google_pubsub_subscription",
        "google_compute_subnetwork",
        "google_storage_bucket",
        "google_kms_key_ring",
        "google_kms_crypto_key",
        "google_pubsub_topic",
        "google_firestore_database",
        "google_cloudfunctions2_function",
        "google_cloud_run_v2_job",
        "google_artifact_registry_repository",
        "google_monitoring_alert_policy",
        "google_billing_budget",
        "google_service_account",
        "google_storage_bucket_object",
    } <= kinds
    db = resources_of(parsed["main.tf"])[("google_firestore_database", "db")]
    assert db["type"] == "FIRESTORE_NATIVE"


def _locals(doc: dict) -> dict:
    return {name: value for item in doc.get("locals", []) for name, value in item.items()}


def test_parsed_every_trigger_deploys_where_its_source_is(parsed):
    """Each rendered trigger, hub-upload and tick included, resolves to a location and a watched resource."""
    main = parsed["main.tf"]
    local = _locals(main)
    assert local["triggers"] == "${{for t in var.triggers : t.name => t}}"
    # Storage triggers run in their bucket's region; the hub bucket is in the map.
    assert "(var.hub_bucket) = var.region" in local["bucket_region"]
    assert 't.kind == "storage" ? local.bucket_region[t.bucket] : var.region' in local["function_location"]
    # Every function's region has an image repository to build into.
    assert local["function_regions"] == "${toset(concat(values(local.function_location), [var.region]))}"
    assert resources_of(main)[("google_pubsub_topic", "topic")]["for_each"] == "${toset(values(var.topics))}"

    # What those expressions will meet: the rendered triggers of a 3-node deployment.
    s = Settings(project="acme-fl", nodes=("us", "eu", "ch"))
    out = render(s)
    bucket_region = {b: "node" for n in out["nodes"].values() for b in (n["raw_bucket"], n["processed_bucket"], n["quarantine_bucket"])}
    bucket_region[out["hub_bucket"]] = "hub"
    by_name = {t["name"]: t for t in out["triggers"]}
    assert len(by_name) == len(out["triggers"]), "trigger names key the for_each: they must be unique"
    for t in out["triggers"]:
        if t["kind"] == "storage":
            assert t["bucket"] in bucket_region, t
        if t["kind"] == "pubsub":
            assert t["topic"] in out["topics"].values(), t
    assert bucket_region[by_name["hub-upload"]["bucket"]] == "hub"
    assert by_name["tick"]["topic"] == out["topics"]["tick"] != out["topics"]["shard_ready"]
    assert {t["function"] for t in out["triggers"]} == {"on_raw_upload", "on_hub_upload", "on_shard_ready", "on_tick", "on_job_written"}


def test_parsed_cloud_scheduler_publishes_the_tick(parsed):
    main = parsed["main.tf"]
    jobs = {name: body for (rtype, name), body in resources_of(main).items() if rtype == "google_cloud_scheduler_job"}
    assert set(jobs) == {"tick"}
    job = jobs["tick"]
    (target,) = job["pubsub_target"]
    assert target["topic_name"] == "${google_pubsub_topic.topic[var.topics.tick].id}"
    assert target.get("data") or target.get("attributes"), "a Pub/Sub message needs data or an attribute"
    assert job["schedule"] == "${var.tick_schedule}"
    assert job["region"] == "${var.region}"
    assert "${google_pubsub_subscription.trigger}" in job["depends_on"], "start the clock after on_tick's subscription exists"
    assert "http_target" not in job and "app_engine_http_target" not in job
    assert '"cloudscheduler.googleapis.com"' in _locals(main)["apis"]

    (tick_schedule,) = [item["tick_schedule"] for item in parsed["variables.tf"]["variable"] if "tick_schedule" in item]
    assert tick_schedule["default"] == "* * * * *"
    # The topic it targets is the one on_tick listens to.
    (tick,) = [t for t in render(Settings())["triggers"] if t["function"] == "on_tick"]
    assert tick["kind"] == "pubsub" and tick["topic"] == render(Settings())["topics"]["tick"]


def test_parsed_no_round_broadcasts_and_nothing_of_ours_publishes_ticks(parsed):
    publishers = [body for (rtype, _), body in _all_resources(parsed).items() if rtype == "google_pubsub_topic_iam_member"]
    assert "${google_pubsub_topic.topic[var.topics.tick].id}" not in {b["topic"] for b in publishers}, "only Cloud Scheduler publishes ticks"
    assert "fed_rounds" not in render(Settings())["topics"] and "fed_rounds" not in tf_text("variables.tf")


def _hub_grants(roles: str) -> dict[str, tuple[str, str]]:
    """worker_bucket_roles (parsed) -> {key: (role, prefix expression)} for the hub bucket's grants."""
    entries = re.findall(
        r'"\$\{node\}-([a-z-]+)"\s*=\s*\{node = node, bucket = ([^,]+), role = "([^"]+)", prefix = ([^,}]+)\}', roles
    )
    assert len(entries) == 3, roles  # processed read/create, hub create
    return {key: (role, prefix.strip()) for key, bucket, role, prefix in entries if bucket == "google_storage_bucket.hub.name"}


def _node_prefix(template_expr: str, node: str) -> str:
    """The per-node prefix local (`{ for node, _ in var.nodes : node => "updates/${node}/" }`) rendered for `node`."""
    m = re.fullmatch(r'\$\{\{for node, _ in var\.nodes : node => "([^"]*)"\}\}', template_expr)
    assert m, template_expr
    assert "${node}" in m.group(1), "the write prefix must be per node"
    return m.group(1).replace("${node}", node)


def test_parsed_workers_create_only_their_own_updates_in_the_hub(parsed):
    from shared.federation import REQUEST_PATH, UPDATE_PATH, global_model_object, server_state_object, update_object

    local = _locals(parsed["iam.tf"])
    write_prefix = {node: _node_prefix(local["worker_hub_update_prefix"], node) for node in ("us", "eu", "us-east")}
    for evaluate in (False, True):
        update = update_object("f", 1, "us", 1, evaluate)
        assert update.startswith(write_prefix["us"]), (update, write_prefix["us"])
        assert UPDATE_PATH.match(update)["node"] == "us"  # the node the hub reads is the one the prefix pins
        assert not update.startswith(write_prefix["eu"]) and not update.startswith(write_prefix["us-east"])
        assert not update_object("f", 1, "us-east", 1, evaluate).startswith(write_prefix["us"])
    for prefix in write_prefix.values():
        assert not REQUEST_PATH.match(prefix + "x.json") and not prefix.startswith("requests/")
        assert not global_model_object("f", 1).startswith(prefix) and not server_state_object("f", 1).startswith(prefix)
    # In the hub a worker creates under its own prefix and reads nothing (global models come through the node API).
    assert _hub_grants(local["worker_bucket_roles"]) == {"hub-create": ("roles/storage.objectCreator", "local.worker_hub_update_prefix[node]")}


def test_worker_hub_prefix_as_text():
    from shared.federation import update_object

    iam = strip_comments(tf_text("iam.tf"))
    write = re.search(r'^  worker_hub_update_prefix = \{ for node, _ in var\.nodes : node => "([^"]+)" \}$', iam, re.MULTILINE)
    assert write
    assert update_object("f", 1, "us", 1, False).startswith(write.group(1).replace("${node}", "us"))
    assert not update_object("f", 1, "us", 1, False).startswith(write.group(1).replace("${node}", "us-east"))
    assert "worker_hub_read_prefix" not in iam, "workers read no hub object"
    creates = re.findall(r'role = "roles/storage\.objectCreator", prefix = ([^ }]+)', iam)
    assert sorted(creates) == ["local.worker_hub_update_prefix[node]", "null"]
    assert re.search(r'validation \{[^}]*keys\(var\.nodes\)[^}]*\^\[A-Za-z0-9_-\]\+\$', declared_variables()["nodes"])


def test_node_api_url_is_cloud_runs_deterministic_url_on_both_sides(parsed):
    """FEDPIPE_NODE_API_URL: the audience workers request and the node API checks, without a cycle."""
    local = _locals(parsed["main.tf"])
    assert local["node_api_name"] == "${var.name_prefix}-node-api"
    assert local["node_api_url"] == "https://${local.node_api_name}-${data.google_project.this.number}.${var.region}.run.app"
    resources = resources_of(parsed["main.tf"])
    node_api = resources[("google_cloudfunctions2_function", "node_api")]
    assert node_api["name"] == "${local.node_api_name}"
    (service,) = node_api["service_config"]
    assert service["environment_variables"] == "${merge(var.settings_env, local.kek_env, local.hub_aggregator_env, {FEDPIPE_NODE_API_URL = local.node_api_url})}"
    # Every worker holds a long poll open: one instance serves many, internal callers only.
    assert (service["max_instance_request_concurrency"], service["available_cpu"], service["ingress_settings"]) == (80, "1", "ALLOW_INTERNAL_ONLY")
    # The workers (CPU and GPU jobs) get the same value from local.worker_env.
    assert "FEDPIPE_NODE_API_URL = local.node_api_url" in local["worker_env"]
    assert "service_config[0].uri" not in local["worker_env"] and "service_config[0].uri" not in service["environment_variables"]
    for job in ("worker", "worker_gpu"):
        (template,) = resources[("google_cloud_run_v2_job", job)]["template"]
        (task,) = template["template"]
        (container,) = task["containers"]
        assert container["dynamic"][0]["env"]["for_each"] == "${local.worker_env[each.key]}"

    # By value, for a project: the URL Cloud Run gives the service, which the
    # worker's client (workers/trainer/node_client.py) and shared.identity read.
    values = {"var.name_prefix": "fedpipe", "data.google_project.this.number": "123456789012", "var.region": "us-central1"}
    name = local["node_api_name"].replace("${var.name_prefix}", values["var.name_prefix"])
    url = local["node_api_url"].replace("${local.node_api_name}", name)
    for ref, value in values.items():
        url = url.replace("${" + ref + "}", value)
    assert url == "https://fedpipe-node-api-123456789012.us-central1.run.app"
    # Cloud Run only has that URL while "<service>-<number>" fits a DNS label.
    (lifecycle,) = node_api["lifecycle"]
    (precondition,) = lifecycle["precondition"]
    assert precondition["condition"] == '${length("${local.node_api_name}-${data.google_project.this.number}") <= 63}'


def test_one_kek_per_node_in_its_region_and_the_hubs_rotating_and_protected(parsed):
    resources = _all_resources(parsed)
    local = _locals(parsed["main.tf"])
    kek = resources[("google_kms_crypto_key", "kek")]
    assert kek["for_each"] == "${local.kek_region}"
    # Every node's KEK in its own region (the key ring of that region), and the hub's in the hub region.
    assert local["kek_region"] == "${merge({for node, _ in var.nodes : node => local.node_region[node]}, {hub = var.region})}"
    assert kek["key_ring"] == "${google_kms_key_ring.data[each.value].id}"
    assert resources[("google_kms_key_ring", "data")]["location"] == "${each.key}"
    assert (kek["purpose"], kek["rotation_period"]) == ("ENCRYPT_DECRYPT", "${var.kek_rotation_period}")
    assert re.search(r'default\s*=\s*"2592000s"', declared_variables()["kek_rotation_period"])  # 30 days
    (lifecycle,) = kek["lifecycle"]
    assert lifecycle["prevent_destroy"] is True
    # "hub" names the hub's key (shared.envelope.HUB): a node of that name would take its place.
    assert lifecycle["precondition"][0]["condition"] == '${!contains(keys(var.nodes), "hub")}'
    # The bucket CMEK keys stay what they were: one per region, for Google's agents.
    assert resources[("google_kms_crypto_key", "data")]["for_each"] == "${local.kms_regions}"


def test_functions_and_workers_get_fedpipe_node_keks_of_exactly_these_keys(parsed):
    """FEDPIPE_NODE_KEKS: "<owner>=gcp-kms://<key resource name>" for every node and the hub, everywhere it is read."""
    from shared import envelope

    resources = _all_resources(parsed)
    local = _locals(parsed["main.tf"])
    assert local["node_keks"] == '${join(",", [for owner, key in google_kms_crypto_key.kek : format("%s=gcp-kms://%s", owner, key.id)])}'
    assert local["kek_env"] == {"FEDPIPE_NODE_KEKS": "${local.node_keks}"}
    # Every function (each trigger's and the node API), and both worker jobs through local.worker_env.
    (fn_service,) = resources[("google_cloudfunctions2_function", "fn")]["service_config"]
    assert fn_service["environment_variables"] == (
        "${merge(var.settings_env, local.trigger_node[each.key] == null ? local.hub_function_env : {}, local.kek_env, {FEDPIPE_TRIGGER = each.key})}"
    )
    assert local["hub_function_env"] == "${merge(local.launcher_env, local.hub_aggregator_env)}"
    (api_service,) = resources[("google_cloudfunctions2_function", "node_api")]["service_config"]
    assert "local.kek_env" in api_service["environment_variables"]
    assert local["worker_env"].startswith("${{for node, _ in var.nodes : node => merge(var.settings_env, local.kek_env, {")
    for job in ("worker", "worker_gpu"):
        (template,) = resources[("google_cloud_run_v2_job", job)]["template"]
        (task,) = template["template"]
        (container,) = task["containers"]
        assert container["dynamic"][0]["env"]["for_each"] == "${local.worker_env[each.key]}"
    # The confidential launchers hand workers the same local.worker_env.
    assert "jsonencode(local.worker_env)" in tf_text("confidential.tf")

    # By value, for a deployment: the key ids Terraform gives these keys (google_kms_key_ring id
    # projects/P/locations/L/keyRings/R; crypto key id <key ring id>/cryptoKeys/<name>).
    project, prefix, hub_region = "acme-fl", "fedpipe", "us-central1"
    node_regions = {"us": "us-central1", "eu": "europe-west4"}
    kek = resources[("google_kms_crypto_key", "kek")]
    ring = resources[("google_kms_key_ring", "data")]
    kek_region = {**node_regions, envelope.HUB: hub_region}
    key_ids = {
        owner: f"projects/{project}/locations/{region}/keyRings/{ring['name'].replace('${var.name_prefix}', prefix)}/cryptoKeys/"
        + kek["name"].replace("${var.name_prefix}", prefix).replace("${each.key}", owner)
        for owner, region in kek_region.items()
    }
    value = ",".join(f"{owner}=gcp-kms://{key_ids[owner]}" for owner in sorted(key_ids))  # a for over a map: key order
    keks = Settings.from_env({"FEDPIPE_NODE_KEKS": value}).node_keks
    assert keks == {
        "us": "gcp-kms://projects/acme-fl/locations/us-central1/keyRings/fedpipe/cryptoKeys/fedpipe-us-kek",
        "eu": "gcp-kms://projects/acme-fl/locations/europe-west4/keyRings/fedpipe/cryptoKeys/fedpipe-eu-kek",
        "hub": "gcp-kms://projects/acme-fl/locations/us-central1/keyRings/fedpipe/cryptoKeys/fedpipe-hub-kek",
    }
    for owner, uri in keks.items():
        assert re.fullmatch(r"gcp-kms://projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+", uri), uri
        assert uri.startswith(envelope.GCP_KMS_PREFIX)
        assert f"/locations/{kek_region[owner]}/" in uri  # each node's key in its own region
    assert len(set(keks.values())) == len(keks), "no two owners share a KEK"


def test_parsed_variables_cover_the_render(parsed):
    declared = {name for item in parsed["variables.tf"]["variable"] for name in item}
    assert set(render(Settings())) <= declared


# ---------------------------------------------------------------- Dockerfile


def test_worker_dockerfile():
    text = (REPO / "workers" / "trainer" / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith(("#", " "))]
    # The base is pinned by digest: a tag can move under a rebuild.
    assert re.fullmatch(r"FROM python:3\.11-slim@sha256:[0-9a-f]{64}", instructions[0]), instructions[0]
    assert any(re.match(r"RUN pip install \. ", line) for line in instructions)
    users = [line for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split()[1].split(":")[0] not in ("0", "root")
    assert instructions[-1] == 'ENTRYPOINT ["python", "-m", "workers.trainer"]'
    # Only what the worker imports goes into the image (no functions/, tests/, emulators/).
    copied = {line.split()[1] for line in instructions if line.startswith("COPY ")}
    assert copied == {"pyproject.toml", "fedpipe/", "shared/", "workers/"}


def test_checkpoints_in_processed_buckets_expire_and_nothing_else_does_by_age(parsed):
    bucket = _all_resources(parsed)[("google_storage_bucket", "node")]
    rules = {rule["for_each"]: rule["content"][0] for rule in (d["lifecycle_rule"] for d in bucket["dynamic"] if "lifecycle_rule" in d)}
    checkpoints = rules['${each.value.kind == "processed" ? [var.checkpoint_retention_days] : []}']
    assert checkpoints["condition"][0] == {"age": "${lifecycle_rule.value}", "matches_prefix": ["checkpoints/"]}
    assert checkpoints["action"][0] == {"type": "Delete"}
    assert len(rules) == 2  # this one and the quarantine's
    assert re.search(r"default\s*=\s*14", declared_variables()["checkpoint_retention_days"])
    assert "checkpoints/" in Path(__file__).parents[2].joinpath("workers", "trainer", "checkpoints.py").read_text()

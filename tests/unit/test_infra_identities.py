"""Who may touch what in infra/, by value: every IAM grant expanded for a three-node deployment.

There is no terraform here to plan, so `grants()` expands each parsed
`google_*_iam_member` the way Terraform would for `render(Settings(nodes=us, eu, ch))`:
for_each instances, `each.*` substituted, members and targets resolved to names.
An expression it does not know fails the expansion, so a new grant cannot slip past
these tests unread.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest

from shared.config import Settings
from shared.federation import update_object
from shared.infra_render import render
from tests.unit.infra_hcl import resources_and_locals

pytestmark = pytest.mark.unit

INFRA = Path(__file__).resolve().parents[2] / "infra"
NODES = ("us", "eu", "ch")
RENDER = render(Settings(project="acme-fl", nodes=NODES))


class Grant(NamedTuple):
    principal: str  # hub | ingest:<node> | worker:<node> | delivery | build | <service>-agent
    target: str  # project | bucket:<name> | topic:<name> | subscription:<trigger> | service:<fn> | key:... | ...
    role: str
    prefix: str | None = None  # object-name prefix of an IAM condition


@pytest.fixture(scope="module")
def tf() -> dict:
    """Every resource and local of infra/*.tf, parsed."""
    return resources_and_locals()


# ---------------------------------------------------------------- expansion


def _bucket_roles(local_text: str, node: str) -> dict[str, dict]:
    """One node's entries of ingest_bucket_roles / worker_bucket_roles."""
    entries = re.findall(r'"\$\{node\}-([a-z-]+)" = \{node = node, bucket = ([^,]+), role = "([^"]+)"(?:, prefix = ([^,}]+))?\}', local_text)
    assert entries, local_text
    return {
        f"{node}-{key}": {"node": node, "bucket": bucket.replace("${node}", node), "role": role, "prefix": (prefix or "null").strip()}
        for key, bucket, role, prefix in entries
    }


def _instances(for_each: str | None, tf: dict) -> list[tuple[str, object]]:
    """(each.key, each.value) of a for_each expression this deployment can meet."""
    locals_ = tf["locals"]
    triggers = {t["name"]: t for t in RENDER["triggers"]}
    if for_each is None:
        return [("", None)]
    if for_each == "${var.nodes}":
        return [(n, n) for n in NODES]
    if for_each in ("${local.ingest_bucket_roles}", "${local.worker_bucket_roles}"):
        text = locals_[for_each[len("${local."):-1]]
        return [item for node in NODES for item in _bucket_roles(text, node).items()]
    if for_each == '${merge({hub = local.hub_member}, {for node, sa in google_service_account.ingest : "ingest-${node}" => "serviceAccount:${sa.email}"})}':
        return [("hub", "${local.hub_member}")] + [
            (f"ingest-{n}", f'serviceAccount:${{google_service_account.ingest["{n}"].email}}') for n in NODES
        ]
    if for_each == "${google_pubsub_subscription.trigger}":  # local.push_triggers: the Pub/Sub triggers
        return [(name, {"id": f"trigger:{name}"}) for name, t in triggers.items() if t["kind"] == "pubsub"]
    if for_each == "${google_cloudfunctions2_function.fn}":
        return [(name, {"service_config[0].service": name}) for name in triggers]
    if for_each in ("${local.kms_regions}", "${google_artifact_registry_repository.functions}"):
        return [("region", {"name": "region"})]  # where does not matter for who
    if for_each.startswith("${merge(google_cloud_run_v2_job.worker,"):
        return [(n, {"name": n}) for n in NODES]
    raise AssertionError(f"unknown for_each {for_each!r}: teach _instances what it expands to")


def _substitute(expr: str, key: str, value) -> str:
    if isinstance(value, dict):
        for field, v in value.items():
            expr = expr.replace(f"each.value.{field}", v if field == "bucket" else f'"{v}"')
    elif value is not None:
        expr = expr.replace("${each.value}", value).replace("each.value", f'"{value}"')
    return expr.replace("each.key", f'"{key}"')


def _principal(member: str) -> str:
    fixed = {
        "${local.hub_member}": "hub",
        "${local.delivery_member}": "delivery",
        "${local.pubsub_agent_member}": "pubsub-agent",
        "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}": "gcs-agent",
        "serviceAccount:${google_project_service_identity.eventarc.email}": "eventarc-agent",
        "serviceAccount:${google_service_account.build.email}": "build",
    }
    if member in fixed:
        return fixed[member]
    m = re.fullmatch(r'serviceAccount:\$\{google_service_account\.(ingest|worker)\["([\w-]+)"\]\.email\}', member)
    assert m, f"unknown member {member!r}"
    return f"{m.group(1)}:{m.group(2)}"


def _bucket(expr: str) -> str:
    nodes = RENDER["nodes"]
    if expr in ("${google_storage_bucket.hub.name}", "google_storage_bucket.hub.name"):
        return RENDER["hub_bucket"]
    if expr == "${google_storage_bucket.functions_source.name}":
        return "functions-source"
    m = re.fullmatch(r'(?:\$\{)?google_storage_bucket\.node\["([\w-]+)-(raw|processed|quarantine)"\]\.name\}?', expr)
    assert m, f"unknown bucket {expr!r}"
    return nodes[m.group(1)][f"{m.group(2)}_bucket"]


def _target(rtype: str, body: dict) -> str:
    if rtype in ("google_project_iam_member",):
        return "project"
    if rtype == "google_storage_bucket_iam_member":
        return f"bucket:{_bucket(body['bucket'])}"
    if rtype == "google_pubsub_topic_iam_member":
        m = re.fullmatch(r"\$\{google_pubsub_topic\.topic\[var\.topics\.(\w+)\]\.id\}", body["topic"])
        return f"topic:{RENDER['topics'][m.group(1)]}" if m else f"topic:{body['topic'].strip(chr(34))}"
    if rtype == "google_pubsub_subscription_iam_member":
        return f"subscription:{body['subscription'].strip(chr(34))}"
    if rtype == "google_cloud_run_service_iam_member":
        if body["service"] == "${google_cloudfunctions2_function.node_api.service_config[0].service}":
            return "service:node-api"
        return f"service:{body['service'].strip(chr(34))}"
    if rtype == "google_kms_crypto_key_iam_member":
        m = re.fullmatch(r'\$\{google_kms_crypto_key\.(signing|data)\[(?:"([\w-]+)"|each\.key)\]\.id\}', body["crypto_key_id"])
        assert m, body["crypto_key_id"]
        return f"key:{m.group(1)}:{m.group(2) or 'region'}"
    if rtype == "google_service_account_iam_member":
        return "service-account:" + body["service_account_id"].split(".")[1]
    if rtype == "google_artifact_registry_repository_iam_member":
        return "repository:functions"
    if rtype == "google_cloud_run_v2_job_iam_member":
        return "job:worker"
    raise AssertionError(f"unknown IAM resource type {rtype}")


def _resolve_each(body: dict, key: str, value) -> dict:
    out = {}
    for field, expr in body.items():
        if not isinstance(expr, str):
            continue
        expr = _substitute(expr, key, value)
        # ${each.value.id} of a for_each over resources became the quoted id.
        expr = re.sub(r'^\$\{"([^"]*)"\}$', r'"\1"', expr)
        out[field] = expr
    return out


def grants(tf: dict) -> list[Grant]:
    found = []
    for (rtype, _), body in tf["resources"].items():
        if not rtype.endswith("_iam_member"):
            continue
        for key, value in _instances(body.get("for_each"), tf):
            resolved = _resolve_each(body, key, value)
            role = resolved["role"]
            prefix = None
            if isinstance(value, dict) and value.get("prefix") not in (None, "null"):
                prefix_expr = value["prefix"]
                assert prefix_expr == "local.worker_hub_update_prefix[node]", prefix_expr
                template = re.fullmatch(r'\$\{\{for node, _ in var\.nodes : node => "([^"]*)"\}\}', tf["locals"]["worker_hub_update_prefix"])
                prefix = template.group(1).replace("${node}", value["node"])
            if role.startswith("${each.value.role}"):
                role = value["role"]
            found.append(Grant(_principal(resolved["member"]), _target(rtype, resolved), role.strip('"'), prefix))
    return found


# ---------------------------------------------------------------- the rules


def test_expansion_sees_every_identity(tf):
    principals = {g.principal for g in grants(tf)}
    for node in NODES:
        assert {f"ingest:{node}", f"worker:{node}"} <= principals
    assert {"hub", "delivery", "build", "pubsub-agent", "gcs-agent"} <= principals


def test_each_raw_upload_function_runs_as_its_nodes_ingest_identity(tf):
    locals_ = tf["locals"]
    fn = tf["resources"][("google_cloudfunctions2_function", "fn")]
    (service,) = fn["service_config"]
    assert service["service_account_email"] == "${local.function_identity[each.key]}"
    assert locals_["raw_bucket_node"] == "${{for node, b in var.nodes : b.raw_bucket => node}}"
    assert locals_["trigger_node"] == '${{for name, t in local.triggers : name => (t.kind == "storage" ? lookup(local.raw_bucket_node, t.bucket, null) : null)}}'
    assert locals_["function_identity"] == (
        "${{for name, node in local.trigger_node : name => (node == null ? google_service_account.hub.email : "
        "google_service_account.ingest[node].email)}}"
    )
    # Those expressions, over the rendered triggers.
    raw_bucket_node = {b["raw_bucket"]: node for node, b in RENDER["nodes"].items()}
    identity = {
        t["name"]: (f"ingest:{raw_bucket_node[t['bucket']]}" if t["kind"] == "storage" and t["bucket"] in raw_bucket_node else "hub")
        for t in RENDER["triggers"]
    }
    assert identity == {
        "raw-upload-us": "ingest:us", "raw-upload-eu": "ingest:eu", "raw-upload-ch": "ingest:ch",
        "hub-upload": "hub", "shard-ready": "hub", "tick": "hub", "job-written": "hub",
    }
    node_api = tf["resources"][("google_cloudfunctions2_function", "node_api")]
    assert node_api["service_config"][0]["service_account_email"] == "${google_service_account.hub.email}"


def test_ingest_identity_touches_only_its_own_nodes_buckets(tf):
    for node in NODES:
        own = {f"bucket:{b}" for b in RENDER["nodes"][node].values()}
        mine = [g for g in grants(tf) if g.principal == f"ingest:{node}"]
        buckets = {g.target: g.role for g in mine if g.target.startswith("bucket:")}
        assert buckets == {
            f"bucket:{RENDER['nodes'][node]['raw_bucket']}": "roles/storage.objectViewer",
            f"bucket:{RENDER['nodes'][node]['processed_bucket']}": "roles/storage.objectUser",
            f"bucket:{RENDER['nodes'][node]['quarantine_bucket']}": "roles/storage.objectUser",
        }
        assert set(buckets) == own
        others = {g.target for g in mine} - own
        assert others == {"project", f"topic:{RENDER['topics']['shard_ready']}"}
        assert {g.role for g in mine if g.target == "project"} == {"roles/datastore.user"}
        assert {g.role for g in mine if g.target.startswith("topic:")} == {"roles/pubsub.publisher"}


def test_hub_identity_has_no_node_bucket(tf):
    node_buckets = {f"bucket:{b}" for n in RENDER["nodes"].values() for b in n.values()}
    hub = [g for g in grants(tf) if g.principal == "hub"]
    assert not {g.target for g in hub} & node_buckets
    assert {(g.target, g.role) for g in hub} == {
        (f"bucket:{RENDER['hub_bucket']}", "roles/storage.objectUser"),
        ("project", "roles/datastore.user"),
        ("job:worker", "roles/run.jobsExecutorWithOverrides"),
    }


def test_workers_get_their_shards_their_update_prefix_and_the_node_api_only(tf):
    for node in NODES:
        mine = {(g.target, g.role, g.prefix) for g in grants(tf) if g.principal == f"worker:{node}"}
        processed = f"bucket:{RENDER['nodes'][node]['processed_bucket']}"
        assert mine == {
            (processed, "roles/storage.objectViewer", None),
            (processed, "roles/storage.objectCreator", None),
            (f"bucket:{RENDER['hub_bucket']}", "roles/storage.objectCreator", f"updates/{node}/"),
            ("service:node-api", "roles/run.invoker", None),
            (f"key:signing:{node}", "roles/cloudkms.signer", None),
        }
        # The prefix admits its own updates and no other node's, a node sharing its first letters included.
        prefix = f"updates/{node}/"
        assert update_object("f", 1, node, 1, False).startswith(prefix)
        assert not update_object("f", 1, f"{node}-east", 1, False).startswith(prefix)
    worker = tf["resources"][("google_storage_bucket_iam_member", "worker")]
    (condition,) = worker["dynamic"][0]["condition"]["content"]
    assert condition["expression"] == 'resource.name.startsWith(\\"projects/_/buckets/${each.value.bucket}/objects/${condition.value}\\")'


def test_no_project_level_pubsub_token_creator_or_builder_grant(tf):
    project = {(g.principal, g.role) for g in grants(tf) if g.target == "project"}
    for principal, role in project:
        if principal.endswith("-agent"):
            continue  # Google's service agents, below
        assert not role.startswith(("roles/pubsub.", "roles/cloudbuild.")), (principal, role)
        assert role != "roles/iam.serviceAccountTokenCreator"
    assert project == {
        ("hub", "roles/datastore.user"),
        *{(f"ingest:{n}", "roles/datastore.user") for n in NODES},
        ("delivery", "roles/eventarc.eventReceiver"),
        ("build", "roles/logging.logWriter"),
        ("eventarc-agent", "roles/eventarc.serviceAgent"),
        # Eventarc's Cloud Storage triggers require it (the topic is Eventarc's, created with the trigger).
        ("gcs-agent", "roles/pubsub.publisher"),
    }
    assert not any(g.principal.startswith("worker:") and g.target == "project" for g in grants(tf))
    assert not [name for (rtype, name) in tf["resources"] if rtype == "google_project_iam_custom_role"]


def test_token_creator_only_on_the_delivery_identity_and_delivery_invokes_only_event_functions(tf):
    tokens = [g for g in grants(tf) if g.role == "roles/iam.serviceAccountTokenCreator"]
    assert tokens == [Grant("pubsub-agent", "service-account:delivery", "roles/iam.serviceAccountTokenCreator")]
    invokers = {(g.principal, g.target) for g in grants(tf) if g.role == "roles/run.invoker"}
    assert invokers == {
        *{("delivery", f"service:{t['name']}") for t in RENDER["triggers"]},
        *{(f"worker:{n}", "service:node-api") for n in NODES},
    }


def test_pubsub_grants_are_per_topic_or_subscription_except_the_storage_agents(tf):
    pubsub = {(g.principal, g.target, g.role) for g in grants(tf) if g.role.startswith("roles/pubsub.")}
    push_triggers = [t["name"] for t in RENDER["triggers"] if t["kind"] == "pubsub"]
    assert push_triggers == ["shard-ready", "tick"]
    assert pubsub == {
        *{(f"ingest:{n}", f"topic:{RENDER['topics']['shard_ready']}", "roles/pubsub.publisher") for n in NODES},
        # The only project-level one: Google's Cloud Storage agent, for Eventarc's storage triggers.
        ("gcs-agent", "project", "roles/pubsub.publisher"),
        ("pubsub-agent", f"topic:{RENDER['topics']['dead_letter']}", "roles/pubsub.publisher"),
        # Our push subscriptions here; Eventarc's subscriptions get theirs from scripts/eventarc-dead-letter.sh.
        *{("pubsub-agent", f"subscription:trigger:{name}", "roles/pubsub.subscriber") for name in push_triggers},
    }

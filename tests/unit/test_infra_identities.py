"""Who may touch what in infra/, by value: every IAM grant expanded for a three-node deployment.

There is no terraform here to plan, so `grants()` expands each parsed
`google_*_iam_member` the way Terraform would for `render(Settings(nodes=us, eu, ch))`:
for_each instances, `each.*` substituted, members and targets resolved to names.
An expression it does not know fails the expansion, so a new grant cannot slip past
these tests unread.

The deployment's switches are expanded too (`Deployment`): `confidential_workers`
(confidential.tf) off and on, `key_release` (attestation.tf) empty and set for
every node, the accelerator backends `gke_enabled`, `vertex_enabled` and
`batch_enabled` (accelerators.tf), and `attested_aggregation` (aggregator.tf). The
rules below hold for each combination, and what the switches add is pinned by
value: with them off, none of it exists. (`confidential_workers` also moves each
node's update-signing key from its worker service account to its attested pool.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import NamedTuple

import pytest

from shared.attestation import NodePolicy, node_audience
from shared.config import Settings
from shared.federation import update_object
from shared.infra_render import render
from shared.key_release import terraform_vars
from tests.unit.infra_hcl import resources_and_locals

pytestmark = pytest.mark.unit

INFRA = Path(__file__).resolve().parents[2] / "infra"
NODES = ("us", "eu", "ch")
RENDER = render(Settings(project="acme-fl", nodes=NODES))
# var.node_regions of this deployment (the default names us and eu only): one region per node,
# the hub's region shared with us.
NODE_REGIONS = {"us": "us-central1", "eu": "europe-west4", "ch": "europe-west6"}
# var.key_release as shared.key_release renders it for every node.
KEY_RELEASE = terraform_vars(
    NodePolicy(node=n, audience=node_audience("acme-fl", n), image_digests=("sha256:" + "a" * 64,)) for n in NODES
)


@dataclass(frozen=True)
class Deployment:
    confidential_workers: bool = False  # var.confidential_workers
    key_release: dict = dataclass_field(default_factory=dict)  # var.key_release
    gke_enabled: bool = False  # var.gke_enabled (accelerators.tf)
    vertex_enabled: bool = False  # var.vertex_enabled
    batch_enabled: bool = False  # var.batch_enabled
    attested_aggregation: bool = False  # var.attested_aggregation (aggregator.tf; needs confidential_workers)

    def flag(self, name: str) -> bool:
        assert name in ("confidential_workers", "gke_enabled", "vertex_enabled", "batch_enabled", "attested_aggregation"), f"unknown switch var.{name}"
        return getattr(self, name)


BASE = Deployment()
EVERYTHING = Deployment(
    confidential_workers=True, key_release=KEY_RELEASE, gke_enabled=True, vertex_enabled=True, batch_enabled=True, attested_aggregation=True,
)
DEPLOYMENTS = {
    "base": BASE,
    "confidential": Deployment(confidential_workers=True),
    "key-release": Deployment(key_release=KEY_RELEASE),
    "both": Deployment(confidential_workers=True, key_release=KEY_RELEASE),
    "gke": Deployment(gke_enabled=True),
    "vertex": Deployment(vertex_enabled=True),
    "batch": Deployment(batch_enabled=True),
    "vertex-batch": Deployment(vertex_enabled=True, batch_enabled=True),
    "attested-aggregation": Deployment(confidential_workers=True, key_release=KEY_RELEASE, attested_aggregation=True),
    "everything": EVERYTHING,
}
each_deployment = pytest.mark.parametrize("deployment", list(DEPLOYMENTS.values()), ids=list(DEPLOYMENTS))


class Grant(NamedTuple):
    principal: str  # hub | ingest:<node> | worker:<node> | delivery | build | <service>-agent | attested:<node> | aggregator
    target: str  # project | bucket:<name> | topic:<name> | subscription:<trigger> | service:<fn> | key:... | subnet:... | ...
    role: str
    prefix: str | None = None  # object-name prefix of an IAM condition
    condition: str | None = None  # the expression of a (non-prefix) IAM condition


# What var.confidential_workers adds, and all it adds (confidential.tf).
CONFIDENTIAL_WORKER_ROLES = ("roles/confidentialcomputing.workloadUser", "roles/logging.logWriter", "roles/batch.agentReporter")
HUB_CONFIDENTIAL = {
    *{("service-account:worker:" + n, "roles/iam.serviceAccountUser") for n in NODES},
    ("project", "roles/compute.instanceAdmin.v1"),
    *{("subnet:workers:" + n, "roles/compute.networkUser") for n in NODES},
    ("project", "roles/batch.jobsEditor"),
}


def _confidential_additions() -> set[tuple[str, str, str]]:
    """(principal, target, role) of every grant that exists only with confidential_workers."""
    return {("hub", t, r) for t, r in HUB_CONFIDENTIAL} | {
        (f"worker:{n}", "project", role) for n in NODES for role in CONFIDENTIAL_WORKER_ROLES
    }


# What the accelerator backends add (accelerators.tf, and confidential.tf's shared grants), by value.
HUB_ACTS_AS_WORKERS = {("hub", f"service-account:worker:{n}", "roles/iam.serviceAccountUser") for n in NODES}
BATCH_WORKER_ROLES = ("roles/logging.logWriter", "roles/batch.agentReporter")
ACCELERATOR_ADDITIONS = {
    "gke_enabled": {
        ("gke-nodes", "project", "roles/container.defaultNodeServiceAccount"),
        ("gke-nodes", "repository:images", "roles/artifactregistry.reader"),
        # Workload Identity: the node's Kubernetes service account acts as the node's worker identity, and only that one.
        *{(f"ksa:{n}", f"service-account:worker:{n}", "roles/iam.workloadIdentityUser") for n in NODES},
        ("hub", "project", "roles/container.developer"),
    },
    "vertex_enabled": {("hub", "project", "roles/aiplatform.user"), *HUB_ACTS_AS_WORKERS},
    "batch_enabled": {
        ("hub", "project", "roles/batch.jobsEditor"),
        *HUB_ACTS_AS_WORKERS,
        *{("hub", f"subnet:workers:{n}", "roles/compute.networkUser") for n in NODES},
        *{(f"worker:{n}", "project", role) for n in NODES for role in BATCH_WORKER_ROLES},
    },
}


# What var.attested_aggregation adds (aggregator.tf), and all it adds: the aggregator's own identity, and
# nothing for anyone else. (principal, target, role, object-name prefix.)
AGGREGATOR_GRANTS = {
    # Every node's updates, read only; global models and server state (federations/<fid>/global/...), read and created.
    ("aggregator", f"bucket:{RENDER['hub_bucket']}", "roles/storage.objectViewer", "updates/"),
    ("aggregator", f"bucket:{RENDER['hub_bucket']}", "roles/storage.objectViewer", "federations/"),
    ("aggregator", f"bucket:{RENDER['hub_bucket']}", "roles/storage.objectCreator", "federations/"),
    # The hub's KEK (global models and server state are sealed under it); no node's.
    ("aggregator", "key:kek:hub", "roles/cloudkms.cryptoKeyEncrypterDecrypter", None),
    # Project-level only; neither reads data.
    ("aggregator", "project", "roles/confidentialcomputing.workloadUser", None),
    ("aggregator", "project", "roles/logging.logWriter", None),
    # Its image, from fedpipe's image repository (code, no data).
    ("aggregator", "repository:images", "roles/artifactregistry.reader", None),
}


def _switch_additions(deployment: Deployment) -> set[tuple[str, str, str]]:
    """(principal, target, role) of every grant the deployment's confidential, accelerator and aggregation switches add."""
    added = _confidential_additions() if deployment.confidential_workers else set()
    for switch, grants_ in ACCELERATOR_ADDITIONS.items():
        if deployment.flag(switch):
            added |= grants_
    if deployment.attested_aggregation:
        added |= {(p, t, r) for p, t, r, _ in AGGREGATOR_GRANTS}
    return added


def _signers(deployment: Deployment) -> set[tuple[str, str, str]]:
    """(principal, key, role) of the update-signing grants: each node's worker service account, or, with
    confidential workers, each node's attested pool (a node without a key-release policy: nobody)."""
    if deployment.confidential_workers:
        return {(f"attested:{n}", f"key:signing:{n}", "roles/cloudkms.signer") for n in deployment.key_release}
    return {(f"worker:{n}", f"key:signing:{n}", "roles/cloudkms.signer") for n in NODES}


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


def _instances(for_each: str | None, tf: dict, deployment: Deployment = BASE) -> list[tuple[str, object]]:
    """(each.key, each.value) of a for_each expression this deployment can meet."""
    locals_ = tf["locals"]
    triggers = {t["name"]: t for t in RENDER["triggers"]}
    if for_each is None:
        return [("", None)]
    if for_each == "${var.nodes}":
        return [(n, n) for n in NODES]
    # main.tf's and attestation.tf's update-signing grants: the worker's without confidential workers, the pool's with.
    if for_each == "${var.confidential_workers ? {} : var.nodes}":
        return [] if deployment.confidential_workers else [(n, n) for n in NODES]
    if for_each == "${var.confidential_workers ? var.key_release : {}}":
        return list(deployment.key_release.items()) if deployment.confidential_workers else []
    # aggregator.tf: the aggregator's objects in the hub bucket, each pinned to a prefix.
    if for_each == "${local.aggregator_bucket_roles}":
        text = locals_["aggregator_bucket_roles"]
        m = re.fullmatch(r"\$\{var\.attested_aggregation \? \{(.*)\} : \{\}\}", text)
        assert m, text
        entries = re.findall(r'"([\w-]+)" = \{role = "([^"]+)", prefix = "([^"]+)"\}', m.group(1))
        assert len(entries) == m.group(1).count("role ="), text
        return [(key, {"role": role, "prefix": prefix}) for key, role, prefix in entries] if deployment.attested_aggregation else []
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
    if for_each == "${local.kms_regions}":  # the data key of each region: the nodes' and the hub's
        assert locals_["kms_regions"] == "${toset(concat(values(local.node_region), [var.region]))}"
        return [(r, r) for r in sorted({*_node_region(tf).values(), RENDER["region"]})]
    if for_each == "${google_artifact_registry_repository.functions}":
        return [("region", {"name": "region"})]  # where does not matter for who
    # confidential.tf: nothing unless var.confidential_workers
    if for_each == "${local.confidential_nodes}":
        assert locals_["confidential_nodes"] == "${var.confidential_workers ? var.nodes : {}}"
        return [(n, n) for n in NODES] if deployment.confidential_workers else []
    # `<switches> ? toset([...]) : toset([])` and `<switches> ? var.nodes : {}`, switches `var.a || var.b ...`
    if m := re.fullmatch(r'\$\{(var\.\w+(?: \|\| var\.\w+)*) \? toset\(\[("[\w./-]+"(?:, "[\w./-]+")*)\]\) : toset\(\[\]\)\}', for_each):
        keys = re.findall(r'"([\w./-]+)"', m.group(2))
        return [(k, k) for k in keys] if _switches_on(m.group(1), deployment) else []
    if m := re.fullmatch(r"\$\{(var\.\w+(?: \|\| var\.\w+)*) \? var\.nodes : \{\}\}", for_each):
        return [(n, n) for n in NODES] if _switches_on(m.group(1), deployment) else []
    if for_each == "${local.gke_nodes}":
        assert locals_["gke_nodes"] == "${var.gke_enabled ? var.nodes : {}}"
        return [(n, n) for n in NODES] if deployment.gke_enabled else []
    if for_each == "${local.confidential_worker_grants}":
        # The workers' project roles on VMs: confidential ones' (attestation, logs, Batch agent), or plain Batch's.
        assert locals_["confidential_worker_grants"] == (
            '${merge([for node, _ in local.vm_worker_nodes : {for role in local.vm_worker_roles : '
            '"${node} ${role}" => {node = node, role = role}}] ...)}'
        )
        assert locals_["vm_worker_nodes"] == "${var.confidential_workers || var.batch_enabled ? var.nodes : {}}"
        assert locals_["vm_worker_roles"] == "${var.confidential_workers ? local.confidential_worker_roles : local.batch_worker_roles}"
        assert tuple(locals_["batch_worker_roles"]) == BATCH_WORKER_ROLES
        nodes = [n for n, _ in _instances("${var.confidential_workers || var.batch_enabled ? var.nodes : {}}", tf, deployment)]
        roles = locals_["confidential_worker_roles"] if deployment.confidential_workers else locals_["batch_worker_roles"]
        return [(f"{n} {role}", {"node": n, "role": role}) for n in nodes for role in roles]
    # attestation.tf: one pool per node of var.key_release
    if for_each == "${var.key_release}":
        return list(deployment.key_release.items())
    if for_each.startswith("${merge(google_cloud_run_v2_job.worker,"):
        return [(n, {"name": n}) for n in NODES]
    raise AssertionError(f"unknown for_each {for_each!r}: teach _instances what it expands to")


def _switches_on(expr: str, deployment: Deployment) -> bool:
    """`var.a || var.b ...` for this deployment."""
    return any(deployment.flag(name) for name in re.findall(r"var\.(\w+)", expr))


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
        "serviceAccount:${google_service_account.gke_nodes[0].email}": "gke-nodes",
        "serviceAccount:${google_service_account.aggregator[0].email}": "aggregator",
    }
    if member in fixed:
        return fixed[member]
    # A node's Kubernetes service account (accelerators.tf, Workload Identity).
    ksa = re.fullmatch(r'\$\{local\.gke_ksa_member\["([\w-]+)"\]\}', member)
    if ksa:
        return f"ksa:{ksa.group(1)}"
    # Every identity a node's attested pool admits (attestation.tf): the pool's whole principal set.
    pool = re.fullmatch(r'principalSet://iam\.googleapis\.com/\$\{google_iam_workload_identity_pool\.attested\["([\w-]+)"\]\.name\}/\*', member)
    if pool:
        return f"attested:{pool.group(1)}"
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


def _node_region(tf: dict) -> dict[str, str]:
    """local.node_region for this deployment."""
    assert tf["locals"]["node_region"] == "${{for node, _ in var.nodes : node => var.node_regions[node]}}"
    return {n: NODE_REGIONS[n] for n in NODES}


def _key(expr: str, tf: dict) -> str:
    """key:signing:<node> | key:data:<region> | key:kek:<node or hub>."""
    m = re.fullmatch(r'\$\{google_kms_crypto_key\.(signing|data|kek)\["([\w-]+)"\]\.id\}', expr)
    if m:
        return f"key:{m.group(1)}:{m.group(2)}"
    m = re.fullmatch(r'\$\{local\.key_release_data_key\["([\w-]+)"\]\}', expr)
    assert m, f"unknown key {expr!r}"
    # attestation.tf: what a node's attested workers may use is the node's own KEK.
    assert tf["locals"]["key_release_data_key"] == "${{for node, _ in var.key_release : node => google_kms_crypto_key.kek[node].id}}"
    return f"key:kek:{m.group(1)}"


def _target(rtype: str, body: dict, tf: dict) -> str:
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
        return _key(body["crypto_key_id"], tf)
    if rtype == "google_service_account_iam_member":
        m = re.fullmatch(r'\$\{google_service_account\.(\w+)(?:\["([\w-]+)"\])?\.name\}', body["service_account_id"])
        assert m, body["service_account_id"]
        return f"service-account:{m.group(1)}" + (f":{m.group(2)}" if m.group(2) else "")
    if rtype == "google_compute_subnetwork_iam_member":
        m = re.fullmatch(r'\$\{google_compute_subnetwork\.workers\["([\w-]+)"\]\.name\}', body["subnetwork"])
        assert m, body["subnetwork"]
        assert body["region"] == f'${{google_compute_subnetwork.workers["{m.group(1)}"].region}}', body
        return f"subnet:workers:{m.group(1)}"
    if rtype == "google_artifact_registry_repository_iam_member":
        if body["repository"] == "${google_artifact_registry_repository.images.name}":
            return "repository:images"
        assert body["repository"] == '"region"', body  # for_each over the functions' repositories (_instances)
        return "repository:functions"
    if rtype == "google_cloud_run_v2_job_iam_member":
        return f"job:worker:{body['name'].strip(chr(34))}"
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


def grants(tf: dict, deployment: Deployment = BASE) -> list[Grant]:
    found = []
    for (rtype, name), body in tf["resources"].items():
        # Authoritative bindings and policies would replace grants made elsewhere; none is expected.
        assert not rtype.endswith(("_iam_binding", "_iam_policy")), (rtype, name)
        if not rtype.endswith("_iam_member"):
            continue
        condition = None
        if "condition" in body:
            (block,) = body["condition"]
            condition = block["expression"]
            if "each.value.prefix" in condition:
                # The aggregator's per-prefix bucket condition: read as the prefix itself, below.
                assert (rtype, name) == ("google_storage_bucket_iam_member", "aggregator"), (rtype, name)
                assert condition == 'resource.name.startsWith(\\"projects/_/buckets/${google_storage_bucket.hub.name}/objects/${each.value.prefix}\\")'
                condition = None
        for dynamic in body.get("dynamic", []):  # only the workers' per-prefix bucket condition, handled below
            assert set(dynamic) == {"condition"} and (rtype, name) == ("google_storage_bucket_iam_member", "worker"), (rtype, name)
        for key, value in _instances(body.get("for_each"), tf, deployment):
            resolved = _resolve_each(body, key, value)
            role = resolved["role"]
            prefix = None
            if isinstance(value, dict) and value.get("prefix") not in (None, "null"):
                prefix_expr = value["prefix"]
                if (rtype, name) == ("google_storage_bucket_iam_member", "aggregator"):
                    prefix = prefix_expr  # a literal of local.aggregator_bucket_roles
                else:
                    assert prefix_expr == "local.worker_hub_update_prefix[node]", prefix_expr
                    template = re.fullmatch(r'\$\{\{for node, _ in var\.nodes : node => "([^"]*)"\}\}', tf["locals"]["worker_hub_update_prefix"])
                    prefix = template.group(1).replace("${node}", value["node"])
            if role.startswith("${each.value.role}"):
                role = value["role"]
            grant = Grant(_principal(resolved["member"]), _target(rtype, resolved, tf), role.strip('"'), prefix, condition)
            found.append(grant)
    return found


# ---------------------------------------------------------------- the rules


@each_deployment
def test_expansion_sees_every_identity(tf, deployment):
    principals = {g.principal for g in grants(tf, deployment)}
    for node in NODES:
        assert {f"ingest:{node}", f"worker:{node}"} <= principals
    assert {"hub", "delivery", "build", "pubsub-agent", "gcs-agent"} <= principals
    assert {p for p in principals if p.startswith("attested:")} == {f"attested:{n}" for n in deployment.key_release}
    assert ("aggregator" in principals) == deployment.attested_aggregation


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


@each_deployment
def test_ingest_identity_touches_only_its_own_nodes_buckets(tf, deployment):
    for node in NODES:
        own = {f"bucket:{b}" for b in RENDER["nodes"][node].values()}
        mine = [g for g in grants(tf, deployment) if g.principal == f"ingest:{node}"]
        buckets = {g.target: g.role for g in mine if g.target.startswith("bucket:")}
        assert buckets == {
            f"bucket:{RENDER['nodes'][node]['raw_bucket']}": "roles/storage.objectViewer",
            f"bucket:{RENDER['nodes'][node]['processed_bucket']}": "roles/storage.objectUser",
            f"bucket:{RENDER['nodes'][node]['quarantine_bucket']}": "roles/storage.objectUser",
        }
        assert set(buckets) == own
        others = {g.target for g in mine} - own
        assert others == {"project", f"topic:{RENDER['topics']['shard_ready']}", f"key:kek:{node}"}
        assert {g.role for g in mine if g.target == "project"} == {"roles/datastore.user"}
        assert {g.role for g in mine if g.target.startswith("topic:")} == {"roles/pubsub.publisher"}
        # It seals its shards under its own node's KEK, and may not open them.
        assert {(g.target, g.role) for g in mine if g.target.startswith("key:")} == {(f"key:kek:{node}", "roles/cloudkms.cryptoKeyEncrypter")}


@each_deployment
def test_hub_identity_has_no_node_bucket(tf, deployment):
    node_buckets = {f"bucket:{b}" for n in RENDER["nodes"].values() for b in n.values()}
    hub = [g for g in grants(tf, deployment) if g.principal == "hub"]
    assert not {g.target for g in hub} & node_buckets
    assert {(g.target, g.role) for g in hub} == {
        (f"bucket:{RENDER['hub_bucket']}", "roles/storage.objectUser"),
        ("project", "roles/datastore.user"),
        *{(f"job:worker:{n}", "roles/run.jobsExecutorWithOverrides") for n in NODES},
        # Opens node updates; seals and opens global models and server state under its own KEK.
        *{(f"key:kek:{n}", "roles/cloudkms.cryptoKeyDecrypter") for n in NODES},
        ("key:kek:hub", "roles/cloudkms.cryptoKeyEncrypterDecrypter"),
        # Launching elsewhere: confidential VMs and Batch, GKE, Vertex AI (the switches', by value above).
        *{(t, r) for p, t, r in _switch_additions(deployment) if p == "hub"},
    }


@each_deployment
def test_workers_get_their_shards_their_update_prefix_and_the_node_api_only(tf, deployment):
    for node in NODES:
        mine = {(g.target, g.role, g.prefix) for g in grants(tf, deployment) if g.principal == f"worker:{node}"}
        processed = f"bucket:{RENDER['nodes'][node]['processed_bucket']}"
        assert mine == {
            (processed, "roles/storage.objectViewer", None),
            (processed, "roles/storage.objectCreator", None),
            (f"bucket:{RENDER['hub_bucket']}", "roles/storage.objectCreator", f"updates/{node}/"),
            ("service:node-api", "roles/run.invoker", None),
            # Its node's update-signing key, as the service account, only without confidential workers (below).
            *{(k, r, None) for p, k, r in _signers(deployment) if p == f"worker:{node}"},
            # On a confidential VM: attestation tokens, logs, the Batch agent (project-level only); on plain Batch VMs the last two.
            *{("project", role, None) for role in CONFIDENTIAL_WORKER_ROLES if deployment.confidential_workers},
            *{("project", role, None) for role in BATCH_WORKER_ROLES if deployment.batch_enabled},
        }
        # The prefix admits its own updates and no other node's, a node sharing its first letters included.
        prefix = f"updates/{node}/"
        assert update_object("f", 1, node, 1, False).startswith(prefix)
        assert not update_object("f", 1, f"{node}-east", 1, False).startswith(prefix)
    worker = tf["resources"][("google_storage_bucket_iam_member", "worker")]
    (condition,) = worker["dynamic"][0]["condition"]["content"]
    assert condition["expression"] == 'resource.name.startsWith(\\"projects/_/buckets/${each.value.bucket}/objects/${condition.value}\\")'


@each_deployment
def test_no_project_level_pubsub_token_creator_or_builder_grant(tf, deployment):
    project = {(g.principal, g.role) for g in grants(tf, deployment) if g.target == "project"}
    for principal, role in project:
        if principal.endswith("-agent"):
            continue  # Google's service agents, below
        assert not role.startswith(("roles/pubsub.", "roles/cloudbuild.")), (principal, role)
        assert role != "roles/iam.serviceAccountTokenCreator"
        assert role != "roles/iam.serviceAccountUser", "actAs on the project would let its holder act as every service account"
    confidential = deployment.confidential_workers
    assert project == {
        ("hub", "roles/datastore.user"),
        *{(f"ingest:{n}", "roles/datastore.user") for n in NODES},
        ("delivery", "roles/eventarc.eventReceiver"),
        ("build", "roles/logging.logWriter"),
        ("eventarc-agent", "roles/eventarc.serviceAgent"),
        # Eventarc's Cloud Storage triggers require it (the topic is Eventarc's, created with the trigger).
        ("gcs-agent", "roles/pubsub.publisher"),
        # confidential.tf and accelerators.tf: roles that exist at project level only (README, "Confidential workers",
        # "Accelerator backends").
        *{(p, r) for p, t, r in _switch_additions(deployment) if t == "project"},
    }
    workers_on_project = {(g.principal, g.role) for g in grants(tf, deployment) if g.principal.startswith("worker:") and g.target == "project"}
    expected_worker_roles = (CONFIDENTIAL_WORKER_ROLES if confidential else ()) + (BATCH_WORKER_ROLES if deployment.batch_enabled else ())
    assert workers_on_project == {(f"worker:{n}", r) for n in NODES for r in expected_worker_roles}
    assert not [name for (rtype, name) in tf["resources"] if rtype == "google_project_iam_custom_role"]


@each_deployment
def test_token_creator_only_on_the_delivery_identity_and_delivery_invokes_only_event_functions(tf, deployment):
    tokens = [g for g in grants(tf, deployment) if g.role == "roles/iam.serviceAccountTokenCreator"]
    assert tokens == [Grant("pubsub-agent", "service-account:delivery", "roles/iam.serviceAccountTokenCreator")]
    invokers = {(g.principal, g.target) for g in grants(tf, deployment) if g.role == "roles/run.invoker"}
    assert invokers == {
        *{("delivery", f"service:{t['name']}") for t in RENDER["triggers"]},
        *{(f"worker:{n}", "service:node-api") for n in NODES},
    }


@each_deployment
def test_pubsub_grants_are_per_topic_or_subscription_except_the_storage_agents(tf, deployment):
    pubsub = {(g.principal, g.target, g.role) for g in grants(tf, deployment) if g.role.startswith("roles/pubsub.")}
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


# ---------------------------------------------------------------- confidential workers (confidential.tf)


def test_confidential_grants_exist_only_with_the_flag_and_are_exactly_these(tf):
    # (With the accelerator switches off: some of these grants are theirs too, below.)
    for key_release in ({}, KEY_RELEASE):
        off = grants(tf, Deployment(confidential_workers=False, key_release=key_release))
        on = grants(tf, Deployment(confidential_workers=True, key_release=key_release))
        # The flag adds what confidential VMs need, and moves each node's signer from its worker service
        # account to its attested pool (to nobody, for a node without a key-release policy).
        removed = {(g.principal, g.target, g.role) for g in set(off) - set(on)}
        assert removed == {(f"worker:{n}", f"key:signing:{n}", "roles/cloudkms.signer") for n in NODES}
        added = {(g.principal, g.target, g.role) for g in set(on) - set(off)}
        assert added == _confidential_additions() | {(f"attested:{n}", f"key:signing:{n}", "roles/cloudkms.signer") for n in key_release}
        # Off (the default), none of them: not even under another target or condition.
        assert not {(g.principal, g.target, g.role) for g in off} & _confidential_additions()
        assert not {g.role for g in off} & ({r for _, _, r in _confidential_additions()} - {"roles/logging.logWriter"})
    assert re.search(r'variable "confidential_workers" \{[^}]*default\s*=\s*false', (INFRA / "confidential.tf").read_text())


def test_hub_acts_only_as_the_worker_identities(tf):
    on = grants(tf, EVERYTHING)
    act_as = {(g.principal, g.target) for g in on if g.role == "roles/iam.serviceAccountUser"}
    assert act_as == {("hub", f"service-account:worker:{n}") for n in NODES}, "never on the project, the hub's own or another identity"
    assert all(g.condition is None and g.prefix is None for g in on if g.role == "roles/iam.serviceAccountUser")
    # Each worker subnet, never the network or the project.
    subnets = {(g.principal, g.target, g.role) for g in on if g.target.startswith("subnet:")}
    assert subnets == {("hub", f"subnet:workers:{n}", "roles/compute.networkUser") for n in NODES}
    assert not [g for g in on if g.role == "roles/compute.networkUser" and not g.target.startswith("subnet:")]


def test_hub_creates_only_the_launchers_vms_and_their_disks(tf):
    from shared.launchers.confidential_space import DEFAULT_NAME_PREFIX, resource_name

    on = grants(tf, Deployment(confidential_workers=True))
    (vms,) = [g for g in on if g.role == "roles/compute.instanceAdmin.v1"]
    assert (vms.principal, vms.target) == ("hub", "project")
    assert vms.condition, "a project-level compute grant must carry the name condition"
    clauses = vms.condition.split(" || ")
    assert clauses == [
        f'(resource.type == \\"compute.googleapis.com/{kind}\\" && '
        f'resource.name.extract(\\"/{collection}/{{name}}\\").startsWith(\\"${{local.confidential_vm_prefix}}\\"))'
        for kind, collection in (("Instance", "instances"), ("Disk", "disks"))
    ], vms.condition
    # The prefix, for the default name_prefix, is the launcher's, and what it names lies under it.
    prefix = tf["locals"]["confidential_vm_prefix"]
    assert prefix == "${var.name_prefix}-cs-"
    rendered = prefix.replace("${var.name_prefix}", "fedpipe")
    assert rendered == DEFAULT_NAME_PREFIX + "-"
    assert resource_name(DEFAULT_NAME_PREFIX, "job-1", 1).startswith(rendered)
    assert not resource_name("fedpipe-cb", "job-1", 1).startswith(rendered)  # Batch's jobs are not VMs the hub may touch
    # Batch jobs: batch.jobsEditor, the one project-level hub grant without a condition of the confidential set.
    (batch,) = [g for g in on if g.role == "roles/batch.jobsEditor"]
    assert (batch.principal, batch.target, batch.condition) == ("hub", "project", None)


# ---------------------------------------------------------------- key release (attestation.tf)
# That each provider's attribute_condition is var.key_release[node].attribute_condition, byte for byte
# shared.key_release's rendering of the node's policy, is tests/unit/test_key_release.py's
# (test_terraform_gets_byte_for_byte_what_the_broker_evaluates); here: who may decrypt with what.


KMS_USE_ROLES = {"roles/cloudkms.cryptoKeyEncrypter", "roles/cloudkms.cryptoKeyDecrypter", "roles/cloudkms.cryptoKeyEncrypterDecrypter"}


def _kek_grants(deployment: Deployment) -> set[tuple[str, str, str]]:
    """(principal, key, role) of every grant on a KEK (main.tf, attestation.tf), by value."""
    return {
        # Each node's ingest seals its shards under its own node's KEK: encrypt only.
        *{(f"ingest:{n}", f"key:kek:{n}", "roles/cloudkms.cryptoKeyEncrypter") for n in NODES},
        # The hub opens every node's updates, and seals and opens its own models and state.
        *{("hub", f"key:kek:{n}", "roles/cloudkms.cryptoKeyDecrypter") for n in NODES},
        ("hub", "key:kek:hub", "roles/cloudkms.cryptoKeyEncrypterDecrypter"),
        # A node's attested workers open its shards and seal its updates: through its pool only.
        *{(f"attested:{n}", f"key:kek:{n}", "roles/cloudkms.cryptoKeyEncrypterDecrypter") for n in deployment.key_release},
        # The attested aggregator opens the previous global model and seals the new one: the hub's KEK, no node's.
        *({("aggregator", "key:kek:hub", "roles/cloudkms.cryptoKeyEncrypterDecrypter")} if deployment.attested_aggregation else set()),
    }


@each_deployment
def test_kek_grants_are_exactly_these_at_key_level(tf, deployment):
    found = grants(tf, deployment)
    on_keks = [g for g in found if g.target.startswith("key:kek:")]
    assert {(g.principal, g.target, g.role) for g in on_keks} == _kek_grants(deployment)
    assert all(g.condition is None and g.prefix is None for g in on_keks)
    # Nobody else on any KEK: no worker service account, no delivery or build identity, no Google agent.
    assert not {g.principal for g in on_keks} & {*(f"worker:{n}" for n in NODES), "delivery", "build", "gcs-agent", "pubsub-agent"}
    # KMS use roles only ever on a key, never on the project (or anything broader).
    assert {g.target.split(":")[0] for g in found if g.role in KMS_USE_ROLES} == {"key"}
    assert not [g for g in found if g.role.startswith("roles/cloudkms.") and g.target == "project"]
    # The keys exist for exactly the nodes and the hub (shared.envelope.HUB), each node's in its own region.
    from shared.envelope import HUB

    assert HUB == "hub"
    assert tf["locals"]["kek_region"] == "${merge({for node, _ in var.nodes : node => local.node_region[node]}, {hub = var.region})}"


@each_deployment
def test_each_nodes_kek_is_released_only_to_its_own_attested_pool(tf, deployment):
    found = grants(tf, deployment)
    attested = [g for g in found if g.principal.startswith("attested:")]
    # A pool gets encrypt/decrypt on its own node's KEK, with confidential workers its own node's signing key,
    # and nothing else.
    assert {(g.principal, g.target, g.role, g.condition) for g in attested} == {
        *{(f"attested:{n}", f"key:kek:{n}", "roles/cloudkms.cryptoKeyEncrypterDecrypter", None) for n in deployment.key_release},
        *{(p, k, r, None) for p, k, r in _signers(deployment) if p.startswith("attested:")},
    }
    for node in NODES:
        # Who may decrypt with a node's KEK: the hub (its updates) and its own pool (if released).
        holders = {g.principal for g in found if g.target == f"key:kek:{node}" and g.role in KMS_USE_ROLES - {"roles/cloudkms.cryptoKeyEncrypter"}}
        assert holders == {"hub", *({f"attested:{node}"} if node in deployment.key_release else set())}
    # The data keys (CMEK) stay Google's agents' alone.
    data_keys = {(g.principal, g.role) for g in found if g.target.startswith("key:data:")}
    assert data_keys == {("gcs-agent", "roles/cloudkms.cryptoKeyEncrypterDecrypter"), ("pubsub-agent", "roles/cloudkms.cryptoKeyEncrypterDecrypter")}
    assert len(set(NODE_REGIONS.values())) == len(NODES), "this deployment gives each node a region of its own"


def test_each_pool_trusts_only_its_nodes_provider(tf):
    resources = tf["resources"]
    pool = resources[("google_iam_workload_identity_pool", "attested")]
    provider = resources[("google_iam_workload_identity_pool_provider", "attested")]
    decrypter = resources[("google_kms_crypto_key_iam_member", "attested_uses_kek")]
    # One pool, one provider and one grant per node of var.key_release, tied together by each.key.
    assert pool["for_each"] == provider["for_each"] == decrypter["for_each"] == "${var.key_release}"
    assert pool["workload_identity_pool_id"] == "${var.name_prefix}-${each.key}-attested"
    assert provider["workload_identity_pool_id"] == "${google_iam_workload_identity_pool.attested[each.key].workload_identity_pool_id}"
    assert decrypter["member"] == "principalSet://iam.googleapis.com/${google_iam_workload_identity_pool.attested[each.key].name}/*"
    assert provider["oidc"][0]["issuer_uri"] == "https://confidentialcomputing.googleapis.com/"
    assert [k for k in resources if k[0].startswith("google_iam_workload_identity_pool")] == [
        ("google_iam_workload_identity_pool", "attested"), ("google_iam_workload_identity_pool_provider", "attested"),
    ]
    # Pool ids differ per node (a pool id is at most 32 characters: the variable's validation keeps node names short).
    ids = {pool["workload_identity_pool_id"].replace("${var.name_prefix}", "fedpipe").replace("${each.key}", n) for n in KEY_RELEASE}
    assert len(ids) == len(KEY_RELEASE) and all(len(i) <= 32 for i in ids)


@each_deployment
def test_update_signing_keys_are_released_only_on_attestation_with_confidential_workers(tf, deployment):
    """workers/trainer/signing_key.py: in Confidential Space a worker signs with its node's pool's STS credentials."""
    found = grants(tf, deployment)
    signers = {(g.principal, g.target, g.role) for g in found if g.target.startswith("key:signing:")}
    assert signers == _signers(deployment)
    assert all(g.condition is None and g.prefix is None for g in found if g.target.startswith("key:signing:"))
    # Each signing key has one signer at most, its own node's (worker or pool), and nobody may do more than sign.
    for node in NODES:
        holders = {p for p, k, _ in signers if k == f"key:signing:{node}"}
        assert holders <= {f"worker:{node}", f"attested:{node}"} and len(holders) <= 1, (node, holders)
    assert {g.role for g in found if g.target.startswith("key:signing:")} <= {"roles/cloudkms.signer"}
    if deployment.confidential_workers:
        # Not the worker service account, which Cloud Run jobs, GKE pods, Vertex AI and Batch jobs also run as.
        assert not [g for g in found if g.principal.startswith("worker:") and g.target.startswith("key:signing:")]
    # The pool whose principal set signs is the one whose provider the worker exchanges its token at
    # (FEDPIPE_KEY_RELEASE_PROVIDER, main.tf local.worker_env), the same pool that holds the node's KEK.
    attested = tf["resources"][("google_kms_crypto_key_iam_member", "attested_signs_updates")]
    kek = tf["resources"][("google_kms_crypto_key_iam_member", "attested_uses_kek")]
    assert attested["member"] == kek["member"]
    assert attested["crypto_key_id"] == "${google_kms_crypto_key.signing[each.key].id}"
    worker = tf["resources"][("google_kms_crypto_key_iam_member", "worker_signs_updates")]
    assert worker["crypto_key_id"] == attested["crypto_key_id"] and worker["role"] == attested["role"] == "roles/cloudkms.signer"


# ---------------------------------------------------------------- attested aggregation (aggregator.tf)


def test_the_aggregator_identity_gets_exactly_its_grants_and_only_with_the_flag(tf):
    for others in (Deployment(confidential_workers=True, key_release=KEY_RELEASE), EVERYTHING):
        on = grants(tf, Deployment(**{**others.__dict__, "attested_aggregation": True}))
        off = grants(tf, Deployment(**{**others.__dict__, "attested_aggregation": False}))
        assert set(off) <= set(on), "the flag only adds grants"
        added = {(g.principal, g.target, g.role, g.prefix) for g in set(on) - set(off)}
        assert added == AGGREGATOR_GRANTS
        assert all(g.condition is None for g in set(on) - set(off))
    assert not [g for g in grants(tf, BASE) if g.principal == "aggregator"]


def test_the_aggregator_reads_updates_and_writes_only_global_models(tf):
    from shared.federation import global_model_object, server_state_object

    on = grants(tf, EVERYTHING)
    hub_bucket = f"bucket:{RENDER['hub_bucket']}"
    mine = [g for g in on if g.principal == "aggregator" and g.target.startswith("bucket:")]
    assert {g.target for g in mine} == {hub_bucket}, "no node bucket, no other bucket"
    creates = {g.prefix for g in mine if g.role == "roles/storage.objectCreator"}
    reads = {g.prefix for g in mine if g.role == "roles/storage.objectViewer"}
    assert (creates, reads) == ({"federations/"}, {"updates/", "federations/"})
    assert not [g for g in mine if g.prefix is None], "every bucket grant is pinned to a prefix"
    assert not [g for g in mine if g.role not in ("roles/storage.objectViewer", "roles/storage.objectCreator")], "nothing that overwrites or deletes"
    # The prefixes are shared.federation's: what the aggregator writes lies under its create prefix, every
    # node's update under its read prefix, and a federation request (requests/<fid>.json) under neither.
    for name in (global_model_object("f-1", 3), server_state_object("f-1", 3)):
        assert name.startswith("federations/") and "/global/" in name
    assert update_object("f-1", 3, "us", 1, False).startswith("updates/")
    assert not any("requests/f-1.json".startswith(p) for p in reads | creates)
    # The updates it reads carry their nodes' names: it may read them all (it aggregates them), and write none.
    assert not any(update_object("f-1", 3, "us", 1, False).startswith(p) for p in creates)


# ---------------------------------------------------------------- accelerator backends (accelerators.tf)


@pytest.mark.parametrize("switch", list(ACCELERATOR_ADDITIONS))
def test_each_accelerator_switch_adds_exactly_its_grants(tf, switch):
    for others in (BASE, Deployment(confidential_workers=True, key_release=KEY_RELEASE)):
        off = grants(tf, others)
        on = grants(tf, Deployment(**{**others.__dict__, switch: True}))
        assert set(off) <= set(on), "a switch only adds grants"
        added = {(g.principal, g.target, g.role) for g in set(on) - set(off)}
        # What confidential_workers already holds is not granted a second time.
        assert added == ACCELERATOR_ADDITIONS[switch] - {(g.principal, g.target, g.role) for g in off}
    # With everything off, none of it.
    assert not {(g.principal, g.target, g.role) for g in grants(tf, BASE)} & ACCELERATOR_ADDITIONS[switch]


@each_deployment
def test_one_binding_one_resource(tf, deployment):
    """No two resources grant the same binding: destroying one would take it from the other (iam_member is not authoritative)."""
    found = grants(tf, deployment)
    seen: dict[Grant, int] = {}
    for g in found:
        seen[g] = seen.get(g, 0) + 1
    assert [g for g, n in seen.items() if n > 1] == []


def test_workload_identity_binds_each_nodes_ksa_to_its_own_worker_only(tf):
    locals_ = tf["locals"]
    assert locals_["gke_ksa"] == '${{for node, _ in var.nodes : node => "worker-${node}"}}'
    assert locals_["workload_pool"] == "${var.project}.svc.id.goog"
    assert locals_["gke_ksa_member"] == (
        '${{for node, ksa in local.gke_ksa : node => "serviceAccount:${local.workload_pool}[${var.gke_namespace}/${ksa}]"}}'
    )
    binding = tf["resources"][("google_service_account_iam_member", "worker_ksa")]
    assert (binding["service_account_id"], binding["member"]) == ("${google_service_account.worker[each.key].name}", "${local.gke_ksa_member[each.key]}")
    # By value, for this deployment: the member GKE's metadata server presents for worker-us's pods.
    member = {n: f"serviceAccount:acme-fl.svc.id.goog[fedpipe/worker-{n}]" for n in NODES}
    assert len(set(member.values())) == len(NODES)
    on = grants(tf, EVERYTHING)
    wi = {(g.principal, g.target) for g in on if g.role == "roles/iam.workloadIdentityUser"}
    assert wi == {(f"ksa:{n}", f"service-account:worker:{n}") for n in NODES}, "each node's KSA acts as its own worker, nothing else"
    # The cluster's pool is the project's, and every pool's machines use GKE's metadata server (no node identity for pods).
    cluster = tf["resources"][("google_container_cluster", "workers")]
    assert cluster["workload_identity_config"] == [{"workload_pool": "${local.workload_pool}", "__is_block__": True}] or cluster[
        "workload_identity_config"
    ] == [{"workload_pool": "${local.workload_pool}"}]
    for pool in ("system", "tpu", "gpu"):
        (node_config,) = tf["resources"][("google_container_node_pool", pool)]["node_config"]
        assert node_config["workload_metadata_config"][0]["mode"] == "GKE_METADATA", pool
        assert node_config["service_account"] == "${google_service_account.gke_nodes[0].email}", pool


def test_gke_nodes_identity_holds_only_logs_metrics_and_image_pulls(tf):
    on = grants(tf, EVERYTHING)
    assert {(g.target, g.role) for g in on if g.principal == "gke-nodes"} == {
        ("project", "roles/container.defaultNodeServiceAccount"),
        ("repository:images", "roles/artifactregistry.reader"),
    }
    # No workload runs as it: it acts as nobody, and nobody acts as it.
    assert not [g for g in on if g.target == "service-account:gke_nodes"]

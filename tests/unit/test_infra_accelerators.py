"""The accelerator backends' infra (accelerators.tf), the VPC Service Controls perimeter (vpc_sc.tf) and the Data Access audit logs, by value.

Who may do what on each backend is test_infra_identities.py's (every grant expanded
for each switch); here: that a plain deploy creates none of it, and what the GKE
clusters, their node pools and the perimeter are when it is switched on.
"""

from __future__ import annotations

import ipaddress
import re

import pytest

from shared.accelerators import GPU_TYPES, TPU_VERSIONS
from tests.unit.infra_hcl import parse_files, resources, resources_and_locals

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tf() -> dict:
    return resources_and_locals()


@pytest.fixture(scope="module")
def variables() -> dict:
    return {name: body for doc in parse_files().values() for item in doc.get("variable", []) for name, body in item.items()}


def _body(tf: dict, rtype: str, name: str) -> dict:
    return tf["resources"][(rtype, name)]


# ---------------------------------------------------------------- off unless asked


def test_a_plain_deploy_creates_no_accelerator_backend_and_no_perimeter(variables):
    for switch in ("gke_enabled", "vertex_enabled", "batch_enabled"):
        assert variables[switch]["default"] is False, switch
    assert variables["vpc_sc_access_policy"]["default"] is None
    docs = parse_files()
    for file_name, switches in (("accelerators.tf", ("gke_enabled", "gke_nodes", "vertex_enabled", "batch_enabled", "accelerator_apis", "gke_tpu.enabled", "gke_gpu.enabled")),
                                ("vpc_sc.tf", ("vpc_sc_enabled",))):
        for (rtype, name), body in resources(docs[file_name]).items():
            gate = body.get("for_each") or body.get("count") or ""
            assert any(s in gate for s in switches), (file_name, rtype, name, gate)
    tf = resources_and_locals()
    assert tf["locals"]["gke_nodes"] == "${var.gke_enabled ? var.nodes : {}}"
    assert tf["locals"]["accelerator_apis"] == (
        '${toset(concat(var.gke_enabled ? ["container.googleapis.com", "binaryauthorization.googleapis.com"] : [], '
        'var.vertex_enabled ? ["aiplatform.googleapis.com"] : [], var.batch_enabled ? ["batch.googleapis.com"] : []))}'
    )
    assert tf["locals"]["vpc_sc_enabled"] == "${var.vpc_sc_access_policy != null}"


# ---------------------------------------------------------------- GKE


def test_each_nodes_cluster_is_private_in_its_region_with_workload_identity(tf):
    cluster = _body(tf, "google_container_cluster", "workers")
    assert cluster["for_each"] == "${local.gke_nodes}"
    assert cluster["location"] == "${local.node_region[each.key]}", "a node's pods run in its own region"
    assert cluster["subnetwork"] == "${google_compute_subnetwork.gke[each.key].id}"
    assert cluster["network"] == "${google_compute_network.workers.id}"
    (private,) = cluster["private_cluster_config"]
    assert (private["enable_private_nodes"], private["enable_private_endpoint"]) == (True, True)
    assert private["master_ipv4_cidr_block"] == "${var.gke_cidrs[each.key].control_plane}"
    # The launcher reaches the control plane by its DNS endpoint: IAM decides, not addresses.
    assert cluster["control_plane_endpoints_config"][0]["dns_endpoint_config"][0]["allow_external_traffic"] is True
    assert cluster["master_authorized_networks_config"][0]["gcp_public_cidrs_access_enabled"] is False
    assert cluster["master_auth"][0]["client_certificate_config"][0]["issue_client_certificate"] is False
    assert cluster["workload_identity_config"][0]["workload_pool"] == "${local.workload_pool}"
    assert tf["locals"]["workload_pool"] == "${var.project}.svc.id.goog"
    assert (cluster["remove_default_node_pool"], cluster["deletion_protection"]) == (True, "${var.deletion_protection}")
    assert cluster["binary_authorization"][0]["evaluation_mode"] == "PROJECT_SINGLETON_POLICY_ENFORCE"
    assert cluster["enable_legacy_abac"] is False and cluster["enable_shielded_nodes"] is True
    subnet = _body(tf, "google_compute_subnetwork", "gke")
    assert subnet["region"] == "${local.node_region[each.key]}" and subnet["private_ip_google_access"] is True
    assert {r["range_name"] for r in subnet["secondary_ip_range"]} == {"pods", "services"}
    assert cluster["ip_allocation_policy"][0] == {"cluster_secondary_range_name": "pods", "services_secondary_range_name": "services"}


def test_accelerator_pools_scale_from_zero_in_the_nodes_zone(tf):
    for pool in ("tpu", "gpu"):
        body = _body(tf, "google_container_node_pool", pool)
        assert body["for_each"] == f"${{var.gke_{pool}.enabled ? local.gke_nodes : {{}}}}"
        assert body["cluster"] == "${google_container_cluster.workers[each.key].id}"
        assert body["node_locations"] == ["${var.gke_zones[each.key]}"]
        assert body["initial_node_count"] == 0
        (autoscaling,) = body["autoscaling"]
        assert (autoscaling["min_node_count"], autoscaling["max_node_count"]) == (0, f"${{var.gke_{pool}.max_nodes}}")
        (node_config,) = body["node_config"]
        assert node_config["labels"] == {"fedpipe/pool": pool}
        assert node_config["shielded_instance_config"][0]["enable_secure_boot"] is True
    # A multi-host TPU slice is one compact placement of the given topology.
    tpu = _body(tf, "google_container_node_pool", "tpu")
    (placement,) = tpu["dynamic"]
    assert placement["placement_policy"]["for_each"] == "${var.gke_tpu.topology == null ? [] : [var.gke_tpu.topology]}"
    assert placement["placement_policy"]["content"] == [{"type": "COMPACT", "tpu_topology": "${placement_policy.value}"}]
    # The GPU is one shared.accelerators names; flex-start takes no reservation.
    gpu = _body(tf, "google_container_node_pool", "gpu")
    (node_config,) = gpu["node_config"]
    (accelerator,) = node_config["guest_accelerator"]
    assert (accelerator["type"], accelerator["count"]) == ("${var.gke_gpu.accelerator}", "${var.gke_gpu.accelerator_count}")
    assert node_config["flex_start"] == "${var.gke_gpu.flex_start}"
    (affinity,) = node_config["dynamic"]
    assert affinity["reservation_affinity"]["for_each"] == '${var.gke_gpu.flex_start ? ["NO_RESERVATION"] : []}'
    # The system pool keeps one small node for kube-dns and the JobSet controller.
    system = _body(tf, "google_container_node_pool", "system")
    assert system["autoscaling"][0]["min_node_count"] == 1


def test_pool_defaults_are_what_the_launchers_can_ask_for(variables):
    gpu_type = re.search(r'accelerator = optional\(string, "([\w-]+)"\)', variables["gke_gpu"]["type"]).group(1)
    assert gpu_type in GPU_TYPES
    # ct5lp-* is TPU v5e (ct6e-*: v6e), 4 chips a host: a single-host pool serves tpu:v5e:2x2.
    tpu_machine = re.search(r'machine_type = optional\(string, "([\w-]+)"\)', variables["gke_tpu"]["type"]).group(1)
    assert tpu_machine == "ct5lp-hightpu-4t" and TPU_VERSIONS["v5e"].chips_per_host == 4


def test_default_ranges_do_not_overlap_and_zones_are_in_their_regions(variables):
    ranges = [ipaddress.ip_network(c) for c in variables["worker_subnet_cidrs"]["default"].values()]
    ranges += [ipaddress.ip_network(c) for c in variables["aggregator_cidrs"]["default"].values()]  # the hub network's
    for node, cidrs in variables["gke_cidrs"]["default"].items():
        ranges += [ipaddress.ip_network(cidrs[k]) for k in ("nodes", "pods", "services", "control_plane")]
        assert ipaddress.ip_network(cidrs["control_plane"]).prefixlen == 28, node
    for i, a in enumerate(ranges):
        for b in ranges[i + 1:]:
            assert not a.overlaps(b), (a, b)
    regions = variables["node_regions"]["default"]
    assert set(variables["gke_zones"]["default"]) == set(regions) == set(variables["gke_cidrs"]["default"])
    for node, zone in variables["gke_zones"]["default"].items():
        assert zone.startswith(regions[node] + "-"), (node, zone)


def test_launchers_get_clusters_namespace_and_identities(tf):
    # What the launchers read, by value, is tests/unit/test_infra_launchers.py's; here the wiring.
    outputs = {name: body for item in parse_files()["accelerators.tf"]["output"] for name, body in item.items()}
    assert outputs["accelerator_launcher_env"]["value"] == "${local.accelerators_enabled ? local.launcher_env : null}"
    env = tf["locals"]["accelerator_launcher_env"]
    for key in ("FEDPIPE_WORKER_SERVICE_ACCOUNTS", "FEDPIPE_WORKER_ENV", "FEDPIPE_GKE_CLUSTERS",
                "FEDPIPE_GKE_NAMESPACE", "FEDPIPE_GKE_SERVICE_ACCOUNT", "FEDPIPE_TPU_BACKEND", "FEDPIPE_GPU_BACKEND"):
        assert key in env, key
    assert env.startswith("${local.accelerators_enabled ? merge(")
    assert tf["locals"]["accelerators_enabled"] == "${var.gke_enabled || var.vertex_enabled || var.batch_enabled}"
    manifests = outputs["gke_manifests"]["value"]
    assert '"iam.gke.io/gcp-service-account" = google_service_account.worker[node].email' in manifests
    assert "name        = local.gke_ksa[node]" in manifests or "name = local.gke_ksa[node]" in manifests


def test_the_deny_all_firewall_leaves_room_for_gkes_own_rules(tf):
    deny = _body(tf, "google_compute_firewall", "workers_deny_ingress")
    assert deny["priority"] == 65534 and deny["source_ranges"] == ["0.0.0.0/0"]


# ---------------------------------------------------------------- VPC Service Controls


REQUIRED_RESTRICTED = {
    "storage.googleapis.com", "firestore.googleapis.com", "pubsub.googleapis.com", "cloudkms.googleapis.com", "run.googleapis.com",
    "cloudfunctions.googleapis.com", "aiplatform.googleapis.com", "batch.googleapis.com", "container.googleapis.com",
}


def test_the_perimeter_holds_the_project_and_every_data_service(tf, variables):
    perimeter = _body(tf, "google_access_context_manager_service_perimeter", "fedpipe")
    assert perimeter["count"] == "${local.vpc_sc_enabled ? 1 : 0}"
    assert perimeter["parent"] == "accessPolicies/${var.vpc_sc_access_policy}"
    assert perimeter["name"] == "accessPolicies/${var.vpc_sc_access_policy}/servicePerimeters/${local.vpc_sc_perimeter_id}"
    assert perimeter["perimeter_type"] == "PERIMETER_TYPE_REGULAR"
    restricted = set(tf["locals"]["vpc_sc_restricted_services"])
    assert REQUIRED_RESTRICTED <= restricted
    assert all(re.fullmatch(r"[a-z]+\.googleapis\.com", s) for s in restricted)
    # The perimeter id of the default deployment is one Access Context Manager accepts.
    perimeter_id = tf["locals"]["vpc_sc_perimeter_id"]
    assert perimeter_id == '${replace("${var.name_prefix}_${var.project}", "-", "_")}'
    assert re.fullmatch(r"[A-Za-z0-9_]+", "fedpipe_acme-fl".replace("-", "_"))
    assert variables["vpc_sc_dry_run"]["default"] is True, "dry run first: violations logged, nothing refused"


def test_dry_run_and_enforced_are_the_same_configuration(tf):
    perimeter = _body(tf, "google_access_context_manager_service_perimeter", "fedpipe")
    assert perimeter["use_explicit_dry_run_spec"] == "${var.vpc_sc_dry_run}"
    blocks = {name: block for item in perimeter["dynamic"] for name, block in item.items()}
    assert set(blocks) == {"spec", "status"}
    assert blocks["spec"]["for_each"] == "${var.vpc_sc_dry_run ? [1] : []}"
    assert blocks["status"]["for_each"] == "${var.vpc_sc_dry_run ? [] : [1]}"
    assert blocks["spec"]["content"] == blocks["status"]["content"], "spec (dry run) and status (enforced) must not drift"
    (content,) = blocks["spec"]["content"]
    assert content["resources"] == ["projects/${data.google_project.this.number}"]
    assert content["restricted_services"] == "${local.vpc_sc_restricted_services}"


def test_only_the_named_identities_and_schedulers_tick_come_in(tf):
    ingress = tf["locals"]["vpc_sc_ingress"]
    # Operators and uploaders (if any are named) to every service; Cloud Scheduler's agent to Pub/Sub only.
    assert 'length(var.vpc_sc_ingress_identities) == 0 ? [] : [{title = "fedpipe operators and uploaders", identities = var.vpc_sc_ingress_identities, services = ["*"]}]' in ingress
    assert ('{title = "Cloud Scheduler publishes the tick", identities = ["serviceAccount:service-${data.google_project.this.number}'
            '@gcp-sa-cloudscheduler.iam.gserviceaccount.com"], services = ["pubsub.googleapis.com"]}') in ingress
    assert ingress.count("title =") == 2


# ---------------------------------------------------------------- audit logs


def test_data_access_audit_logs_for_storage_kms_and_firestore(tf):
    audit = _body(tf, "google_project_iam_audit_config", "data_access")
    # Firestore's audit logs are configured under datastore.googleapis.com (they then log as firestore.googleapis.com).
    assert audit["for_each"] == '${toset(["storage.googleapis.com", "cloudkms.googleapis.com", "datastore.googleapis.com"])}'
    assert [c["log_type"] for c in audit["audit_log_config"]] == ["DATA_READ", "DATA_WRITE"]
    assert not [c for c in audit["audit_log_config"] if c.get("exempted_members")], "nobody is exempt"

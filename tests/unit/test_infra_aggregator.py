"""The attested aggregator's infra (aggregator.tf), by value: the VM, what it is told, who may reach it.

Who may do what is test_infra_identities.py's (AGGREGATOR_GRANTS); here the Confidential Space
VM and its metadata, the hub network, the hub functions' and the workers' environment, each
evaluated for a three-node deployment (tests/unit/infra_hcl.py's Infra) and, where the code
reads it, handed to the code that reads it (shared.config.Settings, workers/trainer/update_seal.py).
"""

from __future__ import annotations

import ipaddress
import re

import pytest

from shared.config import Settings
from tests.unit.infra_hcl import EXAMPLE_AGGREGATOR_ADDRESS, Infra, example_known, example_variables, parse_files, resources

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "d" * 64
IMAGE = f"us-central1-docker.pkg.dev/acme-fl/fedpipe/aggregator@{DIGEST}"
TRAINER = "us-central1-docker.pkg.dev/acme-fl/fedpipe/trainer-cs@sha256:" + "a" * 64
URL = f"http://{EXAMPLE_AGGREGATOR_ADDRESS}:8080"
HUB = "fedpipe-hub@acme-fl.iam.gserviceaccount.com"


def infra(on: bool = True, bucket_prefix: str = "", **choices) -> Infra:
    variables = example_variables(bucket_prefix=bucket_prefix, **choices)
    if on:
        variables.update(attested_aggregation=True, confidential_workers=True, aggregator_image=IMAGE, confidential_worker_image=TRAINER)
        variables.update(choices)
    return Infra(variables, example_known())


@pytest.fixture(scope="module")
def on() -> Infra:
    return infra()


@pytest.fixture(scope="module")
def off() -> Infra:
    return infra(on=False)


def _one(tf: Infra, rtype: str, name: str):
    (instance,) = tf.instances(rtype, name).values()
    return instance


# ---------------------------------------------------------------- off unless asked


def test_nothing_of_it_exists_by_default(off):
    variables = {name: body for doc in parse_files().values() for item in doc.get("variable", []) for name, body in item.items()}
    assert variables["attested_aggregation"]["default"] is False
    for (rtype, name), body in resources(parse_files()["aggregator.tf"]).items():
        gate = body.get("for_each") or body.get("count") or ""
        assert "attested_aggregation" in gate or gate == "${local.aggregator_bucket_roles}", (rtype, name, gate)
        assert off.instances(rtype, name) == {}, (rtype, name)
    assert off.local("aggregator_bucket_roles") == {}
    assert off.local("aggregator_url") is None and off.local("hub_aggregator_env") == {} and off.local("hub_vpc_connector") is None
    for name, fn in off.instances("google_cloudfunctions2_function", "fn").items():
        service = fn.get("service_config", 0)
        assert not {"FEDPIPE_AGGREGATOR_URL", "FEDPIPE_HUB_IDENTITY"} & set(service.attr("environment_variables")), name
        assert (service.attr("vpc_connector"), service.attr("vpc_connector_egress_settings")) == (None, None), name
    assert all("FEDPIPE_AGGREGATOR_IMAGE_DIGESTS" not in env for env in off.local("worker_env").values())


def test_it_needs_confidential_workers_and_an_image_pinned_by_digest():
    from shared.launchers.naming import DIGEST_REFERENCE

    variables = {name: body for doc in parse_files().values() for item in doc.get("variable", []) for name, body in item.items()}
    (validation,) = variables["aggregator_image"]["validation"]
    pattern = re.search(r'regex\("(.+?)", var\.', validation["condition"]).group(1).replace("\\\\", "\\")
    assert pattern == DIGEST_REFERENCE.pattern
    assert re.fullmatch(pattern, IMAGE) and not re.fullmatch(pattern, IMAGE.split("@")[0] + ":latest")
    sa = resources(parse_files()["aggregator.tf"])[("google_service_account", "aggregator")]
    conditions = [p["condition"] for p in sa["lifecycle"][0]["precondition"]]
    assert conditions[:2] == ["${var.confidential_workers}", "${var.aggregator_image != null}"]
    # Evaluated: without confidential workers the plan stops there.
    without = infra(confidential_workers=False)
    assert [without.eval_text(c) for c in conditions] == [False, True, True]
    assert [infra().eval_text(c) for c in conditions] == [True, True, True]


# ---------------------------------------------------------------- the VM


def test_the_vm_is_a_hardened_sev_snp_confidential_space_vm_in_the_hubs_region(on):
    vm = _one(on, "google_compute_instance", "aggregator")
    assert (vm.attr("name"), vm.attr("zone"), vm.attr("machine_type")) == ("fedpipe-aggregator", "us-central1-a", "n2d-standard-4")
    assert vm.attr("min_cpu_platform") == "AMD Milan"
    assert vm.get("confidential_instance_config", 0, "confidential_instance_type") == "SEV_SNP"
    shielded = vm.get("shielded_instance_config", 0)
    assert all(shielded.attr(k) is True for k in ("enable_secure_boot", "enable_vtpm", "enable_integrity_monitoring"))
    assert (vm.get("scheduling", 0, "on_host_maintenance"), vm.get("scheduling", 0, "automatic_restart")) == ("TERMINATE", True)
    # The hardened image family (its tokens say dbgstat = disabled-since-boot), never the debug one.
    image = vm.get("boot_disk", 0, "initialize_params", 0, "image")
    from shared.launchers.confidential_space import IMAGE_FAMILY, IMAGE_PROJECT

    assert image == f"projects/{IMAGE_PROJECT}/global/images/family/{IMAGE_FAMILY}" == "projects/confidential-space-images/global/images/family/confidential-space"
    # No external IP: one interface, no access_config, at the reserved private address, in the hub network.
    (nic,) = vm.attr("network_interface")
    assert "access_config" not in _block_names(nic)
    assert str(nic.attr("network_ip")) == EXAMPLE_AGGREGATOR_ADDRESS
    assert str(nic.attr("subnetwork")) == "${google_compute_subnetwork.aggregator[0].id}"
    subnet = _one(on, "google_compute_subnetwork", "aggregator")
    assert (subnet.attr("region"), subnet.attr("private_ip_google_access")) == ("us-central1", True)
    assert str(subnet.attr("network")) == "${google_compute_network.hub[0].id}"
    # Its own identity, nobody else's.
    assert vm.get("service_account", 0, "email") == "fedpipe-aggregator@acme-fl.iam.gserviceaccount.com"
    assert vm.get("service_account", 0, "scopes") == ["cloud-platform"]


def _block_names(instance) -> set[str]:
    from tests.unit.infra_hcl import _body_parts

    return set(_body_parts(instance.body)[1])


def test_the_vm_runs_the_aggregator_image_and_restarts_it(on):
    metadata = _one(on, "google_compute_instance", "aggregator").attr("metadata")
    assert metadata == {
        "tee-image-reference": IMAGE,
        "tee-restart-policy": "Always",
        "tee-container-log-redirect": "cloud_logging",
        "tee-env-FEDPIPE_PROJECT": "acme-fl",
        "tee-env-FEDPIPE_BUCKET_PREFIX": "",
        "tee-env-FEDPIPE_AGGREGATOR_URL": URL,
        "tee-env-FEDPIPE_HUB_IDENTITY": HUB,
        "tee-env-FEDPIPE_NODE_KEKS": "hub=gcp-kms://projects/acme-fl/locations/us-central1/keyRings/fedpipe/cryptoKeys/fedpipe-hub-kek",
        "block-project-ssh-keys": "true",
    }
    # Confidential Space reads its metadata at boot: a new image replaces the VM rather than editing metadata in place.
    raw = resources(parse_files()["aggregator.tf"])
    assert raw[("google_compute_instance", "aggregator")]["lifecycle"][0]["replace_triggered_by"] == ["${terraform_data.aggregator_image[count.index]}"]
    assert _one(on, "terraform_data", "aggregator_image").attr("input") == IMAGE


@pytest.mark.parametrize("bucket_prefix", ["", "acme-fl-prod"])
def test_the_aggregator_reads_the_hubs_names_and_the_hubs_key_only(bucket_prefix):
    tf = infra(bucket_prefix=bucket_prefix)
    metadata = _one(tf, "google_compute_instance", "aggregator").attr("metadata")
    env = {k.removeprefix("tee-env-"): v for k, v in metadata.items() if k.startswith("tee-env-")}
    settings = Settings.from_env(env)
    # What workers/aggregator/main.py needs: whom to serve, for which audience, in which bucket, under which key.
    assert settings.aggregator_url == URL and settings.hub_identity == HUB
    assert settings.project == "acme-fl"
    assert settings.hub_bucket == tf.var("hub_bucket")
    assert settings.node_keks == {"hub": "gcp-kms://" + tf.instances("google_kms_crypto_key", "kek")["hub"].attr("id")}
    # The port is functions-framework's default (no PORT override for the launch policy to allow).
    assert tf.local("aggregator_port") == 8080


def test_the_zone_and_machine_must_fit_sev_snp_in_the_hub_region():
    vm = resources(parse_files()["aggregator.tf"])[("google_compute_instance", "aggregator")]
    conditions = [p["condition"] for p in vm["lifecycle"][0]["precondition"]]
    assert [infra(aggregator_zone="europe-west4-a").eval_text(c) for c in conditions] == [False, True]
    assert [infra(aggregator_machine_type="c3-standard-4").eval_text(c) for c in conditions] == [True, False]
    assert [infra(aggregator_zone="us-central1-f").eval_text(c) for c in conditions] == [True, True]


# ---------------------------------------------------------------- who reaches it


def test_only_the_hub_functions_connector_reaches_its_port(on):
    connector = _one(on, "google_vpc_access_connector", "hub")
    assert (connector.attr("region"), connector.attr("ip_cidr_range")) == ("us-central1", "10.9.0.16/28")
    assert connector.attr("network") == _one(on, "google_compute_network", "hub").attr("name") == "fedpipe-hub"
    rules = {name: fw for name in ("hub_deny_ingress", "hub_functions_reach_aggregator") for fw in on.instances("google_compute_firewall", name).values()}
    allow = rules["hub_functions_reach_aggregator"]
    assert allow.attr("direction") == "INGRESS" and allow.attr("source_ranges") == [connector.attr("ip_cidr_range")]
    assert allow.attr("target_service_accounts") == ["fedpipe-aggregator@acme-fl.iam.gserviceaccount.com"]
    ((protocol, ports),) = [(a.attr("protocol"), a.attr("ports")) for a in allow.attr("allow")]
    assert (protocol, ports) == ("tcp", ["8080"])
    deny = rules["hub_deny_ingress"]
    assert (deny.attr("priority"), deny.attr("source_ranges")) == (65534, ["0.0.0.0/0"])
    assert [d.attr("protocol") for d in deny.attr("deny")] == ["all"]
    # The hub network holds these two rules and no other; the workers' network's rules never name it.
    for (rtype, name) in resources_all():
        if rtype == "google_compute_firewall":
            for fw in on.instances(rtype, name).values():
                on_hub = str(fw.attr("network")) == "${google_compute_network.hub[0].id}"
                assert on_hub == (name in rules), name
    # The aggregator's subnet, the connector and the workers' ranges do not overlap.
    ranges = [ipaddress.ip_network(r) for r in (*on.var("aggregator_cidrs").values(), *on.var("worker_subnet_cidrs").values())]
    for c in on.var("gke_cidrs").values():
        ranges += [ipaddress.ip_network(c[k]) for k in ("nodes", "pods", "services", "control_plane")]
    assert all(not a.overlaps(b) for i, a in enumerate(ranges) for b in ranges[i + 1:])


def resources_all():
    from tests.unit.infra_hcl import resources_and_locals

    return resources_and_locals()["resources"]


def test_the_hub_functions_and_the_node_api_know_the_aggregator_and_reach_it(on):
    expected = {"FEDPIPE_AGGREGATOR_URL": URL, "FEDPIPE_HUB_IDENTITY": HUB}
    for name, fn in on.instances("google_cloudfunctions2_function", "fn").items():
        service = fn.get("service_config", 0)
        env = service.attr("environment_variables")
        hub_function = service.attr("service_account_email") == HUB
        assert hub_function == (not name.startswith("raw-upload-")), name
        if hub_function:
            assert {k: env[k] for k in expected} == expected, name
            assert str(service.attr("vpc_connector")) == "${google_vpc_access_connector.hub[0].id}"
            assert service.attr("vpc_connector_egress_settings") == "PRIVATE_RANGES_ONLY"  # Google APIs stay direct
            # The identity the aggregator admits is the one these functions run as.
            assert env["FEDPIPE_HUB_IDENTITY"] == service.attr("service_account_email")
        else:
            assert not set(expected) & set(env) and service.attr("vpc_connector") is None, name
    api = _one(on, "google_cloudfunctions2_function", "node_api").get("service_config", 0)
    assert {k: api.attr("environment_variables")[k] for k in expected} == expected  # it relays the aggregator's key
    assert str(api.attr("vpc_connector")) == "${google_vpc_access_connector.hub[0].id}"
    # Both sides hold the same URL: the hub's ID tokens' audience is what the aggregator checks.
    metadata = _one(on, "google_compute_instance", "aggregator").attr("metadata")
    assert metadata["tee-env-FEDPIPE_AGGREGATOR_URL"] == on.local("aggregator_url") == URL
    outputs = {name: body for item in parse_files()["aggregator.tf"]["output"] for name, body in item.items()}
    assert outputs["aggregator_url"]["value"] == "${local.aggregator_url}"


# ---------------------------------------------------------------- what each node trusts


def test_each_node_trusts_the_deployed_image_unless_it_says_otherwise():
    from workers.trainer.update_seal import DIGESTS_ENV

    assert DIGESTS_ENV == "FEDPIPE_AGGREGATOR_IMAGE_DIGESTS"
    default = infra().local("worker_env")
    assert {n: env[DIGESTS_ENV] for n, env in default.items()} == {"us": DIGEST, "eu": DIGEST, "ch": DIGEST}
    other = "sha256:" + "e" * 64
    chosen = infra(aggregator_image_digests={"eu": [DIGEST, other], "ch": []}).local("worker_env")
    assert {n: env[DIGESTS_ENV] for n, env in chosen.items()} == {"us": DIGEST, "eu": f"{DIGEST},{other}", "ch": ""}
    # As workers/trainer/update_seal.py splits it.
    assert tuple(d.strip() for d in chosen["eu"][DIGESTS_ENV].split(",") if d.strip()) == (DIGEST, other)
    # Every launcher hands workers local.worker_env: Cloud Run jobs, the confidential and accelerator launchers.
    assert "jsonencode(local.worker_env)" in (parse_files_text("confidential.tf") + parse_files_text("accelerators.tf"))


def parse_files_text(name: str) -> str:
    from tests.unit.infra_hcl import INFRA

    return (INFRA / name).read_text()


def test_the_aggregator_images_launch_policy_allows_exactly_the_env_infra_sets():
    """Confidential Space refuses a tee-env-* its image's policy does not allow, and the policy is part of the trusted digest."""
    import re
    from pathlib import Path

    dockerfile = (Path(__file__).parents[2] / "workers" / "aggregator" / "Dockerfile").read_text()
    allowed = set(re.search(r'"tee\.launch_policy\.allow_env_override"="([^"]*)"', dockerfile)[1].split(","))
    tf = (Path(__file__).parents[2] / "infra" / "aggregator.tf").read_text()
    assert allowed == set(re.findall(r'"tee-env-([A-Z0-9_]+)"', tf))
    assert "ARG TRAINER\nFROM ${TRAINER}\n" in dockerfile  # the pinned, non-root CPU worker image, given by digest
    assert '"tee.launch_policy.allow_cmd_override"="false"' in dockerfile
    assert '"--target", "aggregator_api"' in dockerfile

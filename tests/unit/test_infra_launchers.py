"""The launching functions' environment, by value: what infra/ sets is what shared/launchers/ reads.

infra/main.tf's local.launcher_env (with accelerators.tf's local.accelerator_launcher_env) is
evaluated for a three-node deployment (tests/unit/infra_hcl.py's Infra) and handed to the
launchers' own `from_env`: the names come from the Python modules themselves, so a launcher
that starts reading a new FEDPIPE_* name fails here until infra sets it.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from shared.launchers.naming import DIGEST_REFERENCE
from tests.unit.infra_hcl import EXAMPLE_NODE_REGIONS, Infra, example_known, example_variables, parse_files
from tests.unit.test_infra_identities import DEPLOYMENTS, KEY_RELEASE, NODES, Deployment, grants

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
# What FEDPIPE_LAUNCHER=cloud reads: the selector, the routing table, and each engine's launcher.
ROUTING_MODULES = ("select", "routing", "fleet", "cloud_run", "gke", "vertex", "batch_gpu")
NOT_IN_THE_CLOUD = {"FEDPIPE_STATE_DIR"}  # select.py's local launcher only
IMAGES = {kind: f"us-central1-docker.pkg.dev/acme-fl/fedpipe/trainer-{kind}@sha256:{c * 64}" for kind, c in (("cpu", "a"), ("gpu", "b"), ("tpu", "c"))}
ALL_OPTIONS = {
    "accelerator_image_cpu": IMAGES["cpu"], "accelerator_image_gpu": IMAGES["gpu"], "accelerator_image_tpu": IMAGES["tpu"],
    "accelerator_max_run_seconds": 7200,
}


def env_names(module: str) -> set[str]:
    """The FEDPIPE_* string constants of shared/launchers/<module>.py."""
    tree = ast.parse((REPO / "shared" / "launchers" / f"{module}.py").read_text())
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and re.fullmatch(r"FEDPIPE_[A-Z_]+", n.value)}


def infra(deployment: Deployment = Deployment(), **choices) -> Infra:
    """infra/ for the three-node example deployment with these switches and choices."""
    switches = {name: getattr(deployment, name) for name in ("confidential_workers", "gke_enabled", "vertex_enabled", "batch_enabled", "attested_aggregation")}
    variables = example_variables(**switches, key_release=deployment.key_release, **choices)
    if deployment.confidential_workers:
        variables.setdefault("confidential_worker_image", IMAGES["cpu"])
    if deployment.attested_aggregation:
        variables.setdefault("aggregator_image", IMAGES["cpu"].replace("trainer-cpu", "aggregator"))
    return Infra(variables, example_known())


def function_env(tf: Infra, trigger: str) -> dict[str, str]:
    return tf.instances("google_cloudfunctions2_function", "fn")[trigger].get("service_config", 0, "environment_variables")


GKE_ALL = Deployment(gke_enabled=True, vertex_enabled=True, batch_enabled=True)


# ---------------------------------------------------------------- the names


def test_infra_sets_every_name_the_routing_launcher_reads():
    read = set().union(*(env_names(m) for m in ROUTING_MODULES)) - NOT_IN_THE_CLOUD
    # The names those modules hold are the ones this test knows them by (a new one fails here first).
    assert read == {
        "FEDPIPE_LAUNCHER", "FEDPIPE_TPU_BACKEND", "FEDPIPE_GPU_BACKEND", "FEDPIPE_NODE_REGIONS", "FEDPIPE_WORKER_JOB",
        "FEDPIPE_WORKER_SERVICE_ACCOUNTS", "FEDPIPE_WORKER_ENV", "FEDPIPE_NAME_PREFIX", "FEDPIPE_MAX_RUN_SECONDS",
        "FEDPIPE_WORKER_IMAGE_CPU", "FEDPIPE_WORKER_IMAGE_GPU", "FEDPIPE_WORKER_IMAGE_TPU",
        "FEDPIPE_GKE_CLUSTERS", "FEDPIPE_GKE_NAMESPACE", "FEDPIPE_GKE_SERVICE_ACCOUNT",
    }
    env = function_env(infra(GKE_ALL, **ALL_OPTIONS), "job-written")
    assert read <= set(env), sorted(read - set(env))
    # And Settings (the project, the hub region) comes with every function's var.settings_env.
    assert {"FEDPIPE_PROJECT", "FEDPIPE_REGION"} <= set(env)


def test_without_a_backend_the_functions_run_cloud_run_jobs_only():
    tf = infra()
    env = tf.local("launcher_env")
    assert env == {
        "FEDPIPE_LAUNCHER": "cloud-run",
        "FEDPIPE_WORKER_JOB": "fedpipe-worker",
        "FEDPIPE_NODE_REGIONS": "ch=europe-west6,eu=europe-west4,us=us-central1",
        "GOOGLE_CLOUD_PROJECT": "acme-fl",
    }
    assert tf.local("accelerator_launcher_env") == {}
    outputs = {name: body for item in parse_files()["accelerators.tf"]["output"] for name, body in item.items()}
    assert outputs["accelerator_launcher_env"]["value"] == "${local.accelerators_enabled ? local.launcher_env : null}"
    assert tf.local("accelerators_enabled") is False


@pytest.mark.parametrize("switch", ["gke_enabled", "vertex_enabled", "batch_enabled"])
def test_any_backend_switches_the_functions_to_the_routing_launcher(switch):
    tf = infra(Deployment(**{switch: True}))
    env = tf.local("launcher_env")
    assert env["FEDPIPE_LAUNCHER"] == "cloud"
    # Cloud Run stays one of the engines (CPU and one L4 on one host).
    assert (env["FEDPIPE_WORKER_JOB"], env["FEDPIPE_NODE_REGIONS"]) == ("fedpipe-worker", "ch=europe-west6,eu=europe-west4,us=us-central1")
    assert env["FEDPIPE_WORKER_SERVICE_ACCOUNTS"] == ",".join(f"{n}=fedpipe-worker-{n}@acme-fl.iam.gserviceaccount.com" for n in sorted(NODES))
    assert env["FEDPIPE_NAME_PREFIX"] == "fedpipe"
    assert json.loads(env["FEDPIPE_WORKER_ENV"]) == tf.local("worker_env")
    # No image, no bound: the engines refuse a kind without an image, and use their own default bound.
    assert not {k for k in env if k.startswith("FEDPIPE_WORKER_IMAGE_")} and "FEDPIPE_MAX_RUN_SECONDS" not in env
    assert ("FEDPIPE_GKE_CLUSTERS" in env) == (switch == "gke_enabled")


def test_gke_clusters_are_named_by_their_dns_endpoint():
    env = infra(Deployment(gke_enabled=True)).local("launcher_env")
    assert env["FEDPIPE_GKE_CLUSTERS"] == ",".join(f"{n}=gke-{n}0123.{EXAMPLE_NODE_REGIONS[n]}.gke.goog" for n in sorted(NODES))
    assert env["FEDPIPE_GKE_NAMESPACE"] == "fedpipe"
    assert env["FEDPIPE_GKE_SERVICE_ACCOUNT"] == "ch=worker-ch,eu=worker-eu,us=worker-us"
    # Unknown until apply: the expression reads the cluster's DNS endpoint, not its id.
    plain = Infra(example_variables(gke_enabled=True), {"data.google_project.this.number": "1"}).local("launcher_env")
    assert plain["FEDPIPE_GKE_CLUSTERS"].startswith('ch=${google_container_cluster.workers["ch"].control_plane_endpoints_config[0].dns_endpoint_config[0].endpoint},')


def test_the_launchers_accept_what_infra_sets():
    from shared.launchers.fleet import Fleet
    from shared.launchers.gke import GkeConfig
    from shared.launchers.routing import Backend, RoutingLauncher
    from shared.launchers.select import launcher_from_env

    env = function_env(infra(GKE_ALL, **ALL_OPTIONS), "job-written")
    routing = launcher_from_env(env)
    assert isinstance(routing, RoutingLauncher)
    assert (routing.policy.tpu, routing.policy.gpu) == (Backend.GKE, Backend.GKE)
    fleet = Fleet.from_env(env)
    assert fleet.project == "acme-fl" and fleet.regions == EXAMPLE_NODE_REGIONS
    assert fleet.images == IMAGES
    assert fleet.max_run.total_seconds() == 7200 and fleet.infra_prefix == "fedpipe"
    assert {n: fleet.service_account(n) for n in NODES} == {n: f"fedpipe-worker-{n}@acme-fl.iam.gserviceaccount.com" for n in NODES}
    assert fleet.worker_env["eu"]["FEDPIPE_NODE"] == "eu"
    gke = GkeConfig.from_env(env)
    assert gke.clusters == {n: f"gke-{n}0123.{EXAMPLE_NODE_REGIONS[n]}.gke.goog" for n in NODES}
    assert {n: gke.service_account(n) for n in NODES} == {n: f"worker-{n}" for n in NODES}
    # Each engine's launcher builds from it (no client is made before a launch).
    for backend in Backend:
        assert routing.launcher(backend) is not None, backend


# ---------------------------------------------------------------- which engine runs TPUs and GPUs


@pytest.mark.parametrize(
    ("switches", "tpu", "gpu"),
    [
        ({"gke_enabled": True}, "gke", "gke"),
        ({"vertex_enabled": True}, "vertex", "vertex"),
        ({"batch_enabled": True}, "gke", "batch"),  # no TPU engine: TPU jobs are refused (the GKE engine is not configured)
        ({"vertex_enabled": True, "batch_enabled": True}, "vertex", "batch"),
        ({"gke_enabled": True, "vertex_enabled": True, "batch_enabled": True}, "gke", "gke"),
    ],
)
def test_backends_default_to_an_enabled_engine(switches, tpu, gpu):
    from shared.launchers.routing import RoutingPolicy

    env = infra(Deployment(**switches)).local("launcher_env")
    assert (env["FEDPIPE_TPU_BACKEND"], env["FEDPIPE_GPU_BACKEND"]) == (tpu, gpu)
    RoutingPolicy.from_env(env)  # valid for the routing table


def test_a_named_backend_wins_and_must_be_enabled():
    from shared.launchers.routing import GPU_BACKENDS, TPU_BACKENDS

    env = infra(GKE_ALL, tpu_backend="vertex", gpu_backend="batch").local("launcher_env")
    assert (env["FEDPIPE_TPU_BACKEND"], env["FEDPIPE_GPU_BACKEND"]) == ("vertex", "batch")
    variables = {name: body for doc in parse_files().values() for item in doc.get("variable", []) for name, body in item.items()}
    for name, allowed in (("tpu_backend", TPU_BACKENDS), ("gpu_backend", GPU_BACKENDS)):
        (validation,) = variables[name]["validation"]
        listed = re.search(r"contains\(\[([^]]+)\]", validation["condition"]).group(1)
        assert re.findall(r'"(\w+)"', listed) == [b.value for b in allowed], name
    # The functions' preconditions: a named engine that is not enabled refuses the plan.
    fn = _fn_body()
    conditions = [p["condition"] for p in fn["lifecycle"][0]["precondition"]]
    assert '${var.tpu_backend == null || (var.tpu_backend == "gke" ? var.gke_enabled : var.vertex_enabled)}' in conditions
    assert (
        '${var.gpu_backend == null || (var.gpu_backend == "gke" ? var.gke_enabled : var.gpu_backend == "batch" ? var.batch_enabled : var.vertex_enabled)}'
        in conditions
    )


def _fn_body() -> dict:
    from tests.unit.infra_hcl import resources_and_locals

    return resources_and_locals()["resources"][("google_cloudfunctions2_function", "fn")]


def test_images_and_the_run_bound_are_the_launchers_rules():
    variables = {name: body for doc in parse_files().values() for item in doc.get("variable", []) for name, body in item.items()}
    for kind in ("cpu", "gpu", "tpu"):
        (validation,) = variables[f"accelerator_image_{kind}"]["validation"]
        pattern = re.search(r'regex\("(.+?)", var\.', validation["condition"]).group(1).replace("\\\\", "\\")
        assert pattern == DIGEST_REFERENCE.pattern, kind  # what infra accepts, the launchers accept (naming.require_digest)
        assert variables[f"accelerator_image_{kind}"]["default"] is None
    env = infra(Deployment(vertex_enabled=True), accelerator_image_tpu=IMAGES["tpu"], accelerator_max_run_seconds=3600).local("launcher_env")
    assert {k: v for k, v in env.items() if k.startswith("FEDPIPE_WORKER_IMAGE_")} == {"FEDPIPE_WORKER_IMAGE_TPU": IMAGES["tpu"]}
    assert env["FEDPIPE_MAX_RUN_SECONDS"] == "3600"
    (bound,) = variables["accelerator_max_run_seconds"]["validation"]
    assert "604800" in bound["condition"]  # fleet.MAX_RUN, 7 days
    from shared.launchers.fleet import MAX_RUN

    assert MAX_RUN.total_seconds() == 604800


# ---------------------------------------------------------------- on_tick follows what on_job_written launched


@pytest.mark.parametrize("name", list(DEPLOYMENTS))
def test_the_tick_function_gets_the_launch_functions_launcher_identity_and_roles(name):
    deployment = DEPLOYMENTS[name]
    tf = infra(deployment, **ALL_OPTIONS)
    functions = tf.instances("google_cloudfunctions2_function", "fn")
    tick, launch = functions["tick"], functions["job-written"]
    # The same launcher, configured the same (on_tick polls and stops what on_job_written started) ...
    tick_env, launch_env = tick.get("service_config", 0, "environment_variables"), launch.get("service_config", 0, "environment_variables")
    assert tick_env.pop("FEDPIPE_TRIGGER") == "tick" and launch_env.pop("FEDPIPE_TRIGGER") == "job-written"
    assert tick_env == launch_env
    launcher_keys = set(tf.local("launcher_env"))
    assert {k: tick_env[k] for k in launcher_keys} == tf.local("launcher_env")
    # ... run as the same identity, the hub ...
    identity = {f: functions[f].get("service_config", 0, "service_account_email") for f in ("tick", "job-written")}
    assert identity == {"tick": "fedpipe-hub@acme-fl.iam.gserviceaccount.com", "job-written": "fedpipe-hub@acme-fl.iam.gserviceaccount.com"}
    # ... which holds what each enabled engine needs to launch, read and stop a run (grants by value).
    hub = {(g.target, g.role) for g in grants(_tf(), deployment) if g.principal == "hub"}
    needed = {(f"job:worker:{n}", "roles/run.jobsExecutorWithOverrides") for n in NODES}  # run, get executions, cancel
    if deployment.gke_enabled:
        needed.add(("project", "roles/container.developer"))  # create, read, delete Jobs and JobSets
    if deployment.vertex_enabled:
        needed |= {("project", "roles/aiplatform.user")} | {(f"service-account:worker:{n}", "roles/iam.serviceAccountUser") for n in NODES}
    if deployment.batch_enabled or deployment.confidential_workers:
        needed |= {("project", "roles/batch.jobsEditor")} | {(f"subnet:workers:{n}", "roles/compute.networkUser") for n in NODES}
    assert needed <= hub, sorted(needed - hub)


_PARSED: dict = {}


def _tf() -> dict:
    from tests.unit.infra_hcl import resources_and_locals

    if not _PARSED:
        _PARSED.update(resources_and_locals())
    return _PARSED


def test_the_key_release_deployment_is_one_the_evaluator_expands():
    # (A guard for the helpers above: key_release reaches the workers' provider name.)
    tf = infra(Deployment(key_release=KEY_RELEASE))
    env = tf.local("worker_env")
    assert str(env["us"]["FEDPIPE_KEY_RELEASE_PROVIDER"]) == '${google_iam_workload_identity_pool_provider.attested["us"].name}'

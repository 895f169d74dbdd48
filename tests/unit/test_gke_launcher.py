"""The GKE launcher: Jobs and JobSets by value, deterministic DNS-safe names, and launch/state/stop against recording APIs.

GKE has no emulator: the objects are compared whole with hand-built kubernetes client
objects (and, for the JobSet, with the manifest a person would write), and the launcher
runs against a small recording stand-in of BatchV1Api and CustomObjectsApi.
"""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kubernetes import client as k8s

from shared.jobs import MAX_QUEUED, DatasetRef, Job, JobSpec
from shared.launchers import LaunchError, LaunchRefused, RunState
from shared.launchers.fleet import Fleet
from shared.launchers.gke import (
    JOB_NAME_MAX,
    JOBSET_NAME_MAX,
    GkeConfig,
    GkeLauncher,
    GkeRun,
    KubeApis,
    build_job,
    build_jobset,
    coordinator_address,
    require_label,
)
from shared.launchers.naming import resource_name

pytestmark = pytest.mark.unit

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
DIGEST = "sha256:" + "0123456789abcdef" * 4
IMAGES = {kind: f"us-docker.pkg.dev/acme-fl/fedpipe/trainer-{kind}@{DIGEST}" for kind in ("cpu", "gpu", "tpu")}
ENV = {"FEDPIPE_NODE": "us", "FEDPIPE_JOB_ID": "job-1", "FEDPIPE_JOB_ATTEMPT": "1"}
HOUR = timedelta(hours=1)
DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def make_job(job_id: str = "job-1", *, accelerator: str = "cpu", hosts: int = 1, attempt: int = 1, node: str = "us") -> Job:
    spec = JobSpec(dataset=DatasetRef(node=node, dataset="iris"), accelerator=accelerator, hosts=hosts)
    return Job.new(job_id, spec, NOW).model_copy(update={"attempt": attempt})


def fleet(**changes) -> Fleet:
    values = dict(project="acme-fl", regions={"us": "us-central1"}, images=IMAGES, worker_env={"us": {"FEDPIPE_NODE": "us"}}, max_run=HOUR)
    return Fleet(**{**values, **changes})


# ---------------------------------------------------------------- objects by value


def test_single_host_gpu_job_by_value():
    name = resource_name("fedpipe", "job-1", 1, JOB_NAME_MAX)
    labels = {"app": "fedpipe", "fedpipe-node": "us", "fedpipe-attempt": "1", "fedpipe-name": name}
    expected = k8s.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=k8s.V1ObjectMeta(name=name, namespace="fedpipe", labels=labels, annotations={"fedpipe/job-id": "job-1"}),
        spec=k8s.V1JobSpec(
            backoff_limit=0,
            completions=1,
            parallelism=1,
            active_deadline_seconds=int((HOUR + MAX_QUEUED).total_seconds()),
            ttl_seconds_after_finished=86400,
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=labels),
                spec=k8s.V1PodSpec(
                    containers=[k8s.V1Container(
                        name="trainer",
                        image=IMAGES["gpu"],
                        env=[k8s.V1EnvVar(name=k, value=v) for k, v in ENV.items()],
                        resources=k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": "4"}, requests={"nvidia.com/gpu": "4"}),
                    )],
                    restart_policy="Never",
                    service_account_name="worker-us",
                    automount_service_account_token=False,
                    node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb", "iam.gke.io/gke-metadata-server-enabled": "true"},
                ),
            ),
        ),
    )
    job = make_job(accelerator="gpu:nvidia-h100-80gb:4")
    assert build_job(job, namespace="fedpipe", service_account="worker-us", image=IMAGES["gpu"], env=ENV, max_run=HOUR) == expected


def test_single_host_tpu_job_selects_its_slice_and_tolerates_the_tpu_taint():
    job = make_job(accelerator="tpu:v6e:2x4")
    pod = build_job(job, namespace="fedpipe", service_account="worker-us", image=IMAGES["tpu"], env=ENV, max_run=HOUR).spec.template.spec
    assert pod.node_selector == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
        "cloud.google.com/gke-tpu-topology": "2x4",
        "iam.gke.io/gke-metadata-server-enabled": "true",
    }
    assert pod.tolerations == [k8s.V1Toleration(key="google.com/tpu", operator="Exists", effect="NoSchedule")]
    assert pod.containers[0].resources == k8s.V1ResourceRequirements(limits={"google.com/tpu": "8"}, requests={"google.com/tpu": "8"})


@pytest.mark.parametrize(("version", "topology", "label"), [
    ("v4", "2x2x4", "tpu-v4-podslice"), ("v5p", "2x2x2", "tpu-v5p-slice"), ("v5e", "4x4", "tpu-v5-lite-podslice"),
])
def test_every_tpu_version_names_its_gke_accelerator(version, topology, label):
    body = build_jobset(make_job(accelerator=f"tpu:{version}:{topology}"), namespace="n", service_account="w", image="i", env={}, max_run=HOUR)
    pod = body["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == label
    assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": "4"}


def test_multi_host_tpu_jobset_by_value():
    job = make_job(accelerator="tpu:v5e:4x4")  # 16 chips: 4 hosts of 4
    name = resource_name("fedpipe", "job-1", 1, JOBSET_NAME_MAX)
    labels = {"app": "fedpipe", "fedpipe-node": "us", "fedpipe-attempt": "1", "fedpipe-name": name}
    env = [{"name": k, "value": v} for k, v in ENV.items()] + [
        {"name": "FEDPIPE_COORDINATOR_ADDRESS", "value": f"{name}-w-0-0.{name}:8476"},
        {"name": "FEDPIPE_NUM_PROCESSES", "value": "4"},
        {"name": "FEDPIPE_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
    ]
    assert build_jobset(job, namespace="fedpipe", service_account="worker-us", image=IMAGES["tpu"], env=ENV, max_run=HOUR) == {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": name,
            "namespace": "fedpipe",
            "labels": labels,
            "annotations": {"fedpipe/job-id": "job-1", "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"},
        },
        "spec": {
            "failurePolicy": {"maxRestarts": 0},
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "ttlSecondsAfterFinished": 86400,
            "replicatedJobs": [{
                "name": "w",
                "replicas": 1,
                "template": {"spec": {
                    "backoffLimit": 0,
                    "completions": 4,
                    "parallelism": 4,
                    "completionMode": "Indexed",
                    "activeDeadlineSeconds": int((HOUR + MAX_QUEUED).total_seconds()),
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "containers": [{
                                "name": "trainer",
                                "image": IMAGES["tpu"],
                                "env": env,
                                "resources": {"limits": {"google.com/tpu": "4"}, "requests": {"google.com/tpu": "4"}},
                            }],
                            "restartPolicy": "Never",
                            "serviceAccountName": "worker-us",
                            "automountServiceAccountToken": False,
                            "nodeSelector": {
                                "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                "cloud.google.com/gke-tpu-topology": "4x4",
                                "iam.gke.io/gke-metadata-server-enabled": "true",
                            },
                            "tolerations": [{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}],
                        },
                    },
                }},
            }],
        },
    }


def test_multi_host_gpu_jobset_has_no_slice_placement():
    body = build_jobset(make_job(accelerator="gpu:nvidia-h100-80gb:8", hosts=2), namespace="n", service_account="w", image="i", env={}, max_run=HOUR)
    assert "alpha.jobset.sigs.k8s.io/exclusive-topology" not in body["metadata"]["annotations"]
    workers = body["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert (workers["completions"], workers["parallelism"]) == (2, 2)
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert "tolerations" not in workers["template"]["spec"]


def test_a_job_is_one_host_and_a_jobset_several():
    with pytest.raises(ValueError, match="JobSet"):
        build_job(make_job(hosts=2), namespace="n", service_account="w", image="i", env={}, max_run=HOUR)
    with pytest.raises(ValueError, match="Job"):
        build_jobset(make_job(), namespace="n", service_account="w", image="i", env={}, max_run=HOUR)
    with pytest.raises(ValueError, match="positive"):
        build_job(make_job(), namespace="n", service_account="w", image="i", env={}, max_run=timedelta(0))


# ---------------------------------------------------------------- names


def test_names_are_deterministic_dns_labels_within_their_bounds_even_for_a_200_character_job_id():
    long_id = "Job_" + "x" * 190 + "~é.Z"
    assert len(long_id) == 198
    for job_id in (long_id, "job-1", "UPPER.case~id", "9-starts-with-digit"):
        job = make_job(job_id, accelerator="tpu:v5e:4x4", attempt=12)
        jobset = build_jobset(job, namespace="n", service_account="w", image="i", env={}, max_run=HOUR)
        again = build_jobset(job, namespace="n", service_account="w", image="i", env={}, max_run=HOUR)
        name = jobset["metadata"]["name"]
        assert name == again["metadata"]["name"]  # a retried launch meets the same object
        assert DNS_LABEL.fullmatch(name) and len(name) <= JOBSET_NAME_MAX, name
        assert len(f"{name}-w-0-63-abcde") <= 63  # the longest pod name the JobSet makes
        assert len(coordinator_address(name).split(".")[0]) <= 63
        single = build_job(make_job(job_id, attempt=12), namespace="n", service_account="w", image="i", env={}, max_run=HOUR).metadata.name
        assert DNS_LABEL.fullmatch(single) and len(single) <= JOB_NAME_MAX
        assert jobset["metadata"]["annotations"]["fedpipe/job-id"] == job_id  # the exact id, where the name holds a slug
    assert build_job(make_job(attempt=2), namespace="n", service_account="w", image="i", env={}, max_run=HOUR).metadata.name != single
    twins = [build_job(make_job(i), namespace="n", service_account="w", image="i", env={}, max_run=HOUR).metadata.name for i in ("x" * 150 + "a", "x" * 150 + "b")]
    assert twins[0] != twins[1]


def test_node_names_label_the_objects_and_must_be_label_values():
    assert [require_label(node) for node in ("us", "EU_west", "a.b")] == ["us", "EU_west", "a.b"]
    for node in ("-x", "x_", "_"):
        with pytest.raises(ValueError, match="not a Kubernetes label value"):
            require_label(node)


def test_handles_round_trip_and_bad_ones_are_refused():
    run = GkeRun("us", "fedpipe", "jobsets", "fedpipe-job-1-a1-0123456789")
    assert GkeRun.parse(str(run)) == run
    for bad in ("us/fedpipe/pods/x", "us/fedpipe/jobs", "projects/p/locations/l/jobs/x", "us//jobs/x"):
        with pytest.raises(LaunchError, match="not a GKE handle"):
            GkeRun.parse(bad)


# ---------------------------------------------------------------- launcher against recording APIs


class Recorder:
    """Records (method, arguments); answers with `answer`, or raises `error` (a kubernetes ApiException)."""

    def __init__(self, answer=None, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.answer, self.error = answer, error

    def _call(self, method: str, **kwargs):
        self.calls.append((method, kwargs))
        if self.error is not None:
            raise self.error
        return self.answer


class FakeBatchApi(Recorder):
    def create_namespaced_job(self, *, namespace, body):
        return self._call("create", namespace=namespace, body=body)

    def read_namespaced_job_status(self, *, name, namespace):
        return self._call("read", name=name, namespace=namespace)

    def delete_namespaced_job(self, *, name, namespace, body):
        return self._call("delete", name=name, namespace=namespace, body=body)


class FakeCustomApi(Recorder):
    def create_namespaced_custom_object(self, *, group, version, namespace, plural, body):
        return self._call("create", group=group, version=version, namespace=namespace, plural=plural, body=body)

    def get_namespaced_custom_object_status(self, *, group, version, namespace, plural, name):
        return self._call("read", group=group, version=version, namespace=namespace, plural=plural, name=name)

    def delete_namespaced_custom_object(self, *, group, version, namespace, plural, name, body):
        return self._call("delete", group=group, version=version, namespace=namespace, plural=plural, name=name, body=body)


CONFIG = GkeConfig(clusters={"us": "gke-0123.us-central1.gke.goog"})


def launcher(batch: FakeBatchApi | None = None, custom: FakeCustomApi | None = None, **changes) -> GkeLauncher:
    apis = KubeApis(batch=batch or FakeBatchApi(), custom=custom or FakeCustomApi())
    return GkeLauncher(fleet(**changes), CONFIG, apis={"us": apis})


def conflict(status: int) -> k8s.ApiException:
    return k8s.ApiException(status=status, reason={404: "Not Found", 409: "Conflict", 403: "Forbidden"}[status])


def test_launch_creates_the_job_in_the_nodes_namespace_and_a_repeat_meets_it():
    batch = FakeBatchApi()
    job = make_job(accelerator="gpu:nvidia-l4:1")
    handle = launcher(batch).launch(job)
    expected = build_job(job, namespace="fedpipe", service_account="worker-us", image=IMAGES["gpu"], env=ENV, max_run=HOUR)
    assert batch.calls == [("create", {"namespace": "fedpipe", "body": expected})]
    assert handle == f"us/fedpipe/jobs/{expected.metadata.name}"
    assert launcher(FakeBatchApi(error=conflict(409))).launch(job) == handle  # launched before: the same run
    with pytest.raises(LaunchError, match="Forbidden"):
        launcher(FakeBatchApi(error=conflict(403))).launch(job)


def test_launch_creates_a_jobset_for_a_slice():
    custom = FakeCustomApi()
    job = make_job(accelerator="tpu:v5e:4x4")
    handle = launcher(custom=custom).launch(job)
    body = build_jobset(job, namespace="fedpipe", service_account="worker-us", image=IMAGES["tpu"], env=ENV, max_run=HOUR)
    assert custom.calls == [("create", {"group": "jobset.x-k8s.io", "version": "v1alpha2", "namespace": "fedpipe",
                                        "plural": "jobsets", "body": body})]
    assert handle == f"us/fedpipe/jobsets/{body['metadata']['name']}"


def test_what_gke_cannot_run_here_is_refused_before_any_call():
    batch = FakeBatchApi()
    with pytest.raises(LaunchRefused, match="no tpu worker image"):
        launcher(batch, images={"cpu": IMAGES["cpu"]}).launch(make_job(accelerator="tpu:v5e:2x2"))
    with pytest.raises(LaunchRefused, match="not a Kubernetes label value"):
        launcher(batch).launch(make_job(node="-us"))
    with pytest.raises(LaunchRefused, match="'eu' has no GKE cluster"):
        launcher(batch).apis("eu")
    assert batch.calls == []


def test_state_reads_the_object_and_a_deleted_one_is_gone():
    done = k8s.V1Job(status=k8s.V1JobStatus(conditions=[k8s.V1JobCondition(type="Complete", status="True")]))
    batch = FakeBatchApi(answer=done)
    assert launcher(batch).state("us/fedpipe/jobs/j1") is RunState.SUCCEEDED
    assert batch.calls == [("read", {"name": "j1", "namespace": "fedpipe"})]
    custom = FakeCustomApi(answer={"status": {"replicatedJobsStatus": [{"name": "w", "ready": 1}]}})
    assert launcher(custom=custom).state("us/fedpipe/jobsets/s1") is RunState.RUNNING
    assert custom.calls[0][1]["name"] == "s1" and custom.calls[0][1]["plural"] == "jobsets"
    assert launcher(FakeBatchApi(error=conflict(404))).state("us/fedpipe/jobs/j1") is RunState.GONE
    with pytest.raises(LaunchError, match="Forbidden"):
        launcher(FakeBatchApi(error=conflict(403))).state("us/fedpipe/jobs/j1")


def test_stop_deletes_in_the_foreground_and_a_deleted_one_needs_nothing():
    batch, custom = FakeBatchApi(), FakeCustomApi()
    gke = launcher(batch, custom)
    gke.stop("us/fedpipe/jobs/j1")
    gke.stop("us/fedpipe/jobsets/s1")
    foreground = k8s.V1DeleteOptions(propagation_policy="Foreground")
    assert batch.calls == [("delete", {"name": "j1", "namespace": "fedpipe", "body": foreground})]
    assert custom.calls == [("delete", {"group": "jobset.x-k8s.io", "version": "v1alpha2", "namespace": "fedpipe",
                                        "plural": "jobsets", "name": "s1", "body": foreground})]
    launcher(FakeBatchApi(error=conflict(404))).stop("us/fedpipe/jobs/j1")
    with pytest.raises(LaunchError, match="Forbidden"):
        launcher(FakeBatchApi(error=conflict(403))).stop("us/fedpipe/jobs/j1")


def test_from_env_reads_what_infra_outputs():
    env = {
        "FEDPIPE_PROJECT": "acme-fl",
        "FEDPIPE_NODE_REGIONS": "us=us-central1,eu=europe-west4",
        "FEDPIPE_WORKER_SERVICE_ACCOUNTS": "us=fl-worker-us@acme-fl.iam.gserviceaccount.com",
        "FEDPIPE_WORKER_IMAGE_TPU": IMAGES["tpu"],
        "FEDPIPE_GKE_CLUSTERS": "us=gke-0123.us-central1.gke.goog",
        "FEDPIPE_GKE_NAMESPACE": "fl",
        "FEDPIPE_GKE_SERVICE_ACCOUNT": "us=worker-us",
        "FEDPIPE_MAX_RUN_SECONDS": "3600",
    }
    gke = GkeLauncher.from_env(env)
    assert gke.config == GkeConfig(clusters={"us": "gke-0123.us-central1.gke.goog"}, namespace="fl", service_accounts={"us": "worker-us"})
    assert gke.fleet == Fleet(
        project="acme-fl", regions={"us": "us-central1", "eu": "europe-west4"}, images={"tpu": IMAGES["tpu"]},
        service_accounts={"us": "fl-worker-us@acme-fl.iam.gserviceaccount.com"}, max_run=HOUR,
    )
    assert gke.fleet.service_account("eu") == "fedpipe-worker-eu@acme-fl.iam.gserviceaccount.com"  # infra's name, unless told
    assert gke.config.service_account("eu") == "worker-eu"
    with pytest.raises(ValueError, match="FEDPIPE_GKE_CLUSTERS"):
        GkeLauncher.from_env({k: v for k, v in env.items() if k != "FEDPIPE_GKE_CLUSTERS"})


def test_shared_launchers_and_their_selection_do_not_import_kubernetes():
    code = "import sys, shared.launchers.select; print('kubernetes' in sys.modules)"
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "False"

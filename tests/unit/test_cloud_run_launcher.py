"""The Cloud Run Jobs launcher: its requests by value, and launch() against a fake client.

Cloud Run has no emulator, so `launch` is tested with a small hand-written client
that records what it is sent; the operation it returns is a real
google.api_core Operation carrying a real Execution, as the library builds it.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.api_core import exceptions as api_exceptions
from google.api_core import operation as ga_operation
from google.cloud import run_v2
from google.longrunning import operations_pb2

from shared.jobs import DatasetRef, Job, JobSpec
from shared.launchers import LaunchError, LaunchRefused, RunState
from shared.launchers.cloud_run import (
    CloudRunJobsLauncher,
    build_run_request,
    execution_name,
    parse_node_regions,
)

pytestmark = pytest.mark.unit

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
PROJECT, REGION = "acme-fl", "us-central1"
EXECUTION = f"projects/{PROJECT}/locations/{REGION}/jobs/fedpipe-worker/executions/fedpipe-worker-x7k2p"


def make_job(job_id: str = "job-1", *, accelerator: str = "cpu", node: str = "us", attempt: int = 1, hosts: int = 1) -> Job:
    spec = JobSpec(dataset=DatasetRef(node=node, dataset="iris"), accelerator=accelerator, hosts=hosts)
    return Job.new(job_id, spec, NOW).model_copy(update={"attempt": attempt})


def run_operation(execution: str = EXECUTION, op_name: str = "projects/p/locations/r/operations/op-1"):
    """What JobsClient.run_job returns: an api_core Operation whose metadata is the Execution."""
    pb = operations_pb2.Operation(name=op_name)
    if execution:
        pb.metadata.Pack(run_v2.Execution.pb(run_v2.Execution(name=execution)))
    return ga_operation.Operation(
        pb,
        refresh=lambda *a, **kw: pb,
        cancel=lambda *a, **kw: None,
        result_type=run_v2.Execution,
        metadata_type=run_v2.Execution,
    )


class FakeJobsClient:
    """Records run_job requests; returns `result` or raises `error`."""

    def __init__(self, result=None, error: Exception | None = None) -> None:
        self.requests: list[run_v2.RunJobRequest] = []
        self.result = result if result is not None else run_operation()
        self.error = error

    def run_job(self, request=None, **kwargs):
        assert not kwargs, f"launcher passed unexpected arguments {kwargs}"
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return self.result


def env_of(request: run_v2.RunJobRequest) -> dict[str, str]:
    (container,) = request.overrides.container_overrides
    return {e.name: e.value for e in container.env}


# ---------------------------------------------------------------- build_run_request


def test_cpu_request_targets_the_worker_job_with_job_id_and_attempt():
    request = build_run_request(PROJECT, REGION, "fedpipe-worker", make_job("job-42", attempt=3))

    assert request.name == "projects/acme-fl/locations/us-central1/jobs/fedpipe-worker"
    (container,) = request.overrides.container_overrides
    assert container.name == "trainer"
    assert [(e.name, e.value) for e in container.env] == [
        ("FEDPIPE_JOB_ID", "job-42"),
        ("FEDPIPE_JOB_ATTEMPT", "3"),
    ]
    assert list(container.args) == [] and not container.clear_args  # no code or args travel
    assert request.overrides.task_count == 1
    assert "timeout" not in request.overrides  # the template's timeout applies


def test_request_equals_the_hand_built_library_request():
    expected = run_v2.RunJobRequest(
        name="projects/acme-fl/locations/us-central1/jobs/w",
        overrides=run_v2.RunJobRequest.Overrides(
            container_overrides=[
                run_v2.RunJobRequest.Overrides.ContainerOverride(
                    name="trainer",
                    env=[
                        run_v2.EnvVar(name="FEDPIPE_JOB_ID", value="job-1"),
                        run_v2.EnvVar(name="FEDPIPE_JOB_ATTEMPT", value="1"),
                    ],
                )
            ],
            task_count=1,
        ),
    )
    assert build_run_request(PROJECT, REGION, "w", make_job()) == expected


def test_gpu_jobs_run_the_gpu_job_resource():
    request = build_run_request(PROJECT, "europe-west4", "fedpipe-worker", make_job(accelerator="gpu"))
    assert request.name == "projects/acme-fl/locations/europe-west4/jobs/fedpipe-worker-gpu"
    assert env_of(request) == {"FEDPIPE_JOB_ID": "job-1", "FEDPIPE_JOB_ATTEMPT": "1"}


@pytest.mark.parametrize(("accelerator", "hosts"), [("tpu:v5e:2x4", 1), ("gpu:nvidia-tesla-a100:1", 1), ("gpu:nvidia-l4:2", 1), ("cpu", 2)])
def test_what_cloud_run_cannot_run_is_refused_naming_what_it_can(accelerator, hosts):
    job = make_job(accelerator=accelerator, hosts=hosts)
    with pytest.raises(LaunchRefused, match=r"runs cpu or gpu:nvidia-l4:1 on one host.*GKE, Vertex AI or Batch"):
        build_run_request(PROJECT, REGION, "fedpipe-worker", job)


def test_explicit_timeout_overrides_the_template_for_this_execution():
    request = build_run_request(PROJECT, REGION, "w", make_job(), timeout=timedelta(minutes=90))
    assert request.overrides.timeout.total_seconds() == 5400
    with pytest.raises(ValueError):
        build_run_request(PROJECT, REGION, "w", make_job(), timeout=timedelta(0))


# ---------------------------------------------------------------- launch


def test_launch_sends_exactly_the_built_request_and_returns_the_execution_name():
    client = FakeJobsClient()
    launcher = CloudRunJobsLauncher(PROJECT, REGION, "fedpipe-worker", client=client)
    job = make_job("job-7", attempt=2)

    assert launcher.launch(job) == EXECUTION
    assert client.requests == [build_run_request(PROJECT, REGION, "fedpipe-worker", job)]


def test_launch_falls_back_to_the_operation_name_without_execution_metadata():
    client = FakeJobsClient(result=run_operation(execution="", op_name="projects/p/locations/r/operations/op-9"))
    launcher = CloudRunJobsLauncher(PROJECT, REGION, "w", client=client)
    assert launcher.launch(make_job()) == "projects/p/locations/r/operations/op-9"


def test_execution_name_without_any_name_is_a_launch_error():
    class Nameless:
        metadata = None
        operation = None

    with pytest.raises(LaunchError):
        execution_name(Nameless())


def test_permission_denied_becomes_launch_error():
    denied = api_exceptions.PermissionDenied("caller lacks run.jobs.runWithOverrides")
    launcher = CloudRunJobsLauncher(PROJECT, REGION, "w", client=FakeJobsClient(error=denied))

    with pytest.raises(LaunchError, match="runWithOverrides") as info:
        launcher.launch(make_job("job-3"))
    assert info.value.__cause__ is denied
    assert "job-3" in str(info.value)


def test_missing_job_resource_names_the_resource():
    launcher = CloudRunJobsLauncher(
        PROJECT, REGION, "w", client=FakeJobsClient(error=api_exceptions.NotFound("no such job"))
    )
    with pytest.raises(LaunchError, match=r"projects/acme-fl/locations/us-central1/jobs/w-gpu does not exist"):
        launcher.launch(make_job(accelerator="gpu"))


def test_retry_exhaustion_becomes_launch_error():
    error = api_exceptions.RetryError("deadline exceeded", cause=api_exceptions.ServiceUnavailable("x"))
    launcher = CloudRunJobsLauncher(PROJECT, REGION, "w", client=FakeJobsClient(error=error))
    with pytest.raises(LaunchError):
        launcher.launch(make_job())


def test_tpu_launch_fails_before_calling_cloud_run():
    client = FakeJobsClient()
    with pytest.raises(LaunchRefused):
        CloudRunJobsLauncher(PROJECT, REGION, "w", client=client).launch(make_job(accelerator="tpu:v5e:2x4"))
    assert client.requests == []


def test_other_errors_are_not_swallowed():
    launcher = CloudRunJobsLauncher(PROJECT, REGION, "w", client=FakeJobsClient(error=KeyError("bug")))
    with pytest.raises(KeyError):
        launcher.launch(make_job())


# ---------------------------------------------------------------- per-node workers


def test_per_node_workers_run_in_the_nodes_region():
    client = FakeJobsClient()
    launcher = CloudRunJobsLauncher(
        PROJECT, REGION, "fedpipe-worker", client=client,
        node_regions={"us": "us-central1", "eu": "europe-west4"},
    )
    launcher.launch(make_job("a", node="eu"))
    launcher.launch(make_job("b", node="us", accelerator="gpu"))

    assert [r.name for r in client.requests] == [
        "projects/acme-fl/locations/europe-west4/jobs/fedpipe-worker-eu",
        "projects/acme-fl/locations/us-central1/jobs/fedpipe-worker-us-gpu",
    ]


def test_unknown_node_is_refused_without_calling_cloud_run():
    client = FakeJobsClient()
    launcher = CloudRunJobsLauncher(PROJECT, REGION, "w", client=client, node_regions={"us": "us-central1"})
    with pytest.raises(LaunchError, match="'asia' has no worker region"):
        launcher.launch(make_job(node="asia"))
    assert client.requests == []


def test_from_env_reads_the_variables_infra_sets():
    launcher = CloudRunJobsLauncher.from_env(
        {
            "FEDPIPE_PROJECT": "acme-fl",
            "FEDPIPE_REGION": "us-central1",
            "FEDPIPE_WORKER_JOB": "fl-worker",
            "FEDPIPE_NODE_REGIONS": "us=us-central1, eu=europe-west4",
        }
    )
    assert (launcher.project, launcher.region, launcher.job_name) == ("acme-fl", "us-central1", "fl-worker")
    assert launcher.node_regions == {"us": "us-central1", "eu": "europe-west4"}
    assert launcher.request_for(make_job(node="eu")).name == (
        "projects/acme-fl/locations/europe-west4/jobs/fl-worker-eu"
    )


def test_from_env_defaults_to_one_worker_job_in_the_hub_region():
    launcher = CloudRunJobsLauncher.from_env({"FEDPIPE_PROJECT": "p", "FEDPIPE_REGION": "europe-west1"})
    assert (launcher.region, launcher.job_name, launcher.node_regions) == ("europe-west1", "fedpipe-worker", None)


def test_parse_node_regions():
    assert parse_node_regions("") == {}
    assert parse_node_regions("us=us-central1,") == {"us": "us-central1"}
    with pytest.raises(ValueError, match="node=region"):
        parse_node_regions("us:us-central1")


# ---------------------------------------------------------------- state and stop


class FakeExecutionsClient:
    """Records get/cancel calls by name; answers with `execution` or raises `error`."""

    def __init__(self, execution: run_v2.Execution | None = None, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.execution, self.error = execution, error

    def _answer(self, method: str, name: str, kwargs: dict):
        assert not kwargs, f"launcher passed unexpected arguments {kwargs}"
        self.calls.append((method, name))
        if self.error is not None:
            raise self.error
        return self.execution

    def get_execution(self, name=None, **kwargs):
        return self._answer("get", name, kwargs)

    def cancel_execution(self, name=None, **kwargs):
        return self._answer("cancel", name, kwargs)


def test_state_and_stop_address_the_execution_and_a_gone_one_is_gone():
    executions = FakeExecutionsClient(run_v2.Execution(task_count=1, running_count=1))
    launcher = CloudRunJobsLauncher(PROJECT, REGION, "w", client=FakeJobsClient(), executions=executions)
    assert launcher.state(EXECUTION) is RunState.RUNNING
    launcher.stop(EXECUTION)
    assert executions.calls == [("get", EXECUTION), ("cancel", EXECUTION)]

    gone = CloudRunJobsLauncher(PROJECT, REGION, "w", executions=FakeExecutionsClient(error=api_exceptions.NotFound("no such execution")))
    assert gone.state(EXECUTION) is RunState.GONE
    gone.stop(EXECUTION)  # nothing to stop
    over = FakeExecutionsClient(error=api_exceptions.FailedPrecondition("execution already completed"))
    CloudRunJobsLauncher(PROJECT, REGION, "w", executions=over).stop(EXECUTION)


def test_state_and_stop_failures_are_launch_errors():
    denied = FakeExecutionsClient(error=api_exceptions.PermissionDenied("run.executions.cancel"))
    launcher = CloudRunJobsLauncher(PROJECT, REGION, "w", executions=denied)
    with pytest.raises(LaunchError, match="run.executions.cancel"):
        launcher.state(EXECUTION)
    with pytest.raises(LaunchError, match="run.executions.cancel"):
        launcher.stop(EXECUTION)
    with pytest.raises(LaunchError, match="not a Cloud Run execution"):
        launcher.state("projects/p/locations/r/operations/op-9")  # launch's fallback handle names no execution
    assert len(denied.calls) == 2


def test_shared_launchers_does_not_import_cloud_run_library():
    # Functions import shared.launchers on cold start; run_v2 must load only when used.
    code = "import sys, shared.launchers; print('google.cloud.run_v2' in sys.modules)"
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "False"

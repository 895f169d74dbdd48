"""The accelerator Batch launcher: requests by value, multi-host task groups, launch/state/stop against a recording client."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import batch_v1
from google.protobuf import duration_pb2

from shared.jobs import DatasetRef, Job, JobSpec
from shared.launchers import LaunchError, LaunchRefused, RunState
from shared.launchers.batch_gpu import BatchLauncher, build_batch_job_request
from shared.launchers.batch_runs import batch_job_handle
from shared.launchers.fleet import Fleet
from shared.launchers.naming import request_id, resource_name
from tests.unit.launcher_fakes import FakeBatchClient

pytestmark = pytest.mark.unit

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
DIGEST = "sha256:" + "0123456789abcdef" * 4
IMAGES = {kind: f"us-docker.pkg.dev/acme-fl/fedpipe/trainer-{kind}@{DIGEST}" for kind in ("cpu", "gpu", "tpu")}
SA = "fedpipe-worker-us@acme-fl.iam.gserviceaccount.com"
SUBNET = "projects/acme-fl/regions/us-central1/subnetworks/fedpipe-workers-us"
ENV = {"FEDPIPE_NODE": "us", "FEDPIPE_JOB_ID": "job-1", "FEDPIPE_JOB_ATTEMPT": "1"}
HOUR = timedelta(hours=1)
A = batch_v1.AllocationPolicy


def make_job(job_id: str = "job-1", *, accelerator: str = "cpu", hosts: int = 1, attempt: int = 1) -> Job:
    spec = JobSpec(dataset=DatasetRef(node="us", dataset="iris"), accelerator=accelerator, hosts=hosts)
    return Job.new(job_id, spec, NOW).model_copy(update={"attempt": attempt})


def build(job: Job) -> batch_v1.CreateJobRequest:
    image = IMAGES[job.spec.accelerator.kind]
    return build_batch_job_request("acme-fl", "us-central1", job, image=image, env=ENV, service_account=SA, subnetwork=SUBNET, max_run=HOUR)


def test_single_host_gpu_job_by_value():
    job_id = resource_name("fedpipe-batch", "job-1", 1)
    parent = "projects/acme-fl/locations/us-central1"
    expected = batch_v1.CreateJobRequest(
        parent=parent,
        job_id=job_id,
        request_id=request_id("batch-job", parent, job_id),
        job=batch_v1.Job(
            task_groups=[batch_v1.TaskGroup(
                task_spec=batch_v1.TaskSpec(
                    runnables=[batch_v1.Runnable(container=batch_v1.Runnable.Container(image_uri=IMAGES["gpu"]))],
                    environment=batch_v1.Environment(variables=ENV),
                    max_retry_count=0,
                    max_run_duration=duration_pb2.Duration(seconds=3600),
                ),
                task_count=1,
                parallelism=1,
                task_count_per_node=1,
                require_hosts_file=False,
            )],
            allocation_policy=A(
                instances=[A.InstancePolicyOrTemplate(
                    policy=A.InstancePolicy(machine_type="g2-standard-48", accelerators=[A.Accelerator(type_="nvidia-l4", count=4)]),
                    install_gpu_drivers=True,
                )],
                service_account=batch_v1.ServiceAccount(email=SA),
                location=A.LocationPolicy(allowed_locations=["regions/us-central1"]),
                network=A.NetworkPolicy(network_interfaces=[A.NetworkInterface(subnetwork=SUBNET, no_external_ip_address=True)]),
            ),
            labels={"app": "fedpipe", "fedpipe-job": "job-1", "fedpipe-attempt": "1", "fedpipe-node": "us", "fedpipe-name": job_id},
            logs_policy=batch_v1.LogsPolicy(destination=batch_v1.LogsPolicy.Destination.CLOUD_LOGGING),
        ),
    )
    assert build(make_job(accelerator="gpu:nvidia-l4:4")) == expected


def test_a_multi_host_run_is_one_task_per_vm_at_once_with_a_hosts_file_and_the_role_mapper():
    request = build(make_job(accelerator="gpu:nvidia-h100-80gb:8", hosts=4))
    (group,) = request.job.task_groups
    assert (group.task_count, group.parallelism, group.task_count_per_node, group.require_hosts_file) == (4, 4, 1, True)
    (runnable,) = group.task_spec.runnables
    assert runnable.container == batch_v1.Runnable.Container(
        image_uri=IMAGES["gpu"], entrypoint="python", commands=["-m", "shared.launchers.host_env", "batch"],
    )
    assert request.job.allocation_policy.instances[0].policy.machine_type == "a3-highgpu-8g"


def test_cpu_runs_without_gpu_drivers_and_tpus_and_unknown_shapes_are_refused():
    (instance,) = build(make_job(hosts=2)).job.allocation_policy.instances
    assert instance == A.InstancePolicyOrTemplate(policy=A.InstancePolicy(machine_type="n2-standard-8"), install_gpu_drivers=False)
    with pytest.raises(LaunchRefused, match=re.escape("Batch runs cpu and the GPU shapes nvidia-l4:1|2|4|8")):
        build(make_job(accelerator="tpu:v5e:2x2"))
    with pytest.raises(LaunchRefused, match="nvidia-tesla-t4:1|2|4"):
        build(make_job(accelerator="gpu:nvidia-tesla-t4:8"))


def test_job_ids_are_deterministic_and_valid_for_a_200_character_job_id():
    long_id = "Job." * 50
    first, again = build(make_job(long_id, attempt=3)), build(make_job(long_id, attempt=3))
    assert first.job_id == again.job_id and first.request_id == again.request_id
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", first.job_id)
    assert build(make_job(long_id, attempt=4)).job_id != first.job_id


def fleet() -> Fleet:
    return Fleet(project="acme-fl", regions={"us": "us-central1"}, images=IMAGES, worker_env={"us": {"FEDPIPE_NODE": "us"}}, max_run=HOUR)


def test_launch_sends_the_built_request_and_an_existing_job_is_the_same_launch():
    client = FakeBatchClient()
    job = make_job(accelerator="gpu:nvidia-l4:4")
    handle = BatchLauncher(fleet(), client=client).launch(job)
    assert client.requests == [build(job)]
    assert handle == batch_job_handle(build(job))
    exists = FakeBatchClient(error=api_exceptions.AlreadyExists("job exists"))
    assert BatchLauncher(fleet(), client=exists).launch(job) == handle
    with pytest.raises(LaunchError, match="batch.jobs.create"):
        BatchLauncher(fleet(), client=FakeBatchClient(error=api_exceptions.PermissionDenied("batch.jobs.create"))).launch(job)


def test_state_reads_and_stop_deletes_the_batch_job():
    handle = "projects/acme-fl/locations/us-central1/jobs/fedpipe-batch-job-1-a1-0123456789"
    client = FakeBatchClient(job=batch_v1.Job(status=batch_v1.JobStatus(state=batch_v1.JobStatus.State.SCHEDULED)))
    launcher = BatchLauncher(fleet(), client=client)
    assert launcher.state(handle) is RunState.QUEUED
    launcher.stop(handle)
    assert client.calls == [("get", handle), ("delete", handle)]
    assert BatchLauncher(fleet(), client=FakeBatchClient(error=api_exceptions.NotFound("x"))).state(handle) is RunState.GONE

"""Multi-host jobs, checkpoints and resume on the local stack: N worker processes, one model.

The reference is one uninterrupted two-host run. A one-host run of the same job must reach
its parameters up to float rounding, and a two-host run killed mid-training must resume
from its checkpoint and reach them exactly.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from emulators.launcher import LocalProcessLauncher, LocalRun, exit_file, host_log_file, worker_pid_file
from shared import weights
from shared.jobs import DatasetRef, Job, JobSpec, JobStatus, TrainSpec, utcnow
from shared.jobstore import JobStore
from shared.launchers import RunState
from tests.conftest import wait_for
from tests.emulator.helpers import job_of_dataset, upload_digits, wait_job

pytestmark = pytest.mark.emulator

DATASET = "multihost"
# Long enough to kill a two-host run once a checkpoint exists (at most one a second; the run takes
# about 9 s on a 2-core machine), short enough for a test.
TRAIN = TrainSpec(model="mlp", hidden=(32,), epochs=60, batch_size=64, learning_rate=1e-3, seed=11)


@pytest.fixture(scope="module")
def dataset(cloud, clients) -> str:
    upload_digits(clients, DATASET, parts=2, train=TrainSpec(epochs=1))
    wait_job(clients, job_of_dataset(clients, DATASET), {"completed"})  # the data set is complete
    return DATASET


def _run(clients, job_id: str, hosts: int, **spec) -> Job:
    job = Job.new(job_id, JobSpec(dataset=DatasetRef(node="us", dataset=DATASET), train=TRAIN, hosts=hosts, **spec), utcnow())
    assert JobStore(clients.db, clients.settings).create(job)
    return job


def _model(clients, job: Job) -> dict[str, np.ndarray]:
    """The trained model as a user reads it back: from the URI in the job's results."""
    bucket, name = job.results["model_uri"].removeprefix("gs://").split("/", 1)
    return weights.from_bytes(clients.gcs.bucket(bucket).blob(name).download_as_bytes())[0]


def _checkpoints(clients, job_id: str) -> list[str]:
    return [b.name for b in clients.gcs.list_blobs(clients.settings.processed_bucket("us"), prefix=f"checkpoints/{job_id}/")]


@pytest.fixture(scope="module")
def reference(cloud, clients, dataset) -> tuple[Job, dict[str, np.ndarray]]:
    """One uninterrupted two-host run."""
    job = wait_job(clients, _run(clients, "mh-reference", hosts=2).id, {"completed", "failed"}, timeout_s=240)
    assert job.status is JobStatus.COMPLETED, job.error
    return job, _model(clients, job)


def test_a_two_host_job_trains_the_model_a_one_host_job_does(cloud, clients, reference) -> None:
    two, two_params = reference
    one = wait_job(clients, _run(clients, "mh-one-host", hosts=1).id, {"completed", "failed"}, timeout_s=240)
    assert one.status is JobStatus.COMPLETED, one.error
    assert (two.results["hosts"], one.results["hosts"], two.results["epochs"]) == (2, 1, TRAIN.epochs)
    assert "resumed_from_step" not in two.results
    # Not bit for bit: each step's gradient is two partial sums (one per process) added by Gloo
    # instead of one sum on one device, so float32 rounding differs in the last bits. Over these
    # 1380 Adam steps that measured 2e-7 at most, on weights of order 0.1 (it grows with the steps:
    # 3e-4 after 13,800).
    one_params = _model(clients, one)
    for name in two_params:
        np.testing.assert_allclose(two_params[name], one_params[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert abs(two.results["accuracy"] - one.results["accuracy"]) <= 1 / one.results["test_examples"]  # one example may flip

    state_dir = Path(cloud.endpoints.state_dir)
    run = LocalRun.parse(two.execution)
    assert len(run.pids) == 2 and run.log == state_dir / "logs" / "jobs" / "mh-reference.1.log"
    assert "job mh-reference attempt 1 running" in host_log_file(run.log, 1).read_text()  # each process logs on its own
    launcher = LocalProcessLauncher(state_dir)
    wait_for(lambda: launcher.state(two.execution) is RunState.SUCCEEDED, 60, "both processes to exit 0")
    assert [exit_file(host_log_file(run.log, i)).read_text() for i in range(2)] == ["0", "0"]


def test_a_killed_two_host_job_resumes_from_its_checkpoint_to_the_same_model(cloud, clients, reference) -> None:
    _, expected = reference
    # The lease must outlast the run's start (importing JAX and joining the run take seconds on a busy
    # machine); the kill is noticed sooner anyway, when the clock polls the launcher for the run's state.
    job = _run(clients, "mh-killed", hosts=2, lease_seconds=20, max_attempts=2)
    wait_for(lambda: _checkpoints(clients, job.id), 240, "a checkpoint of attempt 1")
    store = JobStore(clients.db, clients.settings)
    first = store.get(job.id)
    assert first.attempt == 1 and first.status is JobStatus.RUNNING
    state_dir = Path(cloud.endpoints.state_dir)
    os.killpg(int(worker_pid_file(state_dir, job.id, 1).read_text()), signal.SIGKILL)  # the pid file names the run's group
    launcher = LocalProcessLauncher(state_dir)
    wait_for(lambda: launcher.state(first.execution) is RunState.FAILED, 30, "every process of attempt 1 to die")
    assert [exit_file(host_log_file(LocalRun.parse(first.execution).log, i)).read_text() for i in range(2)] == ["-9", "-9"]

    done = wait_job(clients, job.id, {"completed", "failed"}, timeout_s=240)
    assert done.status is JobStatus.COMPLETED and done.attempt == 2, done.error
    assert done.results["resumed_from_step"] > 0 and done.results["resumed_from_step"] % 23 == 0  # 1438 rows: 23 steps an epoch
    assert done.results["epochs"] == TRAIN.epochs
    got = _model(clients, done)
    # Exactly: the resumed run starts from the checkpoint's bits and runs the same steps on the same batches.
    assert all(np.array_equal(got[name], expected[name]) for name in expected)
    assert len(_checkpoints(clients, job.id)) <= 3  # the oldest are pruned


def test_a_gpu_job_on_a_cpu_only_machine_fails_with_a_clear_reason(cloud, clients, dataset) -> None:
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has an NVIDIA GPU")
    job = _run(clients, "mh-gpu", hosts=1, accelerator="gpu:nvidia-l4:1")
    done = wait_job(clients, job.id, {"completed", "failed"}, timeout_s=60)
    assert done.status is JobStatus.FAILED and done.attempt == 1  # refused: never retried
    assert "gpu:nvidia-l4:1 needs 1 NVIDIA GPU(s); this machine has" in done.error and "no NVIDIA GPU" in done.error

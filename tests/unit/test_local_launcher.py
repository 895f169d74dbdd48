"""The local launcher's own logic: handles, run states from processes and exit files, stop, accelerator refusal.

Processes here are real (a stand-in for the worker's interpreter, told what to do by the
environment), so process groups, signals and the reaping thread that records exit statuses
are exercised.
"""

from __future__ import annotations

import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from emulators.launcher import LocalProcessLauncher, LocalRun, exit_file, host_log_file, missing_accelerator, worker_log_file
from shared.accelerators import parse
from shared.jobs import DatasetRef, Job, JobSpec
from shared.launchers import LaunchError, LaunchRefused, RunState
from tests.conftest import wait_for

pytestmark = pytest.mark.unit

MODULE = "workers.trainer"  # what the stand-in is asked to run (and ignores)
# The worker's stand-in: prints the role it was given, then sleeps, or exits (1 if it is FAIL_PROCESS).
STAND_IN = """#!/bin/sh
echo "$FEDPIPE_COORDINATOR_ADDRESS $FEDPIPE_NUM_PROCESSES $FEDPIPE_PROCESS_ID"
[ "$BEHAVE" = sleep ] && exec sleep 60
sleep 0.5  # a worker lives longer than it takes to start the rest of its run
[ "$FAIL_PROCESS" = "$FEDPIPE_PROCESS_ID" ] && exit 1
exit 0
"""


def _env(**behaviour: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], **behaviour}


def _launcher(tmp_path: Path) -> LocalProcessLauncher:
    python = tmp_path / "stand-in-python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    return LocalProcessLauncher(tmp_path, python=str(python))


def _log(tmp_path: Path) -> Path:
    log = worker_log_file(tmp_path, "job-1", 1)
    log.parent.mkdir(parents=True)
    return log


def test_a_handle_names_every_process_and_the_leaders_log_and_parses_back() -> None:
    run = LocalRun((101, 102, 103), Path("/state/logs/jobs/job-1.2.log"))
    assert run.handle == "local:pid=101,102,103:log=/state/logs/jobs/job-1.2.log"
    assert LocalRun.parse(run.handle) == run
    assert LocalRun.parse("local:pid=7:log=/x/j.1.log").pids == (7,)
    for junk in ("local:pid=1", "local:pid=:log=/x", "local:pid=1,a:log=/x", "cloud-run:jobs/x", "local:pid=1:log="):
        with pytest.raises(ValueError, match="not a local launcher's handle"):
            LocalRun.parse(junk)


def test_each_host_has_its_own_log_and_exit_file() -> None:
    log = Path("/s/logs/jobs/j.1.log")
    assert [host_log_file(log, i).name for i in range(3)] == ["j.1.log", "j.1.host1.log", "j.1.host2.log"]
    assert [exit_file(host_log_file(log, i)).name for i in range(2)] == ["j.1.exit", "j.1.host1.exit"]


def test_a_multi_host_run_is_one_process_group_with_roles_logs_and_exit_statuses(tmp_path: Path) -> None:
    launcher, log = _launcher(tmp_path), _log(tmp_path)
    pids = launcher._start_hosts(_env(BEHAVE="exit"), log, 3, MODULE)
    handle = LocalRun(tuple(pids), log).handle
    assert {os.getpgid(pid) for pid in pids} == {pids[0]}  # one group: killpg(leader) takes the whole run
    wait_for(lambda: launcher.state(handle) is RunState.SUCCEEDED, 30, "the run to succeed")
    roles = [host_log_file(log, i).read_text().split() for i in range(3)]
    assert [r[1:] for r in roles] == [["3", str(i)] for i in range(3)]
    assert len({r[0] for r in roles}) == 1 and roles[0][0].startswith("127.0.0.1:")  # one coordinator for all


def test_state_follows_the_processes_and_stop_ends_the_whole_run(tmp_path: Path) -> None:
    launcher, log = _launcher(tmp_path), _log(tmp_path)
    handle = LocalRun(tuple(launcher._start_hosts(_env(BEHAVE="sleep"), log, 2, MODULE)), log).handle
    assert launcher.state(handle) is RunState.RUNNING
    started = time.monotonic()
    launcher.stop(handle)
    assert time.monotonic() - started < 1  # it returns at once
    assert wait_for(lambda: (s := launcher.state(handle)) is not RunState.RUNNING and s, 30, "the run to end") is RunState.FAILED
    assert [int(exit_file(host_log_file(log, i)).read_text()) for i in range(2)] == [-15, -15]  # SIGTERM
    launcher.stop(handle)  # stopping a finished run is not an error


def test_one_failed_process_fails_the_run(tmp_path: Path) -> None:
    launcher, log = _launcher(tmp_path), _log(tmp_path)
    handle = LocalRun(tuple(launcher._start_hosts(_env(BEHAVE="exit", FAIL_PROCESS="1"), log, 2, MODULE)), log).handle
    assert wait_for(lambda: (s := launcher.state(handle)) is not RunState.RUNNING and s, 30, "the run to end") is RunState.FAILED


def test_a_leader_that_exits_before_the_rest_started_fails_the_launch_clearly(tmp_path: Path) -> None:
    launcher, log = _launcher(tmp_path), _log(tmp_path)
    (tmp_path / "stand-in-python").write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(LaunchError, match="the run's leader exited before process 1 started"):
        for _ in range(20):  # the leader's exit must win the race against the launcher: it does within a few tries
            pids = launcher._start_hosts(_env(), log, 2, MODULE)
            wait_for(lambda p=pids: None not in LocalRun(tuple(p), log).exit_codes(), 30, "the run to end")
            time.sleep(0.05)


def test_a_run_that_ended_without_a_recorded_status_is_gone(tmp_path: Path) -> None:
    log = _log(tmp_path)
    ended = subprocess.Popen(["true"])
    ended.wait()  # ended and reaped, as a zygote child killed by a signal is: no exit file
    assert _launcher(tmp_path).state(LocalRun((ended.pid,), log).handle) is RunState.GONE


def test_a_single_host_worker_keeps_its_own_session(tmp_path: Path) -> None:
    launcher, log = _launcher(tmp_path), _log(tmp_path)
    pid = launcher._start_process(_env(BEHAVE="sleep"), log, MODULE)
    try:
        assert os.getsid(pid) == pid
    finally:
        launcher.stop(LocalRun((pid,), log).handle)
    wait_for(lambda: exit_file(log).exists(), 30, "its exit status")


def test_missing_accelerators_are_named_with_what_the_machine_has(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    assert missing_accelerator(parse("cpu"), 4, dev) is None
    reason = missing_accelerator(parse("gpu"), 1, dev)
    assert reason.startswith("gpu:nvidia-l4:1 needs 1 NVIDIA GPU(s); this machine has") and "CPUs" in reason and "no NVIDIA GPU" in reason
    assert "needs a TPU" in missing_accelerator(parse("tpu:v5e:2x2"), 1, dev)
    (dev / "nvidia0").touch()
    (dev / "nvidiactl").touch()  # not a GPU
    assert missing_accelerator(parse("gpu"), 1, dev) is None
    assert "this machine has" in missing_accelerator(parse("gpu:nvidia-l4:2"), 1, dev) and "1 NVIDIA GPU(s) (nvidia0)" in \
        missing_accelerator(parse("gpu:nvidia-l4:2"), 1, dev)
    (dev / "vfio").mkdir()
    assert missing_accelerator(parse("tpu:v5e:2x2"), 1, dev) is None
    assert "4-host slice" in missing_accelerator(parse("tpu:v4:4x4x1"), 4, dev)


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="this machine has a GPU")
def test_launch_refuses_a_gpu_job_on_a_cpu_machine_before_starting_anything(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    job = Job.new("gpu-job", JobSpec(dataset=DatasetRef(node="us", dataset="d"), accelerator="gpu:nvidia-l4:1"), now)
    with pytest.raises(LaunchRefused, match=r"job gpu-job: gpu:nvidia-l4:1 needs 1 NVIDIA GPU\(s\); this machine has \d+ CPUs, no NVIDIA GPU"):
        _launcher(tmp_path).launch(job)
    assert not (tmp_path / "workers").exists()

"""The local launcher: runs a job's worker as processes on this machine, logs kept.

It stands in for Cloud Run Jobs / Vertex AI / GKE with the same contract: start the
worker for one attempt and return a handle, without waiting for it; say how a run
stands; stop it. The stack's worker zygote (`emulators/worker_zygote.py`) forks a
single-host worker with its imports already loaded; without one, it is a plain
`python -m workers.trainer` process. A multi-host job (hosts N > 1) is N plain
processes with the roles of shared/multihost.py (the coordinator on a free local
port), each with its own log, all in one process group, so whatever kills the
group (`fedpipe down`, the reaper, `stop`) kills the whole run.

The handle is `local:pid=<pid>[,<pid>...]:log=<the leader's log>`. Each process's
exit status lands in a small file beside its log (written by the launcher's
reaping thread, or by the zygote's child itself), so `state` can tell a run that
succeeded or failed from one that vanished.

A job asking for an accelerator this machine lacks is refused (LaunchRefused), as a
cloud backend refuses what it cannot run; this is decided from /dev, without JAX.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from emulators.endpoints import Endpoints
from emulators.processes import free_port
from shared.accelerators import Accelerator
from shared.jobs import Job
from shared.launchers import LaunchError, LaunchRefused, RunState
from shared.multihost import HostRole

HANDLE_PREFIX = "local:pid="
STOP_GRACE_S = 2.0  # after SIGTERM, how long a run has before SIGKILL


def worker_pid_file(state_dir: Path, job_id: str, attempt: int) -> Path:
    return state_dir / "workers" / f"{job_id}.{attempt}.pid"


def zygote_socket(state_dir: Path) -> Path:
    """Where `emulators.worker_zygote` (started by the stack) listens."""
    return state_dir / "worker-zygote.sock"


def spawn_from_zygote(socket_path: Path, env: dict[str, str], log_path: Path, timeout_s: float = 30.0, *,
                      exit_path: Path | None = None) -> int | None:
    """A worker forked by the zygote at `socket_path` (it writes its exit status to `exit_path`): its pid,
    or None when there is no zygote or its code is stale (start a plain process then). LaunchError when
    it took the request but did not answer: a worker may exist, so starting another could run the attempt twice."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(str(socket_path))
        except OSError:
            return None
        conn.settimeout(timeout_s)
        request = {"env": env, "log": str(log_path), "exit": str(exit_path) if exit_path else None}
        try:
            conn.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(conn.makefile().readline() or "{}")
        except (OSError, ValueError) as exc:
            raise LaunchError(f"the worker zygote took the request but did not answer: {exc}") from exc
    if reply.get("stale"):
        return None
    if not isinstance(reply.get("pid"), int):
        raise LaunchError(f"the worker zygote could not start the worker: {reply}")
    return reply["pid"]


KEPT_CACHE = "cache"  # the one folder of the state dir a new start keeps (emulators.stack)


def compilation_cache(state_dir: Path) -> dict[str, str | float]:
    """JAX options for a persistent compilation cache that every local worker of the stack shares.

    A federation worker's first round is mostly XLA compiling its evaluation and training
    steps (about 1.7 s of CPU for the demo's MLP, and the nodes of a federation compile at
    once). A worker whose shapes this stack compiled before (a relaunched attempt, the next
    federation over the same data sets) loads them from here instead. Every compile is kept:
    the small ones are the common case locally.
    """
    return {"jax_compilation_cache_dir": str(state_dir / KEPT_CACHE / "jax"), "jax_persistent_cache_min_compile_time_secs": 0.0}


def worker_log_file(state_dir: Path, job_id: str, attempt: int) -> Path:
    """The log of the attempt's worker (of its leader, in a multi-host run)."""
    return state_dir / "logs" / "jobs" / f"{job_id}.{attempt}.log"


def host_log_file(leader_log: Path, process_id: int) -> Path:
    """The log of process `process_id` of a run whose leader logs to `leader_log`: `<job>.<attempt>.host<i>.log`."""
    return leader_log if process_id == 0 else leader_log.with_suffix(f".host{process_id}.log")


def exit_file(log_path: Path) -> Path:
    """Where the exit status of the process that logs to `log_path` is written when it ends."""
    return log_path.with_suffix(".exit")


@dataclass(frozen=True)
class LocalRun:
    """What a local handle names: the run's processes (the leader first) and the leader's log."""

    pids: tuple[int, ...]
    log: Path

    @property
    def handle(self) -> str:
        return f"{HANDLE_PREFIX}{','.join(map(str, self.pids))}:log={self.log}"

    @classmethod
    def parse(cls, execution: str) -> LocalRun:
        """The one reader of local handles; ValueError for anything this launcher did not return."""
        pids, sep, log = execution.removeprefix(HANDLE_PREFIX).partition(":log=")
        if not execution.startswith(HANDLE_PREFIX) or not sep or not log or not all(p.isdigit() for p in pids.split(",")):
            raise ValueError(f"not a local launcher's handle: {execution[:200]!r}")
        return cls(tuple(int(p) for p in pids.split(",")), Path(log))

    def exit_codes(self) -> list[int | None]:
        """Each process's exit status, None where none was recorded (still running, or ended unseen)."""
        codes: list[int | None] = []
        for i in range(len(self.pids)):
            try:
                codes.append(int(exit_file(host_log_file(self.log, i)).read_text()))
            except (FileNotFoundError, ValueError):
                codes.append(None)
        return codes


def _alive(pid: int) -> bool:
    """Whether `pid` exists. A zombie counts: the launcher records a worker's exit status before reaping
    it (`_reap`), so a process that is gone without a status was never going to get one."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as someone else's
    return True


def _outcome(codes: list[int | None]) -> RunState:
    """A run whose processes have all ended: SUCCEEDED when each exited 0, FAILED when one exited otherwise,
    GONE when none failed but some ended without a status recorded."""
    if any(code not in (None, 0) for code in codes):
        return RunState.FAILED
    return RunState.GONE if None in codes else RunState.SUCCEEDED


def missing_accelerator(accelerator: Accelerator, hosts: int, dev: Path = Path("/dev")) -> str | None:
    """Why this machine cannot run a job on `accelerator` (naming what it has), or None when it can.

    Decided from device files, not by asking JAX: the launcher runs in a function that must not load it.
    """
    gpus = sorted(p.name for p in dev.glob("nvidia[0-9]*"))
    tpus = sorted(p.name for p in dev.glob("accel*")) + (["vfio"] if (dev / "vfio").exists() else [])
    has = ", ".join([
        f"{os.cpu_count()} CPUs",
        f"{len(gpus)} NVIDIA GPU(s) ({', '.join(gpus)})" if gpus else "no NVIDIA GPU (no /dev/nvidia0)",
        f"TPU devices ({', '.join(tpus)})" if tpus else "no TPU (no /dev/accel* or /dev/vfio)",
    ])
    if accelerator.kind == "gpu" and len(gpus) < accelerator.count:
        return f"{accelerator} needs {accelerator.count} NVIDIA GPU(s); this machine has {has}"
    if accelerator.kind == "tpu" and not tpus:
        return f"{accelerator} needs a TPU; this machine has {has}"
    if accelerator.kind == "tpu" and hosts > 1:
        return f"{accelerator} is a {hosts}-host slice; the local launcher runs on this one machine ({has})"
    return None


# What a worker must not be handed: the control plane's emulators, the function's own identity and
# settings, and the stand-in key store. A worker reaches Firestore and Pub/Sub only through the node
# API, and its node's key only through the key broker, once attested, as in production.
WITHHELD = (
    "FIRESTORE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "K_SERVICE", "FEDPIPE_LAUNCHER", "THREADS",
    "FEDPIPE_LOCAL_KEYSTORE", "FEDPIPE_SIGNING_KEY",  # its signing key too: released by the key broker to its attested workload
)
WITHHELD_PREFIXES = ("CLOUDSDK_", "FEDPIPE_ID_TOKEN_")


def worker_env(parent: Mapping[str, str], endpoints: Endpoints, job: Job) -> dict[str, str]:
    """The environment of `job`'s worker: the launching function's, less the control plane, plus the
    node API and the metadata endpoint that gives it the ID tokens of the job's node."""
    if job.spec.dataset.node not in endpoints.metadata_ports:
        raise LaunchError(f"node {job.spec.dataset.node} is not one of this local stack's nodes ({', '.join(endpoints.metadata_ports)})")
    env = {k: v for k, v in parent.items() if k not in WITHHELD and not k.startswith(WITHHELD_PREFIXES)}
    return {**env, **endpoints.worker_env(job.spec.dataset.node), "FEDPIPE_JOB_ID": job.id, "FEDPIPE_JOB_ATTEMPT": str(job.attempt)}


class LocalProcessLauncher:
    def __init__(self, state_dir: Path, python: str = sys.executable) -> None:
        self.state_dir = state_dir
        self.python = python

    def launch(self, job: Job) -> str:
        if refusal := missing_accelerator(job.spec.accelerator, job.spec.hosts):
            raise LaunchRefused(f"job {job.id}: {refusal}")
        log_path = worker_log_file(self.state_dir, job.id, job.attempt)
        pid_path = worker_pid_file(self.state_dir, job.id, job.attempt)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        pid_path.parent.mkdir(parents=True, exist_ok=True)
        endpoints = Endpoints.load(self.state_dir)
        env = worker_env(os.environ, endpoints, job)
        env |= {name.upper(): str(value) for name, value in compilation_cache(self.state_dir).items()}  # read as JAX is imported
        module = endpoints.worker_modules.get(job.spec.dataset.node)
        if job.spec.hosts > 1:
            pids = self._start_hosts(env, log_path, job.spec.hosts, module or "workers.trainer")
        elif module is not None:  # the node runs a worker of its own (as a site may, with its own image)
            pids = [self._start_process(env, log_path, module)]
        else:
            zygote = spawn_from_zygote(zygote_socket(self.state_dir), env, log_path, exit_path=exit_file(log_path))
            pids = [zygote or self._start_process(env, log_path)]
        pid_path.write_text(str(pids[0]))  # the run's process group: what `fedpipe down` and the reaper kill
        return LocalRun(tuple(pids), log_path).handle

    def state(self, execution: str) -> RunState:
        """RUNNING while a process of the run lives, then SUCCEEDED or FAILED by their exit statuses;
        GONE when they ended without one recorded (killed while the launcher that reaps them was down)."""
        run = LocalRun.parse(execution)
        codes = run.exit_codes()
        if None not in codes:
            return _outcome(codes)
        if any(_alive(pid) for pid, code in zip(run.pids, codes, strict=True) if code is None):
            return RunState.RUNNING
        return _outcome(run.exit_codes())  # a second look: a status may have landed before its process went

    def stop(self, execution: str) -> None:
        """SIGTERM the run's process groups now, SIGKILL what is left after STOP_GRACE_S (in the background)."""
        run = LocalRun.parse(execution)
        if None not in run.exit_codes():
            return  # over: its pids may be someone else's by now
        if _signal_groups(run.pids, signal.SIGTERM):
            # Not a daemon: a short-lived caller (a CLI) still escalates before its interpreter exits.
            threading.Timer(STOP_GRACE_S, _signal_groups, (run.pids, signal.SIGKILL)).start()

    def _start_process(self, env: dict[str, str], log_path: Path, module: str = "workers.trainer", group: int | None = None) -> int:
        """One worker process logging to `log_path`, in its own session, or in process group `group` (0: a new one)."""
        try:
            with open(log_path, "ab") as log:
                # Its own session: the worker outlives the function's request, and `fedpipe down` stops its group.
                # A multi-host run's processes share one group instead (a session cannot be joined).
                proc = subprocess.Popen(
                    [self.python, "-m", module],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    start_new_session=group is None, process_group=group,
                )
        except OSError as exc:
            raise LaunchError(f"could not start the worker process: {exc}") from exc
        threading.Thread(target=_reap, args=(proc, exit_file(log_path)), daemon=True).start()  # no zombies, and a recorded status
        return proc.pid

    def _start_hosts(self, env: dict[str, str], log_path: Path, hosts: int, module: str) -> list[int]:
        """The processes of a multi-host run, the leader first, all in the leader's process group."""
        coordinator = f"127.0.0.1:{free_port()}"
        pids: list[int] = []
        try:
            for i in range(hosts):
                role = HostRole(coordinator, hosts, i).env()
                pids.append(self._start_process(env | role, host_log_file(log_path, i), module, group=pids[0] if pids else 0))
        except LaunchError as exc:
            leader_gone = bool(pids) and not _alive(pids[0])  # its group ended with it, so no process could join it
            _signal_groups(pids[:1], signal.SIGKILL)  # no half-started run: its processes would wait for the rest
            if leader_gone:
                raise LaunchError(f"the run's leader exited before process {len(pids)} started (its log: {log_path})") from exc
            raise
        return pids


def _reap(proc: subprocess.Popen, exit_path: Path) -> None:
    """Record how the process ended (a signal as its negative) while it is still a zombie, then reap it:
    whoever sees it gone (`_alive`) finds its status written."""
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    exit_path.write_text(str(info.si_status if info.si_code == os.CLD_EXITED else -info.si_status))
    proc.wait()


def _signal_groups(pids: tuple[int, ...] | list[int], sig: signal.Signals) -> bool:
    """Send `sig` to the process group of each pid that leads one; whether any group was still there."""
    reached = False
    for pid in pids:
        try:
            os.killpg(pid, sig)
            reached = True
        except (ProcessLookupError, PermissionError):
            pass  # gone, or not a group of its own (a follower of a multi-host run, in the leader's group)
    return reached

"""The local launcher: runs a job's worker as a process on this machine, logs kept.

It stands in for Cloud Run Jobs / Vertex AI / GKE with the same contract: start the
worker for one attempt and return a handle, without waiting for it. The stack's
worker zygote (`emulators/worker_zygote.py`) forks it with its imports already
loaded; without one, it is a plain `python -m workers.trainer` process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from emulators.endpoints import Endpoints
from emulators.provision import node_key_file
from shared import signing
from shared.jobs import Job
from shared.launchers import LaunchError


def worker_pid_file(state_dir: Path, job_id: str, attempt: int) -> Path:
    return state_dir / "workers" / f"{job_id}.{attempt}.pid"


def zygote_socket(state_dir: Path) -> Path:
    """Where `emulators.worker_zygote` (started by the stack) listens."""
    return state_dir / "worker-zygote.sock"


def spawn_from_zygote(socket_path: Path, env: dict[str, str], log_path: Path, timeout_s: float = 30.0) -> int | None:
    """A worker forked by the zygote at `socket_path`: its pid, or None when there is no zygote or its
    code is stale (start a plain process then). LaunchError when it took the request but did not
    answer: a worker may exist, so starting another could run the attempt twice."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(str(socket_path))
        except OSError:
            return None
        conn.settimeout(timeout_s)
        try:
            conn.sendall(json.dumps({"env": env, "log": str(log_path)}).encode() + b"\n")
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
    return state_dir / "logs" / "jobs" / f"{job_id}.{attempt}.log"


# What a worker must not be handed: the control plane's emulators, the function's own identity and
# settings, and the stand-in key store. A worker reaches Firestore and Pub/Sub only through the node
# API, and its node's key only through the key broker, once attested, as in production.
WITHHELD = (
    "FIRESTORE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "K_SERVICE", "FEDPIPE_LAUNCHER", "THREADS",
    "FEDPIPE_LOCAL_KEYSTORE",
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
        log_path = worker_log_file(self.state_dir, job.id, job.attempt)
        pid_path = worker_pid_file(self.state_dir, job.id, job.attempt)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        pid_path.parent.mkdir(parents=True, exist_ok=True)
        endpoints = Endpoints.load(self.state_dir)
        env = worker_env(os.environ, endpoints, job)
        env |= {name.upper(): str(value) for name, value in compilation_cache(self.state_dir).items()}  # read as JAX is imported
        key = node_key_file(self.state_dir, job.spec.dataset.node)
        if key.exists():
            env[signing.ENV_VAR] = str(key)  # the node's own key: the hub admits only updates it signed
        module = endpoints.worker_modules.get(job.spec.dataset.node)
        if module is not None:  # the node runs a worker of its own (as a site may, with its own image)
            pid = self._start_process(env, log_path, module)
        else:
            pid = spawn_from_zygote(zygote_socket(self.state_dir), env, log_path) or self._start_process(env, log_path)
        pid_path.write_text(str(pid))
        return f"local:pid={pid}:log={log_path}"

    def _start_process(self, env: dict[str, str], log_path: Path, module: str = "workers.trainer") -> int:
        try:
            with open(log_path, "ab") as log:
                # Its own session: the worker outlives the function's request, and `fedpipe down` stops its group.
                proc = subprocess.Popen(
                    [self.python, "-m", module],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                )
        except OSError as exc:
            raise LaunchError(f"could not start the worker process: {exc}") from exc
        threading.Thread(target=proc.wait, daemon=True).start()  # reap it when it exits: no zombies
        return proc.pid

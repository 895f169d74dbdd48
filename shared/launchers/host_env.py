"""A multi-host run's roles as Cloud Batch and Vertex AI state them, passed on under shared/multihost.py's names.

GKE can put the coordinator and the process index into the worker's environment itself
(gke.py); Batch and Vertex AI give them in their own forms, known only on the VM. So a
multi-host run there starts this module instead of the trainer (the launcher sets the
container's command: `python -m shared.launchers.host_env batch|vertex`); it maps the
engine's values to FEDPIPE_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID and
replaces itself with the trainer, the image's own entry point. The mapping is pure and
tested; this module imports nothing of the cloud.

- Batch (a task group with `require_hosts_file`): BATCH_TASK_INDEX and BATCH_TASK_COUNT,
  and BATCH_HOSTS_FILE, one VM per line in task order; task 0's VM is the coordinator.
- Vertex AI (one worker pool of `hosts` replicas): CLUSTER_SPEC, JSON
  `{"cluster": {"workerpool0": ["host:port", ...]}, "task": {"type": "workerpool0", "index": i}}`;
  replica 0 is the coordinator.

The coordinator listens on COORDINATOR_PORT, not on the port the engine names (Vertex's
is its own frameworks').
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from shared.jobs import MAX_HOSTS
from shared.multihost import COORDINATOR_PORT, HostRole

TRAINER = ("-m", "workers.trainer")  # the worker images' entry point: python -m workers.trainer
COMMAND = {  # the container command a launcher sets for a multi-host run on each engine
    "batch": ["python", "-m", "shared.launchers.host_env", "batch"],
    "vertex": ["python", "-m", "shared.launchers.host_env", "vertex"],
}


def _role(hosts: Sequence[str], index: int, count: int) -> HostRole:
    if not 2 <= count <= MAX_HOSTS or len(hosts) != count or not 0 <= index < count:
        raise ValueError(f"process {index} of {count} on {len(hosts)} hosts: expected 0 <= index < count = hosts <= {MAX_HOSTS}")
    return HostRole(coordinator=f"{hosts[0]}:{COORDINATOR_PORT}", num_processes=count, process_id=index)


def batch_role(env: Mapping[str, str], hosts_file: str) -> HostRole:
    """The role of a Batch task, from its environment and the text of its hosts file."""
    hosts = [line.split()[0] for line in hosts_file.splitlines() if line.strip()]
    try:
        index, count = int(env["BATCH_TASK_INDEX"]), int(env["BATCH_TASK_COUNT"])
    except (KeyError, ValueError):
        raise ValueError("BATCH_TASK_INDEX and BATCH_TASK_COUNT must be whole numbers") from None
    return _role(hosts, index, count)


def vertex_role(env: Mapping[str, str]) -> HostRole:
    """The role of a Vertex AI replica, from its CLUSTER_SPEC."""
    try:
        spec = json.loads(env["CLUSTER_SPEC"])
        pool = spec["cluster"]["workerpool0"]
        index = int(spec["task"]["index"])
        hosts = [address.rsplit(":", 1)[0] for address in pool]
    except (KeyError, ValueError, TypeError, AttributeError):
        raise ValueError("CLUSTER_SPEC must be JSON with cluster.workerpool0 (host:port list) and task.index") from None
    return _role(hosts, index, len(hosts))


def main(argv: Sequence[str]) -> None:
    engine = argv[0] if argv else ""
    if engine == "batch":
        role = batch_role(os.environ, Path(os.environ.get("BATCH_HOSTS_FILE", "/dev/null")).read_text())
    elif engine == "vertex":
        role = vertex_role(os.environ)
    else:
        raise SystemExit(f"usage: python -m shared.launchers.host_env {'|'.join(COMMAND)}")
    os.execve(sys.executable, [sys.executable, *TRAINER], {**os.environ, **role.env()})


if __name__ == "__main__":
    main(sys.argv[1:])

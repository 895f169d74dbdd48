"""A multi-host run's roles, as every launcher hands them to its worker processes.

Each backend knows the coordinator and the process index in its own way (a GKE JobSet's
completion index and headless service, Cloud Batch's task index and main node, a TPU
slice's metadata, the local launcher's ports); it passes them on under these names, so
the worker has one way to read them and call `jax.distributed.initialize`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.jobs import MAX_HOSTS

ENV_COORDINATOR = "FEDPIPE_COORDINATOR_ADDRESS"  # host:port of process 0's coordination service
ENV_NUM_PROCESSES = "FEDPIPE_NUM_PROCESSES"
ENV_PROCESS_ID = "FEDPIPE_PROCESS_ID"
COORDINATOR_PORT = 8476  # the port process 0 listens on where the backend picks the host (JAX's own default)


@dataclass(frozen=True)
class HostRole:
    coordinator: str
    num_processes: int
    process_id: int

    @property
    def is_leader(self) -> bool:
        """Process 0 speaks for the run: it reports to the node API and writes checkpoints and results."""
        return self.process_id == 0

    def env(self) -> dict[str, str]:
        return {ENV_COORDINATOR: self.coordinator, ENV_NUM_PROCESSES: str(self.num_processes), ENV_PROCESS_ID: str(self.process_id)}


def role_from_env(env: Mapping[str, str]) -> HostRole | None:
    """This process's role, or None for a single-host run; ValueError when the launcher's values are inconsistent."""
    if ENV_NUM_PROCESSES not in env:
        return None
    try:
        count, index = int(env[ENV_NUM_PROCESSES]), int(env.get(ENV_PROCESS_ID, ""))
    except ValueError:
        raise ValueError(f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must be whole numbers") from None
    coordinator = env.get(ENV_COORDINATOR, "")
    if not 1 <= count <= MAX_HOSTS or not 0 <= index < count:
        raise ValueError(f"process {index} of {count}: expected 0 <= id < count <= {MAX_HOSTS}")
    if ":" not in coordinator:
        raise ValueError(f"{ENV_COORDINATOR} must be host:port")
    return None if count == 1 else HostRole(coordinator, count, index)

"""A multi-host run's process group: JAX's distributed runtime, and what the leader tells the others.

With a role from the launcher (shared/multihost.py) every process joins the run before
JAX touches a device; `jax.devices()` is then every process's devices, and the Trainer's
mesh spans them all (gradients reduce across hosts). Only the leader talks to the node
API, so what it learns there (the job, its data set, the checkpoint to resume from)
reaches the others through `share`, and every epoch ends with a `verdict` all processes
take together: a stop (lease lost, attestation withdrawn) stops all of them after the
same epoch instead of leaving some waiting in a collective.

Nobody waits forever for a process that died: the coordinator (in the leader) declares
a process that stopped sending heartbeats dead after HEARTBEAT_TIMEOUT_S and terminates
the others, whatever collective they wait in (a collective may also fail sooner, when
Gloo sees the dead peer's connection close). The leader's own lease then lapses, and
the job's next attempt resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import multihost_utils

from shared.multihost import HostRole

log = logging.getLogger("fedpipe.worker.distributed")

INIT_TIMEOUT_S = 120  # every process must join within this, or initialisation fails
HEARTBEAT_TIMEOUT_S = 30  # a process silent this long is dead: the coordinator stops the group
SHUTDOWN_TIMEOUT_S = 30  # how long a finished process waits at exit for the others to finish
MAX_SHARED_BYTES = 2**31 - 1  # what one `share` can carry (its length travels as an int32)


@dataclass(frozen=True)
class Group:
    """This process's place in the run; `role` None is a single-host run, where every call is local."""

    role: HostRole | None = None

    @property
    def is_leader(self) -> bool:
        return self.role is None or self.role.is_leader

    @property
    def size(self) -> int:
        return 1 if self.role is None else self.role.num_processes

    def share(self, payload: bytes | None) -> bytes:
        """The leader's `payload`, on every process (the others pass None). A collective: all must call it."""
        if self.role is None:
            return payload or b""
        if self.is_leader and (payload is None or len(payload) > MAX_SHARED_BYTES):
            raise ValueError(f"the leader shares 0..{MAX_SHARED_BYTES} bytes, not {None if payload is None else len(payload)}")
        data = np.frombuffer(payload, np.uint8) if self.is_leader else None
        size = int(multihost_utils.broadcast_one_to_all(np.int32(0 if data is None else data.size)))
        if size == 0:
            return b""
        return bytes(multihost_utils.broadcast_one_to_all(data if data is not None else np.zeros(size, np.uint8)))

    def verdict(self, code: int) -> int:
        """The largest `code` any process gives (0 = go on). A collective: all must call it, each epoch."""
        if self.role is None:
            return code
        return int(np.max(multihost_utils.process_allgather(np.int32(code))))


def join(role: HostRole | None, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> Group:
    """Join the run `role` names (call before any other JAX use); no role: a single-host group."""
    if role is None:
        return Group()
    # Collectives between CPU processes need an implementation (Gloo, over TCP); TPUs and GPUs bring their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        role.coordinator, role.num_processes, role.process_id,
        initialization_timeout=INIT_TIMEOUT_S, heartbeat_timeout_seconds=heartbeat_timeout_s, shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
    )
    log.info("process %d of %d joined the run at %s: %d devices in all", role.process_id, role.num_processes, role.coordinator, jax.device_count())
    return Group(role)

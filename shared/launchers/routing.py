"""Which Google Cloud engine runs a job, from what it runs on: a pure table, and the launcher that follows it.

    cpu, or Cloud Run's GPU (one L4), on one host  -> Cloud Run Jobs
    tpu (any slice)                                -> FEDPIPE_TPU_BACKEND: gke (default) | vertex
    any other GPU, and every multi-host run        -> FEDPIPE_GPU_BACKEND: gke (default) | batch | vertex

`RoutingLauncher` (FEDPIPE_LAUNCHER=cloud) launches on the engine the table names and
prefixes the engine's handle with its name (`gke:...`, `cloud-run:...`), so `state` and
`stop` reach the engine that made it, whatever the table says by then. Each engine's
launcher is built on first use: a deployment without GKE runs its Cloud Run jobs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from shared.accelerators import DEFAULT_GPU, Accelerator
from shared.jobs import Job
from shared.launchers import Launcher, LaunchError, LaunchRefused, RunState

CLOUD_RUN_GPU = Accelerator("gpu", DEFAULT_GPU, 1)  # the GPU a Cloud Run job can carry

ENV_TPU_BACKEND = "FEDPIPE_TPU_BACKEND"
ENV_GPU_BACKEND = "FEDPIPE_GPU_BACKEND"


class Backend(StrEnum):
    CLOUD_RUN = "cloud-run"
    GKE = "gke"
    VERTEX = "vertex"
    BATCH = "batch"


TPU_BACKENDS = (Backend.GKE, Backend.VERTEX)
GPU_BACKENDS = (Backend.GKE, Backend.BATCH, Backend.VERTEX)


def runs_on_cloud_run(accelerator: Accelerator, hosts: int) -> bool:
    """Cloud Run Jobs runs one host's CPU or one L4: its tasks cannot reach each other."""
    return hosts == 1 and (accelerator.kind == "cpu" or accelerator == CLOUD_RUN_GPU)


@dataclass(frozen=True)
class RoutingPolicy:
    """The two choices a deployment makes: where TPU slices run, and where other GPUs and multi-host runs run."""

    tpu: Backend = Backend.GKE
    gpu: Backend = Backend.GKE

    def __post_init__(self) -> None:
        if self.tpu not in TPU_BACKENDS:
            raise ValueError(f"{ENV_TPU_BACKEND}={self.tpu}: TPUs run on {' or '.join(TPU_BACKENDS)}")
        if self.gpu not in GPU_BACKENDS:
            raise ValueError(f"{ENV_GPU_BACKEND}={self.gpu}: GPUs and multi-host runs go to {', '.join(GPU_BACKENDS)}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RoutingPolicy:
        def backend(name: str) -> Backend:
            value = env.get(name) or Backend.GKE.value
            try:
                return Backend(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: expected one of {', '.join(Backend)}") from None

        return cls(tpu=backend(ENV_TPU_BACKEND), gpu=backend(ENV_GPU_BACKEND))


def route(accelerator: Accelerator, hosts: int, policy: RoutingPolicy) -> Backend:
    """The engine that runs `hosts` workers on `accelerator` each."""
    if accelerator.kind == "tpu":
        return policy.tpu
    if runs_on_cloud_run(accelerator, hosts):
        return Backend.CLOUD_RUN
    return policy.gpu


def split_handle(execution: str) -> tuple[Backend, str]:
    """(engine, its own handle) of a handle `RoutingLauncher.launch` returned."""
    prefix, sep, inner = execution.partition(":")
    if not sep or prefix not in Backend.__members__.values():
        raise LaunchError(f"{execution!r} is not a handle of the cloud launcher (<{'|'.join(Backend)}>:<handle>)")
    return Backend(prefix), inner


class RoutingLauncher:
    """Implements `shared.launchers.Launcher` by handing each job to the engine `route` names."""

    def __init__(self, policy: RoutingPolicy, factories: Mapping[Backend, Callable[[], Launcher]]) -> None:
        self.policy = policy
        self._factories = dict(factories)
        self._launchers: dict[Backend, Launcher] = {}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RoutingLauncher:
        env = dict(os.environ if env is None else env)
        return cls(RoutingPolicy.from_env(env), engine_factories(env))

    def launcher(self, backend: Backend) -> Launcher:
        if backend not in self._launchers:
            if backend not in self._factories:
                raise LaunchRefused(f"the {backend} engine is not configured here")
            try:
                self._launchers[backend] = self._factories[backend]()
            except ValueError as exc:  # its configuration is missing or wrong: no job can run there until it is fixed
                raise LaunchRefused(f"the {backend} engine is not configured: {exc}") from exc
        return self._launchers[backend]

    def launch(self, job: Job) -> str:
        backend = route(job.spec.accelerator, job.spec.hosts, self.policy)
        return f"{backend}:{self.launcher(backend).launch(job)}"

    def state(self, execution: str) -> RunState:
        backend, inner = split_handle(execution)
        return self.launcher(backend).state(inner)

    def stop(self, execution: str) -> None:
        backend, inner = split_handle(execution)
        self.launcher(backend).stop(inner)


def engine_factories(env: Mapping[str, str]) -> dict[Backend, Callable[[], Launcher]]:
    """Each engine's launcher from the environment, its client library imported only when it is built."""

    def cloud_run() -> Launcher:
        from shared.launchers.cloud_run import CloudRunJobsLauncher

        return CloudRunJobsLauncher.from_env(env)

    def gke() -> Launcher:
        from shared.launchers.gke import GkeLauncher

        return GkeLauncher.from_env(env)

    def vertex() -> Launcher:
        from shared.launchers.vertex import VertexLauncher

        return VertexLauncher.from_env(env)

    def batch() -> Launcher:
        from shared.launchers.batch_gpu import BatchLauncher

        return BatchLauncher.from_env(env)

    return {Backend.CLOUD_RUN: cloud_run, Backend.GKE: gke, Backend.VERTEX: vertex, Backend.BATCH: batch}

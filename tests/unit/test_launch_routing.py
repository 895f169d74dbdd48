"""shared/launchers/routing.py and select.py: which engine runs a job, and handles that find their way back."""

from __future__ import annotations

import importlib
from datetime import UTC, datetime

import pytest

from shared.accelerators import parse
from shared.jobs import DatasetRef, Job, JobSpec
from shared.launchers import LaunchError, LaunchRefused, RunState
from shared.launchers.routing import Backend, RoutingLauncher, RoutingPolicy, route, split_handle
from shared.launchers.select import launcher_from_env
from tests.unit.queue_fakes import RecordingLauncher

pytestmark = pytest.mark.unit

B = Backend
CASES = [
    ("cpu", 1), ("gpu", 1), ("gpu:nvidia-l4:2", 1), ("gpu:nvidia-h100-80gb:8", 1), ("cpu", 4), ("gpu", 2),
    ("tpu:v5e:2x4", 1), ("tpu:v6e:4x4", 4), ("tpu:v5p:2x2x4", 4),
]


def table(policy: RoutingPolicy) -> dict[tuple[str, int], Backend]:
    return {(acc, hosts): route(parse(acc), hosts, policy) for acc, hosts in CASES}


def test_the_default_routing_table():
    assert table(RoutingPolicy()) == {
        ("cpu", 1): B.CLOUD_RUN, ("gpu", 1): B.CLOUD_RUN,  # Cloud Run's own: one host, CPU or one L4
        ("gpu:nvidia-l4:2", 1): B.GKE, ("gpu:nvidia-h100-80gb:8", 1): B.GKE,  # GPUs Cloud Run lacks
        ("cpu", 4): B.GKE, ("gpu", 2): B.GKE,  # multi-host
        ("tpu:v5e:2x4", 1): B.GKE, ("tpu:v6e:4x4", 4): B.GKE, ("tpu:v5p:2x2x4", 4): B.GKE,
    }


def test_the_routing_table_with_vertex_for_tpus_and_batch_for_gpus():
    assert table(RoutingPolicy(tpu=B.VERTEX, gpu=B.BATCH)) == {
        ("cpu", 1): B.CLOUD_RUN, ("gpu", 1): B.CLOUD_RUN,
        ("gpu:nvidia-l4:2", 1): B.BATCH, ("gpu:nvidia-h100-80gb:8", 1): B.BATCH,
        ("cpu", 4): B.BATCH, ("gpu", 2): B.BATCH,
        ("tpu:v5e:2x4", 1): B.VERTEX, ("tpu:v6e:4x4", 4): B.VERTEX, ("tpu:v5p:2x2x4", 4): B.VERTEX,
    }


def test_the_policy_comes_from_the_environment_and_refuses_engines_that_cannot_serve():
    assert RoutingPolicy.from_env({}) == RoutingPolicy(B.GKE, B.GKE)
    assert RoutingPolicy.from_env({"FEDPIPE_TPU_BACKEND": "vertex", "FEDPIPE_GPU_BACKEND": "batch"}) == RoutingPolicy(B.VERTEX, B.BATCH)
    with pytest.raises(ValueError, match="TPUs run on gke or vertex"):
        RoutingPolicy.from_env({"FEDPIPE_TPU_BACKEND": "batch"})
    with pytest.raises(ValueError, match="GPUs and multi-host runs go to gke, batch, vertex"):
        RoutingPolicy.from_env({"FEDPIPE_GPU_BACKEND": "cloud-run"})
    with pytest.raises(ValueError, match="FEDPIPE_GPU_BACKEND='k8s'"):
        RoutingPolicy.from_env({"FEDPIPE_GPU_BACKEND": "k8s"})


def make_job(accelerator: str, hosts: int = 1) -> Job:
    spec = JobSpec(dataset=DatasetRef(node="us", dataset="iris"), accelerator=accelerator, hosts=hosts)
    return Job.new("j", spec, datetime(2025, 1, 2, tzinfo=UTC))


def test_handles_say_which_engine_made_them_and_state_and_stop_go_back_to_it():
    engines = {b: RecordingLauncher({"fake:j/1": RunState.RUNNING}) for b in (B.CLOUD_RUN, B.GKE)}
    built = []
    router = RoutingLauncher(RoutingPolicy(), {b: (lambda b=b: built.append(b) or engines[b]) for b in engines})

    assert router.launch(make_job("cpu")) == "cloud-run:fake:j/1"
    handle = router.launch(make_job("tpu:v5e:4x4"))
    assert handle == "gke:fake:j/1"
    assert router.state(handle) is RunState.RUNNING
    router.stop(handle)
    assert engines[B.GKE].asked == ["fake:j/1"] and engines[B.GKE].stopped == ["fake:j/1"]
    assert engines[B.CLOUD_RUN].asked == [] and engines[B.CLOUD_RUN].stopped == []
    assert built == [B.CLOUD_RUN, B.GKE]  # each engine built once, on first use
    assert split_handle("cloud-run:projects/p/locations/r/jobs/w/executions/e") == (B.CLOUD_RUN, "projects/p/locations/r/jobs/w/executions/e")


def test_an_engine_without_configuration_refuses_for_good_and_a_foreign_handle_is_an_error():
    def unconfigured():
        raise ValueError("FEDPIPE_GKE_CLUSTERS is not set")

    router = RoutingLauncher(RoutingPolicy(), {B.GKE: unconfigured})
    with pytest.raises(LaunchRefused, match="the gke engine is not configured: FEDPIPE_GKE_CLUSTERS is not set"):
        router.launch(make_job("tpu:v5e:2x2"))
    with pytest.raises(LaunchRefused, match="the cloud-run engine is not configured here"):
        router.launch(make_job("cpu"))
    for foreign in ("local:pid=12:log=/tmp/x", "projects/p/zones/z/instances/i", ""):
        with pytest.raises(LaunchError, match="not a handle of the cloud launcher"):
            router.state(foreign)


@pytest.mark.parametrize(("kind", "module", "name"), [
    ("cloud", "shared.launchers.routing", "RoutingLauncher"),
    ("cloud-run", "shared.launchers.cloud_run", "CloudRunJobsLauncher"),
    ("gke", "shared.launchers.gke", "GkeLauncher"),
    ("vertex", "shared.launchers.vertex", "VertexLauncher"),
    ("batch", "shared.launchers.batch_gpu", "BatchLauncher"),
])
def test_each_launcher_is_selected_by_name(kind, module, name, monkeypatch):
    launcher_class = getattr(importlib.import_module(module), name)
    monkeypatch.setattr(launcher_class, "from_env", classmethod(lambda cls, env=None: ("built", name, env["FEDPIPE_LAUNCHER"])))
    assert launcher_from_env({"FEDPIPE_LAUNCHER": kind}) == ("built", name, kind)


def test_the_cloud_launcher_builds_from_the_environment_without_credentials():
    router = launcher_from_env({"FEDPIPE_LAUNCHER": "cloud", "FEDPIPE_TPU_BACKEND": "vertex"})
    assert isinstance(router, RoutingLauncher) and router.policy == RoutingPolicy(tpu=B.VERTEX)

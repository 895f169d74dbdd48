"""shared/launchers/host_env.py: Batch's and Vertex AI's multi-host roles under shared/multihost.py's names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.launchers.host_env import batch_role, vertex_role
from shared.multihost import HostRole, role_from_env

pytestmark = pytest.mark.unit

HOSTS = "10.0.0.7 fedpipe-batch-j-a1-0\n10.0.0.9 fedpipe-batch-j-a1-1\n\n10.0.0.4 fedpipe-batch-j-a1-2\n"


def test_a_batch_task_is_its_task_index_and_task_0s_vm_coordinates():
    role = batch_role({"BATCH_TASK_INDEX": "2", "BATCH_TASK_COUNT": "3"}, HOSTS)
    assert role == HostRole(coordinator="10.0.0.7:8476", num_processes=3, process_id=2)
    assert role_from_env(role.env()) == role  # what the worker reads back


def test_a_vertex_replica_is_its_task_index_and_replica_0_coordinates():
    spec = {"cluster": {"workerpool0": ["cmle-training-workerpool0-ab-0:2222", "cmle-training-workerpool0-ab-1:2222"]},
            "task": {"type": "workerpool0", "index": 1}}
    role = vertex_role({"CLUSTER_SPEC": json.dumps(spec)})
    assert role == HostRole(coordinator="cmle-training-workerpool0-ab-0:8476", num_processes=2, process_id=1)


@pytest.mark.parametrize(
    ("env", "hosts"),
    [
        ({"BATCH_TASK_INDEX": "3", "BATCH_TASK_COUNT": "3"}, HOSTS),  # index out of range
        ({"BATCH_TASK_INDEX": "0", "BATCH_TASK_COUNT": "4"}, HOSTS),  # the hosts file lists 3
        ({"BATCH_TASK_INDEX": "x", "BATCH_TASK_COUNT": "3"}, HOSTS),
        ({"BATCH_TASK_COUNT": "3"}, HOSTS),
        ({"BATCH_TASK_INDEX": "0", "BATCH_TASK_COUNT": "1"}, "10.0.0.7\n"),  # one host is no multi-host run
    ],
)
def test_inconsistent_batch_values_are_refused(env, hosts):
    with pytest.raises(ValueError):
        batch_role(env, hosts)


@pytest.mark.parametrize("spec", ["not json", "{}", json.dumps({"cluster": {"workerpool0": ["a:1", "b:1"]}, "task": {"index": 2}})])
def test_inconsistent_vertex_values_are_refused(spec):
    with pytest.raises(ValueError):
        vertex_role({"CLUSTER_SPEC": spec})


def test_the_entry_point_names_its_engines():
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "shared.launchers.host_env", "k8s"], capture_output=True, text=True, cwd=repo)
    assert out.returncode != 0 and "batch|vertex" in out.stderr

"""The CLI as a user runs it: a separate process, against the running local cloud."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.datasets import SPEC_OBJECT
from tests.conftest import wait_for
from tests.emulator.helpers import delivered, deliveries, job_of_dataset, upload_digits, wait_job

pytestmark = pytest.mark.emulator
FEDPIPE = str(Path(sys.executable).parent / "fedpipe")


def fedpipe(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FEDPIPE, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "250", **(env or {})}
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_prints_the_endpoints_and_down_leaves_no_process(tmp_path):
    state = tmp_path / "stack"
    env = {**os.environ, "FEDPIPE_STATE_DIR": str(state), "COLUMNS": "250"}
    up = subprocess.Popen([FEDPIPE, "up", "--no-reload"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        stack = wait_for(lambda: (state / "stack.json").exists() and json.loads((state / "stack.json").read_text()), 90, "fedpipe up")
        pids = list(stack["pids"].values())
        assert all(alive(p) for p in pids)
        down = fedpipe("down", env={"FEDPIPE_STATE_DIR": str(state)})
        assert down.returncode == 0, down.stderr
        output, _ = up.communicate(timeout=30)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 0
    assert f"export STORAGE_EMULATOR_HOST=http://127.0.0.1:{stack['gcs_port']}" in output
    assert f"export CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB=http://127.0.0.1:{stack['pubsub_port']}/" in output
    assert "gs://fedpipe-local-us-raw" in output
    wait_for(lambda: not any(alive(p) for p in pids), 10, "every child of the stack to exit")
    assert not (state / "stack.json").exists()


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud CLI not installed")
def test_gcloud_storage_cp_sets_off_the_chain(cloud, clients, tmp_path):
    exports = fedpipe("env")
    assert exports.returncode == 0, exports.stderr
    env = dict(line.removeprefix("export ").split("=", 1) for line in exports.stdout.splitlines())
    spec = {"features": ["a", "b"], "label": "y", "num_classes": 2, "expected_files": ["data.csv"], "train": {"epochs": 3}}
    (tmp_path / SPEC_OBJECT).write_text(json.dumps(spec))
    (tmp_path / "data.csv").write_text("a,b,y\n" + "".join(f"{i},{i * 3 % 5},{i % 2}\n" for i in range(30)))
    for name in (SPEC_OBJECT, "data.csv"):
        cp = subprocess.run(
            ["gcloud", "storage", "cp", str(tmp_path / name), f"gs://{clients.settings.raw_bucket('us')}/gcloud/{name}"],
            capture_output=True, text=True, env={**os.environ, **env}, timeout=120,
        )
        assert cp.returncode == 0, cp.stderr
    job = wait_job(clients, job_of_dataset(clients, "gcloud"), {"completed", "failed"})
    assert job.status == "completed"
    assert job.results["train_examples"] + job.results["test_examples"] == 30


def test_submit_watch_list_show(cloud, clients):
    upload_digits(clients, "cli", parts=1)
    job_of_dataset(clients, "cli")

    bad = fedpipe("submit", "--node", "us", "--dataset", "cli", "--epochs", "0")
    assert bad.returncode == 1
    assert "invalid job" in bad.stderr and "epochs" in bad.stderr
    missing = fedpipe("submit", "--node", "us", "--dataset", "nope")
    assert missing.returncode == 1 and "not complete" in missing.stderr

    run = fedpipe("submit", "--node", "us", "--dataset", "cli", "--epochs", "5", "--job-id", "cli-manual", "--watch")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "submitted cli-manual" in run.stdout and "completed" in run.stdout
    assert fedpipe("submit", "--node", "us", "--dataset", "cli", "--job-id", "cli-manual").returncode == 1  # no duplicate ids

    listed = fedpipe("jobs", "list", "--limit", "50")
    assert "cli-manual" in listed.stdout
    as_json = json.loads(fedpipe("jobs", "list", "--limit", "50", "--json").stdout)
    assert {j["id"]: j["status"] for j in as_json}["cli-manual"] == "completed"
    # On an 80-column terminal every id is whole, ready to copy into `jobs show`.
    narrow = fedpipe("jobs", "list", "--limit", "50", env={"COLUMNS": "80"}).stdout
    assert all(j["id"] in narrow for j in as_json)
    shown = json.loads(fedpipe("jobs", "show", "cli-manual", "--json").stdout)
    assert shown["status"] == "completed" and shown["spec"]["train"]["epochs"] == 5
    assert fedpipe("jobs", "show", "no-such-job").returncode == 1


def test_quarantine_and_events_commands(cloud, clients):
    upload_digits(clients, "cli-events", parts=1)
    job_of_dataset(clients, "cli-events")
    clients.gcs.bucket(clients.settings.raw_bucket("us")).blob("cli-events/stray.txt").upload_from_string(b"hello")
    wait_for(lambda: "cli-events/stray.txt" in fedpipe("quarantine").stdout, 30, "the stray file in `fedpipe quarantine`")
    assert "unexpected_file" in fedpipe("quarantine").stdout

    tail = fedpipe("events", "tail", "--limit", "200")
    assert tail.returncode == 0 and "objects/cli-events/_dataset.json" in tail.stdout

    [record] = delivered(clients, lambda r: r["subject"] == f"objects/cli-events/{SPEC_OBJECT}", 1)
    replay = fedpipe("events", "replay", record["event_id"])
    assert replay.returncode == 0, replay.stderr
    assert f"replaying {record['event_id']} to on_raw_upload" in replay.stdout
    wait_for(
        lambda: [r for r in deliveries(clients, lambda r: r["event_id"] == record["event_id"]) if r["updated_at"] > record["updated_at"]],
        30, "the replayed delivery",
    )
    time.sleep(0.5)
    assert fedpipe("events", "replay", "no-such-event").returncode == 1


def test_cancel_stops_a_running_worker(cloud, clients):
    from emulators.launcher import worker_pid_file

    upload_digits(clients, "cli-cancel", parts=1)
    job_of_dataset(clients, "cli-cancel")
    submitted = fedpipe("submit", "--node", "us", "--dataset", "cli-cancel", "--epochs", "5000", "--job-id", "cli-cancel-long")
    assert submitted.returncode == 0, submitted.stderr
    job = wait_for(lambda: (j := wait_job(clients, "cli-cancel-long", {"running"})) and j.progress.get("epoch", 0) >= 1 and j, 60, "training")
    pid = int(worker_pid_file(Path(cloud.endpoints.state_dir), job.id, 1).read_text())

    cancelled = fedpipe("jobs", "cancel", "cli-cancel-long")
    assert cancelled.returncode == 0 and "cancelled cli-cancel-long" in cancelled.stdout
    wait_for(lambda: not alive(pid), 30, "the worker to stop at its next heartbeat")
    final = wait_job(clients, "cli-cancel-long", {"cancelled", "completed", "failed"})
    assert final.status == "cancelled" and not final.results
    assert fedpipe("jobs", "cancel", "cli-cancel-long").returncode == 1  # already ended


def test_nodes_register_and_list(cloud, clients):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared.signing import public_key_b64

    key = public_key_b64(Ed25519PrivateKey.generate().public_key())
    done = fedpipe("nodes", "register", "lab-3", "--public-key", key)
    assert done.returncode == 0, done.stderr
    assert clients.db.collection("nodes").document("lab-3").get().get("public_key") == key
    listed = fedpipe("nodes", "list")
    assert "lab-3" in listed.stdout and key in listed.stdout and "us" in listed.stdout  # the local stack registered its own nodes

    short = fedpipe("nodes", "register", "lab-4", "--public-key", "AAAA")
    assert short.returncode == 1 and "an Ed25519 public key has 32 bytes, this one 3" in short.stderr
    both = fedpipe("nodes", "register", "lab-4", "--public-key", key, "--kms", "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1")
    assert both.returncode == 1 and "at most one of --public-key and --kms" in both.stderr
    neither = fedpipe("nodes", "register", "lab-4")
    assert neither.returncode == 1 and "give --identity, and --public-key or --kms" in neither.stderr
    slash = fedpipe("nodes", "register", "lab/4", "--public-key", key)
    assert slash.returncode == 1 and "node names are letters, digits" in slash.stderr
    assert not clients.db.collection("nodes").document("lab-4").get().exists

    # The identity its workers run as: the node API answers that identity's tokens as lab-3.
    done = fedpipe("nodes", "register", "lab-3", "--identity", "Worker-Lab3@p.iam.gserviceaccount.com")
    assert done.returncode == 0, done.stderr
    assert clients.db.collection("nodes").document("lab-3").get().get("identity") == "worker-lab3@p.iam.gserviceaccount.com"
    assert clients.db.collection("nodes").document("lab-3").get().get("public_key") == key  # kept
    assert "worker-lab3@p.iam.gserviceaccount.com" in fedpipe("nodes", "list").stdout

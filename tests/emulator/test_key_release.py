"""Keys released only to attested workers, on the real stack: the attestation simulator plays each
node's Confidential Space launcher, the key broker plays Cloud KMS behind the node's workload
identity pool, and every release or refusal is audited."""

from __future__ import annotations

import pytest
import requests

from emulators.attestation_simulator import Workload
from fedpipe.fed_demo import start_by_upload, upload_node_shares, wait_datasets
from shared.audit import AuditEvent, FirestoreAuditStore
from shared.federation import FederationConfig, FedNode, member_id
from tests.conftest import wait_for
from tests.emulator.helpers import job_of_dataset, upload_digits, wait_job

pytestmark = pytest.mark.emulator


def set_workload(cloud, node: str, **changes) -> None:
    """What `node`'s simulated launcher attests from now on (the stack's good workload, changed)."""
    workload = Workload(**{"image_digest": cloud.endpoints.worker_digest, "lifetime_s": 1, **changes})
    url = f"http://127.0.0.1:{cloud.endpoints.attestation_port}/v1/workloads/{node}"
    requests.put(url, data=workload.model_dump_json(), headers={"Content-Type": "application/json"}, timeout=10).raise_for_status()


@pytest.fixture
def restore_eu(cloud):
    yield
    set_workload(cloud, "eu")


def test_a_job_opens_its_shards_through_released_keys_and_each_release_is_audited(cloud, clients):
    upload_digits(clients, "attested", node="us")
    job = wait_job(clients, job_of_dataset(clients, "attested"), {"completed", "failed"})

    assert job.status == "completed", job.error
    released = wait_for(  # the broker stores its records off the request path, as Cloud Audit Logs are written
        lambda: [r for r in FirestoreAuditStore(clients.db).recent(node="us", limit=200) if r.event is AuditEvent.KEY_RELEASED], 10, "released keys' audit records")
    assert released and {r.operation for r in released} >= {"decrypt"}
    assert {r.image_digest for r in released} == {cloud.endpoints.worker_digest}


@pytest.mark.parametrize(("workload", "reason"), [
    ({"image_digest": "sha256:" + "1" * 64}, "wrong_image"),
    ({"debug": True}, "debug_image"),
    ({"hwmodel": "GCP_SHIELDED_VM"}, "wrong_hardware"),
])
def test_a_workload_the_policy_refuses_gets_no_key_and_its_job_fails_with_reason_attestation(cloud, clients, restore_eu, workload, reason):
    set_workload(cloud, "eu", **workload)
    dataset = f"refused-{reason.replace('_', '-')}"

    upload_digits(clients, dataset, node="eu")
    job = wait_job(clients, job_of_dataset(clients, dataset, node="eu"), {"completed", "failed"})

    assert job.status == "failed"
    assert job.error == f"attestation: {reason}" and job.history[-1].reason == "attestation"
    refusals = wait_for(
        lambda: [r for r in FirestoreAuditStore(clients.db).recent(node="eu", limit=200) if r.event is not AuditEvent.KEY_RELEASED and r.reason == reason],
        10, f"the {reason} refusal's audit record",
    )
    assert refusals[0].node == "eu"


def test_revoking_a_nodes_attestation_mid_federation_stops_its_worker_and_the_rest_go_on(cloud, clients, restore_eu):
    upload_node_shares(clients.gcs, clients.settings, ["us", "eu"], "revoked-digits", "digits", alpha=100.0, seed=5)
    wait_datasets(clients.db, clients.settings, ["us", "eu"], "revoked-digits", 60)
    config = FederationConfig(
        id="fed-revoked", nodes=[FedNode(name=n, dataset="revoked-digits") for n in ("us", "eu")], rounds=12, local_epochs=20,
        min_nodes=1, round_deadline_s=6, lease_seconds=30,  # eu is stopped a few rounds in; us goes on alone
    )
    start_by_upload(clients.gcs, clients.settings, config)
    wait_for(lambda: (clients.db.collection("federations").document("fed-revoked").get().to_dict() or {}).get("round", 0) >= 2, 60, "round 2")

    set_workload(cloud, "eu", issuing=False)  # the launcher stops attesting eu's workload
    eu = wait_job(clients, member_id("fed-revoked", "eu"), {"failed", "completed"}, timeout_s=30)
    fed = wait_for(
        lambda: (d := clients.db.collection("federations").document("fed-revoked").get().to_dict()) and d["status"] != "running" and d,
        120, "the federation to end",
    )

    assert eu.status == "failed" and eu.error.startswith("attestation: ") and eu.history[-1].reason == "attestation"
    assert fed["status"] == "completed", fed.get("error")  # us carried on, with the quorum of one
    rounds = [r.to_dict() for r in clients.db.collection("federations").document("fed-revoked").collection("rounds").stream()]
    assert any(r.get("participants") == ["us"] for r in rounds)  # rounds closed without eu after it was stopped

"""The node API on the real stack: a worker speaks only as the node its verified ID token names.

Tokens come from the stack's per-node metadata endpoints, as a worker's do; the bad
ones are minted with the local issuer's key (or another key), as an attacker on the
network would try them. Every refused request must leave every document as it was.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from emulators.metadata_server import IDENTITY_PATH, Issuer, issuer_key_file, issuer_url, local_identity
from shared.datasets import FeatureStats
from shared.federation import FederationConfig, FedNode, update_object
from shared.fedstore import Federation, FederationStatus, FirestoreFederationStore, Round
from shared.jobs import DatasetRef, Job, JobSpec, JobStatus, transition, utcnow
from shared.jobstore import JobStore
from tests.conftest import wait_for


def api_url(cloud) -> str:
    return cloud.endpoints.function_url("node_api")


def node_token(cloud, node: str, audience: str | None = None) -> str:
    """An ID token from `node`'s metadata endpoint, as google-auth fetches it in a worker."""
    port = cloud.endpoints.metadata_ports[node]
    response = requests.get(
        f"http://127.0.0.1:{port}{IDENTITY_PATH}", params={"audience": audience or api_url(cloud), "format": "full"},
        headers={"Metadata-Flavor": "Google"}, timeout=10,
    )
    response.raise_for_status()
    return response.text


def local_issuer(cloud) -> Issuer:
    state_dir = Path(cloud.endpoints.state_dir)
    return Issuer.load(issuer_url(cloud.endpoints.issuer_port), issuer_key_file(state_dir))


def call(cloud, method: str, path: str, token: str | None, json: dict | None = None, params: dict | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return requests.request(method, api_url(cloud).rstrip("/") + path, json=json, params=params, headers=headers, timeout=60)


def running_job(clients, job_id: str, node: str) -> Job:
    """A running job of `node`, written directly: running, so the launch trigger leaves it alone."""
    now = utcnow()
    job = Job.new(job_id, JobSpec(dataset=DatasetRef(node=node, dataset="ds")), now)
    job = transition(transition(job, JobStatus.SCHEDULED, now), JobStatus.RUNNING, now, heartbeat_at=now)
    JobStore(clients.db, clients.settings).create(job)
    return job


def snapshot(clients, *paths: str) -> dict[str, object]:
    """The update time of each document (None if absent): equal snapshots mean nothing was written."""
    return {p: (s.update_time if (s := clients.db.document(p).get()).exists else None) for p in paths}


def refusals(clients) -> list[dict]:
    return [s.to_dict() for s in clients.db.collection(clients.settings.refusals_collection).stream()]


def test_a_worker_gets_its_nodes_token_from_the_metadata_endpoint_and_is_answered_as_that_node(cloud, clients):
    job = running_job(clients, "api-own-job", "eu")

    reply = call(cloud, "POST", f"/v1/jobs/{job.id}/heartbeat", node_token(cloud, "eu"), {"attempt": 1, "progress": {"epoch": 2.0}})

    assert reply.status_code == 200, reply.text
    assert reply.json() == {"continue": True}
    assert JobStore(clients.db, clients.settings).get(job.id).progress == {"epoch": 2.0}


@pytest.mark.parametrize("route", ["heartbeat", "finish", "start", "dataset"])
def test_a_us_token_speaking_for_an_eu_job_gets_403_is_recorded_and_changes_nothing(cloud, clients, route):
    job = running_job(clients, f"api-eu-job-{route}", "eu")
    path = f"{clients.settings.jobs_collection}/{job.id}"
    before, refused_before = snapshot(clients, path), len(refusals(clients))
    body = {"heartbeat": {"attempt": 1, "progress": {}}, "finish": {"attempt": 1, "outcome": "completed", "results": {"accuracy": 1.0}},
            "start": {"attempt": 1}, "dataset": None}[route]

    reply = call(cloud, "GET" if route == "dataset" else "POST", f"/v1/jobs/{job.id}/{route}", node_token(cloud, "us"), body)

    assert reply.status_code == 403, reply.text
    assert reply.json()["reason"] == "not_your_job"
    assert snapshot(clients, path) == before
    recorded = wait_for(lambda: len(r := refusals(clients)) > refused_before and r, 10, "the refusal's record")
    assert {"node": "us", "identity": local_identity(clients.settings.project, "us"), "reason": "not_your_job",
            "target": {"job_id": job.id}}.items() <= [r for r in recorded if r["target"] == {"job_id": job.id}][0].items()


def _other_key_token(cloud, **claims) -> str:
    """Signed by a key the issuer never published, under the issuer's own key id."""
    issuer = local_issuer(cloud)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    body = {"iss": issuer.url, "aud": api_url(cloud), "email": local_identity(cloud.endpoints.project, "eu"), "email_verified": True,
            "iat": now, "exp": now + 600, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": issuer.kid})


BAD_TOKENS = {
    "expired": lambda cloud: local_issuer(cloud).id_token(local_identity(cloud.endpoints.project, "eu"), api_url(cloud), now=time.time() - 7200),
    "wrong audience": lambda cloud: node_token(cloud, "eu", audience="https://another-service.example/"),
    "unsigned": lambda cloud: jwt.encode(
        {"iss": local_issuer(cloud).url, "aud": api_url(cloud), "email": local_identity(cloud.endpoints.project, "eu"),
         "email_verified": True, "exp": int(time.time()) + 600}, None, algorithm="none"),
    "foreign key": lambda cloud: _other_key_token(cloud),
    "foreign issuer": lambda cloud: local_issuer(cloud).id_token(
        local_identity(cloud.endpoints.project, "eu"), api_url(cloud), iss="https://issuer.example"),
    "no expiry": lambda cloud: jwt.encode(
        {"iss": local_issuer(cloud).url, "aud": api_url(cloud), "email": local_identity(cloud.endpoints.project, "eu"), "email_verified": True},
        local_issuer(cloud)._key, algorithm="RS256", headers={"kid": local_issuer(cloud).kid}),
    "not a token": lambda cloud: "not-a-token",
    "no header": lambda cloud: None,
}


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
def test_a_bad_token_gets_401_and_changes_nothing(cloud, clients, kind):
    job = running_job(clients, f"api-401-{kind.replace(' ', '-')}", "eu")
    path = f"{clients.settings.jobs_collection}/{job.id}"
    before, refused_before = snapshot(clients, path), len(refusals(clients))

    reply = call(cloud, "POST", f"/v1/jobs/{job.id}/finish", BAD_TOKENS[kind](cloud), {"attempt": 1, "outcome": "failed", "error": "x"})

    assert reply.status_code == 401, reply.text
    assert reply.json()["error"].startswith("unauthenticated")
    assert snapshot(clients, path) == before
    assert len(refusals(clients)) == refused_before  # nobody to record: the caller is unknown


def test_an_identity_no_node_registered_gets_403(cloud, clients):
    token = local_issuer(cloud).id_token("stranger@elsewhere.iam.gserviceaccount.com", api_url(cloud))
    job = running_job(clients, "api-stranger", "eu")

    reply = call(cloud, "POST", f"/v1/jobs/{job.id}/heartbeat", token, {"attempt": 1, "progress": {}})

    assert reply.status_code == 403
    assert reply.json()["reason"] == "unregistered_identity"


def _federation(clients, fid: str, nodes: list[str], r: int = 1) -> FederationConfig:
    """A running federation whose round `r` is open, written directly (no workers)."""
    config = FederationConfig(id=fid, nodes=[FedNode(name=n, dataset="ds") for n in nodes], rounds=3)
    now = utcnow()
    stats = FeatureStats(count=10, mean=[0.0] * 4, m2=[1.0] * 4, label_counts=[5, 5])
    fed = Federation(id=fid, status=FederationStatus.RUNNING, config=config, round=r, n_features=4, num_classes=2, stats=stats,
                     node_rows={n: 10 for n in nodes}, created_at=now, updated_at=now)
    assert FirestoreFederationStore(clients.db, clients.settings).create_federation(fed, Round.opened(config, r, now))
    return config


def test_a_node_outside_a_federation_learns_nothing_of_it_and_cannot_report_into_it(cloud, clients):
    _federation(clients, "api-eu-only", ["eu"])
    us = node_token(cloud, "us")

    view = call(cloud, "GET", "/v1/federations/api-eu-only", us)
    model = call(cloud, "GET", "/v1/federations/api-eu-only/models/1", us)
    # us uploads under eu's prefix (its IAM forbids it in production) and reports it as its own.
    name = update_object("api-eu-only", 1, "eu", 1, evaluate=False)
    blob = clients.gcs.bucket(clients.settings.hub_bucket).blob(name)
    blob.upload_from_string(b"not weights")
    report = call(cloud, "POST", "/v1/federations/api-eu-only/rounds/1/updates", us, {"object": name, "generation": blob.generation})

    assert [view.status_code, model.status_code, report.status_code] == [403, 403, 403]
    assert view.json() == {"error": "not a member of this federation", "reason": "not_a_member"}
    assert report.json()["reason"] == "not_your_object"
    updates = clients.db.collection(clients.settings.federations_collection).document("api-eu-only").collection("rounds").document("0001")
    assert list(updates.collection("updates").stream()) == []


def test_a_member_sees_its_own_standing_only(cloud, clients):
    _federation(clients, "api-view", ["eu", "us"])

    view = call(cloud, "GET", "/v1/federations/api-view", node_token(cloud, "eu")).json()

    assert view["status"] == "running" and view["round"] == 1 and view["counted"] is False
    assert "node_rows" not in view and "jobs" not in view and "config" not in view  # nothing about the other node


def test_a_long_poll_answers_as_soon_as_the_round_moves(cloud, clients):
    _federation(clients, "api-poll", ["eu", "us"])
    answers: list[tuple[float, dict]] = []

    def poll() -> None:
        started = time.monotonic()
        reply = call(cloud, "GET", "/v1/federations/api-poll", node_token(cloud, "us"), params={"after": "1", "wait": "20"})
        answers.append((time.monotonic() - started, reply.json()))

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(1.0)
    clients.db.collection(clients.settings.federations_collection).document("api-poll").update({"round": 2})  # as a close does
    waiter.join(30)

    (took, view), = answers
    assert view["round"] == 2
    assert 1.0 <= took < 5.0  # woken by the change, not by the 20 s timeout


def test_the_workers_of_the_local_stack_get_no_firestore_or_pubsub_endpoint(cloud, clients):
    from emulators.endpoints import Endpoints
    from emulators.launcher import worker_env

    job = Job.new("env-probe", JobSpec(dataset=DatasetRef(node="eu", dataset="ds")), utcnow())
    env = worker_env({**cloud.endpoints.client_env(), **cloud.endpoints.identity_env(), "PATH": "/bin"}, Endpoints.load(Path(cloud.endpoints.state_dir)), job)

    assert not {"FIRESTORE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST", "FEDPIPE_ID_TOKEN_CERTS_URL"} & set(env)
    assert not [k for k in env if k.startswith("CLOUDSDK_")]
    assert env["GCE_METADATA_HOST"] == f"127.0.0.1:{cloud.endpoints.metadata_ports['eu']}"
    assert env["FEDPIPE_NODE_API_URL"] == api_url(cloud)

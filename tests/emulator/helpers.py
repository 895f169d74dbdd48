"""Steps the emulator tests share: upload a data set, wait for its job, read deliveries."""

from __future__ import annotations

import json
from datetime import datetime

import requests
from google.cloud import firestore

from emulators.endpoints import DELIVERIES_COLLECTION
from emulators.metadata_server import IDENTITY_PATH
from fedpipe.demo import upload_dataset
from shared.federation import UPDATE_PATH
from shared.jobs import Job, TrainSpec
from shared.manifest import dataset_doc_id
from tests.conftest import wait_for

FAST_TRAIN = TrainSpec(model="mlp", epochs=15)


def upload_digits(clients, dataset: str, node: str = "us", parts: int = 2, train: TrainSpec = FAST_TRAIN) -> list[str]:
    return upload_dataset(clients.gcs, clients.settings, node, dataset, "digits", parts, train)


def dataset_doc(clients, node: str, dataset: str) -> dict:
    snap = clients.db.collection(clients.settings.datasets_collection).document(dataset_doc_id(node, dataset)).get()
    return snap.to_dict() or {}


def job_of_dataset(clients, dataset: str, node: str = "us", timeout_s: float = 60) -> str:
    return wait_for(lambda: dataset_doc(clients, node, dataset).get("job_id"), timeout_s, f"a job for {node}/{dataset}")


def wait_job(clients, job_id: str, statuses: set[str], timeout_s: float = 120) -> Job:
    def probe() -> Job | None:
        snap = clients.db.collection(clients.settings.jobs_collection).document(job_id).get()
        if snap.exists and snap.get("status") in statuses:
            return Job.from_doc(snap.id, snap.to_dict())
        return None

    return wait_for(probe, timeout_s, f"job {job_id} to reach {sorted(statuses)}")


def jobs_for_dataset(clients, dataset: str) -> list[Job]:
    docs = clients.db.collection(clients.settings.jobs_collection).where(
        filter=firestore.FieldFilter("spec.dataset.dataset", "==", dataset)
    ).stream()
    return [Job.from_doc(d.id, d.to_dict()) for d in docs]


def deliveries(clients, predicate=lambda r: True) -> list[dict]:
    return [r for r in (d.to_dict() for d in clients.db.collection(DELIVERIES_COLLECTION).stream()) if predicate(r)]


def delivered(clients, predicate, count: int, timeout_s: float = 30) -> list[dict]:
    """The delivery records matching `predicate`, once there are `count` of them.

    The router commits its records in batches just after the function answers, so a
    record can land a moment after the function's effect is visible.
    """
    return wait_for(lambda: len(found := deliveries(clients, predicate)) >= count and found, timeout_s, f"{count} delivery record(s)")


def event_mentions(record: dict, text: str) -> bool:
    """Whether a delivery's subject or (decoded) body mentions `text`."""
    import base64

    body = base64.b64decode(record["event"]["body"])
    if record["subject"] and text in record["subject"]:
        return True
    try:
        message = json.loads(body).get("message", {})
        return text in base64.b64decode(message.get("data", "")).decode(errors="replace")
    except (ValueError, AttributeError):
        return text.encode() in body


def after(ts: datetime):
    return lambda r: r["updated_at"] >= ts


def report_update(cloud, node: str, blob) -> requests.Response:
    """Report an uploaded update through the node API as `node`'s worker does: with the ID token
    of `node`'s metadata endpoint. The hub counts updates only when their node reports them."""
    port = cloud.endpoints.metadata_ports[node]
    url = cloud.endpoints.function_url("node_api")
    token = requests.get(
        f"http://127.0.0.1:{port}{IDENTITY_PATH}", params={"audience": url, "format": "full"}, headers={"Metadata-Flavor": "Google"}, timeout=10
    ).text
    match = UPDATE_PATH.match(blob.name)
    return requests.post(
        f"{url.rstrip('/')}/v1/federations/{match['fid']}/rounds/{int(match['round'])}/updates",
        json={"object": blob.name, "generation": blob.generation}, headers={"Authorization": f"Bearer {token}"}, timeout=60,
    )

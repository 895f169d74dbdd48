"""Inputs past their bounds, through the real chain: each is refused with its reason, delivered once, never looped."""

from __future__ import annotations

import json

import pytest
import requests

from shared.datasets import MAX_SPEC_BYTES
from shared.quarantine import QuarantineStore
from tests.conftest import wait_for
from tests.emulator.helpers import delivered

pytestmark = pytest.mark.emulator


def quarantined(clients, source: str) -> dict:
    """The quarantine record of `source` once it is there."""
    store = QuarantineStore(clients.db, clients.settings)
    return wait_for(lambda: next((r for r in store.recent(500) if r.source == source), None), 30, f"the quarantine record of {source!r}")


@pytest.mark.parametrize("name", [
    "__x__/a.csv",  # a reserved Firestore id as the data set's name
    "bounds-ctrl/a\x01b.csv",  # a control character
    "bounds-nested/sub/a.csv",  # not directly under its data set's prefix
    "bounds-dots/../a.csv",  # a '..' segment
    "no-data-set.csv",  # no data set at all
])
def test_an_object_name_past_its_bounds_is_quarantined_once_before_it_becomes_a_document_id(cloud, clients, name):
    bucket = clients.settings.raw_bucket("us")
    clients.gcs.bucket(bucket).blob(name).upload_from_string(b"a,b\n1,2\n")

    record = quarantined(clients, f"gs://{bucket}/{name}")
    subjects = {f"objects/{name}", f"objects/{requests.utils.quote(name, safe='/')}"}
    [delivery] = delivered(clients, lambda r: r["trigger"] == "raw-upload-us" and r["subject"] in subjects, 1)

    assert (record.node, record.reason) == ("us", "bad_path")
    assert (delivery["status"], delivery["attempts"]) == ("delivered", 1)


def test_a_declaration_over_its_cap_is_refused_unread_and_delivered_once(cloud, clients):
    bucket = clients.settings.raw_bucket("us")
    spec = {"features": ["a"], "label": "b", "num_classes": 2, "expected_files": ["x.csv"], "padding": "p" * MAX_SPEC_BYTES}
    clients.gcs.bucket(bucket).blob("bounds-big-spec/_dataset.json").upload_from_string(json.dumps(spec))

    record = quarantined(clients, f"gs://{bucket}/bounds-big-spec/_dataset.json")
    [delivery] = delivered(clients, lambda r: r["subject"] == "objects/bounds-big-spec/_dataset.json", 1)

    assert record.reason == "too_large"
    assert record.detail.endswith(f"exceeds the limit of {MAX_SPEC_BYTES}")
    assert (delivery["status"], delivery["attempts"]) == ("delivered", 1)


def test_an_event_whose_object_name_is_not_utf8_is_recorded_and_acknowledged(cloud, clients):
    """No storage client can make such a name, so the event is posted as Eventarc would deliver it."""
    bucket = clients.settings.raw_bucket("eu")
    data = b'{"bucket": "' + bucket.encode() + b'", "name": "ds/\xff\xfe.csv", "generation": "1", "size": "4"}'
    headers = {
        "ce-specversion": "1.0", "ce-id": "bounds-not-utf8", "ce-type": "google.cloud.storage.object.v1.finalized",
        "ce-source": f"//storage.googleapis.com/projects/_/buckets/{bucket}", "ce-subject": "objects/ds/%FF%FE.csv",
        "Content-Type": "application/json",
    }

    reply = requests.post(cloud.endpoints.function_url("on_raw_upload"), data=data, headers=headers, timeout=30)

    assert reply.status_code == 200  # acknowledged: no retry could decode it
    record = quarantined(clients, f"gs://{bucket}/?event=bounds-not-utf8")
    assert (record.node, record.reason) == ("eu", "bad_event")

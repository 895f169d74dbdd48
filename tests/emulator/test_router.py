"""The trigger router (local Eventarc) against the real local cloud: any object name, stage times, isolation."""

from __future__ import annotations

import pytest
from google.cloud.firestore import FieldFilter

from emulators.deliveries import STAGES
from emulators.endpoints import DELIVERIES_COLLECTION
from emulators.router import DELIVERY_THREADS
from tests.conftest import wait_for

pytestmark = pytest.mark.emulator


def name_of_bytes(prefix: str, size: int, suffix: str = ".csv") -> str:
    """An object name of exactly `size` bytes of UTF-8 (1024 is the most GCS allows), mostly 3-byte characters."""
    room = size - len(prefix.encode()) - len(suffix.encode())
    return prefix + "長" * (room // 3) + "_" * (room % 3) + suffix


def records_of(clients, trigger: str, names: list[str]) -> list[dict]:
    """The delivery records of the uploads of `names` (at most 30) to `trigger`'s bucket."""
    query = clients.db.collection(DELIVERIES_COLLECTION).where(filter=FieldFilter("trigger", "==", trigger))
    return [d.to_dict() for d in query.where(filter=FieldFilter("subject", "in", [f"objects/{n}" for n in names])).stream()]


def the_record(clients, trigger: str, name: str) -> dict:
    """The one delivery record of the upload of `name`, once there is one."""
    return wait_for(lambda: records_of(clients, trigger, [name]), 30, f"a delivery record for {name}")[0]


def test_objects_named_anything_are_delivered_at_the_first_attempt(cloud, clients):
    """A non-ASCII name once raised UnicodeEncodeError in the POST, looping for ever with nothing recorded."""
    bucket = clients.gcs.bucket(clients.settings.raw_bucket("us"))
    names = [
        "router-naming/unicode_näme_数据.csv",
        "router-naming/spaces in name.csv",
        'router-naming/quote"and%41percent.csv',  # a literal %41 must stay as it is
        name_of_bytes("router-naming/", 1024),
    ]
    assert len(names[-1].encode()) == 1024
    for name in names:
        bucket.blob(name).upload_from_string(b"a,b\n1,2\n")

    for name in names:
        record = the_record(clients, "raw-upload-us", name)
        assert (record["status"], record["attempts"], record["last_code"]) == ("delivered", 1, 200), record["last_error"]


def test_a_delivery_record_says_when_each_stage_happened(cloud, clients):
    """bench/events.py splits each delivery into stages from these times; they must be in order."""
    name = "router-stages/a.csv"
    clients.gcs.bucket(clients.settings.raw_bucket("us")).blob(name).upload_from_string(b"a,b\n1,2\n")
    record = the_record(clients, "raw-upload-us", name)

    times = [record[stage] for stage in STAGES]
    assert all(times), record
    assert times == sorted(times)
    assert record["answered_at"] <= record["updated_at"]


def test_a_failing_trigger_holds_up_no_other_trigger(cloud, clients):
    """Storage triggers share one subscription; each delivers on its own threads, so backoff stays its own."""
    raw = clients.gcs.bucket(clients.settings.raw_bucket("us"))
    failing = [f"router-isolation/{i:02d}.csv" for i in range(DELIVERY_THREADS + 2)]  # more than a subscription's threads
    hub_name = "router-isolation/not-a-request.txt"
    cloud.stop_function("on_raw_upload")
    try:
        for name in failing:
            raw.blob(name).upload_from_string(b"a,b\n1,2\n")
        wait_for(lambda: len(records_of(clients, "raw-upload-us", failing)) >= DELIVERY_THREADS, 30, "every delivery thread backing off")
        clients.gcs.bucket(clients.settings.hub_bucket).blob(hub_name).upload_from_string(b"x")
        hub = the_record(clients, "hub-upload", hub_name)
        dead = wait_for(
            lambda: (rs := records_of(clients, "raw-upload-us", failing)) and {r["status"] for r in rs} == {"dead_lettered"} and rs,
            60,
            "every failing upload to be dead-lettered",
        )
    finally:
        cloud.start_function("on_raw_upload")
    assert (hub["status"], hub["attempts"]) == ("delivered", 1)
    # Sharing their threads, the hub's event would have waited for the first of them to give up.
    assert hub["answered_at"] < min(r["updated_at"] for r in dead)

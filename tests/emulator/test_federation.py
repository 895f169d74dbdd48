"""Federations on the real local cloud: rounds, quorum, faults, duplicates and late updates."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from emulators.endpoints import REPLAY_TOPIC, keystore_dir
from emulators.launcher import worker_pid_file
from emulators.provision import node_key_file
from fedpipe import fed_views
from fedpipe.fed_demo import start_by_upload, upload_node_shares, wait_datasets, watch_federation
from shared import weights
from shared.envelope import HUB, Envelope, LocalKeyStore, Purpose
from shared.federation import FederationConfig, global_model_object, member_id
from shared.jobs import utcnow
from shared.signing import LocalKeySigner, signature_metadata, update_claims
from tests.conftest import wait_for
from tests.emulator.helpers import delivered, deliveries, report_update, wait_job

pytestmark = pytest.mark.emulator
QUIET = Console(file=io.StringIO())


@pytest.fixture(scope="module")
def shares(cloud, clients):
    """digits split non-IID across us and eu, preprocessed in each node's own buckets."""
    split = upload_node_shares(clients.gcs, clients.settings, ["us", "eu"], "fed-digits", "digits", alpha=0.5, seed=0)
    wait_datasets(clients.db, clients.settings, ["us", "eu"], "fed-digits", 60)
    return split


def federation(fid: str, **overrides) -> FederationConfig:
    base = {"id": fid, "nodes": [{"name": "us", "dataset": "fed-digits"}, {"name": "eu", "dataset": "fed-digits"}],
            "rounds": 3, "local_epochs": 2, "round_deadline_s": 60, "lease_seconds": 30}
    return FederationConfig.model_validate({**base, **overrides})


def run(clients, config: FederationConfig, timeout_s: float = 180) -> tuple[dict, list[dict]]:
    start_by_upload(clients.gcs, clients.settings, config)
    watch_federation(clients.db, clients.settings, config.id, QUIET, timeout_s)
    return fed_views.load(clients.db, clients.settings, config.id)


def signed_metadata(cloud, node: str, fid: str, r: int, attempt: int, examples: int, metrics: dict, payload: bytes) -> dict:
    """Object metadata for an update as `node`'s worker writes it: counts, metrics and its signature."""
    signer = LocalKeySigner.from_file(node_key_file(Path(cloud.endpoints.state_dir), node))
    claims = update_claims(federation=fid, round=r, node=node, attempt=attempt, examples=examples, metrics=metrics, payload=payload)
    return {"examples": str(examples), "metrics": json.dumps(metrics), **signature_metadata(signer, claims)}


def open_round(clients, config: FederationConfig, now, r: int = 2):
    """Services and the hub's store, plus a running federation whose round `r` is open, written
    directly: the hub's handlers are then called in this process, with no workers. The deadline
    is an hour away, so the stack's own deadline sweep stays out of it."""
    from shared import hub
    from shared.datasets import FeatureStats
    from shared.fedstore import Federation, FederationStatus, Round
    from shared.ingest import Services

    svc = Services(clients.settings, clients.db, clients.gcs, clients.publisher)
    store = hub.federation_store(svc)
    stats = FeatureStats(count=2000, mean=[0.0] * 64, m2=[1.0] * 64, label_counts=[200] * 10)
    fed = Federation(id=config.id, status=FederationStatus.RUNNING, config=config, round=r, n_features=64, num_classes=10, stats=stats,
                     node_rows={"us": 1000, "eu": 1000}, created_at=now, updated_at=now)
    store.federation_ref(config.id).set(fed.to_doc())
    rd = Round.opened(config, r, now).model_copy(update={"expected": ["eu", "us"], "deadline_at": now + timedelta(hours=1)})
    store.round_ref(config.id, r).set(rd.to_doc())
    return svc, store


def counted(node: str, now, accuracy: float = 0.5):
    """A counted evaluation update of `node`, as the hub writes it."""
    from shared.fedstore import Update, UpdateMetrics

    metrics = UpdateMetrics(global_accuracy=accuracy, global_loss=1.0, test_examples=10)
    return Update(node=node, object=f"gs://x/{node}", generation=1, attempt=1, examples=10, metrics=metrics, at=now)


def envelope(cloud, owner: str) -> Envelope:
    """`owner`'s key from the local stand-in key store (a node's, or the hub's)."""
    return Envelope(LocalKeyStore(keystore_dir(Path(cloud.endpoints.state_dir))).kek(owner))


def read(cloud, clients, uri: str, purpose: Purpose, owner: str = HUB) -> bytes:
    """An object the hub keeps (or a node sent), opened under its owner's key: at rest, it is sealed."""
    bucket, name = uri.removeprefix("gs://").split("/", 1)
    return envelope(cloud, owner).open(clients.gcs.bucket(bucket).blob(name).download_as_bytes(), bucket, name, purpose)


def test_two_nodes_three_rounds_with_warm_workers(cloud, clients, shares):
    fed, rounds = run(clients, federation("fed-e2e"))

    assert fed["status"] == "completed", fed.get("error")
    assert [(rd["round"], rd["kind"], rd["status"]) for rd in rounds] == [
        (1, "train", "closed"), (2, "train", "closed"), (3, "train", "closed"), (4, "evaluate", "closed")]
    assert all(rd["participants"] == ["eu", "us"] and rd["reason"] == "all 2 nodes reported" for rd in rounds)
    history = fed_views.history(rounds)
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["accuracy"] == fed["final"]["accuracy"] > 0.85
    assert history[-1]["accuracy"] > history[0]["accuracy"] + 0.5  # it learned
    assert history[-1]["examples"] == sum(round(0.2 * s["rows"]) for s in shares.values())

    # The hub's round-1 model is the example-weighted mean of the two uploaded updates.
    updates = rounds[0]["updates"]
    params = {n: weights.from_bytes(read(cloud, clients, u["object"], Purpose.UPDATE, n))[0] for n, u in updates.items()}
    counts = {n: u["examples"] for n, u in updates.items()}
    assert counts == {n: s["rows"] - round(0.2 * s["rows"]) for n, s in shares.items()}
    hub = clients.gcs.bucket(clients.settings.hub_bucket)
    global_1, _ = weights.from_bytes(read(cloud, clients, f"gs://{hub.name}/{global_model_object('fed-e2e', 1)}", Purpose.GLOBAL_MODEL))
    for name, value in global_1.items():
        expected = sum(params[n][name] * counts[n] for n in params) / sum(counts.values())
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)

    # One worker process per node for the whole federation, each completed with the final result.
    for node in ("us", "eu"):
        job = wait_job(clients, member_id("fed-e2e", node), {"completed", "failed"})
        assert job.status == "completed" and job.attempt == 1
        assert job.results["accuracy"] == fed["final"]["accuracy"]
        assert len(list((Path(cloud.endpoints.state_dir) / "logs" / "jobs").glob(f"{job.id}.*.log"))) == 1
    # Their compiles are kept for the stack's next workers (emulators.launcher.compilation_cache).
    assert list((Path(cloud.endpoints.state_dir) / "cache" / "jax").glob("jit__train_epoch_impl-*"))
    # Only weights and metrics reached the hub: no rows of anyone's data.
    assert not [b.name for b in hub.list_blobs() if "fed-e2e" in b.name and b.name.endswith((".csv", ".parquet"))]
    assert {b.name.split("/")[1] for b in hub.list_blobs(prefix="updates/") if "/fed-e2e/" in b.name} == {"us", "eu"}


def test_duplicate_and_late_updates_change_nothing(cloud, clients, shares):
    fed, rounds = run(clients, federation("fed-dups", rounds=2))
    assert fed["status"] == "completed"
    hub = clients.gcs.bucket(clients.settings.hub_bucket)
    global_gen = hub.get_blob(global_model_object("fed-dups", 1)).generation

    # Every update event of round 1 delivered again, with the same CloudEvent ids.
    replayed_at = utcnow()
    round_1 = delivered(clients, lambda r: "/fed-dups/round-0001-" in r["subject"], 2)
    assert len(round_1) == 2
    topic = clients.publisher.topic_path(clients.settings.project, REPLAY_TOPIC)
    for record in round_1:
        clients.publisher.publish(topic, json.dumps({"trigger": record["trigger"], "event": record["event"]}).encode()).result()
    wait_for(lambda: all(r["updated_at"] > replayed_at for r in deliveries(clients, lambda r: "/fed-dups/round-0001-" in r["subject"])),
             30, "both replays")

    # A node uploading to a closed round is refused and recorded as late.
    late = hub.blob("updates/us/fed-dups/round-0001-a9.safetensors")
    payload = read(cloud, clients, f"gs://{hub.name}/{global_model_object('fed-dups', 1)}", Purpose.GLOBAL_MODEL)
    metrics = {"global_accuracy": 0.1, "global_loss": 2.0, "test_examples": 5, "train_loss": 1.0, "train_accuracy": 0.5}
    late.metadata = signed_metadata(cloud, "us", "fed-dups", 1, 9, 10, metrics, payload)
    late.upload_from_string(envelope(cloud, "us").seal(payload, hub.name, late.name, Purpose.UPDATE))
    reply = report_update(cloud, "us", late)
    assert (reply.status_code, reply.json()["outcome"]) == (409, "late")
    # Each counted update of round 1 reported again by its node: a duplicate, counted once.
    for node, update in rounds[0]["updates"].items():
        again = report_update(cloud, node, hub.get_blob(update["object"].removeprefix(f"gs://{hub.name}/"), generation=update["generation"]))
        assert (again.status_code, again.json()["outcome"], again.json()["counted"]) == (200, "duplicate", True)

    fed_after, rounds_after = fed_views.load(clients.db, clients.settings, "fed-dups")
    assert [rd["participants"] for rd in rounds_after] == [rd["participants"] for rd in rounds]
    assert len(rounds_after) == 3 and fed_after["final"] == fed["final"]
    assert [(x["node"], x["attempt"], x["reason"]) for x in rounds_after[0]["late"]] == [("us", 9, "late")]  # late, not invalid
    assert hub.get_blob(global_model_object("fed-dups", 1)).generation == global_gen  # not re-aggregated


def test_node_lost_mid_federation_round_completes_with_quorum(cloud, clients, shares):
    # The deadline leaves room for both workers to start (JAX import, data, compile) on 2 cores.
    config = federation("fed-quorum", rounds=1, min_nodes=1, round_deadline_s=12, max_attempts=1, lease_seconds=5)
    start_by_upload(clients.gcs, clients.settings, config)
    eu_job = wait_job(clients, member_id("fed-quorum", "eu"), {"running"}, timeout_s=60)
    os.killpg(int(worker_pid_file(Path(cloud.endpoints.state_dir), eu_job.id, 1).read_text()), signal.SIGKILL)

    fed = watch_federation(clients.db, clients.settings, "fed-quorum", QUIET, 120)
    assert fed["status"] == "completed", fed.get("error")
    _, rounds = fed_views.load(clients.db, clients.settings, "fed-quorum")
    assert [rd["participants"] for rd in rounds] == [["us"], ["us"]]
    assert rounds[0]["reason"] == "deadline passed with 1 of 2 nodes (quorum 1)"
    eu = wait_job(clients, eu_job.id, {"failed"}, timeout_s=30)
    assert "no heartbeat" in eu.error or eu.error.startswith("the engine reports its run gone"), eu.error  # its lease, or the clock's poll


def test_round_without_quorum_fails_the_federation_with_its_reason(cloud, clients, shares):
    config = federation("fed-noquorum", rounds=2, round_deadline_s=12, max_attempts=1, lease_seconds=5)
    start_by_upload(clients.gcs, clients.settings, config)
    eu_job = wait_job(clients, member_id("fed-noquorum", "eu"), {"running"}, timeout_s=60)
    os.killpg(int(worker_pid_file(Path(cloud.endpoints.state_dir), eu_job.id, 1).read_text()), signal.SIGKILL)

    fed = watch_federation(clients.db, clients.settings, "fed-noquorum", QUIET, 120)
    assert fed["status"] == "failed"
    assert fed["error"] == "round 1: 1 of 2 nodes reported by the deadline; quorum is 2"
    us = wait_job(clients, member_id("fed-noquorum", "us"), {"completed", "failed"}, timeout_s=30)
    assert us.status == "failed" and "federation fed-noquorum failed" in us.error


def test_hub_down_mid_federation_resumes_without_counting_a_round_twice(cloud, clients, shares):
    config = federation("fed-resume", rounds=3)
    start_by_upload(clients.gcs, clients.settings, config)
    wait_for(lambda: (clients.db.collection("federations").document("fed-resume").get().to_dict() or {}).get("round", 0) >= 2, 90, "round 2")
    cloud.stop_function("on_hub_upload")
    time.sleep(1.5)  # updates of the open round pile up as retried deliveries
    cloud.start_function("on_hub_upload")
    fed = watch_federation(clients.db, clients.settings, "fed-resume", QUIET, 120)
    assert fed["status"] == "completed", fed.get("error")
    _, rounds = fed_views.load(clients.db, clients.settings, "fed-resume")
    assert [rd["round"] for rd in rounds] == [1, 2, 3, 4]
    assert all(rd["participants"] == ["eu", "us"] for rd in rounds)


def test_invalid_request_is_rejected_with_a_reason(cloud, clients, shares):
    config = federation("fed-bad", nodes=[{"name": "us", "dataset": "no-such-data"}])
    start_by_upload(clients.gcs, clients.settings, config)
    fed = wait_for(lambda: clients.db.collection("federations").document("fed-bad").get().to_dict(), 30, "the rejection")
    assert fed["status"] == "rejected"
    assert fed["error"] == "data set us/no-such-data is not complete"


def test_fed_show_and_plot_commands(cloud, clients, shares, tmp_path):
    from tests.emulator.test_cli import fedpipe

    run(clients, federation("fed-cli", rounds=2))
    shown = fedpipe("fed", "show", "fed-cli")
    assert shown.returncode == 0, shown.stderr
    assert "federation fed-cli: completed" in shown.stdout and shown.stdout.count("all 2 nodes reported") == 3
    plot = tmp_path / "fed-cli.png"
    assert fedpipe("fed", "plot", "fed-cli", "--out", str(plot)).returncode == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fedpipe("fed", "show", "no-such-federation").returncode == 1


def test_fedadam_steps_the_server_optimizer_from_round_two(cloud, clients, shares):
    from shared.federation import server_state_object

    fed, rounds = run(clients, federation("fed-adam", rounds=3, strategy="fedadam", server_lr=0.05))
    assert fed["status"] == "completed", fed.get("error")
    hub = clients.gcs.bucket(clients.settings.hub_bucket)
    assert not hub.blob(server_state_object("fed-adam", 1)).exists()  # round 1 is a plain average
    state, _ = weights.from_bytes(read(cloud, clients, f"gs://{hub.name}/{server_state_object('fed-adam', 3)}", Purpose.SERVER_STATE))
    assert state["step"].tolist() == [2]  # rounds 2 and 3
    # The round-2 model is the optimizer's step, not the plain average of the round-2 updates.
    updates = rounds[1]["updates"]
    params = {n: weights.from_bytes(read(cloud, clients, u["object"], Purpose.UPDATE, n))[0] for n, u in updates.items()}
    total = sum(u["examples"] for u in updates.values())
    average = {k: sum(params[n][k] * updates[n]["examples"] for n in params) / total for k in params["us"]}
    global_2, _ = weights.from_bytes(read(cloud, clients, f"gs://{hub.name}/{global_model_object('fed-adam', 2)}", Purpose.GLOBAL_MODEL))
    assert max(float(np.abs(global_2[k] - average[k]).max()) for k in average) > 1e-3
    assert fed["final"]["accuracy"] > 0.5


def test_an_update_of_the_wrong_shape_is_refused_and_the_round_goes_on(cloud, clients, shares):
    config = federation("fed-badshape", rounds=1)
    start_by_upload(clients.gcs, clients.settings, config)
    wait_for(lambda: clients.db.collection("federations").document("fed-badshape").collection("rounds").document("0001").get().exists,
             30, "round 1")
    bogus = clients.gcs.bucket(clients.settings.hub_bucket).blob("updates/eu/fed-badshape/round-0001-a9.safetensors")
    payload = weights.to_bytes({"dense_0.kernel": np.zeros((3, 3), np.float32)})
    metrics = {"global_accuracy": 0.1, "global_loss": 2.0, "test_examples": 5, "train_loss": 1.0, "train_accuracy": 0.5}
    bogus.metadata = signed_metadata(cloud, "eu", "fed-badshape", 1, 9, 10, metrics, payload)  # signed, yet unusable
    bogus.upload_from_string(payload)
    reply = report_update(cloud, "eu", bogus)
    assert (reply.status_code, reply.json()["outcome"], reply.json()["reason"]) == (422, "refused", "too_small")

    fed = watch_federation(clients.db, clients.settings, "fed-badshape", QUIET, 120)
    assert fed["status"] == "completed", fed.get("error")
    _, rounds = fed_views.load(clients.db, clients.settings, "fed-badshape")
    assert rounds[0]["participants"] == ["eu", "us"] and rounds[0]["updates"]["eu"]["attempt"] == 1
    [refused] = rounds[0]["late"]
    assert (refused["attempt"], refused["reason"]) == (9, "too_small")  # refused on its size, never downloaded


@pytest.mark.parametrize("closed_when", ["before our write", "after our write", "as we close"])
def test_update_racing_a_deadline_close_is_recorded_late(cloud, clients, monkeypatch, closed_when):
    """A closer fixes the participants from the updates it read; an update written around that
    moment is either among them or recorded as late, never silently dropped."""
    from google.cloud.firestore import DocumentReference

    from shared import hub
    from shared.ingest import RawObject

    fid, now = f"fed-race-{closed_when.split()[0]}", utcnow()
    svc, store = open_round(clients, federation(fid, rounds=1, min_nodes=1), now)
    metrics = {"global_accuracy": 0.5, "global_loss": 1.0, "test_examples": 10}
    store.add_update(fid, 2, counted("us", now))
    marker = store.marker_ref(fid, 2)
    # Written where no trigger fires, so only this call handles it.
    bucket = clients.settings.processed_bucket("eu")
    name = f"updates/eu/{fid}/round-0002-a1.json"
    blob = clients.gcs.bucket(bucket).blob(name)
    blob.upload_from_string(envelope(cloud, "eu").seal(json.dumps(metrics).encode(), bucket, name, Purpose.UPDATE))
    obj = RawObject(bucket, name, blob.generation, blob.size, signed_metadata(cloud, "eu", fid, 2, 1, 10, metrics, json.dumps(metrics).encode()))

    real_create = DocumentReference.create
    closing = {"status": "closed", "reason": "deadline passed with 1 of 2 nodes (quorum 1)", "participants": ["us"], "at": now}

    def create_racing_the_closer(self, data, *args, **kwargs):
        if closed_when == "as we close" and self.path == marker.path and data["participants"] == ["eu", "us"]:
            real_create(marker, closing)  # the closer's marker lands first; ours then fails
        if self.path != store.update_ref(fid, 2, "eu").path or closed_when == "as we close":
            return real_create(self, data, *args, **kwargs)
        if closed_when == "before our write":
            real_create(marker, closing)
            return real_create(self, data, *args, **kwargs)
        result = real_create(self, data, *args, **kwargs)
        real_create(marker, closing)
        return result

    monkeypatch.setattr(DocumentReference, "create", create_racing_the_closer)
    outcome = hub.record_update(svc, obj, fid, 2, "eu", 1, now)

    assert (outcome.kind, outcome.message) == (hub.UpdateKind.LATE, "late: round 2 is closed")
    assert [(x.node, x.reason) for x in store.refusals(fid, 2)] == [("eu", "late")]
    assert store.marker(fid, 2).participants == ["us"]


@pytest.mark.parametrize(("forgery", "reason"), [
    ("unsigned", "unsigned update"),
    ("another node's key", "bad signature: not signed with eu's registered key"),
    ("inflated example count", "bad signature: not signed with eu's registered key"),
    ("swapped payload", "bad signature: not signed with eu's registered key"),
])
def test_an_update_the_nodes_key_did_not_sign_is_refused_and_recorded(cloud, clients, forgery, reason):
    from shared import hub
    from shared.ingest import RawObject

    fid, now = f"fed-sig-{forgery.split()[0].replace(chr(39), '')}", utcnow()
    svc, store = open_round(clients, federation(fid, rounds=1), now)
    metrics = {"global_accuracy": 0.5, "global_loss": 1.0, "test_examples": 10}
    payload = json.dumps(metrics).encode()
    meta = {
        "unsigned": {"examples": "10", "metrics": json.dumps(metrics)},
        "another node's key": signed_metadata(cloud, "us", fid, 2, 1, 10, metrics, payload) | {},
        "inflated example count": signed_metadata(cloud, "eu", fid, 2, 1, 10, metrics, payload) | {"examples": "1000"},
        "swapped payload": signed_metadata(cloud, "eu", fid, 2, 1, 10, metrics, payload.replace(b"0.5", b"0.9")),
    }[forgery]
    if forgery == "another node's key":  # us signs claims naming eu: the key is wrong, not the claims
        signer = LocalKeySigner.from_file(node_key_file(Path(cloud.endpoints.state_dir), "us"))
        claims = update_claims(federation=fid, round=2, node="eu", attempt=1, examples=10, metrics=metrics, payload=payload)
        meta = {"examples": "10", "metrics": json.dumps(metrics), **signature_metadata(signer, claims)}
    bucket, name = clients.settings.processed_bucket("eu"), f"updates/eu/{fid}/round-0002-a1.json"  # no trigger there
    blob = clients.gcs.bucket(bucket).blob(name)
    blob.upload_from_string(envelope(cloud, "eu").seal(payload, bucket, name, Purpose.UPDATE))

    outcome = hub.record_update(svc, RawObject(bucket, name, blob.generation, blob.size, meta), fid, 2, "eu", 1, now)

    assert outcome.message == f"refused: {reason}"
    assert [(x.node, x.message) for x in store.refusals(fid, 2)] == [("eu", reason)]
    assert not store.is_counted(fid, 2, "eu")  # never counted
    assert store.round(fid, 2).status == "open"


def test_a_federation_with_a_node_that_has_no_signing_key_is_refused(cloud, clients, shares):
    from shared.node_registry import NodeRegistry

    eu = NodeRegistry(clients.db, clients.settings).ref("eu")
    saved = eu.get().to_dict()
    eu.delete()
    try:
        start_by_upload(clients.gcs, clients.settings, federation("fed-nokey"))
        ref = clients.db.collection(clients.settings.federations_collection).document("fed-nokey")
        wait_for(lambda: ref.get().exists, 30, "the request to be handled")
    finally:
        eu.set(saved)
    fed = ref.get().to_dict()
    assert fed["status"] == "rejected"
    assert fed["error"] == "no registered signing key for eu (fedpipe nodes register)"


def test_a_replaced_update_is_refused_and_the_counted_version_is_the_one_aggregated(cloud, clients):
    """A node's counted update is pinned by generation: overwriting the object afterwards
    (even with a valid signature) changes nothing the hub aggregates."""
    from shared import hub
    from shared.ingest import RawObject

    fid, now = "fed-replaced", utcnow()
    svc, store = open_round(clients, federation(fid, rounds=1), now)
    bucket, name = clients.settings.processed_bucket("eu"), f"updates/eu/{fid}/round-0002-a1.json"  # no trigger there
    blob = clients.gcs.bucket(bucket).blob(name)

    def upload(accuracy: float) -> RawObject:
        metrics = {"global_accuracy": accuracy, "global_loss": 1.0, "test_examples": 10}
        payload = json.dumps(metrics).encode()
        blob.upload_from_string(envelope(cloud, "eu").seal(payload, bucket, name, Purpose.UPDATE))
        return RawObject(bucket, name, blob.generation, blob.size, signed_metadata(cloud, "eu", fid, 2, 1, 10, metrics, payload))

    first = upload(0.5)
    assert hub.record_update(svc, first, fid, 2, "eu", 1, now).kind is hub.UpdateKind.RECORDED
    assert hub.record_update(svc, first, fid, 2, "eu", 1, now).kind is hub.UpdateKind.DUPLICATE
    second = upload(0.9)
    assert hub.record_update(svc, second, fid, 2, "eu", 1, now).message == "refused: replaces an update already counted"

    kept = store.update_view(fid, 2, "eu").counted
    assert kept.generation == first.generation and kept.metrics.global_accuracy == 0.5
    assert [(x.generation, x.reason) for x in store.refusals(fid, 2)] == [(second.generation, "replaces_counted")]


def test_aggregation_reuses_the_updates_this_hub_counted_instead_of_downloading_them_again(cloud, clients, monkeypatch):
    """An update is read once, when it is counted: the close averages the bytes this hub instance
    verified, and downloads only updates another instance counted."""
    from shared import gcs_uri, hub
    from shared.hub.aggregation_io import aggregate
    from shared.ingest import RawObject
    from shared.model_spec import param_spec

    fid, now = "fed-held", utcnow()
    svc, store = open_round(clients, federation(fid, rounds=1), now, r=1)
    bucket = clients.gcs.bucket(clients.settings.processed_bucket("eu"))  # no trigger there: only these calls handle them
    metrics = {"global_accuracy": 0.5, "global_loss": 1.0, "test_examples": 10, "train_loss": 1.0, "train_accuracy": 0.5}
    updates = {}
    for node, value, examples in (("us", 1.0, 10), ("eu", 2.0, 20)):
        params = {k: np.full(shape, value, np.float32) for k, (shape, _) in param_spec("mlp", 64, 10, (64,)).items()}
        payload = weights.to_bytes(params, {"federation": fid, "round": "1", "node": node})
        blob = bucket.blob(f"updates/{node}/{fid}/round-0001-a1.safetensors")
        blob.upload_from_string(envelope(cloud, node).seal(payload, bucket.name, blob.name, Purpose.UPDATE))
        updates[node] = RawObject(bucket.name, blob.name, blob.generation, blob.size, signed_metadata(cloud, node, fid, 1, 1, examples, metrics, payload))
    # Only us is counted here, so the round stays open (the stack's own deadline sweep could otherwise close it first).
    assert hub.record_update(svc, updates["us"], fid, 1, "us", 1, now).message == "recorded; round 1: 1 of 2 reported"
    us = store.update_view(fid, 1, "us").counted
    counted_elsewhere = us.model_copy(update={"node": "eu", "object": f"gs://{bucket.name}/{updates['eu'].name}",
                                              "generation": updates["eu"].generation, "examples": 20})
    downloads = []
    real_read = gcs_uri.read
    monkeypatch.setattr(gcs_uri, "read", lambda gcs, uri, generation=None: downloads.append(uri) or real_read(gcs, uri, generation))

    uri = aggregate(hub.Hub.of(svc), store.federation(fid), 1, {"us": us, "eu": counted_elsewhere}, recover=False)

    assert downloads == [counted_elsewhere.object]
    global_1, _ = weights.from_bytes(read(cloud, clients, uri, Purpose.GLOBAL_MODEL))
    for value in global_1.values():
        np.testing.assert_allclose(value, (1.0 * 10 + 2.0 * 20) / 30, rtol=1e-6)


def test_a_close_whose_closer_died_is_finished_from_its_marker_once_stale(cloud, clients):
    """The delivery that creates a round's close marker finishes the close. Should it die first,
    the deadline sweep finishes it with the marker's participants once the marker is stale."""
    from shared import hub
    from shared.fedstore import CloseMarker

    fid, now = "fed-dead-closer", utcnow()
    svc, store = open_round(clients, federation(fid, rounds=1), now)
    for node, accuracy in (("eu", 0.6), ("us", 0.8)):
        store.add_update(fid, 2, counted(node, now, accuracy))
    # ...and died. Its time is a minute ahead, so the stack's own deadline sweep (on the real clock)
    # never finds it stale however slowly this test runs: only the calls below do.
    marked = now + timedelta(seconds=60)
    store.create_marker(fid, 2, CloseMarker(status="closed", reason="all 2 nodes reported", participants=["eu", "us"], at=marked))

    assert hub.advance(svc, fid, 2, marked + timedelta(seconds=1), recover=True).message == "round 2 is being closed by another delivery"
    done = hub.advance(svc, fid, 2, marked + timedelta(seconds=hub.STALE_CLOSE_S), recover=True)
    assert done.message == "federation completed (all 2 nodes reported)"

    fed = store.federation(fid)
    assert fed.status == "completed" and fed.final.accuracy == pytest.approx(0.7)
    assert store.round(fid, 2).participants == ["eu", "us"]


def test_a_request_that_is_gone_is_acknowledged_with_its_reason(cloud, clients):
    """No retry can read a deleted request, so the hub says why and acknowledges the event
    instead of failing it until it is dead-lettered."""
    from shared import hub
    from shared.ingest import RawObject, Services

    fid = "fed-gone"
    blob = clients.gcs.bucket(clients.settings.processed_bucket("eu")).blob(f"requests/{fid}.json")  # no trigger there
    blob.upload_from_string(federation(fid).model_dump_json())
    obj = RawObject(blob.bucket.name, blob.name, blob.generation, blob.size, {})
    blob.delete()
    svc = Services(clients.settings, clients.db, clients.gcs, clients.publisher)

    assert hub.handle_hub_object(svc, obj, utcnow()).kind is hub.StartKind.IGNORED
    assert not hub.fed_ref(svc, fid).get().exists


def test_watch_prints_when_firestore_recorded_each_event_on_the_callers_clock(cloud, clients, shares):
    """Every line's time is the event's recorded time (an update counted, a round's close
    committed) since the caller's origin, as the demo's other lines are: not when a poll saw it."""
    origin = utcnow()
    start_by_upload(clients.gcs, clients.settings, federation("fed-clock", rounds=1))
    out = io.StringIO()
    watch_federation(clients.db, clients.settings, "fed-clock", Console(file=out, width=300), 120, origin=origin)

    _, rounds = fed_views.load(clients.db, clients.settings, "fed-clock")
    recorded = {f"round {rd['round']} closed": rd["committed_at"] for rd in rounds}
    recorded |= {f"round {rd['round']:>2} {node}": u["counted_at"] for rd in rounds for node, u in rd["updates"].items()}
    shown = {}
    for line in out.getvalue().splitlines():
        seconds, event = line.strip().split("s ", 1)
        shown[event.split(":")[0].split(" (")[0]] = seconds
    assert shown == {event: f"{(at - origin).total_seconds():.2f}" for event, at in recorded.items()}
    assert len(shown) == 6  # two rounds, each with two nodes' reports and its close

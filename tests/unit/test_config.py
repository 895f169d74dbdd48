"""shared.config, shared.triggers, the router's retry policy and the launcher choice."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulators.launcher import LocalProcessLauncher
from emulators.router_config import RetryPolicy
from shared.config import Settings
from shared.launchers.select import launcher_from_env
from shared.triggers import FIRESTORE_WRITTEN, PUBSUB_PUBLISHED, STORAGE_FINALIZED, function_names, triggers

pytestmark = pytest.mark.unit


# -- Settings -----------------------------------------------------------------


def test_defaults_from_an_empty_environment():
    s = Settings.from_env({})
    assert s.project == "fedpipe-local"
    assert s.nodes == ("us", "eu")
    assert s.region == "us-central1"
    assert s.raw_bucket("us") == "fedpipe-local-us-raw"
    assert s.hub_bucket == "fedpipe-local-hub"


def test_from_env_reads_every_variable():
    s = Settings.from_env(
        {
            "FEDPIPE_PROJECT": "acme",
            "FEDPIPE_NODES": "a, b",
            "FEDPIPE_REGION": "europe-west4",
            "FEDPIPE_MAX_UPLOAD_BYTES": "1024",
        }
    )
    assert s.project == "acme"
    assert s.nodes == ("a", "b")
    assert s.region == "europe-west4"
    assert s.max_upload_bytes == 1024
    assert s.raw_bucket("a") == "acme-a-raw"
    assert s.processed_bucket("b") == "acme-b-processed"
    assert s.quarantine_bucket("a") == "acme-a-quarantine"
    assert s.hub_bucket == "acme-hub"


def test_nodes_are_trimmed_and_empty_entries_dropped():
    assert Settings.from_env({"FEDPIPE_NODES": " a ,, b ,"}).nodes == ("a", "b")
    assert Settings.from_env({"FEDPIPE_NODES": "solo"}).nodes == ("solo",)


def test_google_cloud_project_is_the_fallback_project():
    assert Settings.from_env({"GOOGLE_CLOUD_PROJECT": "gcp-proj"}).project == "gcp-proj"
    assert Settings.from_env({"GOOGLE_CLOUD_PROJECT": "gcp-proj", "FEDPIPE_PROJECT": "mine"}).project == "mine"


def test_bucket_prefix_overrides_the_project_in_bucket_names():
    s = Settings.from_env({"FEDPIPE_PROJECT": "acme", "FEDPIPE_BUCKET_PREFIX": "acme-test", "FEDPIPE_NODES": "a,b"})
    assert s.project == "acme"
    assert s.raw_bucket("a") == "acme-test-a-raw"
    assert s.hub_bucket == "acme-test-hub"
    assert s.all_buckets() == [
        "acme-test-a-raw", "acme-test-a-processed", "acme-test-a-quarantine",
        "acme-test-b-raw", "acme-test-b-processed", "acme-test-b-quarantine",
        "acme-test-hub",
    ]


def test_from_env_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("FEDPIPE_PROJECT", "from-os")
    monkeypatch.setenv("FEDPIPE_NODES", "x")
    s = Settings.from_env()
    assert s.project == "from-os" and s.nodes == ("x",)


def test_node_of_bucket():
    s = Settings.from_env({"FEDPIPE_PROJECT": "acme", "FEDPIPE_NODES": "a, b"})
    assert s.node_of_bucket("acme-a-raw") == "a"
    assert s.node_of_bucket("acme-b-raw") == "b"
    assert s.node_of_bucket("acme-a-processed") is None
    assert s.node_of_bucket("acme-hub") is None
    assert s.node_of_bucket("acme-c-raw") is None
    assert s.node_of_bucket("other-a-raw") is None


# -- triggers -----------------------------------------------------------------


def test_one_storage_trigger_per_node_raw_bucket():
    s = Settings.from_env({"FEDPIPE_PROJECT": "acme", "FEDPIPE_NODES": "a, b, c"})
    storage = [t for t in triggers(s) if t.kind == "storage" and t.function == "on_raw_upload"]
    assert [t.bucket for t in storage] == ["acme-a-raw", "acme-b-raw", "acme-c-raw"]
    assert [t.name for t in storage] == ["raw-upload-a", "raw-upload-b", "raw-upload-c"]
    assert all(t.function == "on_raw_upload" and t.event_type == STORAGE_FINALIZED for t in storage)
    assert all(t.topic is None and t.document is None for t in storage)


def test_pubsub_and_firestore_triggers():
    s = Settings.from_env({})
    ts = triggers(s)
    assert len(ts) == len(s.nodes) + 4
    [hub] = [t for t in ts if t.function == "on_hub_upload"]
    assert (hub.kind, hub.bucket, hub.event_type) == ("storage", s.hub_bucket, STORAGE_FINALIZED)
    pubsub = [t for t in ts if t.kind == "pubsub"]
    firestore = [t for t in ts if t.kind == "firestore"]
    assert len(pubsub) == 2 and len(firestore) == 1
    (p, tick), (f,) = pubsub, firestore
    assert (tick.function, tick.topic) == ("on_tick", s.tick_topic)
    assert (p.function, p.event_type, p.topic, p.bucket) == ("on_shard_ready", PUBSUB_PUBLISHED, "shard-ready", None)
    assert p.topic == s.shard_ready_topic
    assert (f.function, f.event_type, f.document, f.bucket) == ("on_job_written", FIRESTORE_WRITTEN, "jobs/{jobId}", None)


def test_trigger_names_are_unique():
    names = [t.name for t in triggers(Settings.from_env({"FEDPIPE_NODES": "a,b,c"}))]
    assert len(names) == len(set(names))


def test_function_names_in_order_and_unique():
    names = function_names(Settings.from_env({"FEDPIPE_NODES": "a,b,c"}))
    assert names == ["on_raw_upload", "on_hub_upload", "on_shard_ready", "on_tick", "on_job_written"]


# -- RetryPolicy --------------------------------------------------------------


def test_backoff_is_exponential_then_capped():
    policy = RetryPolicy(min_backoff_s=1.0, max_backoff_s=30.0)
    assert [policy.backoff(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_backoff_starts_at_min():
    policy = RetryPolicy(min_backoff_s=0.25, max_backoff_s=1.0)
    assert policy.backoff(1) == 0.25
    assert policy.backoff(2) == 0.5
    assert policy.backoff(3) == 1.0
    assert policy.backoff(50) == 1.0


def test_backoff_with_max_below_min_is_max():
    assert RetryPolicy(min_backoff_s=10.0, max_backoff_s=3.0).backoff(1) == 3.0


def test_zero_backoff_policy():
    assert RetryPolicy(min_backoff_s=0.0, max_backoff_s=0.0).backoff(5) == 0.0


# -- launcher selection -------------------------------------------------------


def test_local_launcher_uses_the_state_dir(tmp_path):
    launcher = launcher_from_env({"FEDPIPE_LAUNCHER": "local", "FEDPIPE_STATE_DIR": str(tmp_path)})
    assert isinstance(launcher, LocalProcessLauncher)
    assert launcher.state_dir == tmp_path


def test_local_is_the_default_launcher():
    launcher = launcher_from_env({})
    assert isinstance(launcher, LocalProcessLauncher)
    assert launcher.state_dir == Path(".fedpipe")


@pytest.mark.parametrize("kind", ["k8s", "LOCAL", ""])
def test_unknown_launcher_is_refused(kind):
    with pytest.raises(ValueError, match="FEDPIPE_LAUNCHER"):
        launcher_from_env({"FEDPIPE_LAUNCHER": kind})


@pytest.mark.parametrize(("kind", "module", "name"), [
    ("confidential-space", "shared.launchers.confidential_space", "ConfidentialSpaceLauncher"),
    ("confidential-batch", "shared.launchers.batch", "ConfidentialBatchLauncher"),
])
def test_confidential_launchers_are_selected_by_name(kind, module, name, monkeypatch):
    import importlib

    launcher_class = getattr(importlib.import_module(module), name)
    monkeypatch.setattr(launcher_class, "from_env", classmethod(lambda cls, env=None: ("built", kind, env["FEDPIPE_LAUNCHER"])))
    assert launcher_from_env({"FEDPIPE_LAUNCHER": kind}) == ("built", kind, kind)

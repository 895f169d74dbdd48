"""`fedpipe smoke` against the local cloud: the same command a deployed project gets, through typer's CliRunner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedpipe import context, smoke
from fedpipe.demo import ChainReport
from shared import clients as shared_clients
from shared.config import Settings
from shared.jobs import JobStatus

pytestmark = pytest.mark.emulator


@pytest.fixture
def cli(cloud):
    """The CLI's view of the cloud: the session stack, found the way `fedpipe` finds it (FEDPIPE_STATE_DIR)."""
    for cached in (context.local_endpoints, shared_clients.settings, shared_clients.db, shared_clients.gcs):
        cached.cache_clear()
    yield CliRunner()
    for cached in (context.local_endpoints, shared_clients.settings, shared_clients.db, shared_clients.gcs):
        cached.cache_clear()


def _summary(output: str) -> smoke.SmokeSummary:
    return smoke.SmokeSummary.model_validate(json.loads(output.strip().splitlines()[-1]))


def test_smoke_passes_every_stage_on_the_local_cloud(cli, clients):
    result = cli.invoke(smoke.smoke_app, ["--node", "eu", "--timeout", "300", "--json"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    summary = _summary(result.output)
    assert summary.passed and summary.target == "local cloud" and summary.node == "eu"
    assert summary.failed_stage is None and summary.error is None and summary.look_at is None
    # Every stage reached, in the chain's order.
    order = ["uploaded", *smoke.STAGE_NAMES]
    assert list(summary.stages_s) == order
    times = [summary.stages_s[s] for s in order]
    assert times == sorted(times), summary.stages_s
    assert summary.rows == smoke.ROWS and summary.accuracy is not None
    # What it reports is what Firestore holds: the data set in eu's raw bucket, trained once.
    job = clients.db.collection(clients.settings.jobs_collection).document(summary.job_id).get().to_dict()
    assert job["status"] == JobStatus.COMPLETED
    assert (job["spec"]["dataset"]["node"], job["spec"]["dataset"]["dataset"]) == ("eu", summary.dataset)
    names = {b.name for b in clients.gcs.list_blobs(clients.settings.raw_bucket("eu"), prefix=f"{summary.dataset}/")}
    assert names == {f"{summary.dataset}/_dataset.json", *(f"{summary.dataset}/{f}" for f in smoke.FILES)}
    assert "passed" in result.output and "job completed" in result.output


def test_an_unknown_node_is_refused_before_anything_is_uploaded(cli):
    result = cli.invoke(smoke.smoke_app, ["--node", "mars"])
    assert result.exit_code == 2
    assert "node 'mars' is not one of this deployment's nodes (us, eu, mallory" in result.output


def test_a_refused_file_fails_at_preprocessing_at_once_and_says_where_to_look(cli, monkeypatch):
    # The files arrive as something that is not the declared CSV: preprocessing quarantines them.
    monkeypatch.setattr(smoke, "csv_bytes", lambda table: b"\x00\x01 not a csv")
    result = cli.invoke(smoke.smoke_app, ["--node", "us", "--timeout", "120", "--json"], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    summary = _summary(result.output)
    assert not summary.passed and summary.failed_stage == "preprocessed"
    assert "part-0.csv" in summary.error or "part-1.csv" in summary.error
    assert "fedpipe-raw-upload-us" in summary.look_at and "fedpipe quarantine" in summary.look_at
    assert summary.elapsed_s < 100, "a refusal ends the wait, not the timeout"
    assert "failed at: preprocessed" in result.output


def test_a_chain_cut_short_names_the_first_stage_not_reached(cli, clients):
    settings = Settings.from_env()
    summary = smoke.run_smoke(clients.db, clients.gcs, settings, smoke.console, node="us", timeout_s=0.5, target="local cloud")
    assert not summary.passed
    assert summary.failed_stage in smoke.STAGE_NAMES and summary.failed_stage not in summary.stages_s
    assert summary.error.startswith("not reached within 0s:")
    # Every stage before it was reached, none after.
    index = smoke.STAGE_NAMES.index(summary.failed_stage)
    assert all(s in summary.stages_s for s in smoke.STAGE_NAMES[:index])
    assert not any(s in summary.stages_s for s in smoke.STAGE_NAMES[index + 1:])
    assert summary.look_at


def test_stage_times_read_watch_chains_timings():
    report = ChainReport(node="us", dataset="d")
    report.timings_s.update({"uploaded": 0.2, "preprocessed:part-0.csv": 1.0, "preprocessed:part-1.csv": 1.5, "dataset_complete": 1.6,
                             "pending:1": 1.6, "scheduled:1": 1.7, "running:1": 2.0, "failed:1": 3.0, "scheduled:2": 4.0,
                             "running:2": 4.5, "completed:2": 6.0})
    assert smoke.stage_times(report, list(smoke.FILES)) == {
        "uploaded": 0.2, "preprocessed": 1.5, "dataset_complete": 1.6, "job_launched": 1.7, "job_running": 2.0, "job_completed": 6.0,
    }
    del report.timings_s["preprocessed:part-1.csv"]
    assert smoke.first_missing(smoke.stage_times(report, list(smoke.FILES))) == "preprocessed"


def test_the_synthetic_data_is_learnable_and_declared_as_uploaded():
    table, features = smoke.synthetic_table(seed=1)
    assert table.num_rows == smoke.ROWS and table.column_names == [*features, "label"]
    assert set(table.column("label").to_pylist()) == {0, 1}

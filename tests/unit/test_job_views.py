"""`fedpipe jobs show`: what the engine says of a job's run, asked once, and `fedpipe submit`'s accelerator options."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from rich.console import Console
from typer.testing import CliRunner

import shared.launchers.select as select
from fedpipe import cli, views
from shared.jobs import DatasetRef, Job, JobSpec, JobStatus, transition
from shared.launchers import RunState
from tests.unit.queue_fakes import RecordingLauncher

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def rendered(table) -> str:
    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(table)
    return out.getvalue()


def scheduled() -> Job:
    job = Job.new("j", JobSpec(dataset=DatasetRef(node="us", dataset="iris"), accelerator="tpu:v5e:4x4"), NOW)
    return transition(job, JobStatus.SCHEDULED, NOW, execution="fake:j/1")


def test_job_detail_shows_the_engine_state_only_when_there_is_one():
    assert "engine state  queued" in rendered(views.job_detail(scheduled(), "queued"))
    assert "engine state" not in rendered(views.job_detail(scheduled()))
    assert "tpu:v5e:4x4 x 4 hosts" in rendered(views.job_detail(scheduled()))


def test_the_engine_is_asked_about_runs_that_are_not_over(monkeypatch):
    launcher = RecordingLauncher({"fake:j/1": RunState.QUEUED})
    monkeypatch.setattr(select, "launcher_from_env", lambda: launcher)
    assert cli._engine_state(scheduled()) == "queued"
    assert cli._engine_state(transition(scheduled(), JobStatus.CANCELLED, NOW)) is None
    assert launcher.asked == ["fake:j/1"]

    def unconfigured():
        raise ValueError("FEDPIPE_LAUNCHER='x'")

    monkeypatch.setattr(select, "launcher_from_env", unconfigured)
    assert cli._engine_state(scheduled()) == "unknown (FEDPIPE_LAUNCHER='x')"


def test_submit_refuses_an_accelerator_it_cannot_parse_before_touching_the_queue():
    result = CliRunner().invoke(cli.app, ["submit", "--node", "us", "--dataset", "iris", "--accelerator", "tpu:v9:2x2"])
    assert result.exit_code != 0 and "a TPU is tpu:<version>:<topology>" in result.output
    result = CliRunner().invoke(cli.app, ["submit", "--node", "us", "--dataset", "iris", "--accelerator", "tpu:v5e:4x4", "--hosts", "2"])
    assert result.exit_code != 0 and "has 4 hosts, not 2" in result.output

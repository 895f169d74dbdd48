"""What the CLI prints: ids a user copies stay whole on a narrow terminal; the demo's node names."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from rich.console import Console

from fedpipe import views
from fedpipe.cli import demo_node_names
from shared.jobs import DatasetRef, Job, JobSpec

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def rendered(table, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(table)
    return out.getvalue()


def test_job_ids_are_never_cut_at_80_columns():
    ids = ["fed-digits-mlp-fedavg-site12", "train-us-a-rather-long-data-set-name-0123456789", "j1"]
    jobs = [Job.new(i, JobSpec(dataset=DatasetRef(node="us", dataset="a-rather-long-data-set-name")), NOW) for i in ids]
    text = rendered(views.jobs_table(jobs, 80), 80)
    assert all(i in text for i in ids)
    assert "…" not in text  # the other columns wrap whole rather than being cut
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "created" in rendered(views.jobs_table(jobs, 160), 160)


def test_delivery_ids_are_never_cut_at_80_columns():
    records = [{"id": "raw-upload-us~12345678901234567", "trigger": "raw-upload-us", "function": "on_raw_upload", "updated_at": NOW,
                "subject": "objects/some/long/path/to/a/file.csv", "status": "delivered", "attempts": 1}]
    assert records[0]["id"] in rendered(views.deliveries_table(records), 80)


def test_demo_node_names():
    assert demo_node_names(2) == ["us", "eu"]
    assert demo_node_names(4) == ["us", "eu", "site3", "site4"]
    assert len(set(demo_node_names(32))) == 32

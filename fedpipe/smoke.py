"""`fedpipe smoke`: a tiny synthetic data set through the whole chain, stage by stage, within a bound.

Against whatever the CLI is pointed at (fedpipe.context: the running local cloud, else the
project of FEDPIPE_PROJECT with Application Default Credentials), the same code: it uploads
a generated data set to a node's raw bucket the way a user would (the declaration, then the
files), follows the chain in Firestore (demo.watch_chain) through files preprocessed ->
data set complete -> job launched -> job running -> job completed, and prints a typed
summary of when each stage was reached. A failure names the stage that was not reached
and what to look at. No real data: the rows are random numbers.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated

import numpy as np
import pyarrow as pa
import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from fedpipe import context
from fedpipe.demo import ChainReport, csv_bytes, watch_chain
from shared.config import Settings
from shared.datasets import SPEC_OBJECT, DatasetSpec
from shared.jobs import TrainSpec, utcnow
from shared.manifest import dataset_doc_id
from shared.quarantine import QuarantineStore

smoke_app = typer.Typer(help="Smoke-test a deployment (or the local cloud) end to end with a tiny synthetic data set.")
console = Console()
err = Console(stderr=True)

FILES = ("part-0.csv", "part-1.csv")  # two files: completion waits for every declared file
ROWS = 96
FEATURES = 4
TRAIN = TrainSpec(model="logreg", epochs=5, batch_size=32)  # seconds on a CPU worker
SLICE_S = 5.0  # how often the refusal check runs between watch_chain's polls


# The chain's stages, in order: what each means, and where to look when it is not reached.
STAGES: tuple[tuple[str, str, str], ...] = (
    ("preprocessed", "files preprocessed",
     "the raw-upload function of node {node} (fedpipe-raw-upload-{node}: its logs), `fedpipe quarantine`, and the events: "
     "`fedpipe events tail` locally, `fedpipe events tail --project {project}` (dead letters) when deployed"),
    ("dataset_complete", "data set complete",
     "the shard-ready function (fedpipe-shard-ready: its logs) and the data set's document {collection}/{dataset_id}"),
    ("job_launched", "job launched",
     "the job-written function (fedpipe-job-written: its logs), its launcher settings (`terraform output launcher_env`), "
     "and `fedpipe jobs show {job}`"),
    ("job_running", "job running",
     "the worker: its Cloud Run job executions (fedpipe-worker-{node}) or the local worker's log, and whether node {node}'s "
     "worker identity is registered (`fedpipe nodes list`)"),
    ("job_completed", "job completed", "`fedpipe jobs show {job}` (its error and attempts) and the worker's logs"),
)
STAGE_NAMES = tuple(name for name, _, _ in STAGES)


class SmokeSummary(BaseModel, frozen=True):
    """What one smoke run saw: each stage reached, in seconds since the upload began."""

    target: str  # "local cloud" or "project <id>"
    node: str
    dataset: str
    job_id: str | None
    passed: bool
    stages_s: dict[str, float]  # stage -> seconds since the upload began, for every stage reached
    failed_stage: str | None = None  # the first stage not reached
    error: str | None = None
    look_at: str | None = None
    rows: int = 0
    accuracy: float | None = None
    elapsed_s: float


def synthetic_table(rows: int = ROWS, features: int = FEATURES, seed: int | None = None) -> tuple[pa.Table, list[str]]:
    """Random rows with a label a linear model can learn: made here, nothing real."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    weights = rng.normal(size=features)
    label = (x @ weights + 0.1 * rng.normal(size=rows) > 0).astype(np.int32)
    label[:2] = (0, 1)  # both classes, however the draw falls
    names = [f"x{i}" for i in range(features)]
    return pa.table({**{n: x[:, i] for i, n in enumerate(names)}, "label": label}), names


def upload(gcs, settings: Settings, node: str, dataset: str, seed: int | None = None) -> list[str]:
    """Declare the data set, then upload its files to the node's raw bucket, as a user would."""
    table, features = synthetic_table(seed=seed)
    spec = DatasetSpec(features=features, label="label", num_classes=2, expected_files=list(FILES), train=TRAIN)
    bucket = gcs.bucket(settings.raw_bucket(node))
    bucket.blob(f"{dataset}/{SPEC_OBJECT}").upload_from_string(json.dumps(spec.model_dump(mode="json"), indent=2), content_type="application/json")
    bounds = np.linspace(0, table.num_rows, len(FILES) + 1).astype(int)
    for i, name in enumerate(FILES):
        part = table.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i]))
        bucket.blob(f"{dataset}/{name}").upload_from_string(csv_bytes(part), content_type="text/csv")
    return list(FILES)


def stage_times(report: ChainReport, files: list[str]) -> dict[str, float]:
    """watch_chain's timings (per file, per job status and attempt) as the smoke test's stages."""
    t = report.timings_s

    def first(prefix: str) -> float | None:
        found = [v for k, v in t.items() if k.startswith(prefix)]
        return min(found) if found else None

    per_file = [t.get(f"preprocessed:{name}") for name in files]
    reached = {
        "uploaded": t.get("uploaded"),
        "preprocessed": max(per_file) if all(v is not None for v in per_file) else None,
        "dataset_complete": t.get("dataset_complete"),
        "job_launched": first("scheduled:"),
        "job_running": first("running:"),
        "job_completed": first("completed:"),
    }
    return {stage: seconds for stage, seconds in reached.items() if seconds is not None}


def first_missing(stages_s: dict[str, float]) -> str | None:
    return next((name for name in STAGE_NAMES if name not in stages_s), None)


def where_to_look(stage: str, *, node: str, project: str, settings: Settings, dataset: str, job: str | None) -> str:
    template = dict((name, hint) for name, _, hint in STAGES)[stage]
    return template.format(node=node, project=project, collection=settings.datasets_collection,
                           dataset_id=dataset_doc_id(node, dataset), job=job or "<job id>")


def refused(db, settings: Settings, dataset: str) -> list[dict]:
    """Quarantine records of this run's files: preprocessing refused them, no stage after will come."""
    return [r.model_dump(include={"source", "reason", "detail"}) for r in QuarantineStore(db, settings).recent(dataset=dataset)]


def run_smoke(db, gcs, settings: Settings, out: Console, *, node: str, timeout_s: float, target: str, dataset: str | None = None) -> SmokeSummary:
    """Upload, follow, summarise. Never raises for a failed chain: the summary says where it stopped."""
    dataset = dataset or f"smoke-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    report = ChainReport(node=node, dataset=dataset)
    started, clock = utcnow(), time.monotonic()
    files = upload(gcs, settings, node, dataset)
    report.timings_s["uploaded"] = round(time.monotonic() - clock, 3)
    out.print(f"[dim]{report.timings_s['uploaded']:7.2f}s[/] uploaded {SPEC_OBJECT} and {len(files)} files "
              f"({ROWS} synthetic rows) to gs://{settings.raw_bucket(node)}/{dataset}/")
    deadline = clock + timeout_s
    error = None
    while (left := deadline - time.monotonic()) > 0:
        report = watch_chain(db, settings, report, started, out, min(SLICE_S, left))
        if report.status != "timeout":
            break  # the job ended
        if problems := refused(db, settings, dataset):
            error = "; ".join(f"{p['source']}: {p['reason']}" + (f" ({p['detail']})" if p.get("detail") else "") for p in problems)
            report.status = "refused"
            break
    stages_s = stage_times(report, files)
    missing = first_missing(stages_s)
    passed = missing is None and report.status == "completed"
    if not passed:
        missing = missing or "job_completed"
        if error is None:
            error = report.error if report.status not in ("timeout", "refused") else None
        if error is None:
            label = dict((name, label) for name, label, _ in STAGES)[missing]
            error = f"not reached within {timeout_s:.0f}s: {label}" + (f" (job {report.job_id})" if report.job_id else "")
    return SmokeSummary(
        target=target, node=node, dataset=dataset, job_id=report.job_id, passed=passed, stages_s=stages_s,
        failed_stage=None if passed else missing, error=None if passed else error,
        look_at=None if passed else where_to_look(missing, node=node, project=settings.project, settings=settings, dataset=dataset, job=report.job_id),
        rows=sum(f.get("rows", 0) for f in report.files.values()), accuracy=report.results.get("accuracy"),
        elapsed_s=round(time.monotonic() - clock, 3),
    )


def summary_table(summary: SmokeSummary) -> Table:
    table = Table("stage", "reached", "at (s)", title=f"fedpipe smoke: {summary.target}, node {summary.node}, data set {summary.dataset}")
    for name, label in (("uploaded", "uploaded"), *((n, lbl) for n, lbl, _ in STAGES)):
        seconds = summary.stages_s.get(name)
        mark = "[green]yes[/]" if seconds is not None else ("[red]NO[/]" if name == summary.failed_stage else "[dim]-[/]")
        table.add_row(label, mark, "" if seconds is None else f"{seconds:.2f}")
    return table


@smoke_app.callback(invoke_without_command=True)
def smoke(
    node: Annotated[str | None, typer.Option(help="the node whose raw bucket gets the data set [default: the first of FEDPIPE_NODES]")] = None,
    timeout: Annotated[float, typer.Option(min=10, max=3600, help="seconds the whole chain may take")] = 900.0,
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON as the last line")] = False,
) -> None:
    """Upload a tiny synthetic data set to NODE's raw bucket and follow it to a trained model; exit 0 only if every stage was reached."""
    local = context.local_endpoints()
    settings = context.settings()
    node = node or settings.nodes[0]
    if node not in settings.nodes:
        err.print(f"[red]error:[/] node {node!r} is not one of this deployment's nodes ({', '.join(settings.nodes)}; FEDPIPE_NODES)")
        raise typer.Exit(2)
    target = "local cloud" if local is not None else f"project {settings.project}"
    console.print(f"smoke test against the [bold]{target}[/], node [bold]{node}[/] (bound: {timeout:.0f}s)")
    summary = run_smoke(context.db(), context.gcs(), settings, console, node=node, timeout_s=timeout, target=target)
    console.print(summary_table(summary))
    if summary.passed:
        accuracy = "" if summary.accuracy is None else f", held-out accuracy {summary.accuracy:.3f}"
        console.print(f"[green]passed[/]: job {summary.job_id} completed in {summary.stages_s['job_completed']:.1f}s{accuracy}")
    else:
        err.print(f"[red]failed at: {summary.failed_stage}[/] {summary.error or ''}")
        err.print(f"look at: {summary.look_at}")
    if json_out:
        print(summary.model_dump_json())
    raise typer.Exit(0 if summary.passed else 1)

"""The end-to-end demo: a real data set dropped into a node's raw bucket, watched to a trained model.

Every step goes through the real local cloud: the storage client uploads, fake-gcs-server
notifies, the router delivers CloudEvents, the functions preprocess, aggregate and
launch, and the JAX worker trains. Nothing here calls a function directly.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
from google.cloud import firestore, storage
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from shared.config import Settings
from shared.datasets import SPEC_OBJECT
from shared.jobs import Job, JobStatus, TrainSpec, utcnow
from shared.manifest import dataset_doc_id
from shared.quarantine import QuarantineStore

DATASETS = ("digits", "breast_cancer", "wine", "iris")


def load_table(name: str) -> tuple[pa.Table, list[str], int]:
    """A scikit-learn data set (shipped with the package, no network) as a table."""
    from sklearn import datasets

    if name not in DATASETS:
        raise ValueError(f"unknown demo data set {name!r}; choose one of {', '.join(DATASETS)}")
    bunch = getattr(datasets, f"load_{name}")()
    features = [f"x{i:02d}" for i in range(bunch.data.shape[1])]
    columns = {f: bunch.data[:, i] for i, f in enumerate(features)}
    columns["label"] = bunch.target.astype(np.int32)
    return pa.table(columns), features, int(bunch.target.max()) + 1


def csv_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pcsv.write_csv(table, buf)
    return buf.getvalue()


@dataclass
class ChainReport:
    """What the demo saw, with each stage's time since the first upload (seconds)."""

    node: str
    dataset: str
    files: dict[str, dict] = field(default_factory=dict)
    quarantined: list[dict] = field(default_factory=list)
    job_id: str | None = None
    status: str = "uploading"
    timings_s: dict[str, float] = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict:
        return {
            "node": self.node, "dataset": self.dataset, "status": self.status, "job_id": self.job_id,
            "rows": sum(f.get("rows", 0) for f in self.files.values()),
            "shards": sum(f.get("shards", 0) for f in self.files.values()),
            "files": self.files, "quarantined": self.quarantined, "timings_s": self.timings_s,
            "accuracy": self.results.get("accuracy"), "results": self.results, "error": self.error,
        }


def upload_dataset(gcs: storage.Client, settings: Settings, node: str, dataset: str, name: str, parts: int, train: TrainSpec) -> list[str]:
    """Split the data set into `parts` CSV files, declare them, and upload declaration then files."""
    table, features, num_classes = load_table(name)
    bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
    files = {f"part-{i}.csv": table.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(parts)}
    spec = {
        "features": features, "label": "label", "num_classes": num_classes,
        "expected_files": list(files), "train": train.model_dump(mode="json"),
    }
    bucket = gcs.bucket(settings.raw_bucket(node))
    bucket.blob(f"{dataset}/{SPEC_OBJECT}").upload_from_string(json.dumps(spec, indent=2), content_type="application/json")
    for file_name, part in files.items():
        bucket.blob(f"{dataset}/{file_name}").upload_from_string(csv_bytes(part), content_type="text/csv")
    return list(files)


def watch_chain(db: firestore.Client, settings: Settings, report: ChainReport, started: datetime, console: Console, timeout_s: float) -> ChainReport:
    """Follow the chain through Firestore until the job ends, printing each stage once."""
    def since(ts: datetime) -> float:
        return round((ts - started).total_seconds(), 3)

    def stage(key: str, ts: datetime, text: str) -> None:
        if key not in report.timings_s:
            report.timings_s[key] = since(ts)
            console.print(f"[dim]{report.timings_s[key]:7.2f}s[/] {text}")

    ds_ref = db.collection(settings.datasets_collection).document(dataset_doc_id(report.node, report.dataset))
    deadline = time.monotonic() + timeout_s
    progress = Progress(TextColumn("        training"), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True)
    task = None
    with progress:
        while time.monotonic() < deadline:
            for snap in ds_ref.collection("files").stream():
                rec = snap.to_dict()
                if rec["status"] == "processed" and rec["name"] not in report.files:
                    report.files[rec["name"]] = {"rows": rec["rows"], "shards": rec["shards"]}
                    stage(f"preprocessed:{rec['name']}", rec["updated_at"], f"preprocessed [bold]{escape(rec['name'])}[/]: {rec['rows']} rows, {rec['shards']} shard(s)")
            ds = ds_ref.get().to_dict() or {}
            if ds.get("status") == "complete" and ds.get("job_id"):
                stage("dataset_complete", ds["completed_at"], f"data set complete: {ds['rows']} rows in {len(ds['files'])} files")
                report.job_id = ds["job_id"]
            if report.job_id:
                snap = db.collection(settings.jobs_collection).document(report.job_id).get()
                if snap.exists:
                    job = Job.from_doc(snap.id, snap.to_dict())
                    for t in job.history:
                        label = {JobStatus.PENDING: f"job [bold]{job.id}[/] pending", JobStatus.SCHEDULED: "job scheduled (launch claimed)",
                                 JobStatus.RUNNING: "job running", JobStatus.COMPLETED: "job completed", JobStatus.FAILED: "job failed"}.get(t.status, str(t.status))
                        stage(f"{t.status.value}:{t.attempt}", t.at, label + (f" (attempt {t.attempt})" if t.attempt > 1 else ""))
                    if job.status is JobStatus.RUNNING and job.progress:
                        if task is None:
                            task = progress.add_task("", total=job.progress.get("epochs", 1))
                        progress.update(task, completed=job.progress.get("epoch", 0),
                                        description=f"epoch {int(job.progress['epoch'])}/{int(job.progress['epochs'])} loss {job.progress['loss']:.4f} acc {job.progress['accuracy']:.3f}")
                    report.status = job.status.value
                    if job.is_terminal:
                        report.results, report.error = job.results, job.error
                        return report
            time.sleep(0.1)
    report.status = "timeout"
    report.error = f"the chain did not finish within {timeout_s:.0f}s"
    return report


def run_chain(db: firestore.Client, gcs: storage.Client, settings: Settings, console: Console, *, node: str, dataset: str,
              source: str, parts: int, train: TrainSpec, timeout_s: float) -> ChainReport:
    report = ChainReport(node=node, dataset=dataset)
    started = utcnow()
    files = upload_dataset(gcs, settings, node, dataset, source, parts, train)
    console.print(f"[dim]{(utcnow() - started).total_seconds():7.2f}s[/] uploaded {SPEC_OBJECT} and {len(files)} files of "
                  f"[bold]{source}[/] to gs://{settings.raw_bucket(node)}/{dataset}/")
    report = watch_chain(db, settings, report, started, console, timeout_s)
    for record in QuarantineStore(db, settings).recent(dataset=dataset):
        report.quarantined.append(record.model_dump(include={"source", "reason", "detail"}))
    return report

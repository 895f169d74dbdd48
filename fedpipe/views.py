"""Rich renderings of jobs, deliveries and quarantined files, shared by the CLI and the demo."""

from __future__ import annotations

from datetime import datetime

from rich.markup import escape
from rich.table import Column, Table

from shared.jobs import Job, JobStatus
from shared.quarantine import QuarantineRecord

STATUS_STYLE = {
    JobStatus.PENDING: "yellow",
    JobStatus.SCHEDULED: "cyan",
    JobStatus.RUNNING: "blue",
    JobStatus.COMPLETED: "green",
    JobStatus.FAILED: "red",
    JobStatus.CANCELLED: "dim",
}


def when(ts: datetime | None) -> str:
    return ts.strftime("%H:%M:%S") if ts else "-"


def status_text(status: JobStatus) -> str:
    return f"[{STATUS_STYLE[status]}]{status.value}[/]"


def progress_text(job: Job) -> str:
    p = job.progress
    if not p:
        return ""
    return f"epoch {int(p.get('epoch', 0))}/{int(p.get('epochs', 0))} loss {p.get('loss', 0):.4f} acc {p.get('accuracy', 0):.3f}"


def id_column(header: str, ids: list[str]) -> Column:
    """A column of ids a user copies into the next command: never cut, wrapped or folded.

    Rich shrinks the other columns to fit a narrow terminal instead (80 columns).
    """
    return Column(header, no_wrap=True, min_width=max((len(i) for i in ids), default=len(header)))


def jobs_table(jobs: list[Job], width: int = 200) -> Table:
    """The jobs list; below 120 columns only id, status, data set and result, so each stays readable."""
    wide = width >= 120
    folded = {"overflow": "fold"}  # wrapped whole, never cut with an ellipsis
    columns = ["status", *(["attempt"] if wide else []), Column("data set", **folded), *(["model", "created", "updated"] if wide else []),
               Column("result / progress", **folded)]
    table = Table(id_column("job", [j.id for j in jobs]), *columns)
    for job in jobs:
        result = (
            f"accuracy {job.results['accuracy']:.4f}" if "accuracy" in job.results else job.error or progress_text(job)
        )
        dataset = f"{job.spec.dataset.node}/{job.spec.dataset.dataset}"
        if wide:
            table.add_row(job.id, status_text(job.status), f"{job.attempt}/{job.spec.max_attempts}", dataset, job.spec.train.model,
                          when(job.created_at), when(job.updated_at), result)
        else:
            table.add_row(job.id, status_text(job.status), dataset, result)
    return table


def job_detail(job: Job, engine_state: str | None = None) -> Table:
    """The job, and `engine_state`: what the engine running its current attempt says of it, when asked."""
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("id", job.id),
        ("status", status_text(job.status)),
        ("attempt", f"{job.attempt} of {job.spec.max_attempts}"),
        ("data set", f"{job.spec.dataset.node}/{job.spec.dataset.dataset}"),
        ("train", job.spec.train.model_dump_json()),
        ("accelerator", str(job.spec.accelerator) + (f" x {job.spec.hosts} hosts" if job.spec.hosts > 1 else "")),
        ("execution", job.execution or "-"),
        *([("engine state", engine_state)] if engine_state else []),
        ("heartbeat", when(job.heartbeat_at)),
        ("progress", progress_text(job) or "-"),
        ("error", job.error or "-"),
    ]
    rows += [(f"result.{k}", str(v)) for k, v in job.results.items()]
    for key, value in rows:
        table.add_row(key, value)
    history = Table("at", "status", "attempt", "reason", title="history")
    for t in job.history:
        history.add_row(when(t.at), status_text(t.status), str(t.attempt), t.reason or "")
    table.add_row("", history)
    return table


def deliveries_table(records: list[dict]) -> Table:
    table = Table("at", "trigger", "function", "subject", "status", "attempts", "last error", id_column("id", [r["id"] for r in records]))
    style = {"delivered": "green", "retrying": "yellow", "dead_lettered": "red"}
    for r in records:
        table.add_row(
            when(r.get("updated_at")), r["trigger"], r["function"], r.get("subject", ""),
            f"[{style.get(r['status'], 'white')}]{r['status']}[/]", str(r["attempts"]),
            (r.get("last_error") or "")[:60], r["id"],
        )
    return table


def quarantine_table(records: list[QuarantineRecord]) -> Table:
    table = Table("at", "node", "source", "reason", "detail", "kept at")
    for r in records:
        detail = "\n".join(r.problems) if r.problems else r.detail
        table.add_row(when(r.at), r.node or "-", escape(r.source), f"[red]{r.reason}[/]", escape(detail), r.kept_at or "-")
    return table

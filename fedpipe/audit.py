"""`fedpipe audit`: the key releases, refusals and attestation failures the key broker recorded (shared/audit.py)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedpipe import context
from shared.audit import AuditEvent, AuditRecord, FirestoreAuditStore

audit_app = typer.Typer(help="Who got a node's key, who was refused, and why.", invoke_without_command=True)
console = Console()

EVENT_STYLE = {AuditEvent.KEY_RELEASED: "green", AuditEvent.KEY_REFUSED: "yellow", AuditEvent.ATTESTATION_FAILED: "red"}


def _store() -> FirestoreAuditStore:
    return FirestoreAuditStore(context.db())


def audit_table(records: list[AuditRecord]) -> Table:
    table = Table("at", "event", "node", "operation", "reason", "image digest", "hwmodel", "service account", "key id")
    for r in records:
        digest = r.image_digest[:19] + "…" if r.image_digest and len(r.image_digest) > 20 else r.image_digest or "-"
        table.add_row(r.at.strftime("%Y-%m-%d %H:%M:%S"), f"[{EVENT_STYLE[r.event]}]{r.event.value}[/]", r.node or "-", r.operation or "-",
                      r.reason or "-", digest, r.hwmodel or "-", r.service_account or "-", str(r.key_id) if r.key_id is not None else "-")
    return table


@audit_app.callback()
def audit(
    node: Annotated[str | None, typer.Option(help="only this node's key")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="newest first, at most this many")] = 50,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON array of records")] = False,
) -> None:
    """List the audit trail of key release, newest first."""
    records = _store().recent(node=node, limit=limit)
    if json_out:
        typer.echo(json.dumps([r.model_dump(mode="json", exclude_none=True) for r in records]))
        return
    if not records:
        console.print("no audit records" + (f" for node {node}" if node else ""))
        return
    console.print(audit_table(records))

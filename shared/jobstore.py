"""The job queue in Firestore: every status change is one transaction through `transition`.

Callers pass `now`, so leases and heartbeats are tested without touching the clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime

from google.api_core.exceptions import AlreadyExists
from google.cloud import firestore
from pydantic import ValidationError

from shared.config import Settings
from shared.jobs import Job, JobStatus, is_lease_expired, may_wait_queued, retry_or_fail, transition

ACTIVE = [JobStatus.SCHEDULED.value, JobStatus.RUNNING.value]

log = logging.getLogger("fedpipe.jobstore")


def _bad_document(job_id: str, exc: Exception) -> None:
    """Log a job document that is not a valid job by its id and the kind of problem only:
    pydantic's messages quote the document's fields, and a document may hold anything."""
    problems = exc.error_count() if isinstance(exc, ValidationError) else 1
    log.error("job document %r is not a valid job (%s, %d problems); skipped", job_id[:200], type(exc).__name__, problems)


def parse_jobs(docs: Iterable[tuple[str, dict | None]]) -> list[Job]:
    """The jobs among (document id, fields) pairs.

    A document that does not parse as a job is logged by id and skipped: one bad
    document must not stop the clock for every other job.
    """
    jobs = []
    for job_id, doc in docs:
        try:
            job = Job.from_doc(job_id, doc or {})
            if any(t is not None and t.tzinfo is None for t in (job.updated_at, job.heartbeat_at)):
                raise TypeError("timestamps without a time zone")  # leases compare them with an aware `now`
            jobs.append(job)
        except (TypeError, ValueError) as exc:  # ValidationError is a ValueError
            _bad_document(job_id, exc)
    return jobs


class JobStore:
    def __init__(self, db: firestore.Client, settings: Settings) -> None:
        self.db = db
        self.collection = db.collection(settings.jobs_collection)

    def create(self, job: Job, transaction: firestore.Transaction | None = None) -> bool:
        """Create the job document; False if a job with this id exists (a duplicate submit)."""
        ref = self.collection.document(job.id)
        if transaction is not None:
            transaction.create(ref, job.to_doc())
            return True
        try:
            ref.create(job.to_doc())
        except AlreadyExists:
            return False
        return True

    def get(self, job_id: str) -> Job | None:
        snap = self.collection.document(job_id).get()
        return Job.from_doc(snap.id, snap.to_dict()) if snap.exists else None

    def list(self, limit: int = 50, status: JobStatus | None = None) -> list[Job]:
        query = self.collection
        if status is not None:
            query = query.where(filter=firestore.FieldFilter("status", "==", status.value))
        query = query.order_by("created_at", direction=firestore.Query.DESCENDING).limit(limit)
        return [Job.from_doc(s.id, s.to_dict()) for s in query.stream()]

    def update(self, job_id: str, change: Callable[[Job], Job | None]) -> Job | None:
        """Read-modify-write in a transaction. `change` returns None to leave the job as it is.

        Returns the job as written, or None when nothing was written.
        """

        @firestore.transactional
        def run(transaction: firestore.Transaction) -> Job | None:
            ref = self.collection.document(job_id)
            snap = ref.get(transaction=transaction)
            if not snap.exists:
                return None
            new = change(Job.from_doc(job_id, snap.to_dict()))
            if new is not None:
                transaction.set(ref, new.to_doc())
            return new

        return run(self.db.transaction())

    # -- the steps of a job's life, each safe to repeat ------------------------

    def claim(self, job_id: str, now: datetime) -> Job | None:
        """pending -> scheduled. Only one caller wins an attempt; a duplicate event gets None."""
        return self.update(
            job_id, lambda j: transition(j, JobStatus.SCHEDULED, now) if j.status is JobStatus.PENDING else None
        )

    def set_execution(self, job_id: str, attempt: int, execution: str) -> Job | None:
        return self.update(
            job_id,
            lambda j: j.model_copy(update={"execution": execution}) if j.attempt == attempt and not j.is_terminal else None,
        )

    def start(self, job_id: str, attempt: int, now: datetime) -> Job | None:
        """scheduled -> running for the worker of `attempt`; None if that attempt is no longer current."""
        return self.update(
            job_id,
            lambda j: transition(j, JobStatus.RUNNING, now, heartbeat_at=now)
            if j.attempt == attempt and j.status is JobStatus.SCHEDULED
            else None,
        )

    def heartbeat(self, job_id: str, attempt: int, now: datetime, progress: dict[str, float]) -> bool:
        """Renew the lease; False tells the worker its attempt was reaped or cancelled and it must stop."""
        written = self.update(
            job_id,
            lambda j: j.model_copy(update={"heartbeat_at": now, "progress": progress})
            if j.attempt == attempt and j.status is JobStatus.RUNNING
            else None,
        )
        return written is not None

    def finish(self, job_id: str, attempt: int, now: datetime, status: JobStatus, **changes) -> Job | None:
        return self.update(
            job_id,
            lambda j: transition(j, status, now, **changes)
            if j.attempt == attempt and j.status in (JobStatus.RUNNING, JobStatus.SCHEDULED)
            else None,
        )

    def fail_launch(self, job_id: str, attempt: int, now: datetime, reason: str) -> Job | None:
        return self.update(
            job_id, lambda j: retry_or_fail(j, now, reason) if j.attempt == attempt and j.status is JobStatus.SCHEDULED else None
        )

    def cancel(self, job_id: str, now: datetime) -> Job | None:
        return self.update(job_id, lambda j: None if j.is_terminal else transition(j, JobStatus.CANCELLED, now, reason="cancelled by user"))

    def refuse(self, job_id: str, attempt: int, now: datetime, reason: str) -> Job | None:
        """scheduled -> failed at once, no retry: the attempt can never run where it was sent."""
        return self.update(
            job_id,
            lambda j: transition(j, JobStatus.FAILED, now, reason=reason, error=reason)
            if j.attempt == attempt and j.status is JobStatus.SCHEDULED
            else None,
        )

    # -- the clock's view of running attempts (shared/timekeeper.py) -----------

    def active(self) -> list[Job]:
        """Every scheduled or running job (bad documents logged and skipped)."""
        snaps = self.collection.where(filter=firestore.FieldFilter("status", "in", ACTIVE)).stream()
        return parse_jobs((snap.id, snap.to_dict()) for snap in snaps)

    def _if_current(self, listed: Job, change: Callable[[Job], Job | None]) -> Job | None:
        """`change` applied only while the job is still active on the attempt and run it was listed with.

        A document that turned invalid since it was listed is logged and left alone.
        """
        try:
            return self.update(
                listed.id,
                lambda j: change(j)
                if j.attempt == listed.attempt and j.execution == listed.execution and j.status in (JobStatus.SCHEDULED, JobStatus.RUNNING)
                else None,
            )
        except ValidationError as exc:
            _bad_document(listed.id, exc)
            return None

    def reap(self, job: Job, now: datetime) -> Job | None:
        """Retry or fail `job` (as listed) if its worker is still silent past its lease."""
        reason = f"no heartbeat for {job.spec.lease_seconds:g}s while {job.status}"
        return self._if_current(job, lambda j: retry_or_fail(j, now, reason) if is_lease_expired(j, now) else None)

    def lose(self, job: Job, now: datetime, reason: str) -> Job | None:
        """Retry or fail `job` (as listed) now: its engine says the run is over, and no worker reported."""
        return self._if_current(job, lambda j: retry_or_fail(j, now, reason))

    def renew_queued(self, job: Job, now: datetime) -> Job | None:
        """Renew a scheduled attempt's lease while its engine holds it in a queue, up to MAX_QUEUED since its claim."""
        return self._if_current(job, lambda j: j.model_copy(update={"heartbeat_at": now}) if may_wait_queued(j, now) else None)

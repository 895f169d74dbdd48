"""The job queue without Firestore, and a launcher that records what it is asked.

`MemoryJobStore` is the real JobStore with its two Firestore touch points replaced:
`update` (the read-modify-write transaction) over a dict, and `active` (the query)
over the same dict, so every step of a job's life runs its real logic. The same
steps against the Firestore emulator: tests/emulator/test_run_polling.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from shared.jobs import Job, JobStatus
from shared.jobstore import JobStore
from shared.launchers import LaunchError, RunState


class MemoryJobStore(JobStore):
    def __init__(self, jobs: Iterable[Job] = ()) -> None:  # no Firestore client
        self.docs: dict[str, Job] = {job.id: job for job in jobs}

    def update(self, job_id: str, change: Callable[[Job], Job | None]) -> Job | None:
        job = self.docs.get(job_id)
        new = change(job) if job is not None else None
        if new is not None:
            self.docs[job_id] = new
        return new

    def active(self) -> list[Job]:
        return [j for j in self.docs.values() if j.status in (JobStatus.SCHEDULED, JobStatus.RUNNING)]


class RecordingLauncher:
    """Launches as `handle(job)`, answers `states` (a RunState, or an exception to raise), records every call."""

    def __init__(
        self,
        states: Mapping[str, RunState | Exception] | None = None,
        launch_error: Exception | None = None,
        stop_error: Exception | None = None,
    ) -> None:
        self.states = dict(states or {})
        self.launch_error, self.stop_error = launch_error, stop_error
        self.launched: list[tuple[str, int]] = []
        self.asked: list[str] = []
        self.stopped: list[str] = []

    @staticmethod
    def handle(job: Job) -> str:
        return f"fake:{job.id}/{job.attempt}"

    def launch(self, job: Job) -> str:
        self.launched.append((job.id, job.attempt))
        if self.launch_error is not None:
            raise self.launch_error
        return self.handle(job)

    def state(self, execution: str) -> RunState:
        self.asked.append(execution)
        answer = self.states.get(execution, LaunchError(f"no such run {execution}"))
        if isinstance(answer, Exception):
            raise answer
        return answer

    def stop(self, execution: str) -> None:
        self.stopped.append(execution)
        if self.stop_error is not None:
            raise self.stop_error


class LaunchOnly:
    """A launcher from before state() and stop(): the clock must go on without them."""

    def launch(self, job: Job) -> str:
        return RecordingLauncher.handle(job)

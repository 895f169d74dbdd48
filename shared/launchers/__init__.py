"""Launchers start a job's worker somewhere: a local process, Cloud Run Jobs, GKE, Vertex AI, Cloud Batch, ...

Each implements `Launcher`; `select.launcher_from_env` picks one from the environment
(`routing.py` picks a backend per job). Their client libraries load only when used.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol

from shared.jobs import Job


class LaunchError(RuntimeError):
    """The launcher could not start the worker; the attempt is retried or failed."""


class LaunchRefused(LaunchError):
    """The job can never run here (an accelerator this backend or machine lacks): fail it now, no retry."""


class RunState(StrEnum):
    """A backend's view of one execution, mapped from its own states by each launcher."""

    QUEUED = "queued"  # accepted, waiting for capacity or starting
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ENDED = "ended"  # finished, and the backend cannot tell how (a Confidential Space VM that stopped)
    GONE = "gone"  # the backend no longer knows it (deleted, or expired from its history)


class Launcher(Protocol):
    def launch(self, job: Job) -> str:
        """Start the worker for `job.attempt` and return an execution handle.

        MUST NOT be called twice for one (job.id, job.attempt): callers claim the
        attempt in a Firestore transaction first.
        """
        ...

    def state(self, execution: str) -> RunState:
        """The backend's state of an execution this launcher returned."""
        ...

    def stop(self, execution: str) -> None:
        """Stop the execution (a reaped or cancelled attempt) and return at once; stopping a finished or gone one is not an error."""
        ...

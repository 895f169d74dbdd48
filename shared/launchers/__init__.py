"""Launchers start a job's worker somewhere: a local process, Cloud Run Jobs, ...

Each implements `Launcher`; the launch function picks one from the environment.
"""

from __future__ import annotations

from typing import Protocol

from shared.jobs import Job


class LaunchError(RuntimeError):
    """The launcher could not start the worker; the attempt is retried or failed."""


class Launcher(Protocol):
    def launch(self, job: Job) -> str:
        """Start the worker for `job.attempt` and return an execution handle.

        MUST NOT be called twice for one (job.id, job.attempt): callers claim the
        attempt in a Firestore transaction first.
        """
        ...

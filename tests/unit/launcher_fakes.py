"""Recording stand-ins for the cloud clients the launchers call (no engine has an emulator).

Each records what it is sent, in the library's own request types or as (method, name)
pairs, and answers with a value or an error given to it.
"""

from __future__ import annotations

from google.cloud import batch_v1


class FakeBatchClient:
    """Records create_job requests and get_job / delete_job names; answers with `job` or raises `error`."""

    def __init__(self, error: Exception | None = None, job: batch_v1.Job | None = None) -> None:
        self.requests: list[batch_v1.CreateJobRequest] = []
        self.calls: list[tuple[str, str]] = []
        self.error, self.job = error, job

    def create_job(self, request=None, **kwargs):
        assert not kwargs, f"launcher passed unexpected arguments {kwargs}"
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return batch_v1.Job(name=f"{request.parent}/jobs/{request.job_id}")

    def _named(self, method: str, name: str, kwargs: dict):
        assert not kwargs, f"launcher passed unexpected arguments {kwargs}"
        self.calls.append((method, name))
        if self.error is not None:
            raise self.error
        return self.job

    def get_job(self, name=None, **kwargs):
        return self._named("get", name, kwargs)

    def delete_job(self, name=None, **kwargs):
        return self._named("delete", name, kwargs)

"""The worker's side of the node API (shared/node_api.py): every call carries the node's ID token.

The token comes from the metadata server, through google-auth, exactly as in production
(locally, GCE_METADATA_HOST points at the stack's stand-in for this node), and is
refreshed before it expires. The worker holds no other credential for the control plane.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

import requests
from google.auth.transport.requests import AuthorizedSession
from google.oauth2 import id_token

from shared.dataset_shards import DatasetShards
from shared.jobs import Job
from shared.node_api_messages import FederationView, UpdateReply

ENV_URL = "FEDPIPE_NODE_API_URL"
TIMEOUT_S = 60.0  # a report of the update that closes a round waits for the aggregation
RETRIES = 5  # transient failures (connection, 5xx) before a call gives up


class NodeApiError(RuntimeError):
    """The node API refused the request, or could not be reached after RETRIES tries."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"node API: {status} {message}")
        self.status = status


class NodeClient:
    def __init__(self, base_url: str, session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        # The audience is the API's URL, as Cloud Run checks for a function's invoker.
        self.session = session or AuthorizedSession(id_token.fetch_id_token_credentials(base_url if base_url.endswith("/") else base_url + "/"))

    @classmethod
    def from_env(cls) -> NodeClient:
        url = os.environ.get(ENV_URL)
        if not url:
            raise NodeApiError(0, f"{ENV_URL} is not set: the worker does not know where to report")
        return cls(url)

    def _call(self, method: str, path: str, json: dict | None = None, params: dict | None = None, timeout_s: float = TIMEOUT_S) -> requests.Response:
        for attempt in range(RETRIES):
            try:
                response = self.session.request(method, self.base_url + path, json=json, params=params, timeout=timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt + 1 == RETRIES:
                    raise NodeApiError(0, f"unreachable: {type(exc).__name__}") from exc
            else:
                if response.status_code < 500 or attempt + 1 == RETRIES:
                    return response
            time.sleep(min(0.2 * 2**attempt, 3.0))
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs) -> tuple[int, dict[str, Any]]:
        response = self._call(method, path, **kwargs)
        body = response.json() if response.headers.get("Content-Type", "").startswith("application/json") else {}
        if response.status_code not in ok:
            raise NodeApiError(response.status_code, body.get("error", response.reason))
        return response.status_code, body

    def start(self, job_id: str, attempt: int) -> Job | None:
        """Our attempt is running now; None when it is not the job's scheduled attempt."""
        status, body = self._json("POST", f"/v1/jobs/{job_id}/start", ok=(200, 409), json={"attempt": attempt})
        return Job.model_validate(body["job"]) if status == 200 else None

    def heartbeat(self, job_id: str, attempt: int, progress: dict[str, float]) -> bool:
        """False: this attempt was reaped or cancelled, and the worker must stop."""
        return self._json("POST", f"/v1/jobs/{job_id}/heartbeat", json={"attempt": attempt, "progress": progress})[1]["continue"]

    def finish(self, job_id: str, attempt: int, outcome: Literal["completed", "failed", "retry"], results: dict | None = None,
               error: str | None = None, reason: Literal["worker error", "attestation"] = "worker error") -> str | None:
        """The job's status as written; None when the attempt was no longer current."""
        body = {"attempt": attempt, "outcome": outcome, "results": results or {}, "error": error[:4000] if error else None, "reason": reason}
        status, reply = self._json("POST", f"/v1/jobs/{job_id}/finish", ok=(200, 409), json=body)
        return reply["status"] if status == 200 else None

    def dataset(self, job_id: str) -> DatasetShards:
        return DatasetShards.model_validate(self._json("GET", f"/v1/jobs/{job_id}/dataset")[1])

    def federation(self, fid: str, after: int = 0, wait_s: float = 0.0) -> FederationView:
        """The federation now, or, with `wait_s`, once its round passes `after` (or `wait_s` passed)."""
        params = {"after": str(after), "wait": str(wait_s)}
        return FederationView.model_validate(self._json("GET", f"/v1/federations/{fid}", params=params, timeout_s=TIMEOUT_S + wait_s)[1])

    def global_model(self, fid: str, r: int) -> bytes:
        response = self._call("GET", f"/v1/federations/{fid}/models/{r}")
        if response.status_code != 200:
            raise NodeApiError(response.status_code, "no global model")
        return response.content

    def report_update(self, fid: str, r: int, object_name: str, generation: int) -> UpdateReply:
        """Ask the hub to count our uploaded update: what it did with it (counted, or refused and why)."""
        body = {"object": object_name, "generation": generation}
        return UpdateReply.model_validate(self._json("POST", f"/v1/federations/{fid}/rounds/{r}/updates", ok=(200, 404, 409, 422), json=body)[1])

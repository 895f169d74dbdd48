"""The node API: the one way a worker speaks to the rest of fedpipe.

Workers hold no Firestore or Pub/Sub rights. Everything they tell the system (started,
heartbeat and progress, completed or failed, "my update for round r is uploaded") and
everything they learn from it (their job, their data set's shards, their federation's
round, its global model) goes through these routes, as the node of a verified ID token
(shared/identity.py). Nothing in a request names the node: a request about a job,
federation or object that is not the caller's node's is refused with 403 and recorded
in the `refusals` collection, and changes nothing.

| route                                         | what it does                                        |
| --------------------------------------------- | --------------------------------------------------- |
| POST /v1/jobs/{job}/start                     | scheduled -> running for the worker's attempt        |
| POST /v1/jobs/{job}/heartbeat                 | renew the lease; says whether to go on               |
| POST /v1/jobs/{job}/finish                    | completed, failed, or retry (a transient error)      |
| GET  /v1/jobs/{job}/dataset                   | the job's pinned data set: spec, statistics, shards  |
| GET  /v1/federations/{fid}?after=R&wait=S     | the federation as this node sees it; waits for R+1   |
| GET  /v1/federations/{fid}/models/{r}         | the global model after round r                       |
| POST /v1/federations/{fid}/rounds/{r}/updates | count the node's uploaded update for round r         |
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from google.api_core.exceptions import NotFound
from google.cloud import firestore
from pydantic import ValidationError
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.exceptions import NotFound as NoRoute
from werkzeug.routing import Map, Rule

from shared import hub
from shared.aggregator_messages import KeyReply
from shared.bytes_cache import BytesCache
from shared.dataset_shards import pinned_dataset
from shared.envelope import HUB, Purpose
from shared.federation import UPDATE_PATH, global_model_object, round_kind
from shared.fedstore import Federation, FederationStatus
from shared.hub import UpdateKind
from shared.hub.aggregator_client import AggregatorUnavailable
from shared.hub.context import aggregator_client, owner_envelopes
from shared.identity import Caller, Refusal, TokenVerifier, Unauthenticated
from shared.ingest import RawObject, Services
from shared.jobs import Job, JobStatus, retry_or_fail, transition, utcnow
from shared.jobstore import JobStore
from shared.node_api_messages import AttemptBody, FederationView, FinishBody, HeartbeatBody, UpdateReply, UpdateReport
from shared.node_registry import NodeRegistry

log = logging.getLogger("fedpipe.node_api")

MAX_BODY_BYTES = 64 * 2**10
MAX_WAIT_S = 30.0  # a long poll answers within this, moved or not
IDENTITY_TTL_S = 30.0  # how long an instance trusts its registry lookup of a token's identity
MAX_IDENTITIES = 4096  # identities an instance remembers; past it, the lookups start over
MAX_ROUND = 9999  # a round number in a path: round_key's four digits

@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any] | bytes = field(default_factory=dict)


def _error(status: int, message: str, **extra: Any) -> Reply:
    return Reply(status, {"error": message, **extra})


class Forbidden(Exception):
    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class FederationWatches:
    """One Firestore listener per federation document, shared by every long poll of this instance.

    A waiter is woken when the document changes; a listener nobody waited on for
    LINGER_S is closed.
    """

    LINGER_S = 120.0

    def __init__(self, ref: Callable[[str], firestore.DocumentReference]) -> None:
        self.ref = ref
        self._lock = threading.Condition()
        self._docs: dict[str, dict | None] = {}
        self._watches: dict[str, Any] = {}
        self._last_wait: dict[str, float] = {}

    def wait(self, fid: str, moved: Any, timeout_s: float) -> dict | None:
        """The federation document once `moved(doc)` holds, or as it is after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._last_wait[fid] = time.monotonic()
            if fid not in self._watches:
                self._watches[fid] = self.ref(fid).on_snapshot(lambda snaps, *_: self._changed(fid, snaps))
            while fid not in self._docs or not moved(self._docs[fid]):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            self._last_wait[fid] = time.monotonic()
            doc = self._docs.get(fid)
        self._close_idle()
        return doc

    def latest(self, fid: str) -> dict | None:
        """The document as the listener last saw it; None when this instance has no listener on it."""
        with self._lock:
            return self._docs.get(fid) if fid in self._watches else None

    def _changed(self, fid: str, snapshots) -> None:
        with self._lock:
            self._docs[fid] = snapshots[0].to_dict() if snapshots and snapshots[0].exists else None
            self._lock.notify_all()

    def _close_idle(self) -> None:
        with self._lock:
            idle = [fid for fid, at in self._last_wait.items() if time.monotonic() - at > self.LINGER_S]
            closing = [self._watches.pop(fid) for fid in idle]
            for fid in idle:
                self._docs.pop(fid, None)
                self._last_wait.pop(fid)
        for watch in closing:  # outside the lock: a listener thread may be waiting for it in _changed
            watch.unsubscribe()


ROUTES = Map(
    [
        Rule("/v1/jobs/<job_id>/start", methods=["POST"], endpoint="start"),
        Rule("/v1/jobs/<job_id>/heartbeat", methods=["POST"], endpoint="heartbeat"),
        Rule("/v1/jobs/<job_id>/finish", methods=["POST"], endpoint="finish"),
        Rule("/v1/jobs/<job_id>/dataset", methods=["GET"], endpoint="dataset"),
        Rule("/v1/federations/<fid>", methods=["GET"], endpoint="federation"),
        Rule(f"/v1/federations/<fid>/models/<int(max={MAX_ROUND}):r>", methods=["GET"], endpoint="model"),
        Rule(f"/v1/federations/<fid>/rounds/<int(max={MAX_ROUND}):r>/updates", methods=["POST"], endpoint="update"),
    ],
    strict_slashes=False,
)


class NodeApi:
    def __init__(self, svc: Services, verifier: TokenVerifier, clock: Callable[[], datetime] = utcnow) -> None:
        self.svc = svc
        self.verifier = verifier
        self.now = clock
        self.jobs = JobStore(svc.db, svc.settings)
        self.registry = NodeRegistry(svc.db, svc.settings)
        self.store = hub.federation_store(svc)
        self.watches = FederationWatches(self.store.federation_ref)
        self.models = BytesCache(max_bytes=256 * 2**20)  # by (federation, round): every member asks for each one
        self.hub_envelope = owner_envelopes(svc.settings)(HUB)
        self._identities: dict[str, tuple[float, str | None]] = {}

    # -- the request, as functions/node_api.py hands it over ---------------------

    def handle(self, method: str, path: str, authorization: str | None, query: dict[str, str], body: bytes) -> Reply:
        try:
            endpoint, args = ROUTES.bind("node-api").match(path, method=method)
        except NoRoute:
            return _error(404, "no such route")
        except MethodNotAllowed:
            return _error(405, "method not allowed")
        try:
            caller = self._caller(authorization)
        except Unauthenticated as exc:
            log.warning("401 %s %s: %s", method, endpoint, exc)
            return _error(401, f"unauthenticated: {exc}")
        try:
            if caller.node is None:
                raise Forbidden(Refusal.UNREGISTERED, "this identity is no registered node's")
            return getattr(self, f"_{endpoint}")(caller.node, body=body, query=query, **args)
        except Forbidden as exc:
            self._record_refusal(caller, method, endpoint, args, exc)
            return _error(403, str(exc), reason=exc.reason.value)
        except ValidationError as exc:
            return _error(400, f"malformed request: {exc.error_count()} problems", fields=[".".join(map(str, e["loc"])) for e in exc.errors()][:10])

    def _caller(self, authorization: str | None) -> Caller:
        identity = self.verifier.verify(authorization)
        cached = self._identities.get(identity)
        if cached is None or time.monotonic() - cached[0] > IDENTITY_TTL_S:
            cached = (time.monotonic(), self.registry.node_of_identity(identity))
            if len(self._identities) >= MAX_IDENTITIES:
                self._identities.clear()
            self._identities[identity] = cached
        return Caller(identity=identity, node=cached[1])

    def _record_refusal(self, caller: Caller, method: str, endpoint: str, args: dict, exc: Forbidden) -> None:
        """Who asked for what, and why not: ids only, never a request body."""
        record = {
            "identity": caller.identity, "node": caller.node, "method": method, "route": endpoint,
            "target": {k: str(v)[:200] for k, v in args.items()}, "reason": exc.reason.value, "at": self.now(),
        }
        log.warning("403 %s %s by %s (node %s): %s", method, endpoint, caller.identity, caller.node, exc.reason.value)
        self.svc.db.collection(self.svc.settings.refusals_collection).add(record)

    # -- jobs ------------------------------------------------------------------------

    def _own_job(self, node: str, job_id: str) -> Job:
        job = self.jobs.get(job_id) if 0 < len(job_id) <= 200 else None
        if job is None or job.spec.dataset.node != node:
            raise Forbidden(Refusal.NOT_YOUR_JOB, "not a job of this node")  # the same answer whether or not it exists
        return job

    def _start(self, node: str, job_id: str, body: bytes, **_) -> Reply:
        self._own_job(node, job_id)
        request = AttemptBody.model_validate_json(body)
        job = self.jobs.start(job_id, request.attempt, self.now())
        if job is None:
            return _error(409, "this attempt is not the job's scheduled one")
        return Reply(200, {"job": job.model_dump(mode="json")})

    def _heartbeat(self, node: str, job_id: str, body: bytes, **_) -> Reply:
        self._own_job(node, job_id)
        request = HeartbeatBody.model_validate_json(body)
        return Reply(200, {"continue": self.jobs.heartbeat(job_id, request.attempt, self.now(), request.progress)})

    def _finish(self, node: str, job_id: str, body: bytes, **_) -> Reply:
        self._own_job(node, job_id)
        request = FinishBody.model_validate_json(body)
        now = self.now()

        def change(job: Job) -> Job | None:
            if job.attempt != request.attempt or job.status not in (JobStatus.RUNNING, JobStatus.SCHEDULED):
                return None
            if request.outcome == "completed":
                return transition(job, JobStatus.COMPLETED, now, results=request.results)
            if request.outcome == "retry":  # a transient error: the next attempt, within the job's limit
                return retry_or_fail(job, now, request.error or "worker error")
            return transition(job, JobStatus.FAILED, now, reason=request.reason, error=request.error)

        written = self.jobs.update(job_id, change)
        if written is None:
            return _error(409, "this attempt is no longer the job's current one")
        return Reply(200, {"status": written.status.value})

    def _dataset(self, node: str, job_id: str, **_) -> Reply:
        """The pinned version of the job's data set: only the node's own shards, spec and statistics."""
        ref = self._own_job(node, job_id).spec.dataset
        pinned = pinned_dataset(self.svc.db, self.svc.settings, ref)
        if pinned is None:
            return _error(409, f"data set {ref.node}/{ref.dataset} is not complete" + (f" at version {ref.version}" if ref.version else ""))
        return Reply(200, pinned.model_dump(mode="json"))

    # -- federations -----------------------------------------------------------------

    def _member_view(self, node: str, fed: Federation | None) -> FederationView:
        """What a member may know of its federation: its own standing, never another node's."""
        if fed is None or fed.config is None or node not in fed.config.node_names:
            raise Forbidden(Refusal.NOT_A_MEMBER, "not a member of this federation")
        r = fed.round or None
        final = fed.final.model_dump(exclude_none=True) if fed.status is FederationStatus.COMPLETED and fed.final else None
        return FederationView(
            status=fed.status.value, round=r, rounds=fed.config.rounds, kind=round_kind(fed.config, r) if r else None,
            global_model_round=(r - 1) if fed.global_model_uri and r else None, train=fed.config.train_spec(),
            signed_updates=fed.config.signed_updates, stats=fed.stats, error=fed.error, final=final,
            confidential_aggregation=fed.config.confidential_aggregation,
            aggregator=self._aggregator_key() if fed.config.confidential_aggregation and fed.status is FederationStatus.RUNNING else None,
        )

    def _aggregator_key(self) -> KeyReply | None:
        """Relayed as the aggregator gives it: the member checks the token itself, so this hop need not be trusted."""
        client = aggregator_client(self.svc.settings.aggregator_url)
        try:
            return client.key() if client is not None else None
        except AggregatorUnavailable as exc:
            log.warning("aggregator key unavailable: %s", exc)
            return None

    def _federation(self, node: str, fid: str, query: dict[str, str], **_) -> Reply:
        fed = self._fed(fid)
        view = self._member_view(node, fed)
        after, wait_s = _int(query.get("after"), 0, 10**6), min(_float(query.get("wait"), 0.0), MAX_WAIT_S)
        if wait_s > 0 and fed.status is FederationStatus.RUNNING and fed.round <= after:
            moved = lambda doc: doc is None or doc.get("status") != "running" or (doc.get("round") or 0) > after  # noqa: E731
            doc = self.watches.wait(fid, moved, wait_s)
            fed = Federation.from_doc(fid, doc) if doc is not None else None
            view = self._member_view(node, fed)
        if fed.status is FederationStatus.RUNNING and fed.round and wait_s == 0:
            # Only a worker's first call can find its update counted (a relaunched worker); a long poll
            # answers with a round that opened after the caller's last one.
            view = view.model_copy(update={"counted": self.store.is_counted(fid, fed.round, node)})
        return Reply(200, view.model_dump(mode="json"))

    def _model(self, node: str, fid: str, r: int, **_) -> Reply:
        self._member_view(node, self._fed(fid, fresh=False))
        blob = self.svc.gcs.bucket(self.svc.settings.hub_bucket).blob(global_model_object(fid, r))

        def read() -> bytes:  # sealed under the hub's key at rest; a member gets it over its authenticated channel
            return self.hub_envelope.open(blob.download_as_bytes(), blob.bucket.name, blob.name, Purpose.GLOBAL_MODEL)

        if (data := self.models.get(fid, r)) is None:
            try:
                data = read()
            except NotFound:
                return _error(404, f"no global model after round {r}")
            self.models.put(fid, r, data)
        return Reply(200, data)

    def _update(self, node: str, fid: str, r: int, body: bytes, **_) -> Reply:
        report = UpdateReport.model_validate_json(body)
        match = UPDATE_PATH.match(report.object)
        if match is None or match["node"] != node or match["fid"] != fid or int(match["round"]) != r:
            raise Forbidden(Refusal.NOT_YOUR_OBJECT, "the object is not this node's update for this round")
        self._member_view(node, self._fed(fid, fresh=False))
        blob = self.svc.gcs.bucket(self.svc.settings.hub_bucket).get_blob(report.object, generation=report.generation)
        if blob is None:
            return _error(404, "no such object generation")
        obj = RawObject(bucket=blob.bucket.name, name=blob.name, generation=blob.generation, size=blob.size, metadata=dict(blob.metadata or {}))
        outcome = hub.record_update(self.svc, obj, fid, r, node, int(match["attempt"]), self.now())
        log.info("update %s#%d: %s", obj.name, obj.generation, outcome.message)
        reply = UpdateReply(
            outcome=outcome.kind.value, counted=outcome.counted, message=outcome.message, reason=outcome.reason.value if outcome.reason else None,
        )
        return Reply(UPDATE_STATUS[outcome.kind], reply.model_dump(mode="json", exclude_none=True))

    def _fed(self, fid: str, fresh: bool = True) -> Federation | None:
        """The federation; not `fresh`: as this instance's listener last saw it, if it has one (membership
        never changes, so a document a few milliseconds old answers who may ask)."""
        if not 0 < len(fid) <= 63:
            return None
        if not fresh and (doc := self.watches.latest(fid)) is not None:
            return Federation.from_doc(fid, doc)
        return self.store.federation(fid)


# What each outcome of a reported update is, in HTTP: the worker learns whether it counted, and why not.
UPDATE_STATUS = {
    UpdateKind.RECORDED: 200, UpdateKind.DUPLICATE: 200, UpdateKind.LATE: 409, UpdateKind.REFUSED: 422, UpdateKind.IGNORED: 404,
}


def _int(text: str | None, default: int, limit: int) -> int:
    try:
        return max(0, min(int(text), limit)) if text else default
    except ValueError:
        return default


def _float(text: str | None, default: float) -> float:
    try:
        value = float(text) if text else default
    except ValueError:
        return default
    return value if value == value and value >= 0 else default  # NaN and negatives: no wait


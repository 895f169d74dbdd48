"""The hub's documents, typed, and the store that owns their Firestore paths.

    federations/{fid}                                   Federation
    federations/{fid}/rounds/{round_key}                Round
    .../rounds/{round_key}/updates/{node}               Update (one counted update per node)
    .../rounds/{round_key}/late/{node}-a{n}-g{gen}      RefusedUpdate (late or refused, each kept)
    .../rounds/{round_key}/outcome/close                CloseMarker (who is in the round)

Federations and rounds change status only through their transition tables. The store is
a small Protocol with a Firestore implementation and an in-memory one beside it, so the
hub's races are tested in milliseconds and the emulator tests check the real thing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Generic, Literal, Protocol, TypeVar

from google.api_core.exceptions import AlreadyExists, FailedPrecondition
from google.cloud import firestore
from pydantic import BaseModel, Field, model_validator

from shared.config import Settings
from shared.datasets import FeatureStats
from shared.federation import MAX_EXAMPLES, FederationConfig, RoundMetrics, RoundStatus, UpdateMetrics, round_key, round_kind
from shared.io_pool import parallel
from shared.privacy import PrivacySpent


class FederationStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"  # created directly, never reached: a request that could not start


F, R = FederationStatus, RoundStatus
FEDERATION_TRANSITIONS: frozenset[tuple[FederationStatus, FederationStatus]] = frozenset({(F.RUNNING, F.COMPLETED), (F.RUNNING, F.FAILED)})
ROUND_TRANSITIONS: frozenset[tuple[RoundStatus, RoundStatus]] = frozenset({(R.OPEN, R.CLOSED), (R.OPEN, R.FAILED)})


class InvalidTransition(ValueError):
    def __init__(self, what: str, current: StrEnum, target: StrEnum) -> None:
        super().__init__(f"{what}: cannot go from {current} to {target}")
        self.current, self.target = current, target


class Federation(BaseModel, frozen=True):
    """A federation's document. A rejected one holds only its error: it never started."""

    id: str
    status: FederationStatus
    config: FederationConfig | None = None
    round: int = Field(default=0, ge=0)
    n_features: int | None = None
    num_classes: int | None = None
    stats: FeatureStats | None = None
    node_rows: dict[str, int] = {}  # each node's rows at the start: the most examples it may claim
    versions: dict[str, str | None] = {}  # each node's pinned data set version
    jobs: dict[str, str] = {}  # node -> its job's id
    global_model_uri: str | None = None
    final: RoundMetrics | None = None
    privacy: PrivacySpent | None = None  # with config.privacy: spent by the global models released so far
    error: str | None = None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None = None

    @model_validator(mode="after")
    def _started_ones_are_whole(self) -> Federation:
        if self.status is not F.REJECTED and (self.config is None or self.stats is None or self.n_features is None or self.num_classes is None):
            raise ValueError("a federation that started has its config, feature count, classes and statistics")
        return self

    @classmethod
    def rejected(cls, fid: str, error: str, now: datetime) -> Federation:
        return cls(id=fid, status=F.REJECTED, error=error, created_at=now, updated_at=now)

    def moved(self, target: FederationStatus, now: datetime, **changes: Any) -> Federation:
        """This federation in status `target`; InvalidTransition if the table forbids it."""
        if (self.status, target) not in FEDERATION_TRANSITIONS:
            raise InvalidTransition(f"federation {self.id}", self.status, target)
        return self.model_copy(update={"status": target, "updated_at": now, **changes})

    def to_doc(self) -> dict:
        config = self.config.model_dump(mode="json") if self.config else None
        return {**self.model_dump(exclude={"id", "config"}), "config": config}

    @classmethod
    def from_doc(cls, fid: str, doc: dict) -> Federation:
        return cls.model_validate({**doc, "id": fid})


class Round(BaseModel, frozen=True):
    round: int = Field(ge=1)
    kind: Literal["train", "evaluate"]
    status: RoundStatus = R.OPEN
    expected: list[str]
    opened_at: datetime
    deadline_at: datetime
    closed_at: datetime | None = None
    reason: str | None = None
    participants: list[str] | None = None
    global_metrics: RoundMetrics | None = None  # of the global model after the previous round, as the nodes evaluated it
    train_metrics: RoundMetrics | None = None
    privacy: PrivacySpent | None = None  # with config.privacy, a training round: spent once its model is released

    @classmethod
    def opened(cls, config: FederationConfig, r: int, now: datetime) -> Round:
        return cls(
            round=r, kind=round_kind(config, r), expected=config.node_names, opened_at=now,
            deadline_at=now + timedelta(seconds=config.round_deadline_s),
        )

    def moved(self, target: RoundStatus, **changes: Any) -> Round:
        if (self.status, target) not in ROUND_TRANSITIONS:
            raise InvalidTransition(f"round {self.round}", self.status, target)
        return self.model_copy(update={"status": target, **changes})

    def to_doc(self) -> dict:
        return self.model_dump(exclude_none=True)


class Update(BaseModel, frozen=True):
    """A node's counted update: the exact object version that was verified, and its claims."""

    node: str
    object: str
    generation: int
    attempt: int = Field(ge=1, le=999)
    examples: int = Field(ge=1, le=MAX_EXAMPLES)
    metrics: UpdateMetrics
    at: datetime

    def to_doc(self) -> dict:
        return self.model_dump(exclude_none=True)  # absent metrics stay absent (e.g. no train_loss in an evaluation)


class RefusalReason(StrEnum):
    """Why an update was not counted: a code for programs; the record's message is for people."""

    TOO_BIG = "too_big"
    TOO_SMALL = "too_small"
    NOT_FINITE = "not_finite"
    OUT_OF_BOUNDS = "out_of_bounds"
    TOO_MANY_EXAMPLES = "too_many_examples"
    BAD_EXAMPLES = "bad_examples"
    BAD_METRICS = "bad_metrics"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    WRONG_SHAPE = "wrong_shape"
    LATE = "late"
    REPLACES_COUNTED = "replaces_counted"
    NOT_A_MEMBER = "not_a_member"
    UNKNOWN_ROUND = "unknown_round"
    NOT_SEALED = "not_sealed"  # does not open under the node's key


class RefusedUpdate(BaseModel, frozen=True):
    """An update that was not counted, kept with why. Claims that failed their checks are not kept."""

    node: str
    object: str
    generation: int
    attempt: int = Field(ge=1, le=999)
    examples: int | None = None
    metrics: UpdateMetrics | None = None
    at: datetime
    reason: RefusalReason
    message: str  # never quotes a value the node sent

    @property
    def key(self) -> str:
        """One record per uploaded version: a redelivery rewrites its own, never another's."""
        return f"{self.node}-a{self.attempt}-g{self.generation}"

    def to_doc(self) -> dict:
        return self.model_dump(exclude_none=True)


class CloseMarker(BaseModel, frozen=True):
    """Written once by the delivery that closes a round: it fixes the participants."""

    status: RoundStatus
    reason: str
    participants: list[str]
    at: datetime


T = TypeVar("T")


@dataclass(frozen=True)
class Stored(Generic[T]):
    """A document with the version it was read at, for a write guarded by "unchanged since"."""

    doc: T
    version: Any


@dataclass(frozen=True)
class UpdateView:
    """What counting one node's update reads, in one round trip."""

    federation: Stored[Federation] | None
    round: Round | None
    counted: Update | None
    marker: CloseMarker | None


@dataclass(frozen=True)
class RoundView:
    """What closing a round reads: its federation, the round, its marker and the updates counted."""

    federation: Stored[Federation] | None
    round: Round | None
    marker: CloseMarker | None
    updates: dict[str, Update]


class FederationStore(Protocol):
    """The hub's documents. Implementations MUST make `create_*` and `add_update` fail (False)
    when the document exists, and MUST make `commit_close` all-or-nothing and refuse it when the
    federation changed since `expected` was read: the hub's exactly-once rounds rest on these."""

    def federation(self, fid: str) -> Federation | None: ...
    def create_federation(self, fed: Federation, first: Round) -> bool: ...
    def create_rejected(self, fed: Federation) -> bool: ...
    def running(self) -> list[str]: ...
    def round(self, fid: str, r: int) -> Round | None: ...
    def update_view(self, fid: str, r: int, node: str) -> UpdateView: ...
    def round_view(self, fid: str, r: int) -> RoundView: ...
    def close_inputs(self, fid: str, r: int, nodes: list[str]) -> tuple[CloseMarker | None, dict[str, Update]]: ...
    def is_counted(self, fid: str, r: int, node: str) -> bool: ...
    def add_update(self, fid: str, r: int, update: Update) -> bool: ...
    def record_refusal(self, fid: str, r: int, refusal: RefusedUpdate) -> None: ...
    def refusals(self, fid: str, r: int) -> list[RefusedUpdate]: ...
    def marker(self, fid: str, r: int) -> CloseMarker | None: ...
    def create_marker(self, fid: str, r: int, marker: CloseMarker) -> bool: ...
    def commit_close(self, fid: str, closed: Round, opened: Round | None, fed: Federation, expected: Any) -> bool: ...


def _parsed(parse: Callable[[dict], T], snap: firestore.DocumentSnapshot) -> T | None:
    return parse(snap.to_dict()) if snap.exists else None


class FirestoreFederationStore:
    def __init__(self, db: firestore.Client, settings: Settings) -> None:
        self.db = db
        self.collection = db.collection(settings.federations_collection)

    # -- paths ----------------------------------------------------------------------

    def federation_ref(self, fid: str) -> firestore.DocumentReference:
        """The federation's document, e.g. to watch it (on_snapshot)."""
        return self.collection.document(fid)

    def round_ref(self, fid: str, r: int) -> firestore.DocumentReference:
        return self.federation_ref(fid).collection("rounds").document(round_key(r))

    def update_ref(self, fid: str, r: int, node: str) -> firestore.DocumentReference:
        return self.round_ref(fid, r).collection("updates").document(node)

    def marker_ref(self, fid: str, r: int) -> firestore.DocumentReference:
        return self.round_ref(fid, r).collection("outcome").document("close")

    def _get_all(self, *refs: firestore.DocumentReference) -> list[firestore.DocumentSnapshot]:
        """Several documents in one round trip, in the order asked."""
        by_path = {snap.reference.path: snap for snap in self.db.get_all(list(refs))}
        return [by_path[ref.path] for ref in refs]

    def _stored(self, fid: str, snap: firestore.DocumentSnapshot) -> Stored[Federation] | None:
        return Stored(Federation.from_doc(fid, snap.to_dict()), snap.update_time) if snap.exists else None

    # -- federations ----------------------------------------------------------------

    def federation(self, fid: str) -> Federation | None:
        return _parsed(lambda doc: Federation.from_doc(fid, doc), self.federation_ref(fid).get())

    def create_federation(self, fed: Federation, first: Round) -> bool:
        """The federation with its first round, atomically; False if the id is taken."""
        batch = self.db.batch()
        batch.create(self.federation_ref(fed.id), fed.to_doc())
        batch.create(self.round_ref(fed.id, first.round), first.to_doc())
        try:
            batch.commit()
        except AlreadyExists:
            return False
        return True

    def create_rejected(self, fed: Federation) -> bool:
        try:
            self.federation_ref(fed.id).create(fed.to_doc())
        except AlreadyExists:
            return False
        return True

    def running(self) -> list[str]:
        query = self.collection.where(filter=firestore.FieldFilter("status", "==", F.RUNNING.value)).select([])
        return [snap.id for snap in query.stream()]

    # -- rounds and updates -----------------------------------------------------------

    def round(self, fid: str, r: int) -> Round | None:
        return _parsed(Round.model_validate, self.round_ref(fid, r).get())

    def update_view(self, fid: str, r: int, node: str) -> UpdateView:
        fed, rd, counted, marker = self._get_all(
            self.federation_ref(fid), self.round_ref(fid, r), self.update_ref(fid, r, node), self.marker_ref(fid, r)
        )
        return UpdateView(self._stored(fid, fed), _parsed(Round.model_validate, rd), _parsed(Update.model_validate, counted),
                          _parsed(CloseMarker.model_validate, marker))

    def round_view(self, fid: str, r: int) -> RoundView:
        (fed, marker, rd), updates = parallel(
            lambda: self._get_all(self.federation_ref(fid), self.marker_ref(fid, r), self.round_ref(fid, r)),
            lambda: list(self.round_ref(fid, r).collection("updates").stream()),
        )
        return RoundView(self._stored(fid, fed), _parsed(Round.model_validate, rd), _parsed(CloseMarker.model_validate, marker),
                         {snap.id: Update.model_validate(snap.to_dict()) for snap in updates})

    def close_inputs(self, fid: str, r: int, nodes: list[str]) -> tuple[CloseMarker | None, dict[str, Update]]:
        """The round's marker and these nodes' counted updates, in one round trip."""
        marker, *updates = self._get_all(self.marker_ref(fid, r), *(self.update_ref(fid, r, n) for n in nodes))
        return _parsed(CloseMarker.model_validate, marker), {s.id: Update.model_validate(s.to_dict()) for s in updates if s.exists}

    def is_counted(self, fid: str, r: int, node: str) -> bool:
        """Whether `node`'s update for round r has been counted."""
        return self.update_ref(fid, r, node).get().exists

    def add_update(self, fid: str, r: int, update: Update) -> bool:
        try:
            self.update_ref(fid, r, update.node).create(update.to_doc())
        except AlreadyExists:
            return False
        return True

    def record_refusal(self, fid: str, r: int, refusal: RefusedUpdate) -> None:
        self.round_ref(fid, r).collection("late").document(refusal.key).set(refusal.to_doc())

    def refusals(self, fid: str, r: int) -> list[RefusedUpdate]:
        return [RefusedUpdate.model_validate(s.to_dict()) for s in self.round_ref(fid, r).collection("late").stream()]

    def marker(self, fid: str, r: int) -> CloseMarker | None:
        return _parsed(CloseMarker.model_validate, self.marker_ref(fid, r).get())

    def create_marker(self, fid: str, r: int, marker: CloseMarker) -> bool:
        try:
            self.marker_ref(fid, r).create(marker.model_dump())
        except AlreadyExists:
            return False
        return True

    def commit_close(self, fid: str, closed: Round, opened: Round | None, fed: Federation, expected: Any) -> bool:
        """One atomic write: the round closed, the next opened, the federation moved on; False if it
        moved since `expected` (the update time it was read at) or the next round exists."""
        batch = self.db.batch()
        batch.set(self.round_ref(fid, closed.round), closed.to_doc())
        if opened is not None:
            batch.create(self.round_ref(fid, opened.round), opened.to_doc())
        batch.update(self.federation_ref(fid), fed.to_doc(), option=self.db.write_option(last_update_time=expected))
        try:
            batch.commit()
        except (AlreadyExists, FailedPrecondition):
            return False
        return True


class MemoryFederationStore:
    """The same store in a dict, for tests: creates fail on existing documents and a close commits
    all-or-nothing against the federation's version, as Firestore's do. Documents pass through
    their Firestore form, so what a test reads back is what Firestore would hold."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._docs: dict[tuple[str, ...], dict] = {}
        self._versions: dict[str, int] = {}

    def _create(self, path: tuple[str, ...], doc: dict) -> bool:
        with self._lock:
            if path in self._docs:
                return False
            self._docs[path] = doc
            return True

    def _bump(self, fid: str) -> None:
        self._versions[fid] = self._versions.get(fid, 0) + 1

    def _stored(self, fid: str) -> Stored[Federation] | None:
        doc = self._docs.get(("fed", fid))
        return Stored(Federation.from_doc(fid, doc), self._versions[fid]) if doc is not None else None

    def _get(self, parse: Callable[[dict], T], *path: str) -> T | None:
        doc = self._docs.get(path)
        return parse(doc) if doc is not None else None

    def federation(self, fid: str) -> Federation | None:
        with self._lock:
            stored = self._stored(fid)
            return stored.doc if stored else None

    def create_federation(self, fed: Federation, first: Round) -> bool:
        with self._lock:
            if ("fed", fed.id) in self._docs or ("round", fed.id, str(first.round)) in self._docs:
                return False
            self._docs[("fed", fed.id)], self._docs[("round", fed.id, str(first.round))] = fed.to_doc(), first.to_doc()
            self._bump(fed.id)
            return True

    def create_rejected(self, fed: Federation) -> bool:
        with self._lock:
            created = self._create(("fed", fed.id), fed.to_doc())
            if created:
                self._bump(fed.id)
            return created

    def running(self) -> list[str]:
        with self._lock:
            return [path[1] for path, doc in self._docs.items() if path[0] == "fed" and doc.get("status") == F.RUNNING.value]

    def put_federation(self, fed: Federation) -> None:
        """Set a federation document as it is (a test's starting state, or a stray write)."""
        with self._lock:
            self._docs[("fed", fed.id)] = fed.to_doc()
            self._bump(fed.id)

    def put_round(self, fid: str, rd: Round) -> None:
        with self._lock:
            self._docs[("round", fid, str(rd.round))] = rd.to_doc()

    def round(self, fid: str, r: int) -> Round | None:
        with self._lock:
            return self._get(Round.model_validate, "round", fid, str(r))

    def _updates(self, fid: str, r: int) -> dict[str, Update]:
        return {p[3]: Update.model_validate(d) for p, d in self._docs.items() if p[:3] == ("update", fid, str(r))}

    def update_view(self, fid: str, r: int, node: str) -> UpdateView:
        with self._lock:
            return UpdateView(self._stored(fid), self.round(fid, r), self._get(Update.model_validate, "update", fid, str(r), node),
                              self.marker(fid, r))

    def round_view(self, fid: str, r: int) -> RoundView:
        with self._lock:
            return RoundView(self._stored(fid), self.round(fid, r), self.marker(fid, r), self._updates(fid, r))

    def close_inputs(self, fid: str, r: int, nodes: list[str]) -> tuple[CloseMarker | None, dict[str, Update]]:
        with self._lock:
            return self.marker(fid, r), {n: u for n, u in self._updates(fid, r).items() if n in nodes}

    def is_counted(self, fid: str, r: int, node: str) -> bool:
        with self._lock:
            return ("update", fid, str(r), node) in self._docs

    def add_update(self, fid: str, r: int, update: Update) -> bool:
        return self._create(("update", fid, str(r), update.node), update.to_doc())

    def record_refusal(self, fid: str, r: int, refusal: RefusedUpdate) -> None:
        with self._lock:
            self._docs[("late", fid, str(r), refusal.key)] = refusal.to_doc()

    def refusals(self, fid: str, r: int) -> list[RefusedUpdate]:
        with self._lock:
            return [RefusedUpdate.model_validate(d) for p, d in sorted(self._docs.items()) if p[:3] == ("late", fid, str(r))]

    def marker(self, fid: str, r: int) -> CloseMarker | None:
        with self._lock:
            return self._get(CloseMarker.model_validate, "marker", fid, str(r))

    def create_marker(self, fid: str, r: int, marker: CloseMarker) -> bool:
        return self._create(("marker", fid, str(r)), marker.model_dump())

    def commit_close(self, fid: str, closed: Round, opened: Round | None, fed: Federation, expected: Any) -> bool:
        with self._lock:
            if self._versions.get(fid) != expected or (opened is not None and ("round", fid, str(opened.round)) in self._docs):
                return False
            self._docs[("round", fid, str(closed.round))] = closed.to_doc()
            if opened is not None:
                self._docs[("round", fid, str(opened.round))] = opened.to_doc()
            self._docs[("fed", fid)] = fed.to_doc()
            self._bump(fid)
            return True

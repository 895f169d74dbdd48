"""The job document and its state machine, as data plus pure functions.

A job is a declarative training request (no code travels with it), so a job
document can never make a worker run arbitrary code.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.accelerators import CPU, AcceleratorField


class JobStatus(StrEnum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = JobStatus
# Every allowed (from, to). Back to PENDING is a retry of a new attempt after a
# worker was lost (no heartbeat within its lease); anything else is refused.
TRANSITIONS: frozenset[tuple[JobStatus, JobStatus]] = frozenset(
    {
        (S.PENDING, S.SCHEDULED),
        (S.PENDING, S.CANCELLED),
        (S.SCHEDULED, S.RUNNING),
        (S.SCHEDULED, S.PENDING),
        (S.SCHEDULED, S.FAILED),
        (S.SCHEDULED, S.CANCELLED),
        (S.RUNNING, S.COMPLETED),
        (S.RUNNING, S.FAILED),
        (S.RUNNING, S.PENDING),
        (S.RUNNING, S.CANCELLED),
    }
)
TERMINAL = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})


class InvalidTransition(ValueError):
    def __init__(self, job_id: str, current: JobStatus, target: JobStatus) -> None:
        super().__init__(f"job {job_id}: cannot go from {current} to {target}")
        self.current, self.target = current, target


def is_valid_transition(current: JobStatus, target: JobStatus) -> bool:
    return (current, target) in TRANSITIONS


def utcnow() -> datetime:
    return datetime.now(UTC)


# The names a data set's document id is made of: '~' is in neither, so no two (node, data set) pairs share an id.
NODE_NAME = r"^[A-Za-z0-9_-]{1,63}$"  # it appears in bucket names, update paths and ids
DATASET_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"  # a raw-bucket prefix: no '/', and never '.' or '..'


class DatasetRef(BaseModel, frozen=True):
    """A node's data set; with `version`, exactly that content (a later re-upload does not change it)."""

    node: str = Field(pattern=NODE_NAME)
    dataset: str = Field(pattern=DATASET_NAME)
    version: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,128}$")

    @property
    def id(self) -> str:
        return f"{self.node}~{self.dataset}"


MAX_WIDTH = 4096  # units in one hidden layer
MAX_LAYERS = 8
MAX_HOSTS = 64  # worker processes of one multi-host run
# How long a launched attempt may wait for capacity (its backend says it is queued: a TPU slice or a
# flex-start GPU not yet there) before its lease counts again. Launchers bound their runs to match.
MAX_QUEUED = timedelta(hours=6)


class TrainSpec(BaseModel, frozen=True):
    """What to train. Validated on submit, so a bad job never reaches a worker."""

    model_config = ConfigDict(allow_inf_nan=False)

    model: Literal["logreg", "mlp", "cnn"] = "mlp"
    hidden: tuple[Annotated[int, Field(ge=1, le=MAX_WIDTH)], ...] = Field(default=(64,), max_length=MAX_LAYERS)
    epochs: int = Field(default=30, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1, le=1 << 16)
    learning_rate: float = Field(default=3e-3, gt=0, le=10)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    prox_mu: float = Field(default=0.0, ge=0, le=1000, description="FedProx proximal term; 0 = plain local training")


class FederationRef(BaseModel, frozen=True):
    """Set on a federation's per-node jobs: the worker follows the hub's rounds instead of training once."""

    id: str
    node: str


class JobSpec(BaseModel, frozen=True):
    dataset: DatasetRef
    train: TrainSpec = TrainSpec()
    federation: FederationRef | None = None
    accelerator: AcceleratorField = CPU
    hosts: int = Field(default=1, ge=1, le=MAX_HOSTS, description="worker processes of a multi-host run (a TPU slice: its hosts)")
    max_attempts: int = Field(default=3, ge=1, le=20)
    lease_seconds: float = Field(default=60.0, gt=0, description="heartbeat patience")

    @model_validator(mode="after")
    def _hosts_fit_the_accelerator(self) -> JobSpec:
        """A TPU slice runs one worker per host: its topology sets `hosts`, and a different count is an error."""
        needed = self.accelerator.hosts
        if self.accelerator.kind == "tpu" and self.hosts != needed:
            if self.hosts != 1:
                raise ValueError(f"a {self.accelerator} slice has {needed} hosts, not {self.hosts}")
            object.__setattr__(self, "hosts", needed)
        if self.hosts > 1 and self.federation is not None:
            raise ValueError("a federation's node jobs run on one host")
        return self


class Transition(BaseModel, frozen=True):
    status: JobStatus
    at: datetime
    attempt: int
    reason: str | None = None


class Job(BaseModel):
    id: str
    spec: JobSpec
    status: JobStatus = JobStatus.PENDING
    attempt: int = 1
    created_at: datetime
    updated_at: datetime
    heartbeat_at: datetime | None = None
    execution: str | None = None  # the launcher's handle for the current attempt
    progress: dict[str, float] = {}
    error: str | None = None
    results: dict = {}
    history: list[Transition] = []

    @field_validator("id")
    @classmethod
    def _id_is_a_document_id(cls, value: str) -> str:
        if not value or "/" in value or len(value) > 200:
            raise ValueError(f"job id {value!r} is not a valid document id")
        return value

    @classmethod
    def new(cls, job_id: str, spec: JobSpec, now: datetime) -> Job:
        return cls(
            id=job_id,
            spec=spec,
            created_at=now,
            updated_at=now,
            history=[Transition(status=JobStatus.PENDING, at=now, attempt=1)],
        )

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    def to_doc(self) -> dict:
        return self.model_dump(mode="python", exclude={"id"})

    @classmethod
    def from_doc(cls, job_id: str, doc: dict) -> Job:
        return cls.model_validate({**doc, "id": job_id})


def transition(job: Job, target: JobStatus, now: datetime, reason: str | None = None, **changes) -> Job:
    """The job after moving to `target`; raises InvalidTransition if the table forbids it.

    Going back to PENDING starts the next attempt; the caller decides whether
    attempts are left (see `retry_or_fail`).
    """
    target = JobStatus(target)
    if not is_valid_transition(job.status, target):
        raise InvalidTransition(job.id, job.status, target)
    attempt = job.attempt + 1 if target is JobStatus.PENDING else job.attempt
    entry = Transition(status=target, at=now, attempt=attempt, reason=reason)
    update = {"status": target, "attempt": attempt, "updated_at": now, "history": [*job.history, entry], **changes}
    if target is JobStatus.PENDING:
        update.update(execution=None, heartbeat_at=None, progress={})
    return job.model_copy(update=update)


def retry_or_fail(job: Job, now: datetime, reason: str) -> Job:
    """A lost attempt: a new attempt if the spec allows one, else failed."""
    if job.attempt < job.spec.max_attempts:
        return transition(job, JobStatus.PENDING, now, reason=reason)
    return transition(job, JobStatus.FAILED, now, reason=reason, error=f"{reason} (attempt {job.attempt} of {job.spec.max_attempts})")


def scheduled_at(job: Job) -> datetime | None:
    """When the current attempt was claimed for launch."""
    for entry in reversed(job.history):
        if entry.status is JobStatus.SCHEDULED and entry.attempt == job.attempt:
            return entry.at
    return None


def may_wait_queued(job: Job, now: datetime) -> bool:
    """A scheduled attempt its backend holds in a queue may wait for capacity, up to MAX_QUEUED since its claim."""
    claimed = scheduled_at(job)
    return job.status is JobStatus.SCHEDULED and claimed is not None and now - claimed <= MAX_QUEUED


def last_sign(job: Job) -> datetime:
    """When the job's current attempt last showed life: its heartbeat, else its last change."""
    return job.heartbeat_at or job.updated_at


def is_lease_expired(job: Job, now: datetime) -> bool:
    """A scheduled or running job whose worker has been silent longer than its lease."""
    if job.status not in (JobStatus.SCHEDULED, JobStatus.RUNNING):
        return False
    return (now - last_sign(job)).total_seconds() > job.spec.lease_seconds

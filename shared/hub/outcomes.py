"""What the hub did with an event, as values: callers branch on `kind`, logs print `message`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from shared.fedstore import RefusalReason


class AdvanceKind(StrEnum):
    NOTHING_TO_DO = "nothing_to_do"  # the federation is not running, or is past this round
    WAITING = "waiting"
    BEING_CLOSED = "being_closed"  # another delivery holds the round's close marker
    ALREADY_CLOSED = "already_closed"  # this close lost the race to commit
    ROUND_CLOSED = "round_closed"  # and the next round opened
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class AdvanceOutcome:
    kind: AdvanceKind
    round: int
    reported: int = 0
    expected: int = 0
    reason: str | None = None  # why the round closed or failed

    @property
    def moved(self) -> bool:
        """Whether this call moved the federation (a round closed or failed, or it completed)."""
        return self.kind in (AdvanceKind.ROUND_CLOSED, AdvanceKind.COMPLETED, AdvanceKind.FAILED)

    @property
    def message(self) -> str:
        r = self.round
        return {
            AdvanceKind.NOTHING_TO_DO: "nothing to do",
            AdvanceKind.WAITING: f"round {r}: {self.reported} of {self.expected} reported",
            AdvanceKind.BEING_CLOSED: f"round {r} is being closed by another delivery",
            AdvanceKind.ALREADY_CLOSED: f"round {r} already closed",
            AdvanceKind.ROUND_CLOSED: f"round {r} closed ({self.reason}); round {r + 1} opened",
            AdvanceKind.COMPLETED: f"federation completed ({self.reason})",
            AdvanceKind.FAILED: f"federation failed: {self.reason}",
        }[self.kind]


class UpdateKind(StrEnum):
    RECORDED = "recorded"
    DUPLICATE = "duplicate"  # this very upload was counted already
    REFUSED = "refused"  # recorded with its reason, never counted
    LATE = "late"  # recorded: the round had closed
    IGNORED = "ignored"  # the object is gone (a replacement has its own event)


@dataclass(frozen=True)
class UpdateOutcome:
    kind: UpdateKind
    reason: RefusalReason | None = None
    detail: str | None = None  # the refusal's message; never quotes a value the node sent
    advance: AdvanceOutcome | None = None  # what counting it (or seeing it again) did to the round

    @property
    def counted(self) -> bool:
        """Whether the node's update is counted in its round (now or before)."""
        return self.kind in (UpdateKind.RECORDED, UpdateKind.DUPLICATE)

    @property
    def message(self) -> str:
        after = f"; {self.advance.message}" if self.advance else ""
        if self.kind in (UpdateKind.REFUSED, UpdateKind.LATE, UpdateKind.IGNORED):
            return f"{self.kind.value}: {self.detail}"
        return f"{self.kind.value}{after}"


class StartKind(StrEnum):
    STARTED = "started"
    DUPLICATE = "duplicate"  # the federation exists: its jobs are made sure of, nothing else
    REJECTED = "rejected"  # recorded as rejected with its reason
    REJECTED_EARLIER = "rejected_earlier"  # the id was rejected before: it stays so, nothing starts
    IGNORED = "ignored"  # the request is gone


@dataclass(frozen=True)
class StartOutcome:
    kind: StartKind
    error: str | None = None  # why it was rejected

    @property
    def message(self) -> str:
        return {
            StartKind.STARTED: "started",
            StartKind.DUPLICATE: "duplicate: already started",
            StartKind.REJECTED: f"rejected: {self.error}",
            StartKind.REJECTED_EARLIER: f"rejected earlier: {self.error}; choose a new id",
            StartKind.IGNORED: "ignored: the request is gone",
        }[self.kind]


@dataclass(frozen=True)
class SweepOutcome:
    """One running federation's deadline check: what it did, or the class of the error it met."""

    federation: str
    advance: AdvanceOutcome | None = None
    error: str | None = None  # the exception's class only: its text may quote a document

    @property
    def moved(self) -> bool:
        return self.advance is not None and self.advance.moved

    @property
    def message(self) -> str:
        return f"{self.federation}: {self.advance.message if self.advance else f'sweep failed ({self.error})'}"

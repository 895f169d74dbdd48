"""Closing a round: decide, fix the participants with a close marker, aggregate, move the federation on.

The caller that creates the round's close marker finishes the close; everyone else leaves
it alone, so one delivery aggregates and nobody contends for the federation document. If
that finisher died, the deadline sweep (`recover=True`) finishes from the marker once it
is STALE_CLOSE_S old. Every finishing write is idempotent, and the federation moves from
round r to r+1 once (one atomic write, guarded by the federation document being as read).
"""

from __future__ import annotations

import logging
from datetime import datetime

from shared.aggregator_messages import AggregateRequest
from shared.federation import RoundMetrics, RoundStatus, close_decision, weighted_metrics
from shared.fedstore import CloseMarker, Federation, FederationStatus, Round, Stored, Update
from shared.hub.aggregation_io import aggregate
from shared.hub.aggregator_client import AggregatorUnavailable
from shared.hub.context import Hub
from shared.hub.outcomes import AdvanceKind, AdvanceOutcome, SweepOutcome
from shared.privacy import spent

log = logging.getLogger("fedpipe.hub")

STALE_CLOSE_S = 15.0  # a close marker this old on a still-open round: its finisher died (or is slow: writes are create-only)
CLOSE_GIVE_UP_S = 600.0  # a close that keeps failing this long (e.g. an update deleted) fails the federation


def advance(hub: Hub, fid: str, r: int, now: datetime, recover: bool = False) -> AdvanceOutcome:
    """Close round r if it may close now, then open round r+1 or complete the federation."""
    return advance_seen(hub, fid, r, now, recover=recover)[0]


def advance_seen(
    hub: Hub, fid: str, r: int, now: datetime, recover: bool = False, seen: tuple[Stored[Federation], Round] | None = None
) -> tuple[AdvanceOutcome, CloseMarker | None]:
    """`advance`, also returning the round's close marker when there is one (who is in the round).

    `seen` is the federation and round a delivery read before it counted its update, when the
    round had no close marker. Neither changes until a marker exists, so only the marker and
    the expected nodes' updates are read again, in one round trip: one fewer for every update.
    """
    if seen is None:
        view = hub.store.round_view(fid, r)
        stored, rd, marker, reported = view.federation, view.round, view.marker, view.updates
    else:
        stored, rd = seen
        marker, reported = hub.store.close_inputs(fid, r, rd.expected)
    if stored is None or rd is None or stored.doc.status is not FederationStatus.RUNNING or stored.doc.round != r:
        return AdvanceOutcome(AdvanceKind.NOTHING_TO_DO, r), marker
    if marker is not None:
        age_s = (now - marker.at).total_seconds()
        if not (recover and age_s >= STALE_CLOSE_S):
            return AdvanceOutcome(AdvanceKind.BEING_CLOSED, r), marker
        try:
            return _finish(hub, stored, rd, marker, now, recover=True), marker
        except Exception as exc:
            if age_s < CLOSE_GIVE_UP_S:
                raise  # the next sweep tries again
            log.exception("round %d of %s could not be closed for %.0f s; failing the federation", r, fid, age_s)
            failed = marker.model_copy(update={"status": RoundStatus.FAILED, "reason": f"round {r} could not be closed ({type(exc).__name__})"})
            return _finish(hub, stored, rd, failed, now, recover=True), marker
    decision = close_decision(rd, list(reported), stored.doc.config.quorum, now)
    if decision is None:
        return AdvanceOutcome(AdvanceKind.WAITING, r, reported=len(set(reported) & set(rd.expected)), expected=len(rd.expected)), None
    status, reason = decision
    marker = CloseMarker(status=status, reason=reason, participants=sorted(set(reported) & set(rd.expected)), at=now)
    if not hub.store.create_marker(fid, r, marker):
        return AdvanceOutcome(AdvanceKind.BEING_CLOSED, r), hub.store.marker(fid, r)
    return _finish(hub, stored, rd, marker, now, reported), marker


def _finish(
    hub: Hub, stored: Stored[Federation], rd: Round, marker: CloseMarker, now: datetime,
    reported: dict[str, Update] | None = None, recover: bool = False,
) -> AdvanceOutcome:
    fed, r = stored.doc, rd.round
    if reported is None:
        _, reported = hub.store.close_inputs(fed.id, r, marker.participants)
    participants = {node: reported[node] for node in marker.participants}  # KeyError if one vanished: retried, then failed
    closed = {"closed_at": marker.at, "reason": marker.reason, "participants": marker.participants}
    opened = None
    if marker.status is RoundStatus.FAILED:
        closed_round = rd.moved(RoundStatus.FAILED, **closed)
        moved = fed.moved(FederationStatus.FAILED, now, error=marker.reason)
    else:
        docs = {node: u.to_doc() for node, u in participants.items()}
        # Each node evaluated the model it received: the global model after round r-1.
        evaluated = RoundMetrics(round=r - 1, **weighted_metrics(docs, "global_"))
        if rd.kind == "train":
            uri = aggregated(hub, fed, r, participants, recover)
            # Every round up to r released a noised model (a round that fails ends the federation),
            # so r rounds are spent; recounted from the config, a recovering closer agrees.
            dp = spent(fed.config.privacy, r, len(participants)) if fed.config.privacy is not None else None
            closed_round = rd.moved(RoundStatus.CLOSED, **closed, global_metrics=evaluated,
                                    train_metrics=RoundMetrics(**weighted_metrics(docs, "train_")), privacy=dp)
            moved = fed.model_copy(update={"round": r + 1, "global_model_uri": uri, "updated_at": now, "privacy": dp})
            opened = Round.opened(fed.config, r + 1, now)
        else:
            closed_round = rd.moved(RoundStatus.CLOSED, **closed, global_metrics=evaluated)
            moved = fed.moved(FederationStatus.COMPLETED, now, final=evaluated, completed_at=now)
    # A finisher that lost a race (or a recovery after the finisher came back) changes nothing.
    if not hub.store.commit_close(fed.id, closed_round, opened, moved, stored.version):
        return AdvanceOutcome(AdvanceKind.ALREADY_CLOSED, r)
    kind = {FederationStatus.FAILED: AdvanceKind.FAILED, FederationStatus.COMPLETED: AdvanceKind.COMPLETED}.get(moved.status, AdvanceKind.ROUND_CLOSED)
    return AdvanceOutcome(kind, r, reported=len(participants), expected=len(rd.expected), reason=marker.reason)


def sweep_deadlines(hub: Hub, now: datetime) -> list[SweepOutcome]:
    """Close rounds whose deadline passed (with quorum) or fail them; run periodically.

    One federation's trouble must not stall every other's clock: its outcome names the
    error's class only (the text may quote a document), and the log has the traceback.
    """
    outcomes = []
    for fid in hub.store.running():
        try:
            fed = hub.store.federation(fid)
            outcome = advance(hub, fid, fed.round, now, recover=True) if fed else AdvanceOutcome(AdvanceKind.NOTHING_TO_DO, 0)
            outcomes.append(SweepOutcome(fid, advance=outcome))
        except Exception as exc:
            log.exception("deadline sweep of %s failed", fid)
            outcomes.append(SweepOutcome(fid, error=type(exc).__name__))
    return outcomes


def aggregated(hub: Hub, fed: Federation, r: int, participants: dict[str, Update], recover: bool) -> str:
    """The new global model's URI: aggregated here, or by the attested aggregator when only it can open the updates."""
    assert fed.config is not None
    if not fed.config.confidential_aggregation:
        return aggregate(hub, fed, r, participants, recover)
    if hub.aggregator is None:
        raise AggregatorUnavailable("this federation needs the attested aggregator, and FEDPIPE_AGGREGATOR_URL is not set")
    request = AggregateRequest(federation=fed, round=r, participants=participants, recover=recover)
    return hub.aggregator.aggregate(request).global_model_uri

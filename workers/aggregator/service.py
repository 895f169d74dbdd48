"""What the attested aggregator does with the hub's requests, without HTTP.

The hub (and its operator) cannot open an update sealed to this workload, and must not be
able to use this workload to open one for it. So, whatever the hub asks:
- an update is read only at its own path (updates/<node>/<fid>/round-r...), as that node's
  update for that round, and admitted with the hub's own checks (signature against the
  node's registered key, claims, finite and bounded weights);
- a round is aggregated from at least MIN_AGGREGATED distinct nodes' updates, and once per
  (federation, round) with one set of participants for the life of this instance, so a hub
  cannot ask for {us, eu} and then {eu} and subtract;
- what leaves is the aggregate, sealed under the hub's key at the round's fixed path (and,
  with privacy, noised here, before anyone outside sees it); refusals name a reason, never a value.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from google.api_core.exceptions import NotFound, PreconditionFailed
from google.cloud import storage

from shared import gcs_uri
from shared.aggregator_messages import AdmitRefusal, AdmitReply, AdmitRequest, AggregateReply, AggregateRequest
from shared.attested_seal import RecipientKey
from shared.config import Settings
from shared.envelope import Envelope, EnvelopeError, Purpose
from shared.federation import MIN_AGGREGATED, UPDATE_PATH, round_key
from shared.fedstore import RefusalReason, Update
from shared.hub import admission
from shared.hub.admission import Claims
from shared.hub.aggregation_io import VERIFIED, aggregate

MAX_REMEMBERED_ROUNDS = 100_000  # rounds whose participants this instance holds to; oldest forgotten first


class Rejected(ValueError):
    """A request this workload will not serve, whoever asks: answered 409 with the message."""


@dataclass(frozen=True)
class Host:
    """The hub's bucket and key, as aggregation_io.aggregate needs them (a ModelKeeper)."""

    settings: Settings
    gcs: storage.Client
    envelope: Callable[[str], Envelope]


class AggregatorService:
    def __init__(self, host: Host, key: RecipientKey) -> None:
        self.host, self.key = host, key
        self._aggregated: OrderedDict[tuple[str, int], frozenset[str]] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, request: AdmitRequest) -> AdmitReply:
        fed, rd, node = request.federation, request.round, request.node
        if fed.config is None or not fed.config.confidential_aggregation or rd.kind != "train":
            raise Rejected("only training rounds of federations with confidential_aggregation come here")
        self._check_path(request.object, fed.id, rd.round, node)
        claims = admission.read_claims(request.metadata)
        if not isinstance(claims, Claims):
            return _reply(claims)
        try:
            data = self._open(request.object, request.generation)
        except EnvelopeError:
            return AdmitReply(refusal=AdmitRefusal(reason=RefusalReason.NOT_SEALED, message="the update is not sealed to this aggregator"))
        except (NotFound, PreconditionFailed):
            return AdmitReply(gone=True)
        refusal = (
            admission.signature_refusal(fed.config, fed.id, rd.round, node, request.attempt, claims, data, request.metadata, request.public_key)
            or admission.content_refusal(fed, rd, node, claims, data)
        )
        if refusal is None:
            VERIFIED.put(request.object, request.generation, data)  # the round's aggregation reads it from here
        return _reply(refusal)

    def aggregate(self, request: AggregateRequest) -> AggregateReply:
        fed, r, participants = request.federation, request.round, request.participants
        if fed.config is None or not fed.config.confidential_aggregation:
            raise Rejected("only federations with confidential_aggregation come here")
        if len(participants) < MIN_AGGREGATED:
            raise Rejected(f"an aggregate needs at least {MIN_AGGREGATED} nodes' updates, not {len(participants)}")
        for node, update in participants.items():
            if update.node != node:
                raise Rejected("a participant's update names another node")
            self._check_path(update.object, fed.id, r, node)
        self._hold_to(fed.id, r, frozenset(participants))
        uri = aggregate(self.host, fed, r, participants, request.recover, open_update=self._open_update)
        return AggregateReply(global_model_uri=uri)

    def _hold_to(self, fid: str, r: int, nodes: frozenset[str]) -> None:
        """The first participant set asked for a round is the only one ever aggregated for it (a retry asks the same)."""
        with self._lock:
            seen = self._aggregated.setdefault((fid, r), nodes)
            self._aggregated.move_to_end((fid, r))
            while len(self._aggregated) > MAX_REMEMBERED_ROUNDS:
                self._aggregated.popitem(last=False)
        if seen != nodes:
            raise Rejected(f"round {r} of {fid} was aggregated from other participants")

    def _check_path(self, uri: str, fid: str, r: int, node: str) -> None:
        bucket, name = gcs_uri.split(uri)
        match = UPDATE_PATH.match(name)
        if bucket != self.host.settings.hub_bucket or match is None or match["kind"] != "safetensors" or (
            match["node"], match["fid"], match["round"]
        ) != (node, fid, round_key(r)):
            raise Rejected(f"{uri} is not {node}'s training update for round {r} of {fid}")

    def _open(self, uri: str, generation: int) -> bytes:
        bucket, name = gcs_uri.split(uri)
        return self.key.open(gcs_uri.read(self.host.gcs, uri, generation), bucket, name, Purpose.UPDATE)

    def _open_update(self, update: Update) -> bytes:
        return self._open(update.object, update.generation)


def _reply(refusal: admission.Refusal | None) -> AdmitReply:
    return AdmitReply(refusal=AdmitRefusal(reason=refusal.reason, message=refusal.message) if refusal else None)

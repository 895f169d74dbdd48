"""The hub of a federation, split by concern:

- starting: a request becomes a running federation (or is rejected, for good);
- admission: what an update must be before it counts;
- recording: count a node's update once, or record why not;
- closing: close a round, move the federation on, the deadline sweep;
- aggregation_io: read the counted updates, write the global model once;
- outcomes: what each step did, as typed values;
- api: the entry points with the cloud clients, as functions and the node API call them.
"""

from shared.hub.aggregation_io import VERIFIED
from shared.hub.api import advance, fed_ref, federation_store, handle_hub_object, record_update, round_ref, sweep_deadlines
from shared.hub.closing import STALE_CLOSE_S
from shared.hub.context import Hub
from shared.hub.outcomes import (
    AdvanceKind,
    AdvanceOutcome,
    StartKind,
    StartOutcome,
    SweepOutcome,
    UpdateKind,
    UpdateOutcome,
)
from shared.hub.starting import FederationError

__all__ = [
    "STALE_CLOSE_S", "VERIFIED", "AdvanceKind", "AdvanceOutcome", "FederationError", "Hub", "StartKind", "StartOutcome",
    "SweepOutcome", "UpdateKind", "UpdateOutcome", "advance", "fed_ref", "federation_store",
    "handle_hub_object", "record_update", "round_ref", "sweep_deadlines",
]

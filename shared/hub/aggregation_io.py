"""A training round's aggregation: read the counted updates, combine them, write the global model once.

Memory stays a few models however many nodes report: the updates stream into the
aggregator one by one, the next already downloading, and those this hub instance verified
when it counted them come from VERIFIED instead of a second download.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
from google.api_core.exceptions import PreconditionFailed
from google.cloud import storage

from shared import gcs_uri, weights
from shared.aggregation import ServerOptimizer, aggregator, clip_update
from shared.bytes_cache import BytesCache
from shared.config import Settings
from shared.envelope import HUB, Envelope, Purpose
from shared.federation import global_model_object, server_state_object
from shared.fedstore import Federation, Update
from shared.hub.admission import model_spec
from shared.io_pool import IO
from shared.model_spec import initial_params
from shared.privacy import private_mean, secure_rng

# Updates this hub instance read, opened and counted, held for their round's aggregation by
# (object, generation): without it the delivery that closes a round downloads again every update
# the instance already verified. A miss (counted by another instance, or evicted) is downloaded.
VERIFIED = BytesCache(max_bytes=64 * 2**20)

UpdateOpener = Callable[[Update], bytes]  # a counted update's bytes, opened: downloaded at its counted generation


class ModelKeeper(Protocol):
    """What aggregation needs of its host: the hub's bucket and the hub's key (the hub itself, or the attested aggregator)."""

    settings: Settings
    gcs: storage.Client
    envelope: Callable[[str], Envelope]


def aggregate(hub: ModelKeeper, fed: Federation, r: int, participants: dict[str, Update], recover: bool,
              open_update: UpdateOpener | None = None) -> str:
    """The global model after training round r, written once to a fixed path; returns its URI.

    Only a recovering closer can find the model written already (by the closer that died
    after writing it). Without privacy it is the same bytes it would write; with privacy
    the noise is fresh each time, and whichever model was written first is the one released.
    """
    config = fed.config
    assert config is not None
    bucket = hub.gcs.bucket(hub.settings.hub_bucket)
    target = bucket.blob(global_model_object(fed.id, r))
    uri = f"gs://{bucket.name}/{target.name}"
    if recover and target.exists():
        return uri
    opener = open_update or (lambda update: read_sealed(hub, update.object, Purpose.UPDATE, update.generation, update.node))
    expected = model_spec(fed)
    # Round 1 has no previous global model at the hub (nodes start from the shared seed), so
    # clip_norm and the server optimizers act from round 2 on. Privacy cannot wait a round:
    # its round 1 clips against the seed model, which the hub rebuilds.
    stepped = config.strategy in ("fedadam", "fedyogi")
    previous = None
    if fed.global_model_uri and (stepped or config.clip_norm is not None or config.privacy is not None):
        previous = weights.from_bytes(read_sealed(hub, fed.global_model_uri, Purpose.GLOBAL_MODEL), expected=expected)[0]
    if config.privacy is not None:
        reference = previous if previous is not None else initial_params(expected, config.seed)
        updates = (params for params, _ in _updates(opener, participants, expected, None, None))
        combined, _ = private_mean(updates, reference, config.privacy, secure_rng())
    else:
        combine = aggregator(config.strategy, config.trim_fraction)
        combine.extend(_updates(opener, participants, expected, previous, config.clip_norm))
        combined = combine.result()
    new_global = combined
    if stepped and previous is not None:
        state_blob = bucket.blob(server_state_object(fed.id, r - 1))
        state_uri = f"gs://{bucket.name}/{state_blob.name}"
        state = weights.from_bytes(read_sealed(hub, state_uri, Purpose.SERVER_STATE))[0] if state_blob.exists() else None
        new_global, state = ServerOptimizer(config.strategy, server_lr=config.server_lr).step(previous, combined, state)
        _create(hub, bucket.blob(server_state_object(fed.id, r)), weights.to_bytes(state, {"federation": fed.id, "round": str(r)}), Purpose.SERVER_STATE)
    _create(hub, target, weights.to_bytes(new_global, {"federation": fed.id, "round": str(r)}), Purpose.GLOBAL_MODEL)
    return uri


def read_sealed(hub: ModelKeeper, uri: str, purpose: Purpose, generation: int | None = None, owner: str = HUB) -> bytes:
    """An object the hub keeps (or a node sent), opened under its owner's key."""
    bucket, name = gcs_uri.split(uri)
    return hub.envelope(owner).open(gcs_uri.read(hub.gcs, uri, generation), bucket, name, purpose)


def _updates(
    open_update: UpdateOpener, participants: dict[str, Update], expected: dict, previous: dict[str, np.ndarray] | None,
    clip_norm: float | None,
) -> Iterator[tuple[dict[str, np.ndarray], float]]:
    """Each counted update as the aggregator asks for it (clipped when asked), the next one already downloading."""
    nodes = sorted(participants)

    def fetch(node: str):
        # The very version whose signature was verified when it was counted.
        update = participants[node]
        return IO.submit(lambda: VERIFIED.pop(update.object, update.generation) or open_update(update))

    pending = fetch(nodes[0])
    for i, node in enumerate(nodes):
        data = pending.result()
        if i + 1 < len(nodes):
            pending = fetch(nodes[i + 1])
        params, _ = weights.from_bytes(data, expected=expected)
        del data
        if clip_norm is not None and previous is not None:
            params = clip_update(params, previous, clip_norm)
        yield params, float(participants[node].examples)
        del params


def _create(hub: ModelKeeper, blob, data: bytes, purpose: Purpose) -> None:
    """Write once, sealed under the hub's key: a recovering closer racing the original one never replaces what it wrote."""
    try:
        sealed = hub.envelope(HUB).seal(data, blob.bucket.name, blob.name, purpose)
        blob.upload_from_string(sealed, content_type="application/octet-stream", if_generation_match=0)
    except PreconditionFailed:
        pass

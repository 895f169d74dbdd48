"""Checkpoints of a training job: what a new attempt resumes from after a lost one.

A checkpoint is a `TrainState` (params, optimizer state, epochs and steps done, the
metrics so far) as safetensors, every tensor under its pytree path and with its own
dtype, sealed with the node's key (Purpose.CHECKPOINT) in the node's processed bucket
at `checkpoints/<job id>/<step>`. Sealing binds it to that name, so another job's or
node's checkpoint does not open here; a fingerprint of the job, its model and its data
inside refuses one that opens but does not fit. `latest` skips whatever does not
open or fit, with a warning that names the object and never its content.

`Checkpointer` decides when to write: after an epoch, at most one per `min_interval_s`,
and never so often that writing takes more than `max_overhead` of the time; it keeps
the newest `keep`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import jax
import numpy as np
import requests
from google.api_core import exceptions as gcs_errors
from google.cloud import storage
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shared.envelope import SEAL_OVERHEAD_MAX, Envelope, EnvelopeError, Purpose
from shared.weights import WeightsMismatch, check_spec, read_metadata, spec_of
from workers.trainer.training import Trainer, TrainState

log = logging.getLogger("fedpipe.worker.checkpoints")

FORMAT = "fedpipe-checkpoint-v1"
PREFIX = "checkpoints"
MAX_KEEP = 20  # checkpoints kept per job, at most
MAX_INTERVAL_S = 3600.0  # the longest a policy may wait between checkpoints


class CheckpointMismatch(ValueError):
    """The bytes are not a checkpoint of this job's model and data."""


def job_fingerprint(job_id: str, trainer: Trainer, n_train: int) -> str:
    """What a checkpoint must have been written for: this job, model config, shapes and training rows."""
    what = {"job": job_id, "config": asdict(trainer.config), "features": trainer.n_features, "classes": trainer.n_classes, "rows": n_train}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _tensors(state: TrainState) -> dict[str, jax.Array]:
    """The state's arrays by name: `params/<name>` and `opt_state/<pytree path>`."""
    named = {f"params/{name}": value for name, value in state.params.items()}
    leaves, _ = jax.tree_util.tree_flatten_with_path(state.opt_state)
    return named | {f"opt_state/{jax.tree_util.keystr(path)}": leaf for path, leaf in leaves}


def encode(state: TrainState, fingerprint: str) -> bytes:
    """Safetensors of the state, every tensor in its own dtype (the optimizer's step count stays int32)."""
    meta = {"format": FORMAT, "fingerprint": fingerprint, "epoch": str(state.epoch), "step": str(state.step), "history": json.dumps(state.history)}
    return st_save({name: np.array(value, order="C") for name, value in _tensors(state).items()}, metadata=meta)  # 0-d stays 0-d


def decode(data: bytes, template: TrainState, fingerprint: str) -> TrainState:
    """The state in `data`, shaped like `template` (names, shapes and dtypes checked); CheckpointMismatch otherwise."""
    try:
        meta = read_metadata(data)
        tensors = st_load(data)
    except (WeightsMismatch, SafetensorError, ValueError, TypeError):
        raise CheckpointMismatch("not safetensors") from None
    if meta.get("format") != FORMAT or meta.get("fingerprint") != fingerprint:
        raise CheckpointMismatch("written for another job, model or data set")
    try:
        check_spec(tensors, spec_of(_tensors(template)))
    except WeightsMismatch:
        raise CheckpointMismatch("its tensors are not this model's") from None
    try:
        epoch, step, history = int(meta["epoch"]), int(meta["step"]), tuple(json.loads(meta["history"]))
    except (KeyError, ValueError, TypeError):
        raise CheckpointMismatch("its metadata is not a checkpoint's") from None
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template.opt_state)
    opt_state = jax.tree_util.tree_unflatten(treedef, [tensors[f"opt_state/{jax.tree_util.keystr(path)}"] for path, _ in leaves])
    return TrainState({name: tensors[f"params/{name}"] for name in template.params}, opt_state, epoch, step, history)


class CheckpointStore:
    """One job's checkpoints in its node's processed bucket, sealed with the node's key."""

    def __init__(self, bucket: storage.Bucket, envelope: Envelope, job_id: str) -> None:
        self.bucket, self.envelope, self.job_id = bucket, envelope, job_id

    @property
    def prefix(self) -> str:
        return f"{PREFIX}/{self.job_id}/"

    def name(self, step: int) -> str:
        return f"{self.prefix}{step}"

    def steps(self) -> list[int]:
        """Steps with a checkpoint, newest first (objects not named by a step are not ours: ignored)."""
        names = (blob.name.removeprefix(self.prefix) for blob in self.bucket.list_blobs(prefix=self.prefix))
        return sorted((int(n) for n in names if n.isdigit()), reverse=True)

    def write(self, step: int, payload: bytes) -> None:
        sealed = self.envelope.seal(payload, self.bucket.name, self.name(step), Purpose.CHECKPOINT)
        self.bucket.blob(self.name(step)).upload_from_string(sealed, content_type="application/octet-stream")

    def read(self, step: int, max_bytes: int) -> bytes:
        """The opened checkpoint; EnvelopeError when it is not one sealed by this node for this name, CheckpointMismatch
        when it is bigger than this model's can be (checked before it is downloaded)."""
        blob = self.bucket.get_blob(self.name(step))
        if blob is None:
            raise gcs_errors.NotFound(self.name(step))
        if blob.size > max_bytes:
            raise CheckpointMismatch(f"larger than this model's checkpoint can be ({max_bytes} bytes)")
        sealed = blob.download_as_bytes(if_generation_match=blob.generation)
        return self.envelope.open(sealed, self.bucket.name, self.name(step), Purpose.CHECKPOINT)

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep`."""
        for step in self.steps()[keep:]:
            try:
                self.bucket.blob(self.name(step)).delete()
            except gcs_errors.NotFound:
                pass  # pruned by an earlier attempt's writer at the same time


MAX_METADATA_BYTES = 4 * 2**20  # a checkpoint's header: its fingerprint, counters and every epoch's metrics (about 100 bytes each)


def max_checkpoint_bytes(template: TrainState) -> int:
    """The most a sealed checkpoint of `template`'s shapes can take: its tensors, its header, the seal."""
    tensors = sum(getattr(leaf, "nbytes", None) or np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves((template.params, template.opt_state)))
    return tensors + MAX_METADATA_BYTES + SEAL_OVERHEAD_MAX


def latest(store: CheckpointStore, template: TrainState, fingerprint: str) -> bytes | None:
    """The newest checkpoint that opens and fits `template` (its opened bytes, for `decode`), or None."""
    max_bytes = max_checkpoint_bytes(template)
    for step in store.steps():
        try:
            payload = store.read(step, max_bytes)
            decode(payload, template, fingerprint)
        except (gcs_errors.NotFound, gcs_errors.PreconditionFailed):
            continue  # pruned or replaced since it was listed
        except (gcs_errors.GoogleAPIError, requests.RequestException) as exc:  # resuming is best effort: a fresh start is correct
            log.warning("checkpoint %s skipped: storage error (%s)", store.name(step), type(exc).__name__)
        except EnvelopeError:
            log.warning("checkpoint %s skipped: it does not open with this node's key for this name (another's, altered, or not sealed)",
                        store.name(step))
        except CheckpointMismatch as exc:
            log.warning("checkpoint %s skipped: %s", store.name(step), exc)  # our own fixed reasons, never its content
        else:
            return payload
    return None


@dataclass(frozen=True)
class CheckpointPolicy:
    """When to checkpoint and how many to keep: bounded, so a fast small job does not spend its time writing."""

    min_interval_s: float = 1.0  # at most one checkpoint per this long
    max_overhead: float = 0.1  # and writing takes at most this fraction of the time
    keep: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.min_interval_s <= MAX_INTERVAL_S or not 0 < self.max_overhead <= 1 or not 1 <= self.keep <= MAX_KEEP:
            raise ValueError(f"need 0 <= min_interval_s <= {MAX_INTERVAL_S}, 0 < max_overhead <= 1 and 1 <= keep <= {MAX_KEEP}; "
                             f"got {self.min_interval_s}, {self.max_overhead}, {self.keep}")


class Checkpointer:
    """Writes the states `Trainer.train` hands it, as `policy` allows; what the leader of a run passes as `on_state`."""

    def __init__(self, store: CheckpointStore, epochs: int, fingerprint: str, policy: CheckpointPolicy = CheckpointPolicy(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.epochs, self.fingerprint, self.policy, self.clock = store, epochs, fingerprint, policy, clock
        self.last_at = clock()  # training starts now: the first checkpoint comes an interval in
        self.last_write_s = 0.0
        self.written: list[int] = []  # steps written by this attempt

    def due(self, state: TrainState) -> bool:
        """Not after the last epoch (the model is written then), and only once the interval and the overhead bound allow."""
        wait = max(self.policy.min_interval_s, self.last_write_s / self.policy.max_overhead)
        return state.epoch < self.epochs and self.clock() - self.last_at >= wait

    def __call__(self, state: TrainState) -> None:
        if not self.due(state):
            return
        started = self.clock()
        try:
            self.store.write(state.step, encode(state, self.fingerprint))
            self.store.prune(self.policy.keep)
        except (gcs_errors.GoogleAPIError, requests.RequestException) as exc:  # training goes on: a later one may succeed
            log.warning("checkpoint at step %d not written: %s", state.step, type(exc).__name__)
        else:
            self.written.append(state.step)
        self.last_at = self.clock()
        self.last_write_s = self.last_at - started

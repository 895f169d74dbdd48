"""The training core: arrays in, arrays out, no cloud I/O.

A `Trainer` is built once per (config, n_features, n_classes) and keeps its
jitted functions, so each federated round (a new `fit` from new global params)
reuses the compiled code instead of recompiling.

Each epoch is shuffled on the host (NumPy, seeded by (seed, epoch)) into
per-epoch batch index and mask arrays: the ragged last batch is padded and
masked, not dropped, so every example is used every epoch. Only those small
index arrays go to the device; each step gathers its batch from the on-device
data set, so no epoch copies the whole data set. How an epoch runs on the
device is decided in one place, `step_loop_for` (see there): one jitted
`lax.scan` over the batches, or, for conv models on the CPU backend, a Python
loop over one jitted step. Both use the same step and masked objective. With
several devices each batch is sharded over a 1-D 'data' mesh and params are
replicated; XLA inserts the gradient all-reduce, so the same code runs on one
CPU, a GPU, or a TPU slice.

Across processes (a multi-host run, workers/trainer/distributed.py) the mesh spans
every process's devices. A process cannot put data on another's devices, so there
each process gathers on the host only its own devices' rows of every batch of the
epoch and hands them to JAX as its part of one global array (`_feed`); the step,
the masks and the all-reduce are the same, so N processes reach the parameters one
process does, up to the order of float sums.

`train` runs from a `TrainState` (params, optimizer state, epochs done) and hands
one back after every epoch, so a checkpoint of it resumes bit for bit: the next
epoch's order depends only on (seed, epoch).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from shared.model_spec import param_spec
from workers.trainer import models

Params = dict[str, jax.Array]
Metrics = dict[str, float]
EVAL_CHUNK = 1024  # examples per eval step; bounds memory for big eval sets


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters; hashable so a worker can cache one Trainer per config."""

    model: str = "mlp"
    hidden: tuple[int, ...] = (64,)
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 3e-3
    seed: int = 0
    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.model not in models.MODELS:
            raise ValueError(f"unknown model {self.model!r}; expected one of {', '.join(models.MODELS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be >= 1")
        if not self.learning_rate > 0 or self.prox_mu < 0:
            raise ValueError(f"need learning_rate > 0 and prox_mu >= 0, got {self.learning_rate}, {self.prox_mu}")

    @classmethod
    def from_spec(cls, spec: Any, prox_mu: float | None = None) -> TrainConfig:
        """From a `shared.jobs.TrainSpec`; prox_mu comes from the spec if it has one, else 0."""
        mu = prox_mu if prox_mu is not None else float(getattr(spec, "prox_mu", 0.0) or 0.0)
        return cls(
            model=spec.model,
            hidden=tuple(spec.hidden),
            epochs=spec.epochs,
            batch_size=spec.batch_size,
            learning_rate=spec.learning_rate,
            seed=spec.seed,
            prox_mu=mu,
        )


def feature_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of the training split (apply the same to the test split)."""
    x = np.asarray(x, dtype=np.float32)
    return x.mean(axis=0), x.std(axis=0)


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std as float32; constant features (std 0) are only centred, not blown up."""
    x = np.asarray(x, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    return ((x - np.asarray(mean, dtype=np.float32)) / np.where(std > 0, std, 1.0)).astype(np.float32)


def step_loop_for(config: TrainConfig, n_features: int, n_classes: int, platform: str) -> bool:
    """How an epoch runs: True = a Python loop over one jitted step, False = one jitted `lax.scan`.

    The single place this is decided. Scan is the default: one dispatch per epoch.
    But on XLA:CPU, convolutions inside a while loop (what scan lowers to) miss the
    fast conv path, most of all the backward convs (jax-ml/jax#12868), which made the
    FedAvg CNN ~20x slower than a plain loop of jitted steps. So models with
    convolutions use the step loop on the CPU backend; GPU/TPU keep scan. Both run
    the same step (same masked objective, sharding and results). Evaluation is
    forward-only and always one scan (measured on par with a step loop on CPU).
    """
    has_conv = any(len(shape) == 4 for shape, _ in param_spec(config.model, n_features, n_classes, config.hidden).values())
    return has_conv and platform == "cpu"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _masked_batches(order: Any, batch: int, n_devices: int) -> tuple[np.ndarray, np.ndarray]:
    """Host-side example indices [n_batches, padded_batch] (int32) and a validity mask of the same shape.

    The last batch is padded (index 0, mask False) instead of dropped, and each
    batch is padded up to a multiple of the device count so it shards evenly;
    masked rows contribute nothing, so results match across device counts.
    """
    order = np.asarray(order, dtype=np.int32)
    n = order.shape[0]
    n_batches = -(-n // batch)
    idx = np.zeros((n_batches, _round_up(batch, n_devices)), np.int32)
    mask = np.zeros(idx.shape, bool)
    flat = np.zeros(n_batches * batch, np.int32)
    flat[:n] = order
    idx[:, :batch] = flat.reshape(n_batches, batch)
    mask[:, :batch] = (np.arange(n_batches * batch) < n).reshape(n_batches, batch)
    return idx, mask


@dataclass(frozen=True)
class TrainState:
    """Where training stands after `epoch` epochs: all a checkpoint must hold to go on bit for bit."""

    params: Params
    opt_state: Any
    epoch: int = 0  # epochs done: the next one to run has this index
    step: int = 0  # optimizer steps done
    history: tuple[Metrics, ...] = ()  # each finished epoch's train metrics


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The example order of one epoch: a host-side permutation, fixed by (seed, epoch)."""
    return np.random.default_rng([seed % 2**64, epoch]).permutation(n).astype(np.int32)


class Trainer:
    """Jitted training/eval for one (config, n_features, n_classes); reuse it across rounds.

    `step_loop` overrides `step_loop_for`'s choice of how an epoch runs (tests, benchmarks).
    """

    def __init__(
        self,
        config: TrainConfig,
        n_features: int,
        n_classes: int,
        devices: Sequence[jax.Device] | None = None,
        *,
        step_loop: bool | None = None,
    ) -> None:
        self.config = config
        self.n_features, self.n_classes = int(n_features), int(n_classes)
        if config.model == "cnn":
            models.image_side(self.n_features)  # fail now, not at the first trace
        self.devices = list(devices) if devices is not None else jax.devices()
        self.mesh = Mesh(np.array(self.devices), ("data",)) if len(self.devices) > 1 else None
        # Some devices belong to other processes: data is fed per process (`_feed`), not put whole.
        self.multi_process = any(d.process_index != jax.process_index() for d in self.devices)
        self.optimizer = optax.adam(config.learning_rate)
        self.traces: Counter[str] = Counter()  # how often each function was traced (= compiled)
        if step_loop is None:
            step_loop = step_loop_for(config, self.n_features, self.n_classes, self.devices[0].platform)
        self.step_loop = bool(step_loop)
        self._train_epoch = jax.jit(self._train_epoch_impl)  # scan mode: one call per epoch
        self._train_step = jax.jit(self._train_step_impl)  # step-loop mode: one call per batch
        self._eval = jax.jit(self._eval_impl)  # always a scan: forward-only convs are fine in it
        self._opt_init = jax.jit(self.optimizer.init)  # one compile, where eager zeros compile one per shape

    @property
    def n_devices(self) -> int:
        return len(self.devices)

    def init_params(self) -> Params:
        """Fresh params for this trainer's shapes (the hub's round-0 model)."""
        c = self.config
        return models.init_params(c.model, self.n_features, self.n_classes, c.hidden, c.seed)

    # ---- placement -------------------------------------------------------
    def _replicated(self) -> jax.sharding.Sharding | jax.Device:
        return NamedSharding(self.mesh, PartitionSpec()) if self.mesh is not None else self.devices[0]

    def _put(self, tree: Any) -> Any:
        """On the trainer's devices, replicated (params, the data set, the epoch's batch indices)."""
        return jax.device_put(tree, self._replicated())

    def _put_params(self, params: Mapping[str, Any]) -> Params:
        return self._put({k: jnp.asarray(v, dtype=jnp.float32) for k, v in params.items()})

    def _put_data(self, x: Any, y: Any) -> tuple[tuple[Any, Any], int]:
        """The data set where batches are taken from: on the devices, or kept on the host when fed per process."""
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y).astype(np.int32)
        if x.ndim != 2 or x.shape[1] != self.n_features or y.shape != (x.shape[0],) or x.shape[0] == 0:
            raise ValueError(f"need x [n>0, {self.n_features}] and y [n]; got x {x.shape}, y {y.shape}")
        if y.min() < 0 or y.max() >= self.n_classes:
            raise ValueError(f"labels must be in [0, {self.n_classes}); got range [{y.min()}, {y.max()}]")
        return ((x, y) if self.multi_process else self._put((x, y))), x.shape[0]

    def _inputs(self, data: tuple[Any, Any], idx: np.ndarray, mask: np.ndarray) -> tuple[Any, tuple[jax.Array, ...]]:
        """What a pass over batches runs on: (on-device data set, batch indices and masks), or, across
        processes, (None, the batches themselves) as `_feed` builds them."""
        if self.multi_process:
            return None, self._feed(*data, idx, mask)
        return data, self._put((idx, mask))

    def _feed(self, x: np.ndarray, y: np.ndarray, idx: np.ndarray, mask: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Global batches [n_batches, padded_batch, ...], split over the mesh by example: each process gathers
        (on the host) and transfers only the rows of its own devices, as JAX asks it for them."""
        sharding = NamedSharding(self.mesh, PartitionSpec(None, "data"))
        return (
            jax.make_array_from_callback((*idx.shape, x.shape[1]), sharding, lambda i: x[idx[i[:2]]]),
            jax.make_array_from_callback(idx.shape, sharding, lambda i: y[idx[i]]),
            jax.make_array_from_callback(idx.shape, sharding, lambda i: mask[i]),
        )

    def _epoch_batches(self, n: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Host-side (idx, mask) [n_batches, padded_batch] for one training epoch."""
        return _masked_batches(epoch_order(self.config.seed, epoch, n), min(self.config.batch_size, n), self.n_devices)

    # ---- traced functions ------------------------------------------------
    def _batch(self, data: tuple[jax.Array, jax.Array] | None, item: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One batch from one item of `_inputs`: rows `idx` of the on-device data, its examples split over the
        mesh; or, fed per process, the item itself (already split)."""
        if data is None:
            return item
        (x, y), (idx, mask) = data, item
        xb, yb = jnp.take(x, idx, axis=0, mode="clip"), jnp.take(y, idx, axis=0, mode="clip")  # idx is in range
        if self.mesh is None:
            return xb, yb, mask
        return tuple(jax.lax.with_sharding_constraint(a, NamedSharding(self.mesh, PartitionSpec("data"))) for a in (xb, yb, mask))

    def _batch_stats(self, params: Params, xb: jax.Array, yb: jax.Array, mb: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Summed cross-entropy and number correct over the valid rows of a batch."""
        logits = models.apply(self.config.model, params, xb)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        correct = (jnp.argmax(logits, axis=-1) == yb) & mb
        return jnp.sum(jnp.where(mb, ce, 0.0)), jnp.sum(correct)

    def _objective(self, params: Params, global_params: Params, xb: jax.Array, yb: jax.Array, mb: jax.Array):
        """Mean CE over valid rows, plus FedProx's (mu/2)||w - w_global||^2 when mu > 0."""
        loss_sum, correct = self._batch_stats(params, xb, yb, mb)
        loss = loss_sum / jnp.maximum(jnp.sum(mb), 1)
        mu = self.config.prox_mu
        if mu > 0:  # static: mu == 0 traces exactly the plain objective
            sq = sum(jnp.sum((params[k] - global_params[k]) ** 2) for k in params)
            loss = loss + 0.5 * mu * sq
        return loss, (loss_sum, correct)

    def _step(self, params: Params, opt_state: Any, global_params: Params, data, item):
        """One optimizer step on one batch [padded_batch] (see `_batch`): the body of both epoch modes."""
        grad_fn = jax.value_and_grad(self._objective, has_aux=True)
        (_, (loss_sum, correct)), grads = grad_fn(params, global_params, *self._batch(data, item))
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss_sum, correct

    def _train_epoch_impl(self, params: Params, opt_state: Any, global_params: Params, data, items):
        """Scan mode: a whole epoch over `items` [n_batches, padded_batch, ...] in one call."""
        self.traces["train_epoch"] += 1

        def body(carry, item):
            params, opt_state, loss_sum, correct = self._step(*carry, global_params, data, item)
            return (params, opt_state), (loss_sum, correct)

        (params, opt_state), (loss_sums, corrects) = jax.lax.scan(body, (params, opt_state), items)
        return params, opt_state, jnp.sum(loss_sums), jnp.sum(corrects)

    def _train_step_impl(self, params: Params, opt_state: Any, global_params: Params, data, items, i, loss_sum, correct):
        """Step-loop mode: batch `i` of the epoch's items; adds its stats to the running sums."""
        self.traces["train_step"] += 1
        item = tuple(a[i] for a in items)
        params, opt_state, batch_loss, batch_correct = self._step(params, opt_state, global_params, data, item)
        return params, opt_state, loss_sum + batch_loss, correct + batch_correct

    def _eval_impl(self, params: Params, data, items):
        self.traces["eval"] += 1

        def body(carry, item):
            loss_sum, correct = self._batch_stats(params, *self._batch(data, item))
            return (carry[0] + loss_sum, carry[1] + correct), None

        (loss_sum, correct), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), items)
        return loss_sum, correct

    def _run_epoch(self, params: Params, opt_state: Any, anchor: Params, data, idx: np.ndarray, mask: np.ndarray):
        data, items = self._inputs(data, idx, mask)
        if not self.step_loop:
            return self._train_epoch(params, opt_state, anchor, data, items)
        loss_sum, correct = self._put((np.float32(0), np.int32(0)))  # committed like the sums they become
        for i in range(idx.shape[0]):
            params, opt_state, loss_sum, correct = self._train_step(params, opt_state, anchor, data, items, i, loss_sum, correct)
        return params, opt_state, loss_sum, correct

    # ---- public API ------------------------------------------------------
    def start(self, params: Mapping[str, Any]) -> TrainState:
        """Epoch 0 from `params`, with a fresh optimizer state."""
        params = self._put_params(params)
        return TrainState(params, self._put(self._opt_init(params)))  # committed like later epochs: one cache entry

    def train(
        self,
        state: TrainState,
        x: Any,
        y: Any,
        epochs: int | None = None,
        on_epoch: Callable[[int, Metrics], None] | None = None,
        global_params: Mapping[str, Any] | None = None,
        on_state: Callable[[TrainState], None] | None = None,
    ) -> TrainState:
        """Run epochs `state.epoch` .. `epochs - 1` (default: the config's) and return where training ends.

        `on_epoch` gets each epoch's train metrics, `on_state` the state after it (its
        arrays still on the devices: a checkpointer fetches them only when it writes).
        `global_params` anchors the FedProx term and defaults to the state's params.
        """
        epochs = self.config.epochs if epochs is None else int(epochs)
        data, n = self._put_data(x, y)
        params, opt_state = self._put_params(state.params), self._put(state.opt_state)
        anchor = params if global_params is None else self._put_params(global_params)
        watched = on_epoch is not None or on_state is not None
        pending: list[tuple[jax.Array, jax.Array]] = []
        history, step = list(state.history), state.step
        for epoch in range(state.epoch, epochs):
            idx, mask = self._epoch_batches(n, epoch)
            params, opt_state, loss_sum, correct = self._run_epoch(params, opt_state, anchor, data, idx, mask)
            step += idx.shape[0]
            if not watched:  # no one is waiting: don't block the device every epoch
                pending.append((loss_sum, correct))
                continue
            history.append(self._metrics(loss_sum, correct, n))
            if on_epoch is not None:
                on_epoch(epoch, history[-1])
            if on_state is not None:
                on_state(TrainState(params, opt_state, epoch + 1, step, tuple(history)))
        history.extend(self._metrics(loss, hits, n) for loss, hits in pending)
        return TrainState(params, opt_state, max(epochs, state.epoch), step, tuple(history))

    def fit(
        self,
        params: Mapping[str, Any],
        x: Any,
        y: Any,
        epochs: int | None = None,
        on_epoch: Callable[[int, Metrics], None] | None = None,
        global_params: Mapping[str, Any] | None = None,
    ) -> tuple[Params, list[Metrics]]:
        """Train from `params`; returns the new params and per-epoch train metrics.

        Adam starts fresh each call (one call = one local round). Epoch metrics
        are the mean CE / accuracy seen while training that epoch.
        """
        end = self.train(self.start(params), x, y, epochs, on_epoch, global_params)
        return end.params, list(end.history)

    @staticmethod
    def _metrics(loss_sum: jax.Array, correct: jax.Array, n: int) -> Metrics:
        return {"loss": float(loss_sum) / n, "accuracy": float(correct) / n}

    def evaluate(self, params: Mapping[str, Any], x: Any, y: Any) -> dict[str, float | int]:
        """Mean CE, accuracy and example count (the count lets a hub weight site metrics)."""
        data, n = self._put_data(x, y)
        params = self._put_params(params)
        idx, mask = _masked_batches(np.arange(n), min(_round_up(EVAL_CHUNK, self.n_devices), n), self.n_devices)
        loss_sum, correct = self._eval(params, *self._inputs(data, idx, mask))
        return {**self._metrics(loss_sum, correct, n), "examples": n}


def param_count(params: Mapping[str, Any]) -> int:
    """Re-exported so callers of the training core need only this module."""
    return models.param_count(params)


__all__ = ["TrainConfig", "TrainState", "Trainer", "feature_stats", "standardize", "param_count", "step_loop_for", "epoch_order"]

"""Worker training throughput: fedpipe's worker path vs a bare jitted JAX train loop.

    .venv/bin/python bench/worker.py [--model cnn|mlp|logreg --batch 256 --samples N --epochs E]

Why: the product target is a worker that trains at >= 70% of what the same model does in the
simplest fast JAX loop, so that shard decoding, standardization, Trainer bookkeeping and the
jitted-epoch design cost little. Both sides run the same `models.apply`, softmax CE and
optax.adam (same learning rate), batch size and seeded synthetic float32 data (10 classes;
784 = 28x28 features for cnn, 64 for mlp/logreg), in one process, interleaved:

* worker  Parquet shard bytes (made once by `preprocess_file` and sealed as ingest seals them;
          setup, untimed) -> opened (`Envelope.open`, an in-process key: the key broker's round
          trip per shard is not counted) -> `read_shard` for each -> concatenate -> `standardize` (merged stats) -> `Trainer.fit(..., on_epoch=cb)`
          -> params ready. Timed end to end, decode and host->device transfer included, after a
          warm-up fit whose trace+compile time (jax's compile events) is `worker_compile_s`.
* bare    one jitted step (grad + adam), batches already on the device, a Python loop over
          them, `block_until_ready` at the end; the compiling first step is excluded.

Samples/s = samples * epochs / median time. Bare uses full batches only (defaults are
multiples of 256); the worker also reshuffles every epoch, a cost it really pays. Trainer
uses all jax devices, bare the first: compare on one-device machines. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import tink  # noqa: E402
from tink import aead  # noqa: E402

from shared.datasets import DatasetSpec  # noqa: E402
from shared.envelope import Envelope, Purpose  # noqa: E402
from shared.preprocess import preprocess_file, read_shard  # noqa: E402
from workers.trainer import models  # noqa: E402
from workers.trainer.training import TrainConfig, Trainer, standardize  # noqa: E402

N_CLASSES = 10
# features, samples, epochs: mlp/logreg use TrainSpec's 30 epochs; cnn stays < 2 min on 2 CPU cores even at ~50 samples/s
DEFAULTS = {"cnn": (784, 1024, 2), "mlp": (64, 65536, 30), "logreg": (64, 65536, 30)}


def synthetic(n: int, f: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, learnable float32 data: a class-dependent mean plus unit noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, N_CLASSES, n).astype(np.int32)
    centers = rng.normal(0.0, 1.0, (N_CLASSES, f)).astype(np.float32)
    return (centers[y] + rng.normal(0.0, 1.0, (n, f)).astype(np.float32)).astype(np.float32), y


ENVELOPE = Envelope(tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM).primitive(aead.Aead))


def build_shards(x: np.ndarray, y: np.ndarray) -> tuple[DatasetSpec, list[bytes], np.ndarray, np.ndarray]:
    """Setup (untimed): a Parquet upload -> `preprocess_file` -> shards and merged mean/std."""
    names = [f"f{j}" for j in range(x.shape[1])]
    sink = io.BytesIO()
    pq.write_table(pa.table([*(x[:, j] for j in range(x.shape[1])), y], names=[*names, "label"]), sink)
    spec = DatasetSpec(features=names, label="label", num_classes=N_CLASSES, expected_files=["synthetic.parquet"])
    processed = preprocess_file(sink.getvalue(), "synthetic.parquet", spec, max_bytes=1 << 34)
    mean, std = processed.stats.mean_std()
    sealed = [ENVELOPE.seal(shard, "bench", f"shard-{i}", Purpose.SHARD) for i, shard in enumerate(processed.shards)]
    return spec, sealed, np.asarray(mean, np.float32), np.asarray(std, np.float32)


def worker_run(trainer: Trainer, params: Any, spec: DatasetSpec, shards: list[bytes],
               mean: np.ndarray, std: np.ndarray, epochs: int) -> tuple[float, float]:
    """(decode s, total s) for sealed shards -> open -> read_shard -> standardize -> fit (with on_epoch) -> params ready."""
    progress: list[dict[str, float]] = []
    t0 = time.perf_counter()
    parts = [read_shard(ENVELOPE.open(b, "bench", f"shard-{i}", Purpose.SHARD), spec) for i, b in enumerate(shards)]
    x = standardize(np.concatenate([p[0] for p in parts]), mean, std)
    y = np.concatenate([p[1] for p in parts])
    decoded = time.perf_counter()
    out, _ = trainer.fit(params, x, y, epochs=epochs, on_epoch=lambda e, m: progress.append(m))
    jax.block_until_ready(out)
    return decoded - t0, time.perf_counter() - t0


def make_bare_step(model: str, lr: float) -> tuple[optax.GradientTransformation, Any]:
    """The minimal jitted train step: mean softmax CE of `models.apply`, one adam update."""
    opt = optax.adam(lr)

    def loss_fn(params: dict[str, jax.Array], xb: jax.Array, yb: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(models.apply(model, params, xb), yb).mean()

    @jax.jit
    def step(params: dict[str, jax.Array], opt_state: Any, xb: jax.Array, yb: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return opt, step


def bare_run(step: Any, opt: optax.GradientTransformation, params: Any,
             batches: list[tuple[jax.Array, jax.Array]], epochs: int) -> float:
    """Seconds for a Python loop of jitted steps over on-device batches, synced at the end."""
    opt_state = opt.init(params)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for xb, yb in batches:
            params, opt_state, loss = step(params, opt_state, xb, yb)
    jax.block_until_ready((params, loss))
    return time.perf_counter() - t0


def machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.processor())
    return {"cpu_model": cpu, "usable_cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"), "loadavg_at_start": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(DEFAULTS), default="cnn")
    for flag, default in (("--batch", 256), ("--samples", None), ("--epochs", None)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--repeats", type=int, default=3, help="at most this many timed (worker, bare) pairs")
    ap.add_argument("--budget-s", type=float, default=45.0, help="no new repeat once this much was timed")
    ap.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    a = ap.parse_args()
    mach = machine()
    n_features, samples, epochs = DEFAULTS[a.model]
    samples, epochs = a.samples or samples, a.epochs or epochs

    x, y = synthetic(samples, n_features)
    spec, shards, mean, std = build_shards(x, y)
    trainer = Trainer(TrainConfig(model=a.model, epochs=epochs, batch_size=a.batch, learning_rate=a.lr),
                      n_features, N_CLASSES)
    params = trainer.init_params()  # host-side start, as the worker's round-0 params
    compile_s: list[float] = []  # trace + lower + XLA compile, from jax's own compile-duration events
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: compile_s.append(secs) if event.startswith("/jax/core/compile/") else None)
    worker_run(trainer, params, spec, shards, mean, std, 1)  # warm-up fit: compiles the epoch function
    worker_compile_s, n_compiles = sum(compile_s), len(compile_s)

    opt, step = make_bare_step(a.model, a.lr)
    xs, n_b = standardize(x, mean, std), samples // a.batch  # bare: full batches only (ragged tail dropped)
    batches = [(jax.device_put(xs[i * a.batch:(i + 1) * a.batch]), jax.device_put(y[i * a.batch:(i + 1) * a.batch]))
               for i in range(n_b)]
    jax.block_until_ready(step(params, opt.init(params), *batches[0]))
    bare_compile_s = sum(compile_s[n_compiles:])

    worker_t: list[tuple[float, float]] = []
    bare_t: list[float] = []
    while len(bare_t) < max(1, a.repeats) and (not bare_t or sum(bare_t) + sum(w for _, w in worker_t) < a.budget_s):
        worker_t.append(worker_run(trainer, params, spec, shards, mean, std, epochs))  # interleaved: load
        bare_t.append(bare_run(step, opt, params, batches, epochs))  # from other processes hits both alike
    decode_s = statistics.median(d for d, _ in worker_t)
    w_s, b_s = statistics.median(w for _, w in worker_t), statistics.median(bare_t)
    worker_sps, bare_sps = samples * epochs / w_s, n_b * a.batch * epochs / b_s
    devs = jax.devices()
    mach["loadavg_at_end"] = os.getloadavg()
    result = {
        "worker_samples_per_s": round(worker_sps, 1), "bare_samples_per_s": round(bare_sps, 1),
        "ratio": round(worker_sps / bare_sps, 3), "target_ratio": 0.7,
        "device": f"{devs[0].device_kind} x{len(devs)}", "model": a.model, "batch": a.batch,
        "params": models.param_count(params), "samples": samples, "epochs": epochs, "shards": len(shards),
        "worker_s": [round(w, 3) for _, w in worker_t], "bare_s": [round(t, 3) for t in bare_t],
        "worker_decode_s": round(decode_s, 4),  # read_shard + concat + standardize, inside worker_s
        "worker_compile_s": round(worker_compile_s, 3),
        "bare_compile_s": round(bare_compile_s, 3), "worker_traces": dict(trainer.traces), "machine": mach,
    }
    print(f"{a.model}: {result['params']:,} params, batch {a.batch}, {samples} samples x {epochs} epochs, "
          f"{len(shards)} shards on {result['device']} ({mach['cpu_model']}, {mach['usable_cpus']} CPUs, "
          f"load {mach['loadavg_at_start'][0]:.1f})\n"
          f"  worker {worker_sps:,.0f} samples/s (shards->fit, median of {len(worker_t)}; decode {decode_s:.3f}s "
          f"of {w_s:.3f}s), bare {bare_sps:,.0f} samples/s\n  ratio {result['ratio']:.2f}: "
          f"{'meets' if result['ratio'] >= 0.7 else 'MISSES'} the 0.70 target; "
          f"compile: worker {result['worker_compile_s']}s, bare {result['bare_compile_s']}s", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

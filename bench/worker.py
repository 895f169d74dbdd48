"""Worker training throughput: fedpipe's worker path vs a bare jitted JAX train loop, and MFU.

    .venv/bin/python bench/worker.py [--model cnn|mlp|logreg|wide --batch 256 --samples N --epochs E]
    .venv/bin/python bench/worker.py --model wide --bare-only    # the bare loop and MFU only

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
* bare    one jitted step (grad + adam; params and optimizer state donated, so updated in
          place), batches already on the device, a Python loop over them, `block_until_ready`
          at the end; the compiling first step is excluded.

Samples/s = samples * epochs / median time. Bare uses full batches only (defaults are
multiples of the batch); the worker also reshuffles every epoch, a cost it really pays. Trainer
uses all jax devices, bare the first: compare on one-device machines.

Models: cnn (the FedAvg CNN), mlp and logreg as a job trains them, and `wide`, sized to load an
accelerator: fedpipe's mlp made wide, 256 -> 8192 x 3 -> 10 (136.4M params, 0.81 GFLOP per sample
per step), batch 2048, 65,536 samples x 20 epochs. On the CPU backend `wide` is scaled down by
itself to 256 -> 1024 x 3 -> 10 (2.4M params), batch 256, 16,384 samples x 3 epochs, so it ends in
well under a minute on 2 cores (`scale` in the JSON says which ran; --features/--hidden/--batch/
--samples/--epochs override). 256 features, not more: the worker decodes its shards once per
fit, so more input per sample would make this a Parquet benchmark, not a training one.

MFU (model FLOPs utilisation), for every model: FLOPs per step are XLA's cost analysis of the
compiled bare step (`jax.jit(step).lower(...).compile().cost_analysis()["flops"]`: forward,
backward and adam, as XLA counts them; `flops_source` says if the pre-optimisation count was
used instead, and dense models also get the matmul-only count worked out by hand). Per sample =
per step / batch; bare_mfu = FLOPs per sample x bare samples/s / peak, worker_mfu the same with the
worker's samples/s. The peak is PEAKS' entry for jax's device_kind at the rate float32 matmuls
run at under jax_default_matmul_precision: TF32 tensor cores on NVIDIA GPUs at jax's default
precision (plain fp32 with "highest"), one bf16 pass on TPU (3 with "high", 6 with "highest").
The CPU and unknown devices have no entry: "unknown peak", MFU null.

--bare-only skips the worker path and everything it imports (pyarrow, tink, pydantic, the
project's shard code): for a machine that has JAX but not the project's dependencies.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from workers.trainer import models  # noqa: E402
from workers.trainer.training import TrainConfig, Trainer, feature_stats, standardize  # noqa: E402

try:  # the worker path's own needs; --bare-only runs without them
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tink
    from tink import aead

    from shared.datasets import DatasetSpec
    from shared.envelope import Envelope, Purpose
    from shared.preprocess import preprocess_file, read_shard
except ImportError as exc:  # pragma: no cover - depends on the machine
    WORKER_PATH_MISSING: str | None = f"{type(exc).__name__}: {exc}"
else:
    WORKER_PATH_MISSING = None

N_CLASSES = 10


@dataclass(frozen=True)
class Shape:
    """One benchmark model: fedpipe's model name, its input and hidden sizes, and the run's size."""

    model: str
    features: int
    hidden: tuple[int, ...]
    samples: int
    epochs: int
    batch: int


# mlp/logreg use TrainSpec's 30 epochs; cnn stays < 2 min on 2 CPU cores even at ~50 samples/s
SHAPES = {
    "cnn": Shape("cnn", 784, (), 1024, 2, 256),
    "mlp": Shape("mlp", 64, TrainConfig.hidden, 65536, 30, 256),
    "logreg": Shape("logreg", 64, (), 65536, 30, 256),
}
# `wide` by backend: 136.4M params and 0.81 GFLOP per sample on an accelerator; 58x smaller on the CPU.
WIDE = {
    "accelerator": Shape("mlp", 256, (8192,) * 3, 65536, 20, 2048),
    "cpu": Shape("mlp", 256, (1024,) * 3, 16384, 3, 256),
}

# Dense peak FLOP/s of one chip, from the vendors' datasheets: (device_kind regex, bf16, TF32, fp32).
# First match wins, so the PCIe/NVL parts come before their SXM names. TPUs have one matmul rate
# (bf16); jax names the v5e "TPU v5 lite", the v6e "TPU v6 lite" and the v5p "TPU v5".
PEAKS: tuple[tuple[str, float, float | None, float | None], ...] = (
    (r"H200 NVL", 835.5e12, 417.5e12, 60.0e12),
    (r"H200", 989.4e12, 494.7e12, 66.9e12),
    (r"H100 PCIe", 756.5e12, 378.0e12, 51.2e12),
    (r"H100 NVL", 835.5e12, 417.5e12, 60.0e12),
    (r"H100", 989.4e12, 494.7e12, 66.9e12),
    (r"A100", 312.0e12, 156.0e12, 19.5e12),
    (r"\bL4\b", 121.0e12, 60.5e12, 30.3e12),
    (r"TPU v5 ?lite|TPU v5e", 197.0e12, None, None),
    (r"TPU v6 ?lite|TPU v6e", 918.0e12, None, None),
    (r"TPU v5p?$", 459.0e12, None, None),
)
GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def peak_flops(kind: str, platform_name: str, precision: str | None) -> tuple[float | None, str]:
    """(peak FLOP/s, what it is) for float32 matmuls at `precision` (jax_default_matmul_precision) on one chip."""
    row = next((r for r in PEAKS if re.search(r[0], kind, re.IGNORECASE)), None)
    if row is None or platform_name == "cpu":
        return None, f"unknown peak ({platform_name}: {kind})"
    _, bf16, tf32, fp32 = row
    level = str(precision or "default").lower()
    highest, high = level in ("highest", "float32"), level in ("high", "tensorfloat32", "bfloat16_3x")
    if platform_name in GPU_PLATFORMS:
        return (fp32, "fp32 (highest precision)") if highest else (tf32, "TF32 tensor cores (float32 at jax's default precision)")
    passes = 6 if highest else 3 if high else 1
    return bf16 / passes, f"bf16 x{passes} pass{'es' if passes > 1 else ''} (TPU float32 matmul at {level} precision)"


def step_flops(step: Any, *args: Any) -> tuple[float | None, str]:
    """FLOPs of one call of the jitted `step`, by XLA's cost analysis of the compiled executable.

    Falls back to the analysis of the lowered (unoptimised) module if the compiled one has no
    count (a backend may leave library calls uncounted)."""
    for source, analysis in (("compiled", lambda: step.lower(*args).compile().cost_analysis()),
                             ("lowered", lambda: step.lower(*args).cost_analysis())):
        try:
            ca = analysis()
        except Exception:  # noqa: BLE001 - an analysis a backend lacks is reported as missing, not fatal
            continue
        if isinstance(ca, list | tuple):  # older jax: one dict per executable
            ca = ca[0] if ca else {}
        if (flops := float((ca or {}).get("flops", 0.0))) > 0:
            return flops, source
    return None, "unavailable"


def dense_flops_per_sample(params: dict[str, Any]) -> int | None:
    """Matmul FLOPs per sample of a train step of a dense stack, by hand: forward, weight gradient
    and input gradient (not for the first layer) are 2*fan_in*fan_out each. None for convs."""
    if any(name.startswith("conv_") for name in params):
        return None
    kernels = [params[f"dense_{i}.kernel"].shape for i in range(sum(1 for k in params if k.endswith(".kernel")))]
    return sum(6 * fi * fo for fi, fo in kernels) - 2 * kernels[0][0] * kernels[0][1]


def synthetic(n: int, f: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, learnable float32 data: a class-dependent mean plus unit noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, N_CLASSES, n).astype(np.int32)
    centers = rng.normal(0.0, 1.0, (N_CLASSES, f)).astype(np.float32)
    return (centers[y] + rng.normal(0.0, 1.0, (n, f)).astype(np.float32)).astype(np.float32), y


@functools.cache
def envelope() -> Envelope:
    return Envelope(tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM).primitive(aead.Aead))


def build_shards(x: np.ndarray, y: np.ndarray) -> tuple[DatasetSpec, list[bytes], np.ndarray, np.ndarray]:
    """Setup (untimed): a Parquet upload -> `preprocess_file` -> shards and merged mean/std."""
    names = [f"f{j}" for j in range(x.shape[1])]
    sink = io.BytesIO()
    pq.write_table(pa.table([*(x[:, j] for j in range(x.shape[1])), y], names=[*names, "label"]), sink)
    spec = DatasetSpec(features=names, label="label", num_classes=N_CLASSES, expected_files=["synthetic.parquet"])
    processed = preprocess_file(sink.getvalue(), "synthetic.parquet", spec, max_bytes=1 << 34)
    mean, std = processed.stats.mean_std()
    sealed = [envelope().seal(shard, "bench", f"shard-{i}", Purpose.SHARD) for i, shard in enumerate(processed.shards)]
    return spec, sealed, np.asarray(mean, np.float32), np.asarray(std, np.float32)


def worker_run(trainer: Trainer, params: Any, spec: DatasetSpec, shards: list[bytes],
               mean: np.ndarray, std: np.ndarray, epochs: int) -> tuple[float, float]:
    """(decode s, total s) for sealed shards -> open -> read_shard -> standardize -> fit (with on_epoch) -> params ready."""
    progress: list[dict[str, float]] = []
    t0 = time.perf_counter()
    parts = [read_shard(envelope().open(b, "bench", f"shard-{i}", Purpose.SHARD), spec) for i, b in enumerate(shards)]
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

    # Params and adam state are donated: updated in place, as a fast loop would, not reallocated each step.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params: dict[str, jax.Array], opt_state: Any, xb: jax.Array, yb: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return opt, step


def bare_run(step: Any, opt: optax.GradientTransformation, params: Any,
             batches: list[tuple[jax.Array, jax.Array]], epochs: int) -> float:
    """Seconds for a Python loop of jitted steps over on-device batches, synced at the end."""
    params = jax.block_until_ready(jax.tree.map(jnp.copy, params))  # the step donates its inputs: keep the caller's
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


def resolve_shape(a: argparse.Namespace) -> tuple[Shape, str | None]:
    """The run's Shape: the model's defaults (for wide, by backend), then the command line's overrides."""
    scale = None
    if a.model == "wide":
        scale = "cpu" if jax.default_backend() == "cpu" else "accelerator"
        base = WIDE[scale]
    else:
        base = SHAPES[a.model]
    hidden = tuple(int(h) for h in a.hidden.split(",")) if a.hidden else base.hidden
    shape = Shape(base.model, a.features or base.features, hidden, a.samples or base.samples,
                  a.epochs or base.epochs, a.batch or base.batch)
    assert shape.samples >= shape.batch, f"--samples ({shape.samples}) must be at least one batch ({shape.batch})"
    return shape, scale


def rounded(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=[*SHAPES, "wide"], default="cnn")
    for flag in ("--batch", "--samples", "--epochs", "--features"):
        ap.add_argument(flag, type=int, default=None, help="override the model's default")
    ap.add_argument("--hidden", default=None, help="mlp/wide hidden sizes, comma-separated (e.g. 8192,8192)")
    ap.add_argument("--repeats", type=int, default=3, help="at most this many timed (worker, bare) pairs")
    ap.add_argument("--budget-s", type=float, default=45.0, help="no new repeat once this much was timed")
    ap.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    ap.add_argument("--bare-only", action="store_true", help="skip the worker path (and its imports): bare loop and MFU only")
    a = ap.parse_args()
    if not a.bare_only and WORKER_PATH_MISSING:
        sys.exit(f"the worker path cannot run here ({WORKER_PATH_MISSING}); install the project's dependencies or pass --bare-only")
    mach = machine()
    shape, scale = resolve_shape(a)
    samples, epochs, batch = shape.samples, shape.epochs, shape.batch

    x, y = synthetic(samples, shape.features)
    if a.bare_only:
        spec = shards = None
        mean, std = feature_stats(x)
    else:
        spec, shards, mean, std = build_shards(x, y)
    trainer = Trainer(TrainConfig(model=shape.model, hidden=shape.hidden or TrainConfig.hidden, epochs=epochs,
                                  batch_size=batch, learning_rate=a.lr), shape.features, N_CLASSES)
    params = trainer.init_params()  # host-side start, as the worker's round-0 params
    compile_s: list[float] = []  # trace + lower + XLA compile, from jax's own compile-duration events
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: compile_s.append(secs) if event.startswith("/jax/core/compile/") else None)
    if not a.bare_only:
        worker_run(trainer, params, spec, shards, mean, std, 1)  # warm-up fit: compiles the epoch function
    worker_compile_s, n_compiles = sum(compile_s), len(compile_s)

    opt, step = make_bare_step(shape.model, a.lr)
    xs, n_b = standardize(x, mean, std), samples // batch  # bare: full batches only (ragged tail dropped)
    batches = [(jax.device_put(xs[i * batch:(i + 1) * batch]), jax.device_put(y[i * batch:(i + 1) * batch]))
               for i in range(n_b)]
    dev_params = jax.device_put(params)
    warm = jax.tree.map(jnp.copy, dev_params)  # donated by the compiling step
    jax.block_until_ready(step(warm, opt.init(warm), *batches[0]))
    bare_compile_s = sum(compile_s[n_compiles:])
    flops, flops_source = step_flops(step, dev_params, opt.init(dev_params), *batches[0])

    worker_t: list[tuple[float, float]] = []
    bare_t: list[float] = []
    while len(bare_t) < max(1, a.repeats) and (not bare_t or sum(bare_t) + sum(w for _, w in worker_t) < a.budget_s):
        if not a.bare_only:  # interleaved: load from other processes hits both alike
            worker_t.append(worker_run(trainer, params, spec, shards, mean, std, epochs))
        bare_t.append(bare_run(step, opt, dev_params, batches, epochs))
    b_s = statistics.median(bare_t)
    bare_sps = n_b * batch * epochs / b_s
    if worker_t:
        decode_s = statistics.median(d for d, _ in worker_t)
        w_s = statistics.median(w for _, w in worker_t)
        worker_sps: float | None = samples * epochs / w_s
    else:
        decode_s = w_s = worker_sps = None

    devs = jax.devices()
    kind, plat = devs[0].device_kind, devs[0].platform
    precision = jax.config.jax_default_matmul_precision
    peak, basis = peak_flops(kind, plat, precision)
    per_sample = flops / batch if flops else None
    achieved = {k: (per_sample * sps if per_sample and sps else None) for k, sps in (("bare", bare_sps), ("worker", worker_sps))}
    mfu = {k: (v / peak if v and peak else None) for k, v in achieved.items()}
    analytic = dense_flops_per_sample(params)
    mach["loadavg_at_end"] = os.getloadavg()
    ratio = worker_sps / bare_sps if worker_sps else None
    result = {
        "worker_samples_per_s": rounded(worker_sps, 1), "bare_samples_per_s": round(bare_sps, 1),
        "ratio": rounded(ratio, 3), "target_ratio": 0.7,
        "device": f"{kind} x{len(devs)}", "device_kind": kind, "platform": plat, "model": a.model, "scale": scale,
        "features": shape.features, "hidden": list(shape.hidden) if shape.model == "mlp" else None, "batch": batch,
        "params": models.param_count(params), "samples": samples, "epochs": epochs,
        "shards": len(shards) if shards else None,
        "worker_path": f"skipped (--bare-only{'; ' + WORKER_PATH_MISSING if WORKER_PATH_MISSING else ''})" if a.bare_only else "ran",
        "worker_s": [round(w, 3) for _, w in worker_t], "bare_s": [round(t, 3) for t in bare_t],
        "worker_decode_s": rounded(decode_s, 4),  # read_shard + concat + standardize, inside worker_s
        "worker_compile_s": round(worker_compile_s, 3) if not a.bare_only else None,
        "bare_compile_s": round(bare_compile_s, 3), "worker_traces": dict(trainer.traces),
        "flops_per_step": flops, "flops_source": flops_source, "flops_per_sample": rounded(per_sample, 0),
        "flops_per_sample_matmuls_by_hand": analytic,
        "bare_tflops_per_s": rounded(achieved["bare"] and achieved["bare"] / 1e12, 3),
        "worker_tflops_per_s": rounded(achieved["worker"] and achieved["worker"] / 1e12, 3),
        "peak_flops_per_s": peak, "peak_basis": basis, "matmul_precision": precision,
        "bare_mfu": rounded(mfu["bare"], 4), "worker_mfu": rounded(mfu["worker"], 4),
        "machine": mach,
    }
    hidden_txt = f" hidden {'x'.join(map(str, shape.hidden))}," if shape.model == "mlp" else ""
    lines = [f"{a.model}{f' ({scale} scale)' if scale else ''}: {result['params']:,} params,{hidden_txt} batch {batch}, "
             f"{samples} samples x {epochs} epochs on {result['device']} ({mach['cpu_model']}, {mach['usable_cpus']} CPUs, "
             f"load {mach['loadavg_at_start'][0]:.1f}, jax {jax.__version__})"]
    if worker_sps:
        lines.append(f"  worker {worker_sps:,.0f} samples/s (shards->fit, median of {len(worker_t)}; decode {decode_s:.3f}s "
                     f"of {w_s:.3f}s), bare {bare_sps:,.0f} samples/s")
        lines.append(f"  ratio {ratio:.2f}: {'meets' if ratio >= 0.7 else 'MISSES'} the 0.70 target; "
                     f"compile: worker {result['worker_compile_s']}s, bare {result['bare_compile_s']}s")
    else:
        lines.append(f"  bare {bare_sps:,.0f} samples/s (median of {len(bare_t)}); worker path skipped")
    flops_txt = f"{flops / 1e9:,.2f} GFLOP/step ({flops_source} cost analysis)" if flops else "FLOPs unavailable"
    if peak:
        lines.append(f"  {flops_txt}; MFU bare {mfu['bare']:.1%}"
                     + (f", worker {mfu['worker']:.1%}" if mfu["worker"] is not None else "")
                     + f" of {peak / 1e12:,.1f} TFLOP/s ({basis})")
    else:
        lines.append(f"  {flops_txt}; bare {result['bare_tflops_per_s']} TFLOP/s; MFU null: {basis}")
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

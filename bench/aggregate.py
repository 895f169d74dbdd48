"""Aggregation throughput and memory: fedpipe's StreamingMean vs NumPy tensordot vs Flower's
aggregate, against the machine's memory bandwidth; the robust strategies (coordinate-wise
median, trimmed mean) vs np.median and scipy.stats.trim_mean; on an accelerator, the same
weighted mean done on the device.

    .venv/bin/python bench/aggregate.py            # re-executes under .venv-bench if flwr is there
    .venv-bench/bin/python bench/aggregate.py      # same thing, directly
    .venv/bin/python bench/aggregate.py --cases large --no-robust   # what bench/device.sh runs
    .venv/bin/python bench/aggregate.py --quick    # small case only, no robust strategies: seconds

Flower (PyPI ``flwr``) pins protobuf/grpcio versions that can clash with the
google-cloud libraries in .venv, so it lives in its own venv (one-time setup)::

    python3.11 -m venv .venv-bench && .venv-bench/bin/pip install flwr numpy

Nothing else is needed there: this script puts the repo root on sys.path and
shared/aggregation.py only needs NumPy. Without flwr anywhere, the Flower columns are null.

Cases: N updates of P float32 params split over a few tensors like a real model
(N=10, P~1.7M and N=100, P~11.1M). On the same arrays, in the same process:

* ours    StreamingMean.extend over the updates, as the hub calls it: groups of K updates
          (K = GROUP_BYTES // model bytes, at most N), each accumulated in one cache-blocked
          pass; construction and result() included. Default backend "auto" (fused saxpy from
          NumPy's bundled OpenBLAS, with a watchdog that falls back to NumPy under CPU
          oversubscription), plus the explicit "numpy" and "blas" backends reported
          separately, and ours_add: StreamingMean.add one update at a time, for reference.
* numpy   ``np.tensordot(w / w.sum(), stacked, axes=1)`` on a [N, P] float32 array. Building
          the stacked array is NOT timed (reported separately as numpy_stack_s); weights are
          float32 (float64 weights make NumPy upcast the whole stack, ~8x slower).
* flower  ``flwr.server.strategy.aggregate.aggregate([(ndarrays, num_examples), ...])``.

Robust strategies, timed in their own interleaved rounds (fewer of them: the baselines are
slow), on the same updates:

* ours_median, ours_trimmed   CoordinateMedian().extend/result and TrimmedMean(TRIM_FRACTION),
          as aggregator("median" / "trimmed_mean") gives them to the hub.
* numpy_median, scipy_trim_mean   ``np.median(block, axis=0)`` and
          ``scipy.stats.trim_mean(block, TRIM_FRACTION, axis=0)`` over blocks of BASELINE_BLOCK
          columns of the stacked [N, P] array (stacking not timed). Blocked because both copy
          their input: on the whole array that is a second N x P copy (4.4 GB for N=100).

Throughput is bytes of updates read per aggregation (N * P * 4) / median wall time of
several rounds (9 small / 5 large) that each run every method once in a shuffled order,
after one untimed warm-up each. Peak extra memory is measured with tracemalloc (NumPy reports its buffers
to it) on a separate, untimed run, relative to the already-loaded updates; for numpy it
includes the stacked copy, which is what that approach needs. For ours it is also measured
streamed (ours_streamed_peak_bytes): each update materialised (copied) only when extend asks
for it, as the hub reads them from the bucket, so it counts the group extend holds: a
constant number of models (about K + 1: the group and the accumulator), not N.

Memory per strategy: the streaming mean holds a few models whatever N is; median and
trimmed mean hold all N updates (by reference) until result(), plus a sort buffer per thread
and the result. Both are measured with tracemalloc: *_peak_extra_bytes relative to updates
already in memory, *_streamed_peak_bytes with each update copied when asked for (as the hub
reads them from the bucket), which is what the hub needs; both are printed in models too.

Memory bandwidth, measured in the same run (before the cases and again after them; the
best of all is kept): jit-compiled JAX kernels over a large float32 buffer on a device, bytes
moved / time, best of several trials of back-to-back calls: a full reduction (``jnp.sum``:
reads the buffer once) and a copy (``x * 2``: reads and writes it), plus, on the host, an
OpenBLAS GEMV of ones over the buffer (NumPy, every core; the same kind of read as the
tensordot baseline). host_bw_gbps is the best rate any of them moved the host's memory at
(1 GiB buffer; the copy's bytes read plus written), and ours_vs_host_bw = ours_gbps /
host_bw_gbps is the hub aggregation's share of it (target >= 0.80): the hub aggregates in the
host's memory, so that is its ceiling, whatever accelerator the machine has. Since ours_gbps
counts the bytes of updates read, host_read_bw_gbps (the best read-only kernel) and
ours_vs_host_read_bw are reported too: where a read-only kernel cannot saturate the memory
(one core's reduction on XLA:CPU), it is the kinder, and weaker, ceiling. device_bw_gbps is the same measurement
on jax's default device (2 GiB on an accelerator; on a CPU-only machine it is the host).

On an accelerator (jax's default backend is not the CPU), each case also times the weighted
mean on the device: the stacked [N, P] array put on the device once (its transfer timed
apart, device_transfer_s), then a jitted ``jnp.tensordot(w, stacked, axes=1)`` (HIGHEST
precision) and a fused ``jnp.sum(w[:, None] * stacked, axis=0)``; device_agg_gbps is the
faster (bytes of updates / median time), device_agg_vs_device_bw its share of device_bw_gbps,
device_agg_incl_transfer_gbps with the host->device copy counted. Without JAX (or on the
CPU backend) the device fields are null.

Other processes on the same CPUs skew everything (and can trip the "auto" watchdog): the
load average at start and end is printed and recorded in the JSON.

The LAST line printed is one JSON object (fields for the largest case, plus all cases).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"


def _maybe_reexec() -> None:
    """Run under .venv-bench when flwr is missing here but installed there."""
    if importlib.util.find_spec("flwr") is not None or os.environ.get("FEDPIPE_BENCH_REEXEC"):
        return
    if BENCH_PYTHON.exists() and Path(sys.executable).absolute() != BENCH_PYTHON.absolute():
        print(f"flwr not importable here; re-executing under {BENCH_PYTHON.relative_to(ROOT)}", flush=True)
        os.environ["FEDPIPE_BENCH_REEXEC"] = "1"
        os.execv(str(BENCH_PYTHON), [str(BENCH_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])


_maybe_reexec()
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from shared.aggregation import GROUP_BYTES, CoordinateMedian, StreamingMean, TrimmedMean, blas_axpy_available  # noqa: E402

try:
    from flwr.server.strategy.aggregate import aggregate as flower_aggregate
except ImportError:  # pragma: no cover - depends on the venv
    flower_aggregate = None
try:
    from scipy.stats import trim_mean as scipy_trim_mean
except ImportError:  # pragma: no cover - depends on the venv
    scipy_trim_mean = None
try:  # bandwidth kernels and the device-side mean; without JAX, NumPy's GEMV alone measures the host
    import jax
    import jax.numpy as jnp
except ImportError:  # pragma: no cover - depends on the venv
    jax = jnp = None

GB = 1e9
HOST_BW_BYTES = 1 << 30  # buffer for the host's bandwidth: far beyond any CPU cache
DEVICE_BW_BYTES = 2 << 30  # and an accelerator's (an H200's L2 is 60 MB)
TARGET_VS_BW = 0.80
TRIM_FRACTION = 0.1  # aggregator()'s default
BASELINE_BLOCK = 1 << 16  # columns of the stacked array per np.median / trim_mean call (26 MB at N=100)


def shapes_small() -> dict[str, tuple[int, ...]]:
    """~1.70M params: a small CNN (8 3x3x128x128 convs, a stem, a dense head)."""
    s: dict[str, tuple[int, ...]] = {"stem/kernel": (3, 3, 64, 128), "stem/bias": (128,)}
    for i in range(8):
        s[f"block{i}/conv/kernel"] = (3, 3, 128, 128)
        s[f"block{i}/conv/bias"] = (128,)
    s["dense/kernel"] = (2048, 200)
    s["dense/bias"] = (200,)
    s["head/kernel"] = (200, 180)
    s["head/bias"] = (180,)
    return s


def shapes_large() -> dict[str, tuple[int, ...]]:
    """~11.1M params: ResNet-18-like tail (4 3x3x512x512 convs, a 256->512 conv, a 1000-way head)."""
    s: dict[str, tuple[int, ...]] = {"layer4.0/conv1/kernel": (3, 3, 256, 512), "layer4.0/conv1/bias": (512,)}
    for i in range(4):
        s[f"layer4.{i}/conv2/kernel"] = (3, 3, 512, 512)
        s[f"layer4.{i}/conv2/bias"] = (512,)
    s["fc/kernel"] = (512, 1000)
    s["fc/bias"] = (1000,)
    return s


def make_updates(n: int, shapes: dict[str, tuple[int, ...]], seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()} for _ in range(n)]


def interleaved_medians(methods: dict, repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median wall time per method: one untimed warm-up each, then `repeats` rounds that run
    every method once, in a shuffled order (fixed seed), so background noise and position
    effects (e.g. running right after Flower has freed GBs, when the allocator has to fault
    fresh pages back in) hit all methods alike."""
    outs = {}
    for name, fn in methods.items():
        outs[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            outs[name] = None
            gc.collect()
            t0 = time.perf_counter()
            outs[name] = methods[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}, outs


def peak_extra_bytes(fn) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = fn()
        peak = tracemalloc.get_traced_memory()[1]
        del out
    finally:
        tracemalloc.stop()
    return peak - base


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in arrays])


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def blocked(stacked: np.ndarray, statistic) -> np.ndarray:
    """``statistic(block)`` (a reduction over axis 0) over blocks of BASELINE_BLOCK columns, into one flat result."""
    out = np.empty(stacked.shape[1], dtype=np.float32)
    for lo in range(0, stacked.shape[1], BASELINE_BLOCK):
        out[lo : lo + BASELINE_BLOCK] = statistic(stacked[:, lo : lo + BASELINE_BLOCK])
    return out


def robust(make, source):
    """One round of a robust aggregator, as the hub runs it: extend with the pairs, then result()."""

    def run():
        agg = make()
        agg.extend(source())
        return agg.result()

    return run


def time_robust(updates, weights: list[float], stacked: np.ndarray, shapes, repeats: int) -> dict:
    """Median and trimmed mean: ours vs NumPy/SciPy on the stacked array, interleaved like the means."""
    n, nbytes = len(updates), stacked.nbytes
    pairs = lambda: zip(updates, weights, strict=True)  # noqa: E731
    methods = {
        "ours_median": robust(CoordinateMedian, pairs),
        "ours_trimmed": robust(lambda: TrimmedMean(TRIM_FRACTION), pairs),
        "numpy_median": lambda: blocked(stacked, lambda b: np.median(b, axis=0)),
    }
    if scipy_trim_mean is not None:
        methods["scipy_trim_mean"] = lambda: blocked(stacked, lambda b: scipy_trim_mean(b, TRIM_FRACTION, axis=0))
    medians, outs = interleaved_medians(methods, repeats)
    trimmed = int(TRIM_FRACTION * n)
    row: dict = {"trim_fraction": TRIM_FRACTION, "trimmed_per_end": trimmed, "robust_repeats": repeats}
    print(f"   -- robust (median of {repeats}; trimmed mean drops {trimmed} of {n} at each end per coordinate)")
    for name, t in medians.items():
        row[f"{name}_s"], row[f"{name}_gbps"] = t, nbytes / t / GB
        print(f"   {name:15s} {t * 1e3:9.1f} ms  {nbytes / t / GB:6.2f} GB/s", flush=True)
    row["ours_median_vs_numpy"] = row["ours_median_gbps"] / row["numpy_median_gbps"]
    row["ours_median_rel_diff_vs_numpy"] = rel_diff(flat(outs["ours_median"][k] for k in shapes), outs["numpy_median"])
    line = f"   ours_median/numpy_median = {row['ours_median_vs_numpy']:.2f}x"
    if "scipy_trim_mean" in outs:
        row["ours_trimmed_vs_scipy"] = row["ours_trimmed_gbps"] / row["scipy_trim_mean_gbps"]
        row["ours_trimmed_rel_diff_vs_scipy"] = rel_diff(flat(outs["ours_trimmed"][k] for k in shapes), outs["scipy_trim_mean"])
        line += f", ours_trimmed/scipy_trim_mean = {row['ours_trimmed_vs_scipy']:.2f}x"
    else:
        row["scipy_trim_mean_s"] = row["scipy_trim_mean_gbps"] = row["ours_trimmed_vs_scipy"] = None
    print(line, flush=True)
    return row


def robust_memory(updates, weights: list[float], streamed, model_bytes: int) -> dict:
    """Peak extra memory of median and trimmed mean, with the updates in memory and streamed."""
    row: dict = {}
    pairs = lambda: zip(updates, weights, strict=True)  # noqa: E731
    for name, make in (("median", CoordinateMedian), ("trimmed", lambda: TrimmedMean(TRIM_FRACTION))):
        row[f"ours_{name}_peak_extra_bytes"] = peak_extra_bytes(robust(make, pairs))
        row[f"ours_{name}_streamed_peak_bytes"] = peak_extra_bytes(robust(make, streamed))
    mib = 1 << 20
    print("   peak extra memory, robust: " + ", ".join(
        f"{name} {row[f'ours_{name}_peak_extra_bytes'] / mib:,.0f} MiB in memory / "
        f"{row[f'ours_{name}_streamed_peak_bytes'] / mib:,.0f} MiB = "
        f"{row[f'ours_{name}_streamed_peak_bytes'] / model_bytes:.1f} models streamed"
        for name in ("median", "trimmed")), flush=True)
    return row


def on_accelerator() -> bool:
    return jax is not None and jax.default_backend() != "cpu"


def _best_gbps(run, nbytes: int, calls: int, trials: int) -> float:
    """Best GB/s over `trials` trials of run(calls): `calls` back-to-back calls of a kernel that
    moves nbytes each, returning what to wait on; a trial ends when that is ready. Warmed up first."""
    sync = jax.block_until_ready if jax is not None else (lambda x: x)
    sync(run(1))
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        sync(run(calls))
        best = min(best, (time.perf_counter() - t0) / calls)
    return nbytes / best / GB


def measure_bandwidth(device, nbytes: int, with_numpy: bool, trials: int = 5) -> dict[str, float]:
    """GB/s of each bandwidth kernel over an nbytes float32 buffer (see the module docstring).

    The copy is chained (y = y + 1, its input donated), so it runs in place in order and a
    trial needs one buffer, not one per call."""
    rates: dict[str, float] = {}
    if jax is not None and device is not None:
        calls = 3 if device.platform == "cpu" else 20  # ~0.1 s of a CPU, ~10 ms of an HBM device
        with jax.default_device(device):
            x = jnp.ones(nbytes // 4, jnp.float32)
            y = [jnp.zeros(nbytes // 4, jnp.float32)]
        total, bump = jax.jit(jnp.sum), jax.jit(lambda a: a + 1.0, donate_argnums=0)

        def chained(k: int):
            for _ in range(k):
                y[0] = bump(y[0])
            return y[0]  # each call consumed the one before: the last ready means all done

        rates["jax_sum_read"] = _best_gbps(lambda k: [total(x) for _ in range(k)], nbytes, calls, trials)
        rates["jax_copy_read_write"] = _best_gbps(chained, 2 * nbytes, calls, trials)
        del x, y
    if with_numpy:
        buf = np.ones((1024, nbytes // 4 // 1024), np.float32)
        ones = np.ones(1024, np.float32)
        rates["numpy_gemv_read"] = _best_gbps(lambda k: [ones @ buf for _ in range(k)], nbytes, 1, trials)
        del buf
    gc.collect()
    return rates


def bandwidths(trials: int = 5) -> dict[str, dict[str, float]]:
    """Each kernel's GB/s on the host ("host": jax's CPU device and NumPy) and, on an accelerator, on jax's default device."""
    host_device = jax.devices("cpu")[0] if jax is not None else None
    out = {"host": measure_bandwidth(host_device, HOST_BW_BYTES, with_numpy=True, trials=trials)}
    if on_accelerator():
        out["device"] = measure_bandwidth(jax.devices()[0], DEVICE_BW_BYTES, with_numpy=False, trials=trials)
    return out


def device_mean(stacked: np.ndarray, w32: np.ndarray, trials: int, ref: np.ndarray) -> dict:
    """The weighted mean on jax's default device: stacked [N, P] put there once, then the jitted mean."""
    nbytes = stacked.nbytes
    dev = jax.devices()[0]
    t0 = time.perf_counter()
    s_d, w_d = jax.block_until_ready((jax.device_put(stacked, dev), jax.device_put(w32, dev)))
    row: dict = {"device_transfer_s": time.perf_counter() - t0}
    methods = {
        "tensordot": jax.jit(lambda w, s: jnp.tensordot(w, s, axes=1, precision=jax.lax.Precision.HIGHEST)),
        "fused_sum": jax.jit(lambda w, s: jnp.sum(w[:, None] * s, axis=0)),
    }
    calls = max(1, min(20, int(2e9 // nbytes)))  # back-to-back calls per trial: past the dispatch overhead
    for name, fn in methods.items():
        row[f"device_{name}_gbps"] = _best_gbps(lambda k, fn=fn: [fn(w_d, s_d) for _ in range(k)], nbytes, calls, trials)
        row[f"device_{name}_rel_diff_vs_ours"] = rel_diff(np.asarray(fn(w_d, s_d)), ref)
    best = max(methods, key=lambda m: row[f"device_{m}_gbps"])
    row["device_agg_method"], row["device_agg_gbps"] = best, row[f"device_{best}_gbps"]
    row["device_agg_incl_transfer_gbps"] = nbytes / (nbytes / row["device_agg_gbps"] / GB + row["device_transfer_s"]) / GB
    print(f"   on {dev.device_kind}: " + ", ".join(f"{m} {row[f'device_{m}_gbps']:,.1f} GB/s" for m in methods)
          + f" (best of {trials}; +{row['device_transfer_s'] * 1e3:.0f} ms to put the stack there: "
          f"{row['device_agg_incl_transfer_gbps']:,.1f} GB/s with it)", flush=True)
    return row


DEVICE_FIELDS = ("device_transfer_s", "device_agg_method", "device_agg_gbps", "device_agg_incl_transfer_gbps")


def run_case(name: str, n: int, shapes: dict[str, tuple[int, ...]], repeats: int, robust_repeats: int, robust: bool = True) -> dict:
    p = sum(int(np.prod(s)) for s in shapes.values())
    nbytes = n * p * 4
    print(f"\n== {name}: N={n} updates x P={p:,} float32 params in {len(shapes)} tensors "
          f"({nbytes / GB:.2f} GB read per aggregation, median of {repeats})", flush=True)
    t0 = time.perf_counter()
    updates = make_updates(n, shapes, seed=n)
    weights = np.random.default_rng(1).integers(100, 10_000, size=n)
    print(f"   generated updates in {time.perf_counter() - t0:.1f}s", flush=True)
    row: dict = {"case": name, "n": n, "p": p, "tensors": len(shapes), "bytes_read": nbytes, "repeats": repeats}

    used: list[str] = []
    row["ours_group"] = min(n, max(1, GROUP_BYTES // (p * 4)))  # updates per group: extend's rule

    def ours(backend: str, source=lambda: zip(updates, weights.tolist(), strict=True)):
        def run():
            mean = StreamingMean(backend=backend)
            mean.extend(source())  # the hub's call: default group_bytes
            if backend == "auto":
                used.append(mean.backend)  # "auto" may have fallen back to numpy mid-run
            return mean.result()

        return run

    def ours_add():
        mean = StreamingMean()
        for u, w in zip(updates, weights, strict=True):
            mean.add(u, int(w))
        return mean.result()

    def streamed():
        """Each update copied only when extend asks for it, like a read from the bucket."""
        for u, w in zip(updates, weights.tolist(), strict=True):
            yield {k: a.copy() for k, a in u.items()}, w

    # numpy baseline: tensordot on the stacked [N, P] array; stacking is not timed.
    def build_stacked() -> np.ndarray:
        stacked = np.empty((n, p), dtype=np.float32)
        for i, u in enumerate(updates):
            off = 0
            for k in shapes:
                size = u[k].size
                stacked[i, off : off + size] = u[k].reshape(-1)
                off += size
        return stacked

    w32 = (weights / weights.sum()).astype(np.float32)
    t0 = time.perf_counter()
    stacked = build_stacked()
    row["numpy_stack_s"] = time.perf_counter() - t0
    fl_in = [([u[k] for k in shapes], int(w)) for u, w in zip(updates, weights, strict=True)]

    # "auto" is what the hub uses (blas + watchdog); explicit backends for reference.
    methods = {"ours_auto": ours("auto"), "ours_numpy": ours("numpy")}
    if blas_axpy_available():
        methods["ours_blas"] = ours("blas")
    methods["ours_add"] = ours_add
    methods["numpy"] = lambda: np.tensordot(w32, stacked, axes=1)
    if flower_aggregate is not None:
        methods["flower"] = lambda: flower_aggregate(fl_in)
    medians, outs = interleaved_medians(methods, repeats)
    row["ours_backend"] = "+".join(sorted(set(used)))
    for name, t in medians.items():
        row[f"{name}_s"], row[f"{name}_gbps"] = t, nbytes / t / GB
        note = {
            "ours_auto": f"  (groups of {row['ours_group']}, ran on: {row['ours_backend']})",
            "ours_add": "  (StreamingMean.add, one update at a time)",
            "numpy": f"  (+{row['numpy_stack_s'] * 1e3:.0f} ms to stack, not timed)",
        }.get(name, "")
        print(f"   {name:11s} {t * 1e3:9.1f} ms  {nbytes / t / GB:6.2f} GB/s{note}", flush=True)
    row["ours_s"], row["ours_gbps"] = row["ours_auto_s"], row["ours_auto_gbps"]
    row["numpy_incl_stack_gbps"] = nbytes / (row["numpy_s"] + row["numpy_stack_s"]) / GB

    ref = flat(outs["ours_auto"][k] for k in shapes)
    row["numpy_rel_diff_vs_ours"] = rel_diff(outs["numpy"], ref)
    row["ours_numpy_backend_rel_diff"] = rel_diff(flat(outs["ours_numpy"][k] for k in shapes), ref)
    if "flower" in outs:
        row["flower_rel_diff_vs_ours"] = rel_diff(flat(outs["flower"]), ref)
    del outs
    if on_accelerator():
        row |= device_mean(stacked, w32, repeats, ref)
    else:
        row |= dict.fromkeys(DEVICE_FIELDS)
    del ref
    if robust:
        row |= time_robust(updates, weights.tolist(), stacked, shapes, robust_repeats)
    stacked = None  # free 4.4 GB before the next case (the closures above are done with it)
    gc.collect()

    # Peak extra memory, each on its own untimed run.
    row["ours_peak_extra_bytes"] = peak_extra_bytes(ours("auto"))
    row["ours_numpy_backend_peak_extra_bytes"] = peak_extra_bytes(ours("numpy"))
    row["ours_streamed_peak_bytes"] = peak_extra_bytes(ours("auto", streamed))
    # Filling a preallocated [N, P] buffer row by row: the least memory this approach needs.
    row["numpy_peak_extra_bytes"] = peak_extra_bytes(lambda: np.tensordot(w32, build_stacked(), axes=1))
    if flower_aggregate is not None:
        row["flower_peak_extra_bytes"] = peak_extra_bytes(lambda: flower_aggregate(fl_in))
    else:
        row["flower_s"] = row["flower_gbps"] = row["flower_peak_extra_bytes"] = None
        print("   flower      (flwr not installed: see the module docstring)", flush=True)
    fl_in = None  # free Flower's input copies
    gc.collect()
    if robust:
        row |= robust_memory(updates, weights.tolist(), streamed, p * 4)

    row["ours_vs_numpy"] = row["ours_gbps"] / row["numpy_gbps"]
    row["ours_vs_flower"] = row["ours_gbps"] / row["flower_gbps"] if row["flower_gbps"] else None
    print(f"   ours/numpy = {row['ours_vs_numpy']:.2f}x, ours/flower = "
          + (f"{row['ours_vs_flower']:.1f}x" if row["ours_vs_flower"] else "n/a"), flush=True)
    mib = 1 << 20
    print(f"   peak extra memory: ours {row['ours_peak_extra_bytes'] / mib:,.0f} MiB "
          f"({row['ours_streamed_peak_bytes'] / mib:,.0f} MiB = "
          f"{row['ours_streamed_peak_bytes'] / (p * 4):.1f} models streamed, groups of {row['ours_group']} for N={n}), "
          f"numpy (stacked) {row['numpy_peak_extra_bytes'] / mib:,.0f} MiB"
          + (f", flower {row['flower_peak_extra_bytes'] / mib:,.0f} MiB" if row["flower_peak_extra_bytes"] else "")
          + f"  (one model = {p * 4 / mib:,.0f} MiB)", flush=True)
    updates = None  # free the updates before the next case
    gc.collect()
    return row


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    flwr_version = None
    if flower_aggregate is not None:
        from importlib.metadata import version

        flwr_version = version("flwr")
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": model or platform.processor(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "numpy": np.__version__,
        "flwr": flwr_version,
        "blas_axpy": blas_axpy_available(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "jax": jax.__version__ if jax is not None else None,
        "jax_device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})" if jax is not None else None,
        "executable": sys.executable,
        "loadavg_at_start": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="small,large", help="comma-separated: small (N=10 x 1.7M), large (N=100 x 11.1M)")
    ap.add_argument("--no-robust", action="store_true", help="skip median and trimmed mean (their baselines take minutes)")
    ap.add_argument("--quick", action="store_true", help="small case only, fewer rounds, no robust strategies: a smoke run")
    a = ap.parse_args()
    names = ["small"] if a.quick else [c.strip() for c in a.cases.split(",") if c.strip()]
    assert names and set(names) <= {"small", "large"}, f"--cases takes small and/or large, got {a.cases!r}"
    robust = not (a.no_robust or a.quick)

    mach = machine()
    print(f"machine: {mach['cpu_model']}, {mach['usable_cpus']} usable CPUs, {mach['platform']}, "
          f"numpy {mach['numpy']}, flwr {mach['flwr']}, jax {mach['jax']} on {mach['jax_device']}")
    print(f"load average (other processes share these CPUs): {mach['loadavg_at_start']}")
    if mach["openblas_coretype"]:
        print(f"note: OPENBLAS_CORETYPE={mach['openblas_coretype']} is set: OpenBLAS (tensordot, and our "
              "saxpy) uses that kernel set instead of auto-detecting one; left as is.")
    trials = 3 if a.quick else 5
    bw_runs = [bandwidths(trials)]
    print_bandwidth("before the cases", bw_runs[0])
    specs = {"small": (10, shapes_small(), 9, 5), "large": (100, shapes_large(), 5, 3)}
    cases = []
    for name in names:
        n, shapes, repeats, robust_repeats = specs[name]
        cases.append(run_case(name, n, shapes, 3 if a.quick else repeats, robust_repeats, robust=robust))
    bw_runs.append(bandwidths(trials))
    print_bandwidth("after the cases", bw_runs[1])
    # The best each kernel managed in either run: a rate the memory demonstrably sustains.
    bw = {where: {k: max(run[where][k] for run in bw_runs) for k in bw_runs[0][where]} for where in bw_runs[0]}
    host_bw = max(bw["host"].values())
    host_read_bw = max(v for k, v in bw["host"].items() if k.endswith("_read"))
    device_bw = max(bw["device"].values()) if "device" in bw else host_bw
    for row in cases:
        row["host_bw_gbps"], row["ours_vs_host_bw"] = host_bw, row["ours_gbps"] / host_bw
        row["host_read_bw_gbps"], row["ours_vs_host_read_bw"] = host_read_bw, row["ours_gbps"] / host_read_bw
        row["numpy_vs_host_bw"] = row["numpy_gbps"] / host_bw
        row["device_agg_vs_device_bw"] = row["device_agg_gbps"] / device_bw if row["device_agg_gbps"] else None
        print(f"== {row['case']}: ours {row['ours_gbps']:.2f} GB/s = {row['ours_vs_host_bw']:.2f} of the host's "
              f"{host_bw:.1f} GB/s (target >= {TARGET_VS_BW:.2f}: {'met' if row['ours_vs_host_bw'] >= TARGET_VS_BW else 'MISSED'}), "
              f"numpy {row['numpy_vs_host_bw']:.2f}; of the best read-only rate ({host_read_bw:.1f} GB/s): "
              f"ours {row['ours_vs_host_read_bw']:.2f}"
              + (f"; on the device {row['device_agg_gbps']:,.1f} GB/s = {row['device_agg_vs_device_bw']:.2f} of its "
                 f"{device_bw:,.1f} GB/s" if row["device_agg_gbps"] else ""), flush=True)
    big = cases[-1]
    mach["loadavg_at_end"] = os.getloadavg()

    def r(key: str, digits: int = 3):
        value = big.get(key)
        return round(value, digits) if value is not None else None

    summary = {
        "ours_gbps": r("ours_gbps"),
        "numpy_gbps": r("numpy_gbps"),
        "flower_gbps": r("flower_gbps") or None,
        "ours_vs_numpy": r("ours_vs_numpy"),
        "ours_vs_flower": r("ours_vs_flower", 2) or None,
        "host_bw_gbps": round(host_bw, 2),
        "ours_vs_host_bw": r("ours_vs_host_bw"),
        "target_vs_bw": TARGET_VS_BW,
        "host_read_bw_gbps": round(host_read_bw, 2),
        "ours_vs_host_read_bw": r("ours_vs_host_read_bw"),
        "numpy_vs_host_bw": r("numpy_vs_host_bw"),
        "device_bw_gbps": round(device_bw, 2) if "device" in bw else None,
        "device_agg_gbps": r("device_agg_gbps", 2),
        "device_agg_vs_device_bw": r("device_agg_vs_device_bw"),
        "device_agg_incl_transfer_gbps": r("device_agg_incl_transfer_gbps", 2),
        "device_agg_method": big.get("device_agg_method"),
        "bandwidth_gbps": {where: {k: round(v, 2) for k, v in kernels.items()} for where, kernels in bw.items()},
        "bandwidth_runs_gbps": [{where: {k: round(v, 2) for k, v in kernels.items()} for where, kernels in run.items()}
                                for run in bw_runs],
        "case": big["case"],
        "n": big["n"],
        "p": big["p"],
        "ours_backend": big["ours_backend"],
        "ours_numpy_backend_gbps": r("ours_numpy_gbps"),
        "ours_blas_backend_gbps": r("ours_blas_gbps"),
        "numpy_incl_stack_gbps": r("numpy_incl_stack_gbps"),
        "ours_group": big["ours_group"],
        "ours_add_gbps": r("ours_add_gbps"),
        "ours_peak_extra_bytes": big["ours_peak_extra_bytes"],
        "ours_streamed_peak_bytes": big["ours_streamed_peak_bytes"],
        "numpy_peak_extra_bytes": big["numpy_peak_extra_bytes"],
        "robust": robust,
        "ours_median_gbps": r("ours_median_gbps"),
        "ours_trimmed_gbps": r("ours_trimmed_gbps"),
        "ours_median_vs_numpy": r("ours_median_vs_numpy", 2),
        "ours_trimmed_vs_scipy": r("ours_trimmed_vs_scipy", 2),
        "ours_median_streamed_peak_bytes": big.get("ours_median_streamed_peak_bytes"),
        "ours_trimmed_streamed_peak_bytes": big.get("ours_trimmed_streamed_peak_bytes"),
        "machine": mach,
        "cases": cases,
    }
    print(json.dumps(summary))


def print_bandwidth(when: str, run: dict[str, dict[str, float]]) -> None:
    for where, kernels in run.items():
        print(f"memory bandwidth, {where} ({when}): " + ", ".join(f"{k} {v:,.1f} GB/s" for k, v in kernels.items()), flush=True)


if __name__ == "__main__":
    main()

"""Aggregation throughput and memory: fedpipe's StreamingMean vs NumPy tensordot vs Flower's
aggregate, and the robust strategies (coordinate-wise median, trimmed mean) vs np.median and
scipy.stats.trim_mean.

    .venv/bin/python bench/aggregate.py            # re-executes under .venv-bench if flwr is there
    .venv-bench/bin/python bench/aggregate.py      # same thing, directly

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

Other processes on the same CPUs skew everything (and can trip the "auto" watchdog): the
load average at start and end is printed and recorded in the JSON.

The LAST line printed is one JSON object (fields for the largest case, plus all cases).
"""

from __future__ import annotations

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

GB = 1e9
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


def run_case(name: str, n: int, shapes: dict[str, tuple[int, ...]], repeats: int, robust_repeats: int) -> dict:
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
    del outs, ref
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
        "executable": sys.executable,
        "loadavg_at_start": os.getloadavg(),
    }


def main() -> None:
    mach = machine()
    print(f"machine: {mach['cpu_model']}, {mach['usable_cpus']} usable CPUs, {mach['platform']}, "
          f"numpy {mach['numpy']}, flwr {mach['flwr']}")
    print(f"load average (other processes share these CPUs): {mach['loadavg_at_start']}")
    if mach["openblas_coretype"]:
        print(f"note: OPENBLAS_CORETYPE={mach['openblas_coretype']} is set: OpenBLAS (tensordot, and our "
              "saxpy) uses that kernel set instead of auto-detecting one; left as is.")
    cases = [
        run_case("small", 10, shapes_small(), repeats=9, robust_repeats=5),
        run_case("large", 100, shapes_large(), repeats=5, robust_repeats=3),
    ]
    big = cases[-1]
    mach["loadavg_at_end"] = os.getloadavg()
    summary = {
        "ours_gbps": round(big["ours_gbps"], 3),
        "numpy_gbps": round(big["numpy_gbps"], 3),
        "flower_gbps": round(big["flower_gbps"], 3) if big["flower_gbps"] else None,
        "ours_vs_numpy": round(big["ours_vs_numpy"], 3),
        "ours_vs_flower": round(big["ours_vs_flower"], 2) if big["ours_vs_flower"] else None,
        "n": big["n"],
        "p": big["p"],
        "ours_backend": big["ours_backend"],
        "ours_numpy_backend_gbps": round(big["ours_numpy_gbps"], 3),
        "ours_blas_backend_gbps": round(big["ours_blas_gbps"], 3) if "ours_blas_gbps" in big else None,
        "numpy_incl_stack_gbps": round(big["numpy_incl_stack_gbps"], 3),
        "ours_group": big["ours_group"],
        "ours_add_gbps": round(big["ours_add_gbps"], 3),
        "ours_peak_extra_bytes": big["ours_peak_extra_bytes"],
        "ours_streamed_peak_bytes": big["ours_streamed_peak_bytes"],
        "numpy_peak_extra_bytes": big["numpy_peak_extra_bytes"],
        "ours_median_gbps": round(big["ours_median_gbps"], 3),
        "ours_trimmed_gbps": round(big["ours_trimmed_gbps"], 3),
        "ours_median_vs_numpy": round(big["ours_median_vs_numpy"], 2),
        "ours_trimmed_vs_scipy": round(big["ours_trimmed_vs_scipy"], 2) if big["ours_trimmed_vs_scipy"] else None,
        "ours_median_streamed_peak_bytes": big["ours_median_streamed_peak_bytes"],
        "ours_trimmed_streamed_peak_bytes": big["ours_trimmed_streamed_peak_bytes"],
        "machine": mach,
        "cases": cases,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

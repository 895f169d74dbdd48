"""Hub-side aggregation: streaming FedAvg, robust coordinate-wise statistics, update
clipping and server optimizers (FedAvg, FedAdam, FedYogi).

NumPy only, so the aggregation Cloud Function stays light: no JAX/optax import here.

Params are flat ``dict[str, np.ndarray]``; every node sends the same names, shapes and
dtypes (float32 in fedpipe).

StreamingMean
    A FedAvg accumulator whose memory is one model (plus a small per-thread scratch
    buffer), however many updates arrive. ``extend`` takes updates lazily from an
    iterable (e.g. read straight from the bucket) and holds at most ``group_bytes`` of
    them at a time (default ``GROUP_BYTES``, 256 MiB), so the caller's memory is
    bounded too: a constant number of models, not one per node. Each group is
    accumulated in one cache-blocked pass, which costs about one read of each update;
    ``add`` (one update at a time) also reads and writes the whole accumulator per update.

    Idempotency is the CALLER's job: nothing here knows update ids, so adding the same
    update twice counts it twice. The hub records which update ids it has added
    (alongside the accumulator, or by rebuilding from the list of ids) and skips
    redeliveries before handing updates over.

ServerOptimizer
    FedOpt (Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
    arXiv:2003.00295, Algorithm 2). The server treats ``global - averaged`` as a
    gradient; its state is a flat dict of arrays so the hub can keep it in a bucket
    between rounds as safetensors (no pickle).

CoordinateMedian, TrimmedMean
    Robust statistics per coordinate (Yin et al., "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates", ICML 2018): one hostile node cannot move them far,
    whatever it sends. Unweighted, and they need all n updates at once (n models, not
    one): see their docstrings.

aggregator(strategy)
    The one entry point the hub uses: a StreamingMean for the mean-based strategies, a
    CoordinateMedian or TrimmedMean for the robust ones; all are ``Aggregator``s.

clip_update
    Update-norm clipping against the round's global model, before aggregation.

FedProx is a client-side proximal term (mu/2 * ||w - w_global||^2 added to the local
loss); the server side of FedProx is plain FedAvg, so nothing for it lives here.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np

__all__ = [
    "GROUP_BYTES",
    "SERVER_OPTIMIZERS",
    "STRATEGIES",
    "Aggregator",
    "CoordinateMedian",
    "ServerOptimizer",
    "Strategy",
    "StreamingMean",
    "TrimmedMean",
    "aggregator",
    "blas_axpy_available",
    "clip_update",
    "fedavg",
    "update_norm",
]

Params = dict[str, np.ndarray]

_log = logging.getLogger(__name__)

# StreamingMean.extend's default: at most this many bytes of updates held at once (and
# so the size of a group accumulated in one pass): 6 updates of an 11M-param float32
# model, all of them for small models. A Cloud Function has 1 GiB by default.
GROUP_BYTES = 256 << 20
# A group is applied chunk by chunk of the flat parameter space: every update of the
# group into one chunk of the accumulator, then the next chunk, so the chunk stays in
# cache while the group streams through it (main-memory traffic per group: one read of
# each update, one read and one write of the accumulator).
# blas backend: elements per chunk, 8 MiB of float32 (in L3). OpenBLAS splits each saxpy
# over its threads and syncs them per call, so chunks are big. Measured on the 2-core AMD
# EPYC of bench/aggregate.py, groups of 6: 1-2 Mi elements per chunk did best; our own
# threads each calling a single-threaded saxpy on smaller (L2) chunks were no faster and
# far less steady.
_BLAS_CHUNK = 1 << 21
# NumPy backend: elements per chunk and thread, and per scratch block (multiply into it,
# then add): 128 Ki float32 = 512 KiB, so chunk and scratch stay in a core's L2.
_NUMPY_CHUNK = 1 << 17
# Below this many elements per update, threading costs more than it saves.
_MIN_PARALLEL = 1 << 19
# backend="auto" watchdog: a saxpy call that should take milliseconds can crawl when
# OpenBLAS threads its calls and other processes keep the CPUs busy (measured: a JAX job
# on the same 2 cores made each per-call thread sync take a scheduler time slice, ~0.05
# GB/s, while the NumPy backend still did ~4 GB/s). _BLAS_SLOW_CALLS_TO_SWITCH consecutive
# saxpy calls (on at least _BLAS_WATCH_MIN_ELEMENTS elements, each taking over
# _BLAS_MIN_SECONDS) below this floor switch the accumulator to the NumPy backend for the
# rest of its life; a single stall (page-fault storm, a neighbour's burst) does not. New
# accumulators created within _BLAS_DISTRUST_SECONDS of such a switch start on NumPy.
_BLAS_FLOOR_BYTES_PER_S = 1e9
_BLAS_MIN_SECONDS = 0.005
_BLAS_WATCH_MIN_ELEMENTS = 1 << 16
_BLAS_SLOW_CALLS_TO_SWITCH = 3
_BLAS_DISTRUST_SECONDS = 60.0
_blas_distrusted_until = 0.0


# --------------------------------------------------------------------------------------
# Fused y += a*x from the BLAS that NumPy already ships and has already loaded.
#
# NumPy has no fused multiply-add ufunc, so the NumPy backend needs two passes per block
# (multiply into an L2-resident scratch, then add). The manylinux NumPy wheels (which is
# what Cloud Functions installs) bundle OpenBLAS; its cblas_saxpy does the update in a
# single multi-threaded pass and is faster here (see bench/aggregate.py). It is found
# by exact symbol name, checked against NumPy on a small array before first use, and any
# failure falls back to the NumPy backend. FEDPIPE_AGG_BLAS=0 turns it off.
# --------------------------------------------------------------------------------------

_BLAS_CANDIDATES = (
    # (library glob inside site-packages/numpy.libs, symbol, integer type)
    ("libscipy_openblas64_*.so*", "scipy_cblas_saxpy64_", ctypes.c_int64),  # numpy >= 2.0
    ("libopenblas64_*.so*", "cblas_saxpy64_", ctypes.c_int64),  # numpy 1.2x
    ("libscipy_openblas-*.so*", "scipy_cblas_saxpy", ctypes.c_int),  # LP64 builds
)


@functools.lru_cache(maxsize=1)
def _saxpy():
    """Return ``saxpy(n, alpha, x_address, y_address)`` or None when unavailable/untrusted."""
    if os.environ.get("FEDPIPE_AGG_BLAS", "1") == "0":
        return None
    libdir = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for pattern, symbol, int_t in _BLAS_CANDIDATES:
        for path in sorted(libdir.glob(pattern)):
            try:
                fn = getattr(ctypes.CDLL(str(path)), symbol)
            except (OSError, AttributeError):
                continue
            fn.restype = None
            fn.argtypes = [int_t, ctypes.c_float, ctypes.c_void_p, int_t, ctypes.c_void_p, int_t]

            def saxpy(n: int, alpha: float, x: int, y: int, _fn=fn) -> None:
                _fn(n, alpha, x, 1, y, 1)

            if _blas_self_test(saxpy):
                return saxpy
    return None


def _blas_self_test(saxpy) -> bool:
    rng = np.random.default_rng(0)
    for n in (1, 7, 4099, 20_011):  # odd sizes; the last one takes OpenBLAS's threaded path
        x = rng.standard_normal(n, dtype=np.float32)
        y = rng.standard_normal(n, dtype=np.float32)
        want = y + np.float32(0.37) * x
        got = y.copy()
        try:
            saxpy(n, 0.37, x.ctypes.data, got.ctypes.data)
        except Exception:  # noqa: BLE001 - any ctypes failure means "don't use it"
            return False
        if not np.allclose(got, want, rtol=1e-6, atol=1e-6):
            return False
    return True


def blas_axpy_available() -> bool:
    """Whether StreamingMean's "blas" backend can run here."""
    return _saxpy() is not None


def _default_threads() -> int:
    env = os.environ.get("FEDPIPE_AGG_THREADS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


_POOL_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="fedpipe-agg")
        return pool


# --------------------------------------------------------------------------------------
# StreamingMean
# --------------------------------------------------------------------------------------

Schema = dict[str, tuple[tuple[int, ...], np.dtype]]


class _Staged:
    """Updates validated (against the accumulator's schema, or the first staged one's if it
    has none yet) but not accumulated yet. ``ops`` holds ``(alpha, flat arrays)`` for the
    positive weights, alpha None for the very first one (a copy)."""

    def __init__(self, schema: Schema | None, w0: float) -> None:
        self.schema = schema
        self.w0 = w0
        self.weights: list[float] = []
        self.ops: list[tuple[float | None, dict[str, np.ndarray]]] = []


class StreamingMean:
    """Weighted mean of parameter dicts, accumulated in place.

    ``add(update, weight)`` accumulates one update; ``add_group(pairs)`` and
    ``extend(pairs)`` accumulate ``(update, weight)`` pairs a group at a time, in one
    cache-blocked pass per group (same result: bit for bit on the NumPy backend).
    ``result()`` returns ``sum(w_i x_i) / sum(w_i)``. The first update fixes the names,
    shapes and dtypes; a later update that differs raises ``ValueError`` naming the
    tensor, before anything of it (or of its group, for ``add_group``) is accumulated.

    Accumulation precision: float32 for float32 (or float16/bfloat16-like) params,
    float64 for float64 params. float32 is enough: for N=100 updates the normwise
    relative error of the float32 mean against a float64 reference is ~1.5e-7 (both for
    near-identical updates and for iid N(0, 1) ones; see
    tests/unit/test_aggregation.py::test_float32_accumulation_accuracy_n100), well under
    1e-6, and a float64 accumulator doubles the memory traffic of the hot loop (measured
    ~2x slower).

    Numerics: updates are accumulated relative to the first positive weight w0, i.e.
    ``acc = x_0 + sum_{i>0} (w_i / w0) x_i`` and ``result = acc * (w0 / W)``. So the first
    update is a plain copy, equal weights need no multiply at all, and one update gives
    back exactly its own values (bit for bit). Every element sees the same operations in
    the same order however the updates are grouped.

    Memory: one accumulator the size of the model (a single buffer), plus one 512 KiB
    scratch per thread for the NumPy backend; nothing per update (an update that is not
    C-contiguous is copied once, which is unavoidable for a blocked pass). ``add_group``
    reads a group the caller already holds; ``extend`` holds at most ``group_bytes``.

    Backends: "blas" = fused saxpy from NumPy's bundled OpenBLAS (threaded by OpenBLAS);
    "numpy" = ``np.multiply(out=scratch)`` + ``np.add(out=acc)`` over L2-sized chunks,
    split over ``threads`` threads (ufuncs release the GIL); "auto" = blas when
    available, with a watchdog that moves to numpy after 3 consecutive saxpy calls below
    1 GB/s (OpenBLAS's per-call thread syncs collapse when other processes oversubscribe
    the CPUs).

    Idempotency is handled by the caller, which must record the ids of the updates it
    has added and never add the same one twice. One StreamingMean is not meant to be
    fed from several threads at once (it parallelises each group internally).
    """

    def __init__(self, *, backend: str = "auto", threads: int | None = None) -> None:
        if backend not in ("auto", "blas", "numpy"):
            raise ValueError(f"backend must be 'auto', 'blas' or 'numpy', not {backend!r}")
        if backend == "blas" and not blas_axpy_available():
            raise ValueError("backend='blas' requested but NumPy's bundled BLAS saxpy is not available")
        use_blas = backend == "blas" or (backend == "auto" and time.monotonic() >= _blas_distrusted_until)
        self._saxpy = _saxpy() if use_blas else None
        self.backend = "blas" if self._saxpy is not None else "numpy"
        self._watchdog = backend == "auto"
        self._slow_calls = 0
        self.threads = _default_threads() if threads is None else max(1, int(threads))
        self._schema: Schema | None = None
        self._names: tuple[str, ...] = ()
        self._acc: dict[str, np.ndarray] = {}  # flat, C-contiguous views into _bufs' buffers
        self._offset: dict[str, int] = {}  # where each tensor starts in its buffer
        self._bufs: list[tuple[np.ndarray, tuple[str, ...]]] = []  # one per dtype
        self._w0 = 0.0  # first positive weight; 0 while nothing has been accumulated
        self._total = 0.0
        self._count = 0
        self._scratch: list[dict[np.dtype, np.ndarray]] = [{} for _ in range(self.threads)]

    # ---- introspection ---------------------------------------------------------------

    @property
    def count(self) -> int:
        """Updates added so far (including zero-weight ones)."""
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    # ---- accumulation ----------------------------------------------------------------

    def add(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        """Accumulate ``weight * update``. ``weight`` is usually the node's example count."""
        self.add_group([(update, weight)])

    def add_group(self, updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> None:
        """Accumulate ``(update, weight)`` pairs the caller holds, in one pass.

        All or nothing: every pair is validated before anything is accumulated, so a
        ``ValueError`` leaves the accumulator unchanged.
        """
        staged = _Staged(self._schema, self._w0)
        for update, weight in updates:
            self._stage(staged, update, weight)
        self._commit(staged)

    def extend(
        self, updates: Iterable[tuple[Mapping[str, np.ndarray], float]], *, group_bytes: int = GROUP_BYTES
    ) -> None:
        """Accumulate every ``(update, weight)`` pair of an iterable, drawn lazily.

        Holds at most ``group_bytes`` of updates (at least one update) and accumulates them
        as a group before drawing more, so a generator that reads each update when asked
        keeps the caller's memory at a constant number of models however long it is.
        Same mean and same errors as ``add`` for each pair in turn: whatever stops the
        iteration (a rejected update, an exception from the iterable), the pairs before
        it are accumulated, it and the rest are not.
        """
        staged = _Staged(self._schema, self._w0)
        per_group = 0
        try:
            for update, weight in updates:
                nbytes = self._stage(staged, update, weight)
                del update  # the group holds it; don't keep it past the group
                per_group = per_group or max(1, group_bytes // max(nbytes, 1))
                if len(staged.weights) >= per_group:
                    group, staged = staged, None  # so that a failed commit is not retried below
                    self._commit(group)
                    del group  # drop the group's updates before drawing the next ones
                    staged = _Staged(self._schema, self._w0)
        finally:
            if staged is not None:  # None only if a commit itself failed: never commit twice
                self._commit(staged)

    def result(self) -> Params:
        """The weighted mean, as new arrays in the params' dtype (the accumulator is kept).

        The returned arrays are views into one buffer per dtype (one allocation, so large
        models get transparent huge pages); each is C-contiguous with the param's shape.
        """
        if self._schema is None:
            raise ValueError("no updates were added")
        if self._total <= 0.0:
            raise ValueError("total weight is zero: nothing to average")
        scale = self._w0 / self._total
        out: Params = {}
        for buf, names in self._bufs:
            res_dtype = self._schema[names[0]][1]
            if scale == 1.0:  # exactly one update carries all the weight: an exact copy
                res = buf.astype(res_dtype, copy=True)
            else:
                res = np.empty(buf.shape, dtype=buf.dtype)
                np.multiply(buf, buf.dtype.type(scale), out=res)
                if res.dtype != res_dtype:
                    res = res.astype(res_dtype)
            for name in names:
                off, size = self._offset[name], self._acc[name].size
                out[name] = res[off : off + size].reshape(self._schema[name][0])
        return {name: out[name] for name in self._names}

    # ---- validation ------------------------------------------------------------------

    def _stage(self, staged: _Staged, update: Mapping[str, np.ndarray], weight: float) -> int:
        """Validate one pair into ``staged`` (which is left as it was if it is rejected); returns the update's bytes."""
        w = _checked_weight(weight)
        flat, schema = _flatten(update, staged.schema)
        alpha = None
        if w > 0.0 and staged.w0 > 0.0:
            alpha = w / staged.w0
            with np.errstate(over="ignore", under="ignore"):
                a32 = np.float32(alpha)
            if not math.isfinite(float(a32)) or a32 == 0:
                raise ValueError(f"weight {w!r} is too far from the first weight {staged.w0!r} for float32")
        staged.schema = schema
        staged.weights.append(w)
        if w > 0.0:
            staged.ops.append((alpha, flat))
            staged.w0 = staged.w0 or w
        return sum(a.nbytes for a in flat.values())

    def _commit(self, staged: _Staged) -> None:
        if not staged.weights:
            return
        if self._schema is None:
            self._set_schema(staged.schema)
        for buf, names in self._bufs:
            self._pass(buf, names, staged.ops)
        self._w0 = staged.w0
        for w in staged.weights:
            self._count += 1
            self._total += w

    def _set_schema(self, schema: Schema) -> None:
        self._schema = schema
        self._names = tuple(schema)
        # One accumulator buffer per param dtype (usually exactly one), sliced into flat
        # per-tensor views: a single large allocation is backed by transparent huge pages,
        # many small ones are not, and first-touch page faults are a visible cost here.
        # np.empty is fine: the first positive-weight update overwrites every element.
        by_dtype: dict[np.dtype, list[str]] = {}
        for name, (_, dtype) in schema.items():
            by_dtype.setdefault(dtype, []).append(name)
        for dtype, names in by_dtype.items():
            sizes = [math.prod(schema[n][0]) for n in names]
            buf = np.empty(sum(sizes), dtype=np.result_type(dtype, np.float32))
            off = 0
            for name, size in zip(names, sizes):
                self._acc[name] = buf[off : off + size]
                self._offset[name] = off
                off += size
            self._bufs.append((buf, tuple(names)))

    # ---- the blocked pass ------------------------------------------------------------

    def _pass(self, buf: np.ndarray, names: tuple[str, ...], ops) -> None:
        """Apply ``ops`` to one accumulator buffer, chunk by chunk: every op to a chunk
        before the next chunk, so the chunk stays in cache while the group streams through."""
        if self._saxpy is not None and buf.dtype == np.float32:
            # One thread here; OpenBLAS splits each call over its own threads.
            addrs = [{name: flat[name].ctypes.data for name in names} for _, flat in ops]
            self._range(names, ops, addrs, 0, buf.size, _BLAS_CHUNK, 0)
            return
        workers = self.threads if buf.size >= _MIN_PARALLEL else 1
        bounds = [buf.size * k // workers for k in range(workers + 1)]
        if workers == 1:
            self._range(names, ops, None, 0, buf.size, _NUMPY_CHUNK, 0)
            return
        pool = _pool(workers)
        futures = [
            pool.submit(self._range, names, ops, None, bounds[k], bounds[k + 1], _NUMPY_CHUNK, k)
            for k in range(workers)
        ]
        for f in futures:
            f.result()

    def _chunks(self, names: tuple[str, ...], lo: int, hi: int, size: int) -> list[list[tuple[str, int, int]]]:
        """Elements [lo, hi) of one buffer, in chunks of `size`, each a list of (tensor, start, stop) slices."""
        chunks: list[list[tuple[str, int, int]]] = []
        chunk: list[tuple[str, int, int]] = []
        room = size
        for name in names:
            off = self._offset[name]
            a, b = max(lo, off) - off, min(hi, off + self._acc[name].size) - off
            while a < b:
                n = min(b - a, room)
                chunk.append((name, a, a + n))
                a, room = a + n, room - n
                if room == 0:
                    chunks.append(chunk)
                    chunk, room = [], size
        if chunk:
            chunks.append(chunk)
        return chunks

    def _range(self, names: tuple[str, ...], ops, addrs, lo: int, hi: int, size: int, k: int) -> None:
        """Elements [lo, hi) of the buffer holding `names`, in chunks of `size`, on worker k
        (whose scratch it uses). `addrs`: the ops' tensor addresses, for saxpy; None for NumPy."""
        for chunk in self._chunks(names, lo, hi, size):
            for name, a, b in chunk:
                acc = self._acc[name][a:b]
                y = acc.ctypes.data if addrs is not None else 0
                for i, (alpha, flat) in enumerate(ops):
                    saxpy = self._saxpy  # None once the watchdog gives up, even mid-pass
                    if alpha is None:
                        np.copyto(acc, flat[name][a:b])
                    elif addrs is not None and saxpy is not None:
                        self._timed_saxpy(saxpy, b - a, alpha, addrs[i][name] + 4 * a, y)
                    else:
                        self._axpy(alpha, flat[name][a:b], acc, k)

    def _timed_saxpy(self, saxpy, n: int, alpha: float, x: int, y: int) -> None:
        if not self._watchdog or n < _BLAS_WATCH_MIN_ELEMENTS:
            saxpy(n, alpha, x, y)
            return
        start = time.perf_counter()
        saxpy(n, alpha, x, y)
        elapsed = time.perf_counter() - start
        if elapsed > _BLAS_MIN_SECONDS and 4 * n < _BLAS_FLOOR_BYTES_PER_S * elapsed:
            self._slow_calls += 1
        else:
            self._slow_calls = 0
        if self._slow_calls >= _BLAS_SLOW_CALLS_TO_SWITCH and self._saxpy is not None:
            self._abandon_blas(4 * n / elapsed)

    def _abandon_blas(self, bytes_per_s: float) -> None:
        global _blas_distrusted_until
        _log.warning(
            "BLAS saxpy ran at %.3f GB/s (CPUs oversubscribed?); using the NumPy backend "
            "for this aggregation and for new ones in the next %.0f s",
            bytes_per_s / 1e9, _BLAS_DISTRUST_SECONDS,
        )
        _blas_distrusted_until = time.monotonic() + _BLAS_DISTRUST_SECONDS
        self._saxpy = None
        self.backend = "numpy"

    def _axpy(self, alpha: float, x: np.ndarray, acc: np.ndarray, k: int) -> None:
        """acc += alpha * x, using worker k's scratch (worker k only ever touches its own)."""
        if alpha == 1.0:  # equal weights: one pass, no scratch
            np.add(acc, x, out=acc)
            return
        a = acc.dtype.type(alpha)  # keep the multiply in the accumulator's precision
        tmp = self._scratch[k].get(acc.dtype)
        if tmp is None:
            tmp = self._scratch[k][acc.dtype] = np.empty(_NUMPY_CHUNK, dtype=acc.dtype)
        for s in range(0, x.size, tmp.size):
            t = tmp[: min(tmp.size, x.size - s)]
            np.multiply(x[s : s + t.size], a, out=t)
            np.add(acc[s : s + t.size], t, out=acc[s : s + t.size])


def _checked_weight(weight: float) -> float:
    w = float(weight)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"weight must be finite and >= 0, got {weight!r}")
    return w


def _flatten(update: Mapping[str, np.ndarray], schema: Schema | None) -> tuple[dict[str, np.ndarray], Schema]:
    """The update's tensors as flat C-contiguous arrays in schema order, checked against
    `schema` (or defining it, when None); ValueError naming the first bad tensor."""
    if not isinstance(update, Mapping):
        raise ValueError(f"update must be a mapping of name -> array, got {type(update).__name__}")
    arrays = {name: np.asarray(a) for name, a in update.items()}
    if schema is None:
        if not arrays:
            raise ValueError("update has no tensors")
        for name, a in arrays.items():
            if not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"tensor {name!r}: dtype {a.dtype} is not floating point")
        schema = {name: (a.shape, a.dtype) for name, a in arrays.items()}
    else:
        missing = [n for n in schema if n not in arrays]
        if missing:
            raise ValueError(f"update is missing tensor {missing[0]!r} (missing: {missing})")
        extra = [n for n in arrays if n not in schema]
        if extra:
            raise ValueError(f"update has unexpected tensor {extra[0]!r} (unexpected: {extra})")
        for name, (shape, dtype) in schema.items():
            a = arrays[name]
            if a.shape != shape:
                raise ValueError(f"tensor {name!r}: shape {a.shape} != expected {shape}")
            if a.dtype != dtype:
                raise ValueError(f"tensor {name!r}: dtype {a.dtype} != expected {dtype}")
    return {name: np.ascontiguousarray(arrays[name]).reshape(-1) for name in schema}, schema


def fedavg(
    updates: Iterable[tuple[Mapping[str, np.ndarray], float]], *, group_bytes: int = GROUP_BYTES, **kwargs
) -> Params:
    """Weighted mean of ``(params, weight)`` pairs, drawn lazily through ``StreamingMean.extend``."""
    mean = StreamingMean(**kwargs)
    mean.extend(updates, group_bytes=group_bytes)
    return mean.result()


# --------------------------------------------------------------------------------------
# Robust aggregation: coordinate-wise median and trimmed mean
# --------------------------------------------------------------------------------------

# Coordinates are sorted a block at a time: the block's values from every update are
# copied into a [coordinates, n] buffer, so each coordinate's n values are contiguous and
# NumPy's SIMD sort (x86-simd-sort in NumPy >= 2) does the work. Measured on the 2-core
# AMD EPYC of bench/aggregate.py (n=100): ~5x faster than np.partition on the same
# buffer, and ~3x faster than sorting along axis 0 of an [n, coordinates] buffer. This is
# the buffer's size per thread for float32 params: in L2 with room to spare.
_SORT_BLOCK_BYTES = 1 << 21
# Averaging the middle m values of each sorted row: up to this many, adding them column by
# column into a float64 vector is ~3x faster (n=10) than a float64 row sum, whose inner
# loop runs over only m values per row; for many more (n=100, m=80) the row sum is ~2x faster.
_COLUMN_SUM_MAX = 16


class _SortedMean:
    """Holds every update; per coordinate, sorts the n values and averages the middle ones.

    Subclasses say how many values to drop at each end (``_trim``). Updates go through the
    same checks as StreamingMean's (names, shapes, dtypes, weights), and the first one
    fixes the schema. Nothing is copied on ``extend``: the caller must not modify an
    update's arrays before ``result()``. Non-finite values are not looked for here (sorting
    puts NaN last, so it may be trimmed or may not): admission refuses them first.
    """

    def __init__(self, *, threads: int | None = None) -> None:
        self.threads = _default_threads() if threads is None else max(1, int(threads))
        self._schema: Schema | None = None
        self._updates: list[dict[str, np.ndarray]] = []  # flat views, positive weights only
        self._count = 0

    @property
    def count(self) -> int:
        """Updates added so far (including zero-weight ones, which take no part)."""
        return self._count

    def _trim(self, n: int) -> int:
        raise NotImplementedError

    def extend(self, updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> None:
        """Hold every ``(update, weight)`` pair; the weight only decides whether it takes part (> 0).

        As with StreamingMean, an update that is rejected (``ValueError`` naming the tensor or
        the weight) stops the iteration: the pairs before it are kept, it and the rest are not.
        """
        for update, weight in updates:
            w = _checked_weight(weight)
            flat, self._schema = _flatten(update, self._schema)
            self._count += 1
            if w > 0.0:
                self._updates.append(flat)

    def result(self) -> Params:
        """The statistic per coordinate, as new arrays with the params' shapes and dtypes."""
        if self._schema is None:
            raise ValueError("no updates were added")
        n = len(self._updates)
        if n == 0:
            raise ValueError("every update has weight zero: nothing to aggregate")
        trim = self._trim(n)
        out = {name: np.empty(math.prod(shape), dtype=dtype) for name, (shape, dtype) in self._schema.items()}
        per_block = max(1, _SORT_BLOCK_BYTES // (n * 4))  # coordinates per block
        blocks = [(name, lo, min(lo + per_block, a.size)) for name, a in out.items() for lo in range(0, a.size, per_block)]
        values = n * sum(a.size for a in out.values())
        workers = min(self.threads if values >= _MIN_PARALLEL else 1, len(blocks))
        if workers == 1:
            self._reduce(blocks, per_block, trim, out)
        else:  # np.sort releases the GIL
            shares = [blocks[len(blocks) * k // workers : len(blocks) * (k + 1) // workers] for k in range(workers)]
            for f in [_pool(workers).submit(self._reduce, share, per_block, trim, out) for share in shares]:
                f.result()
        return {name: out[name].reshape(shape) for name, (shape, _) in self._schema.items()}

    def _reduce(self, blocks: list[tuple[str, int, int]], per_block: int, trim: int, out: dict[str, np.ndarray]) -> None:
        """For each block: gather [coordinates, n], sort each row, mean of the middle n - 2*trim in float64."""
        n = len(self._updates)
        buf = None
        for name, lo, hi in blocks:
            if buf is None or buf.dtype != out[name].dtype:
                buf = np.empty((per_block, n), dtype=out[name].dtype)
            block = buf[: hi - lo]
            for i, update in enumerate(self._updates):
                block[:, i] = update[name][lo:hi]
            block.sort(axis=1)
            middle = block[:, trim : n - trim]
            m = middle.shape[1]
            if m <= _COLUMN_SUM_MAX:
                sums = middle[:, 0].astype(np.float64)
                for j in range(1, m):
                    sums += middle[:, j]
            else:
                sums = middle.sum(axis=1, dtype=np.float64)
            np.divide(sums, m, out=out[name][lo:hi], casting="same_kind")


class CoordinateMedian(_SortedMean):
    """Coordinate-wise median of the updates (the mean of the two middle values for even n).

    Unweighted over nodes: every update with a positive weight counts once, whatever its
    weight. The weight is the node's claimed example count, and a hostile node can inflate
    it; a robust statistic must not trust it.

    Memory: unlike StreamingMean (one model), this holds all n updates until ``result()``
    (n models, by reference), plus a sort buffer of 2 MiB (for float32) and a few MiB of
    sums per thread, and the result (one model). The caller cannot stream updates past it.
    """

    def _trim(self, n: int) -> int:
        return (n - 1) // 2


class TrimmedMean(_SortedMean):
    """Coordinate-wise trimmed mean: per coordinate, drop the floor(trim_fraction * n)
    largest and as many smallest values, and average the rest (in float64).

    With n too small to drop anything, it is the plain unweighted mean. Unweighted over
    nodes, like CoordinateMedian and for the same reason (a claimed example count can be
    inflated by a hostile node); same memory: n models held, plus a sort buffer per thread.
    """

    def __init__(self, trim_fraction: float = 0.1, *, threads: int | None = None) -> None:
        if not 0.0 <= float(trim_fraction) < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
        super().__init__(threads=threads)
        self.trim_fraction = float(trim_fraction)

    def _trim(self, n: int) -> int:
        # Rounded first so that e.g. 0.29 * 100 = 28.999999999999996 trims 29, not 28.
        return math.floor(round(self.trim_fraction * n, 9))


# --------------------------------------------------------------------------------------
# Strategy selection
# --------------------------------------------------------------------------------------

Strategy = Literal["fedavg", "fedprox", "fedadam", "fedyogi", "median", "trimmed_mean"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


class Aggregator(Protocol):
    """What the hub feeds a round's ``(update, example count)`` pairs into, whatever the strategy."""

    def extend(self, updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> None: ...

    def result(self) -> Params: ...


def aggregator(strategy: Strategy, trim_fraction: float = 0.1) -> Aggregator:
    """A fresh aggregator for one round of a federation using ``strategy``.

    fedavg, fedprox, fedadam and fedyogi all average (a StreamingMean, a few models of
    memory); fedadam/fedyogi's server step is applied to that average afterwards, by the
    hub, with ServerOptimizer. median and trimmed_mean hold all n updates (see their
    classes). ``trim_fraction`` is used by trimmed_mean only.
    """
    if strategy == "median":
        return CoordinateMedian()
    if strategy == "trimmed_mean":
        return TrimmedMean(trim_fraction)
    if strategy in STRATEGIES:
        return StreamingMean()
    raise ValueError(f"unknown aggregation strategy {strategy!r}; choose from {STRATEGIES}")


# --------------------------------------------------------------------------------------
# Update-norm clipping
# --------------------------------------------------------------------------------------


def update_norm(params: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm of ``params - reference`` over all tensors, accumulated in float64.

    ValueError when the two do not have the same tensor names and shapes.
    """
    if set(params) != set(reference):
        diff = sorted(set(params) ^ set(reference))
        raise ValueError(f"params and reference differ in tensor {diff[0]!r} (all: {diff})")
    total = 0.0
    for name, p in params.items():
        p, r = np.asarray(p), np.asarray(reference[name])
        if p.shape != r.shape:
            raise ValueError(f"tensor {name!r}: shape {p.shape} != reference shape {r.shape}")
        delta = p.astype(np.float64) - r
        total += float(np.vdot(delta, delta))
    return math.sqrt(total)


def clip_update(params: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], max_norm: float) -> Params:
    """``params`` with its delta from ``reference`` (the round's global model) scaled down to a
    global L2 norm of at most ``max_norm``; the same arrays when it is within the bound already.

    Bounds how far one node can pull a mean in a round, whatever it trained on (a scaled
    update that passed admission is the case in point). The scaling is done in float64 and
    the result has the params' dtypes. ValueError on mismatched names or shapes, a
    non-finite delta, or a ``max_norm`` that is not finite and > 0.
    """
    if not (math.isfinite(float(max_norm)) and max_norm > 0):
        raise ValueError(f"max_norm must be finite and > 0, got {max_norm!r}")
    norm = update_norm(params, reference)
    if not math.isfinite(norm):
        raise ValueError("the update's distance from the reference is not finite")
    if norm <= max_norm:  # a zero delta included
        return {name: np.asarray(p) for name, p in params.items()}
    scale = max_norm / norm
    clipped: Params = {}
    for name, p in params.items():
        p = np.asarray(p)
        r = np.asarray(reference[name], dtype=np.float64)
        clipped[name] = (r + (p.astype(np.float64) - r) * scale).astype(p.dtype)
    return clipped


# --------------------------------------------------------------------------------------
# Server optimizers (FedOpt)
# --------------------------------------------------------------------------------------

SERVER_OPTIMIZERS = ("fedavg", "fedadam", "fedyogi", "fedadagrad")


class ServerOptimizer:
    """FedOpt server update (Reddi et al. 2021, Algorithm 2), in NumPy.

    With pseudo-gradient ``g = global - averaged`` (the paper's Delta_t with the sign
    flipped, so the usual "subtract" convention of optimizers applies)::

        m_t = beta1 * m_{t-1} + (1 - beta1) * g
        v_t = beta2 * v_{t-1} + (1 - beta2) * g^2                       (fedadam)
        v_t = v_{t-1} - (1 - beta2) * g^2 * sign(v_{t-1} - g^2)         (fedyogi)
        v_t = v_{t-1} + g^2                                             (fedadagrad)
        new_global = global - server_lr * m_t / (sqrt(v_t) + tau)

    "fedavg" is ``new_global = averaged`` (server_lr = 1 SGD on g).

    There is NO bias correction: Algorithm 2 of the paper has none (optax's
    ``scale_by_adam`` always applies it, so the tests compare our moments with optax's
    raw ``mu``/``nu`` and the update with the paper's formula). v starts at ``v0``,
    default ``tau**2`` as the paper requires (``v_{-1} >= tau^2``); m starts at 0.

    Defaults: beta1 = 0.9, beta2 = 0.99 as in the paper's experiments (Sec. 5, which
    fixes them and tunes only the learning rates and tau); server_lr = 1e-2 and
    tau = 1e-3 are the same as Flower's FedYogi defaults (flwr.server.strategy.FedYogi,
    eta=1e-2, tau=1e-3) and sit inside the paper's grids. Like the paper, tune
    server_lr (and tau) per task: they matter far more than the betas.

    State is a flat dict of arrays (safetensors-friendly): ``"step"`` (int64, shape (1,))
    and, for the adaptive ones, ``"m/<name>"`` and ``"v/<name>"`` (float32 like params).
    """

    def __init__(
        self,
        name: str = "fedavg",
        *,
        server_lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        v0: float | None = None,
    ) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {name!r}; choose from {SERVER_OPTIMIZERS}")
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if server_lr <= 0 or tau <= 0:
            raise ValueError("server_lr and tau must be > 0")
        self.name = name
        self.server_lr = float(server_lr)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.tau = float(tau)
        self.v0 = self.tau**2 if v0 is None else float(v0)

    @property
    def adaptive(self) -> bool:
        return self.name != "fedavg"

    def init(self, params: Mapping[str, np.ndarray]) -> Params:
        state: Params = {"step": np.zeros(1, dtype=np.int64)}
        if self.adaptive:
            for name, p in params.items():
                p = np.asarray(p)
                state[f"m/{name}"] = np.zeros(p.shape, dtype=p.dtype)
                state[f"v/{name}"] = np.full(p.shape, self.v0, dtype=p.dtype)
        return state

    def step(
        self,
        global_params: Mapping[str, np.ndarray],
        averaged_params: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[Params, Params]:
        """One server round. Inputs are not modified; returns ``(new_global, new_state)``."""
        if set(global_params) != set(averaged_params):
            diff = sorted(set(global_params) ^ set(averaged_params))
            raise ValueError(f"global and averaged params differ in tensor {diff[0]!r} (all: {diff})")
        if state is None:
            state = self.init(global_params)
        if "step" not in state:
            raise ValueError("server optimizer state has no 'step'")
        new_state: Params = {"step": np.asarray(state["step"], dtype=np.int64).reshape(1) + 1}
        new_global: Params = {}
        for name, x in global_params.items():
            x = np.asarray(x)
            avg = np.asarray(averaged_params[name])
            if avg.shape != x.shape:
                raise ValueError(f"tensor {name!r}: averaged shape {avg.shape} != global shape {x.shape}")
            if not self.adaptive:
                new_global[name] = avg.astype(x.dtype, copy=True)
                continue
            dt = x.dtype.type
            m, v = self._moments(name, x, state)
            g = x - avg.astype(x.dtype, copy=False)
            g2 = g * g
            m = m * dt(self.beta1) + g * dt(1.0 - self.beta1)
            if self.name == "fedadam":
                v = v * dt(self.beta2) + g2 * dt(1.0 - self.beta2)
            elif self.name == "fedyogi":
                v = v - g2 * np.sign(v - g2) * dt(1.0 - self.beta2)
            else:  # fedadagrad
                v = v + g2
            update = m / (np.sqrt(v) + dt(self.tau))
            new_global[name] = x - update * dt(self.server_lr)
            new_state[f"m/{name}"] = m
            new_state[f"v/{name}"] = v
        return new_global, new_state

    @staticmethod
    def _moments(name: str, x: np.ndarray, state: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        out = []
        for key in (f"m/{name}", f"v/{name}"):
            if key not in state:
                raise ValueError(f"tensor {name!r}: server optimizer state has no {key!r}")
            a = np.asarray(state[key])
            if a.shape != x.shape:
                raise ValueError(f"tensor {name!r}: state {key!r} shape {a.shape} != param shape {x.shape}")
            out.append(a.astype(x.dtype, copy=False))
        return out[0], out[1]

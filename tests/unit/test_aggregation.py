"""shared.aggregation: streaming FedAvg, robust statistics, clipping and FedOpt server optimizers against closed forms."""

from __future__ import annotations

import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shared import aggregation as agg
from shared.aggregation import (
    STRATEGIES,
    CoordinateMedian,
    ServerOptimizer,
    StreamingMean,
    TrimmedMean,
    aggregator,
    blas_axpy_available,
    clip_update,
    fedavg,
    update_norm,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

# Every accumulation path: the fused BLAS one (when NumPy's bundled OpenBLAS is usable)
# and the blocked NumPy one, single- and multi-threaded.
BACKENDS = [
    pytest.param({"backend": "numpy", "threads": 1}, id="numpy-1t"),
    pytest.param({"backend": "numpy", "threads": 3}, id="numpy-3t"),
    pytest.param(
        {"backend": "blas"},
        id="blas",
        marks=pytest.mark.skipif(not blas_axpy_available(), reason="NumPy's bundled BLAS saxpy not found"),
    ),
]

# Big enough to take the threaded path (>= 2**19 elements in total) and to cross several
# scratch blocks with a ragged last block (sizes are not multiples of 2**17).
SHAPES = {"conv/kernel": (3, 3, 64, 97), "dense/kernel": (1001, 397), "dense/bias": (397,), "scalar": ()}


def make_updates(n: int, seed: int = 0, shapes=SHAPES) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    return [
        {k: (b + rng.standard_normal(b.shape).astype(np.float32)).astype(np.float32) for k, b in base.items()}
        for _ in range(n)
    ]


def mean64(updates, weights) -> dict[str, np.ndarray]:
    """Closed form sum(w_i x_i) / sum(w_i) in float64."""
    total = float(sum(weights))
    return {
        k: sum(float(w) * u[k].astype(np.float64) for u, w in zip(updates, weights, strict=True)) / total
        for k in updates[0]
    }


def assert_close_rel(got: dict, want: dict, rel: float = 1e-6) -> None:
    """Normwise relative error per tensor, plus elementwise error relative to the tensor's scale."""
    assert set(got) == set(want)
    for k in want:
        g, w = np.asarray(got[k], dtype=np.float64), np.asarray(want[k], dtype=np.float64)
        assert g.shape == w.shape, k
        scale = max(np.abs(w).max(), 1e-30)
        assert np.linalg.norm(g - w) <= rel * max(np.linalg.norm(w), 1e-30), k
        assert np.abs(g - w).max() <= 4 * rel * scale, k


# --------------------------------------------------------------------------------------
# StreamingMean / fedavg
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", BACKENDS)
def test_equal_weights_give_arithmetic_mean(kw):
    ups = make_updates(6)
    got = fedavg(((u, 1.0) for u in ups), **kw)
    want = {k: np.mean(np.stack([u[k].astype(np.float64) for u in ups]), axis=0) for k in SHAPES}
    assert_close_rel(got, want)
    for k, s in SHAPES.items():
        assert got[k].shape == s and got[k].dtype == np.float32


@pytest.mark.parametrize("kw", BACKENDS)
@pytest.mark.parametrize("weight", [1.0, 7.0, 0.1, 12345.0])
def test_one_node_is_identity_bit_exact(kw, weight):
    (u,) = make_updates(1, seed=3)
    mean = StreamingMean(**kw)
    mean.add(u, weight)
    got = mean.result()
    for k in SHAPES:
        assert got[k].dtype == u[k].dtype and got[k].shape == u[k].shape
        assert np.array_equal(got[k], u[k]), k
        assert got[k] is not u[k] and not np.shares_memory(got[k], u[k])


@pytest.mark.parametrize("kw", BACKENDS)
def test_zero_weight_updates_do_not_count(kw):
    a, b = make_updates(2, seed=4)
    mean = StreamingMean(**kw)
    mean.add(b, 0)
    mean.add(a, 5)
    mean.add(b, 0.0)
    got = mean.result()
    assert mean.count == 3 and mean.total_weight == 5.0
    for k in SHAPES:
        assert np.array_equal(got[k], a[k])


@pytest.mark.parametrize("kw", BACKENDS)
def test_weights_proportional_to_examples_exact(kw):
    # Values chosen so the 1:3 mean is exact in float32: (1*1 + 3*5) / 4 = 4, (1*(-2) + 3*2) / 4 = 1.
    shapes = {"w": (1000, 700), "b": (7,)}
    x1 = {"w": np.full(shapes["w"], 1.0, np.float32), "b": np.full(7, -2.0, np.float32)}
    x2 = {"w": np.full(shapes["w"], 5.0, np.float32), "b": np.full(7, 2.0, np.float32)}
    got = fedavg([(x1, 100), (x2, 300)], **kw)
    assert np.array_equal(got["w"], np.full(shapes["w"], 4.0, np.float32))
    assert np.array_equal(got["b"], np.full(7, 1.0, np.float32))
    # Random tensors, 1:3 and uneven example counts: the float64 closed form within 1e-6.
    ups = make_updates(2, seed=5)
    assert_close_rel(fedavg([(ups[0], 1), (ups[1], 3)], **kw), mean64(ups, [1, 3]))
    ups = make_updates(5, seed=6)
    counts = [120, 4500, 33, 980, 2048]
    assert_close_rel(fedavg(zip(ups, counts), **kw), mean64(ups, counts))


@pytest.mark.parametrize("kw", BACKENDS)
def test_order_does_not_change_result(kw):
    ups = make_updates(20, seed=7)
    counts = np.random.default_rng(8).integers(10, 10_000, size=20).tolist()
    first = fedavg(zip(ups, counts), **kw)
    for seed in (1, 2):
        perm = np.random.default_rng(seed).permutation(20)
        again = fedavg(((ups[i], counts[i]) for i in perm), **kw)
        assert_close_rel(again, first)
    assert_close_rel(first, mean64(ups, counts))


def test_backends_agree():
    ups = make_updates(8, seed=9)
    counts = [3, 1, 4, 1, 5, 9, 2, 6]
    results = [fedavg(zip(ups, counts), backend="numpy", threads=t) for t in (1, 2, 4)]
    if blas_axpy_available():
        results.append(fedavg(zip(ups, counts), backend="blas"))
    for r in results[1:]:
        assert_close_rel(r, results[0])
    # The threaded NumPy path splits the same work differently but does the same float ops.
    for k in SHAPES:
        assert np.array_equal(results[0][k], results[1][k])


def test_float32_accumulation_accuracy_n100():
    """Why the accumulator is float32: N=100 stays well inside 1e-6 of a float64 reference."""
    rng = np.random.default_rng(10)
    p = 200_000
    counts = rng.integers(100, 10_000, size=100)
    base = rng.standard_normal(p).astype(np.float32) * 0.05
    for noise in (0.005, 1.0):  # near-identical updates (real FL), and iid N(0, 1)
        mean = StreamingMean(backend="numpy", threads=1)
        ref = np.zeros(p, np.float64)
        for c in counts:
            x = (base + rng.standard_normal(p).astype(np.float32) * np.float32(noise)).astype(np.float32)
            mean.add({"x": x}, c)
            ref += float(c) * x
        ref /= counts.sum()
        err = np.linalg.norm(mean.result()["x"] - ref) / np.linalg.norm(ref)
        assert err < 1e-6, err


@pytest.mark.parametrize("kw", BACKENDS)
def test_non_contiguous_and_float64_updates(kw):
    rng = np.random.default_rng(11)
    a = rng.standard_normal((700, 900)).astype(np.float32)
    b = rng.standard_normal((700, 900)).astype(np.float32)
    got = fedavg([({"t": a.T}, 1), ({"t": b.T}, 2)], **kw)  # transposed views
    assert_close_rel(got, {"t": (a.T.astype(np.float64) + 2 * b.T.astype(np.float64)) / 3})
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    got64 = fedavg([({"t": a64}, 1), ({"t": b64}, 2)], **kw)
    assert got64["t"].dtype == np.float64
    np.testing.assert_allclose(got64["t"], (a64 + 2 * b64) / 3, rtol=1e-12, atol=1e-12)


def test_result_is_repeatable_and_accumulation_continues():
    a, b, c = make_updates(3, seed=12)
    mean = StreamingMean()
    mean.add(a, 1)
    mean.add(b, 2)
    r1, r2 = mean.result(), mean.result()
    for k in SHAPES:
        assert np.array_equal(r1[k], r2[k])
    mean.add(c, 3)
    assert_close_rel(mean.result(), mean64([a, b, c], [1, 2, 3]))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda u: u.pop("dense/bias"), "dense/bias"),
        (lambda u: u.__setitem__("extra/gamma", np.ones(3, np.float32)), "extra/gamma"),
        (lambda u: u.__setitem__("dense/kernel", np.ones((1001, 396), np.float32)), "dense/kernel"),
        (lambda u: u.__setitem__("conv/kernel", np.ones((3, 3, 64, 97), np.float64)), "conv/kernel"),
        (lambda u: u.__setitem__("scalar", np.ones((1,), np.float32)), "scalar"),
    ],
    ids=["missing", "unexpected", "shape", "dtype", "scalar-shape"],
)
def test_mismatch_raises_naming_tensor_and_leaves_accumulator_unchanged(mutate, match):
    a, b = make_updates(2, seed=13)
    mean = StreamingMean()
    mean.add(a, 2)
    before = mean.result()
    bad = dict(b)
    mutate(bad)
    with pytest.raises(ValueError, match=match):
        mean.add(bad, 3)
    assert mean.count == 1 and mean.total_weight == 2.0
    after = mean.result()
    for k in SHAPES:
        assert np.array_equal(before[k], after[k])


def test_bad_weights_and_empty_inputs_raise():
    (u,) = make_updates(1)
    with pytest.raises(ValueError, match="no updates"):
        StreamingMean().result()
    with pytest.raises(ValueError, match="no updates"):
        fedavg([])
    mean = StreamingMean()
    mean.add(u, 0)
    with pytest.raises(ValueError, match="total weight is zero"):
        mean.result()
    for w in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight"):
            StreamingMean().add(u, w)
    mean = StreamingMean()
    mean.add(u, 1e-30)
    with pytest.raises(ValueError, match="too far"):
        mean.add(u, 1e30)
    assert mean.count == 1
    with pytest.raises(ValueError, match="no tensors"):
        StreamingMean().add({}, 1)
    with pytest.raises(ValueError, match="'steps'"):
        StreamingMean().add({"steps": np.arange(3)}, 1)
    with pytest.raises(ValueError, match="backend"):
        StreamingMean(backend="cuda")


# --------------------------------------------------------------------------------------
# Groups: add_group / extend (the cache-blocked pass the hub uses)
# --------------------------------------------------------------------------------------

MODEL_BYTES = sum(4 * int(np.prod(s)) for s in SHAPES.values())


def small_chunks(monkeypatch):
    """Chunks (and NumPy scratch blocks) and the threading threshold far smaller than the
    tensors and not multiples of each other or of any tensor size, so every kind of boundary
    is crossed, on every backend."""
    monkeypatch.setattr(agg, "_BLAS_CHUNK", 10_007)
    monkeypatch.setattr(agg, "_NUMPY_CHUNK", 3_001)
    monkeypatch.setattr(agg, "_MIN_PARALLEL", 1)


@pytest.mark.parametrize("kw", BACKENDS)
@pytest.mark.parametrize("per_group", [1, 2, 3, 7, 100])
def test_extend_matches_float64_reference(kw, per_group):
    ups = make_updates(7, seed=20)
    counts = [120, 4500, 33, 980, 2048, 7, 640]
    mean = StreamingMean(**kw)
    mean.extend(zip(ups, counts), group_bytes=per_group * MODEL_BYTES)
    assert mean.count == 7 and mean.total_weight == sum(counts)
    assert_close_rel(mean.result(), mean64(ups, counts))


@pytest.mark.parametrize("kw", BACKENDS)
def test_grouping_and_order_do_not_change_result(kw, monkeypatch):
    small_chunks(monkeypatch)
    ups = make_updates(9, seed=21)
    counts = np.random.default_rng(22).integers(1, 1000, size=9).tolist()
    one_by_one = StreamingMean(**kw)
    for u, c in zip(ups, counts):
        one_by_one.add(u, c)
    want = one_by_one.result()
    assert_close_rel(want, mean64(ups, counts))
    for per_group in (2, 4, 9):
        got = fedavg(zip(ups, counts), group_bytes=per_group * MODEL_BYTES, **kw)
        if kw["backend"] == "numpy":  # same float ops on every element, in the same order
            for k in SHAPES:
                assert np.array_equal(got[k], want[k]), (per_group, k)
        assert_close_rel(got, want)
    mixed = StreamingMean(**kw)  # add_group and add interleaved, groups of uneven sizes
    mixed.add_group(zip(ups[:4], counts[:4]))
    mixed.add(ups[4], counts[4])
    mixed.add_group(zip(ups[5:], counts[5:]))
    assert_close_rel(mixed.result(), want)
    perm = np.random.default_rng(23).permutation(9)
    shuffled = fedavg(((ups[i], counts[i]) for i in perm), group_bytes=4 * MODEL_BYTES, **kw)
    assert_close_rel(shuffled, want)


@pytest.mark.parametrize("kw", BACKENDS)
def test_group_chunks_not_aligned_with_tensors(kw, monkeypatch):
    small_chunks(monkeypatch)
    shapes = {"a": (3, 5001), "b": (17,), "c": (10_007,), "d": (2, 2, 2), "e": (40_000,)}
    ups = make_updates(5, seed=24, shapes=shapes)
    counts = [3, 1, 4, 1, 5]
    mean = StreamingMean(**kw)
    mean.add_group(zip(ups, counts))
    assert_close_rel(mean.result(), mean64(ups, counts))


@pytest.mark.parametrize("kw", BACKENDS)
def test_group_zero_weights_and_single_update(kw):
    a, b, c = make_updates(3, seed=25)
    mean = StreamingMean(**kw)
    mean.add_group([(a, 0), (b, 5.0), (c, 0)])
    assert mean.count == 3 and mean.total_weight == 5.0
    got = mean.result()
    for k in SHAPES:
        assert np.array_equal(got[k], b[k])  # the first positive weight is a plain copy
    mean.add_group([])
    assert mean.count == 3


@pytest.mark.parametrize("bad_index", [0, 2])
@pytest.mark.parametrize(
    "mutate",
    [
        lambda u: u.pop("dense/bias"),
        lambda u: u.__setitem__("dense/kernel", np.ones((1001, 396), np.float32)),
        lambda u: u.__setitem__("conv/kernel", np.ones((3, 3, 64, 97), np.float64)),
    ],
    ids=["missing", "shape", "dtype"],
)
def test_group_with_a_bad_update_leaves_accumulator_unchanged(mutate, bad_index):
    a, b, c, d = make_updates(4, seed=26)
    mean = StreamingMean()
    mean.add(a, 2)
    before = mean.result()
    group = [(b, 1), (c, 3), (d, 4)]
    bad = dict(group[bad_index][0])
    mutate(bad)
    group[bad_index] = (bad, group[bad_index][1])
    with pytest.raises(ValueError):
        mean.add_group(group)
    assert mean.count == 1 and mean.total_weight == 2.0
    after = mean.result()
    for k in SHAPES:
        assert np.array_equal(before[k], after[k])
    with pytest.raises(ValueError, match="weight"):  # a bad weight after good updates
        mean.add_group([(b, 1), (c, -1)])
    with pytest.raises(ValueError, match="too far"):
        mean.add_group([(b, 1), (c, 1e-50)])
    assert mean.count == 1 and np.array_equal(mean.result()["dense/kernel"], before["dense/kernel"])


def test_rejected_first_group_does_not_fix_the_schema():
    a, b = make_updates(2, seed=27)
    other = {"w": np.ones(4, np.float32)}
    mean = StreamingMean()
    with pytest.raises(ValueError, match="missing tensor 'conv/kernel'"):
        mean.add_group([(a, 1), (b, 2), (other, 1)])
    assert mean.count == 0 and mean.names == ()
    mean.add_group([(other, 2), ({"w": np.full(4, 4.0, np.float32)}, 2)])  # a different schema is fine
    assert np.array_equal(mean.result()["w"], np.full(4, 2.5, np.float32))


def test_extend_holds_at_most_a_group_and_stops_at_a_bad_update():
    ups = make_updates(8, seed=28)
    counts = [5, 4, 3, 2, 1, 6, 7, 8]
    mean = StreamingMean()
    drawn, alive = [], []

    def lazily(bad_at: int | None = None):
        for i, (u, c) in enumerate(zip(ups, counts)):
            # At most one group (3 updates) is held, and everything before it is accumulated.
            assert sum(ref() is not None for ref in alive) <= 3
            assert len(drawn) - mean.count <= 3
            drawn.append(i)
            fresh = {k: a.copy() for k, a in u.items()}  # like a read from the bucket
            alive.append(weakref.ref(fresh["dense/kernel"]))
            yield ({"oops": u["scalar"]} if i == bad_at else fresh), c
            del fresh

    mean.extend(lazily(), group_bytes=3 * MODEL_BYTES + 100)  # 3 per group, not a multiple of 8
    assert drawn == list(range(8)) and mean.count == 8
    assert_close_rel(mean.result(), mean64(ups, counts))

    # A rejected update: the ones before it are accumulated (as with add), it and the rest are not.
    mean, drawn = StreamingMean(), []
    with pytest.raises(ValueError, match="missing tensor"):
        mean.extend(lazily(bad_at=4), group_bytes=3 * MODEL_BYTES)
    assert drawn == [0, 1, 2, 3, 4] and mean.count == 4
    assert_close_rel(mean.result(), mean64(ups[:4], counts[:4]))

    # An exception from the iterable itself (e.g. a failed download) behaves the same.
    def failing():
        yield from zip(ups[:2], counts[:2])
        raise OSError("download failed")

    mean = StreamingMean()
    with pytest.raises(OSError):
        mean.extend(failing(), group_bytes=10 * MODEL_BYTES)
    assert mean.count == 2
    assert_close_rel(mean.result(), mean64(ups[:2], counts[:2]))


@pytest.mark.skipif(not blas_axpy_available(), reason="NumPy's bundled BLAS saxpy not found")
def test_auto_backend_falls_back_mid_group(monkeypatch, caplog):
    """The watchdog gives up on BLAS in the middle of a group's pass: the rest of that pass
    (the rest of the chunk included) and the next groups run on NumPy, and the mean is right."""
    small_chunks(monkeypatch)
    monkeypatch.setattr(agg, "_blas_distrusted_until", 0.0)
    monkeypatch.setattr(agg, "_BLAS_MIN_SECONDS", 0.0)
    monkeypatch.setattr(agg, "_BLAS_FLOOR_BYTES_PER_S", 1e30)
    monkeypatch.setattr(agg, "_BLAS_WATCH_MIN_ELEMENTS", 0)
    monkeypatch.setattr(agg, "_BLAS_SLOW_CALLS_TO_SWITCH", 5)  # the 5th saxpy, in the 2nd chunk of group 1
    ups = make_updates(7, seed=30)
    counts = [9, 8, 7, 6, 5, 4, 3]
    mean = StreamingMean(backend="auto", threads=3)
    calls = []
    real = mean._saxpy
    mean._saxpy = lambda *args: (calls.append(args[0]), real(*args))
    with caplog.at_level("WARNING", logger="shared.aggregation"):
        mean.extend(zip(ups, counts), group_bytes=4 * MODEL_BYTES)
    assert mean.backend == "numpy" and len(calls) == 5
    assert_close_rel(mean.result(), mean64(ups, counts))


@pytest.mark.skipif(not blas_axpy_available(), reason="NumPy's bundled BLAS saxpy not found")
def test_auto_backend_falls_back_to_numpy_when_blas_is_slow(monkeypatch, caplog):
    ups = make_updates(4, seed=16)
    counts = [5, 6, 7, 8]
    monkeypatch.setattr(agg, "_BLAS_MIN_SECONDS", 0.0)
    monkeypatch.setattr(agg, "_BLAS_FLOOR_BYTES_PER_S", 1e30)  # every call looks pathologically slow
    monkeypatch.setattr(agg, "_blas_distrusted_until", 0.0)
    monkeypatch.setattr(agg, "_BLAS_WATCH_MIN_ELEMENTS", 0)
    monkeypatch.setattr(agg, "_BLAS_SLOW_CALLS_TO_SWITCH", 2)
    explicit = StreamingMean(backend="blas")
    auto = StreamingMean(backend="auto", threads=2)
    assert auto.backend == "blas"
    with caplog.at_level("WARNING", logger="shared.aggregation"):
        for u, c in zip(ups, counts):
            explicit.add(u, c)
            auto.add(u, c)
    assert auto.backend == "numpy" and "using the NumPy backend" in caplog.text
    assert explicit.backend == "blas"  # an explicit choice is kept
    assert_close_rel(auto.result(), mean64(ups, counts))
    assert_close_rel(explicit.result(), mean64(ups, counts))
    # For a while, new "auto" accumulators start on NumPy; explicit "blas" is still honoured.
    assert StreamingMean().backend == "numpy"
    assert StreamingMean(backend="blas").backend == "blas"
    monkeypatch.setattr(agg, "_blas_distrusted_until", 0.0)
    assert StreamingMean().backend == "blas"


@pytest.mark.skipif(not blas_axpy_available(), reason="NumPy's bundled BLAS saxpy not found")
def test_auto_backend_ignores_a_single_stall(monkeypatch):
    monkeypatch.setattr(agg, "_blas_distrusted_until", 0.0)
    monkeypatch.setattr(agg, "_BLAS_WATCH_MIN_ELEMENTS", 0)
    ups = make_updates(4, seed=17)
    mean = StreamingMean(backend="auto")
    real, calls = mean._saxpy, []

    class Clock:
        """The first timed saxpy takes 1 s, every other one 1 ns: no real timing, so load cannot flake it."""

        now = 0.0
        reads = 0

        @classmethod
        def perf_counter(cls) -> float:
            cls.reads += 1
            cls.now += 1.0 if cls.reads == 2 else 1e-9
            return cls.now

        monotonic = staticmethod(time.monotonic)

    monkeypatch.setattr(agg, "time", Clock)

    def counted(n, alpha, x, y):
        calls.append(n)
        real(n, alpha, x, y)

    mean._saxpy = counted
    for u, c in zip(ups, [1, 2, 3, 4]):
        mean.add(u, c)
    assert calls and mean.backend == "blas"
    assert_close_rel(mean.result(), mean64(ups, [1, 2, 3, 4]))


def test_blas_can_be_disabled_by_env():
    code = (
        "import shared.aggregation as a; "
        "assert not a.blas_axpy_available(); assert a.StreamingMean().backend == 'numpy'"
    )
    env = {"FEDPIPE_AGG_BLAS": "0", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)


def test_import_is_light():
    """The aggregation Cloud Function must not pay for JAX/optax at import time."""
    code = (
        "import sys, shared.aggregation; "
        "heavy = [m for m in ('jax', 'optax', 'jaxlib', 'scipy') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --------------------------------------------------------------------------------------
# Server optimizers
# --------------------------------------------------------------------------------------

# Two rounds on four coordinates, eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3, v0=tau^2=1e-6.
# Pseudo-gradients g = global - averaged:  g1 = [0.5, -1, 0, -0.5],  g2 = [0.2, -0.4, 1, 0.5].
# Worked by hand for coordinate 1 of FedAdam, round 1:
#   m = 0.1 * -1 = -0.1;  v = 0.99 * 1e-6 + 0.01 * 1 = 0.01000099;  sqrt(v) + tau = 0.10100495
#   x = -2 - 0.1 * (-0.1 / 0.10100495) = -2 + 0.0990050 = -1.9009950
# FedYogi, round 1, coordinate 0: sign(v0 - g^2) = sign(1e-6 - 0.25) = -1, so
#   v = 1e-6 + 0.01 * 0.25 = 0.002501;  coordinate 2 (g = 0): v stays 1e-6 and x does not move.
# The other values below come from the same scalar recurrences (paper's Algorithm 2).
X0 = [1.0, -2.0, 0.5, 3.0]
G = [[0.5, -1.0, 0.0, -0.5], [0.2, -0.4, 1.0, 0.5]]
HYPER = {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
EXPECTED = {
    "fedadam": [
        ([0.9019798098790516, -1.9009949511174575, 0.5, 3.0980201901209483],
         [0.05, -0.1, 0.0, -0.05],
         [0.00250099, 0.01000099, 9.9e-07, 0.00250099]),
        ([0.7829935693707251, -1.780894387319861, 0.4009949025999249, 3.091031154395874],
         [0.065, -0.13, 0.1, 0.005],
         [0.0028759801, 0.0115009801, 0.0100009801, 0.0049759801]),
    ],
    "fedyogi": [
        ([0.9019800019996002, -1.9009950001249938, 0.5, 3.0980199980004],
         [0.05, -0.1, 0.0, -0.05],
         [0.002501, 0.010001, 1e-06, 0.002501]),
        ([0.7834986026041257, -1.7814085174060916, 0.4009950001249938, 3.091048223117105],
         [0.065, -0.13, 0.1, 0.005],
         [0.002901, 0.011601, 0.010001, 0.005001]),
    ],
}  # fmt: skip


def _two_rounds(name: str, dtype):
    opt = ServerOptimizer(name, **HYPER)
    x = {"p": np.array(X0, dtype=dtype)}
    state = opt.init(x)
    out = []
    for g in G:
        averaged = {"p": x["p"] - np.array(g, dtype=dtype)}
        x, state = opt.step(x, averaged, state)
        out.append((x, state))
    return out


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_fedadam_fedyogi_two_steps_hand_computed(name):
    for dtype, rtol in ((np.float64, 1e-12), (np.float32, 2e-6)):
        for t, ((x, state), (want_x, want_m, want_v)) in enumerate(zip(_two_rounds(name, dtype), EXPECTED[name])):
            assert x["p"].dtype == dtype and state["m/p"].dtype == dtype
            np.testing.assert_allclose(x["p"], want_x, rtol=rtol, atol=rtol, err_msg=f"{name} x round {t + 1}")
            np.testing.assert_allclose(state["m/p"], want_m, rtol=rtol, atol=rtol * 1e-3)
            np.testing.assert_allclose(state["v/p"], want_v, rtol=rtol, atol=rtol * 1e-6)
            assert state["step"].tolist() == [t + 1]


def test_fedadagrad_one_step():
    opt = ServerOptimizer("fedadagrad", server_lr=0.5, beta1=0.0, tau=1e-2, v0=0.0)
    x, state = opt.step({"p": np.array([1.0, 2.0])}, {"p": np.array([0.0, 2.5])})
    # g = [1, -0.5], m = g, v = g^2, x - 0.5 * g / (|g| + 0.01)
    np.testing.assert_allclose(x["p"], [1.0 - 0.5 / 1.01, 2.0 + 0.25 / 0.51], rtol=1e-12)
    np.testing.assert_allclose(state["v/p"], [1.0, 0.25], rtol=1e-12)


def test_fedavg_server_step_is_the_average():
    opt = ServerOptimizer("fedavg")
    g = {"a": np.ones((2, 3), np.float32)}
    avg = {"a": np.full((2, 3), 0.25, np.float32)}
    new, state = opt.step(g, avg)
    assert np.array_equal(new["a"], avg["a"]) and new["a"] is not avg["a"]
    assert set(state) == {"step"} and state["step"].tolist() == [1]
    assert np.array_equal(g["a"], np.ones((2, 3), np.float32))  # inputs untouched


def test_fedadam_moments_match_optax_scale_by_adam():
    """optax.scale_by_adam(b1, b2, eps=tau, eps_root=0) keeps the same raw moments (mu, nu).

    optax always bias-corrects its *update* (mu / (1 - b1^t), nu / (1 - b2^t)); Algorithm 2
    of Reddi et al. does not. So the moments are compared with optax's state, and the
    parameter update with the paper's formula applied to optax's moments.
    """
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.05
    opt = ServerOptimizer("fedadam", server_lr=lr, beta1=b1, beta2=b2, tau=tau, v0=0.0)  # optax's nu starts at 0
    tx = optax.scale_by_adam(b1=b1, b2=b2, eps=tau, eps_root=0.0)
    rng = np.random.default_rng(14)
    x = {"w": rng.standard_normal((4, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    state = opt.init(x)
    ostate = tx.init({k: jnp.asarray(v) for k, v in x.items()})
    for t in range(1, 4):
        averaged = {k: (v - rng.standard_normal(v.shape).astype(np.float32) * 0.1).astype(np.float32) for k, v in x.items()}
        g = {k: x[k] - averaged[k] for k in x}
        ou, ostate = tx.update({k: jnp.asarray(v) for k, v in g.items()}, ostate)
        new_x, state = opt.step(x, averaged, state)
        mu, nu = ostate.mu, ostate.nu
        for k in x:
            np.testing.assert_allclose(state[f"m/{k}"], np.asarray(mu[k]), rtol=1e-6, atol=1e-8)
            np.testing.assert_allclose(state[f"v/{k}"], np.asarray(nu[k]), rtol=1e-6, atol=1e-10)
            paper = x[k] - lr * np.asarray(mu[k]) / (np.sqrt(np.asarray(nu[k])) + tau)
            np.testing.assert_allclose(new_x[k], paper, rtol=1e-6, atol=1e-7)
            if t == 1:  # optax's bias-corrected step is a different (larger) step
                assert not np.allclose(new_x[k], x[k] - lr * np.asarray(ou[k]), rtol=1e-3)
        x = new_x


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedyogi", "fedadagrad"])
def test_state_round_trips_through_safetensors(name):
    opt = ServerOptimizer(name, server_lr=0.05)
    ups = make_updates(3, seed=15, shapes={"layer.0/kernel": (6, 4), "layer.0/bias": (4,)})
    x = ups[0]
    x1, state = opt.step(x, ups[1])
    blob = st_save(state)
    loaded = st_load(blob)
    assert set(loaded) == set(state)
    for k in state:
        assert loaded[k].dtype == state[k].dtype and np.array_equal(loaded[k], state[k]), k
    # Continuing from the stored state is exactly continuing from the in-memory one.
    x2a, s2a = opt.step(x1, ups[2], state)
    x2b, s2b = opt.step(x1, ups[2], loaded)
    for k in x2a:
        assert np.array_equal(x2a[k], x2b[k])
    for k in s2a:
        assert np.array_equal(s2a[k], s2b[k])
    assert s2b["step"].tolist() == [2]


def test_server_optimizer_errors_name_the_tensor():
    opt = ServerOptimizer("fedyogi")
    x = {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match="'b'"):
        opt.step(x, {"a": x["a"]})
    with pytest.raises(ValueError, match="'a'"):
        opt.step(x, {"a": np.zeros(4, np.float32), "b": x["b"]})
    state = opt.init(x)
    del state["v/b"]
    with pytest.raises(ValueError, match="'b'"):
        opt.step(x, x, state)
    with pytest.raises(ValueError, match="unknown server optimizer"):
        ServerOptimizer("fedsgd")
    assert agg.SERVER_OPTIMIZERS == ("fedavg", "fedadam", "fedyogi", "fedadagrad")


# --------------------------------------------------------------------------------------
# Robust aggregation: coordinate-wise median and trimmed mean
# --------------------------------------------------------------------------------------


def columns(*per_node: list[float]) -> list[dict[str, np.ndarray]]:
    """One update per node, from each node's values for the 2x2 tensor 'w' (row-major) and the scalar 'b' (last)."""
    return [{"w": np.array(v[:4], np.float32).reshape(2, 2), "b": np.array(v[4], np.float32)} for v in per_node]


def run(agg_, updates, weights=None) -> dict[str, np.ndarray]:
    agg_.extend(zip(updates, weights or [1.0] * len(updates), strict=True))
    return agg_.result()


def test_median_of_odd_n_is_the_middle_value():
    ups = columns([1, -2, 7, 0.5, 10], [3, -1, 5, 0.25, -10], [2, 9, 6, 0.125, 0])
    got = run(CoordinateMedian(), ups)
    assert np.array_equal(got["w"], np.array([[2, -1], [6, 0.25]], np.float32))
    assert np.array_equal(got["b"], np.float32(0))


def test_median_of_even_n_is_the_mean_of_the_two_middle_values():
    ups = columns([1, 8, -3, 0, 1], [4, 2, -1, 0, 2], [2, 6, -7, 1, 3], [10, 4, -5, 0, 4])
    got = run(CoordinateMedian(), ups)
    # Sorted per coordinate: [1,2,4,10] -> 3, [2,4,6,8] -> 5, [-7,-5,-3,-1] -> -4, [0,0,0,1] -> 0, [1,2,3,4] -> 2.5.
    assert np.array_equal(got["w"], np.array([[3, 5], [-4, 0]], np.float32))
    assert np.array_equal(got["b"], np.float32(2.5))


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    # n=5, trim 0.2: one largest and one smallest value dropped per coordinate, wherever they come from.
    ups = columns([100, 0, 5, 1, 2], [1, -50, 5, 2, 2], [3, 6, 5, 3, 2], [2, 0, 5, 4, 2], [4, 3, 5, 5, 1e6])
    got = run(TrimmedMean(0.2), ups)
    # [1,2,3,4,100] -> 3, [-50,0,0,3,6] -> 1, [5]*5 -> 5, [1..5] -> 3, [2,2,2,2,1e6] -> 2.
    assert np.array_equal(got["w"], np.array([[3, 1], [5, 3]], np.float32))
    assert np.array_equal(got["b"], np.float32(2))


def test_trim_fraction_is_floored_per_n_without_float_noise():
    # 0.29 * 100 is 28.999999999999996 in floating point; the trim is 29. Values i^2 tell 28 from 29.
    ups = [{"w": np.array([float(i * i)], np.float32)} for i in range(100)]
    got = run(TrimmedMean(0.29), ups[::-1])
    assert got["w"][0] == pytest.approx(np.mean([i * i for i in range(29, 71)]), rel=1e-7)
    assert got["w"][0] != pytest.approx(np.mean([i * i for i in range(28, 72)]), rel=1e-4)


def test_trimmed_mean_with_n_too_small_to_trim_is_the_unweighted_mean():
    ups = columns([1, 2, 3, 4, 5], [3, 2, 1, 0, 5], [2, 8, 2, 2, 5], [10, 0, 6, 2, 5])  # 0.2 * 4 < 1: nothing trimmed
    got = run(TrimmedMean(0.2), ups, weights=[1, 100, 1, 5])
    assert np.array_equal(got["w"], np.array([[4, 3], [3, 2]], np.float32))
    assert np.array_equal(got["b"], np.float32(5))
    (one,) = make_updates(1, seed=40)
    alone = run(TrimmedMean(0.4), [one])
    assert all(np.array_equal(alone[k], one[k]) for k in SHAPES)


def test_an_outlier_moves_fedavg_but_not_median_or_trimmed_mean():
    honest = [0.9, 1.0, 1.1, 0.95, 1.05]
    ups = [{"w": np.full(3, v, np.float32)} for v in [*honest, 1e6]]
    weights = [100.0] * 6
    assert fedavg(zip(ups, weights))["w"][0] == pytest.approx((sum(honest) + 1e6) / 6, rel=1e-6)
    median = run(CoordinateMedian(), ups, weights)["w"]
    trimmed = run(TrimmedMean(0.2), ups, weights)["w"]  # 0.2 * 6: one dropped at each end
    np.testing.assert_allclose(median, np.full(3, (1.0 + 1.05) / 2), rtol=1e-7)
    np.testing.assert_allclose(trimmed, np.full(3, (0.95 + 1.0 + 1.05 + 1.1) / 4), rtol=1e-7)


def test_robust_statistics_ignore_claimed_weights_except_zero():
    ups = make_updates(5, seed=41)
    for make in (CoordinateMedian, lambda: TrimmedMean(0.2)):
        even = run(make(), ups, [1, 1, 1, 1, 1])
        inflated = run(make(), ups, [1, 2.0**62, 3, 7, 1])  # a hostile claim changes nothing
        assert all(np.array_equal(even[k], inflated[k]) for k in SHAPES)
        agg_ = make()
        agg_.extend(zip(ups, [1, 0, 1, 1, 1]))  # zero weight: left out, as in the mean
        assert agg_.count == 5
        without = run(make(), ups[:1] + ups[2:])
        assert all(np.array_equal(agg_.result()[k], without[k]) for k in SHAPES)


@pytest.mark.parametrize("threads", [1, 3])
def test_robust_statistics_match_numpy_and_keep_shapes_and_dtypes(threads):
    ups = make_updates(7, seed=42)  # >= 2**19 elements: the threaded path for threads=3
    for agg_, trim in ((CoordinateMedian(threads=threads), 3), (TrimmedMean(0.3, threads=threads), 2)):
        got = run(agg_, ups, list(range(1, 8)))
        for k, shape in SHAPES.items():
            assert got[k].shape == shape and got[k].dtype == np.float32, k
            ordered = np.sort(np.stack([u[k].astype(np.float64) for u in ups]), axis=0)
            want = ordered[trim : 7 - trim].mean(axis=0)
            np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-7, err_msg=k)
            if trim == 3:
                assert np.array_equal(got[k], np.median(np.stack([u[k] for u in ups]), axis=0).astype(np.float32)), k


def test_robust_statistics_refuse_bad_input_clearly():
    a, b = make_updates(2, seed=43)
    for make in (CoordinateMedian, TrimmedMean):
        with pytest.raises(ValueError, match="no updates"):
            make().result()
        with pytest.raises(ValueError, match="weight zero"):
            run(make(), [a, b], [0, 0.0])
        bad = dict(b, **{"dense/kernel": np.ones((1001, 396), np.float32)})
        agg_ = make()
        with pytest.raises(ValueError, match=r"'dense/kernel': shape \(1001, 396\)"):
            agg_.extend([(a, 1), (bad, 1), (b, 1)])
        assert agg_.count == 1  # the pairs before a rejected one are kept, it and the rest are not
        assert all(np.array_equal(agg_.result()[k], a[k]) for k in SHAPES)
        with pytest.raises(ValueError, match="weight must be finite"):
            make().extend([(a, float("nan"))])
    for fraction in (-0.1, 0.5, float("nan")):
        with pytest.raises(ValueError, match="trim_fraction"):
            TrimmedMean(fraction)


def test_aggregator_picks_the_implementation_per_strategy():
    kinds = {s: type(aggregator(s, trim_fraction=0.25)) for s in STRATEGIES}
    assert kinds == {
        "fedavg": StreamingMean, "fedprox": StreamingMean, "fedadam": StreamingMean, "fedyogi": StreamingMean,
        "median": CoordinateMedian, "trimmed_mean": TrimmedMean,
    }  # fmt: skip
    assert aggregator("trimmed_mean", trim_fraction=0.25).trim_fraction == 0.25
    with pytest.raises(ValueError, match="unknown aggregation strategy 'krum'"):
        aggregator("krum")  # type: ignore[arg-type]
    ups = columns([1, 2, 3, 4, 5], [3, 4, 5, 6, 7])
    for strategy in STRATEGIES:  # the one interface the hub uses
        got = run(aggregator(strategy), ups)
        assert np.array_equal(got["w"], np.array([[2, 3], [4, 5]], np.float32)), strategy


# --------------------------------------------------------------------------------------
# Update-norm clipping
# --------------------------------------------------------------------------------------


def test_clip_scales_the_delta_to_max_norm():
    zero = {"v": np.zeros(2, np.float32)}
    got = clip_update({"v": np.array([3, 4], np.float32)}, zero, max_norm=1)
    np.testing.assert_allclose(got["v"], [0.6, 0.8], rtol=1e-7)
    assert got["v"].dtype == np.float32
    # The norm is global over tensors (3 in one, 4 in the other), and the delta is taken from the reference.
    params = {"a": np.array([[4.0]], np.float32), "b": np.array([-3.0, 1.0], np.float32)}
    reference = {"a": np.array([[1.0]], np.float32), "b": np.array([1.0, 1.0], np.float32)}
    assert update_norm(params, reference) == 5.0
    got = clip_update(params, reference, max_norm=2.5)
    assert got["a"].shape == (1, 1) and got["b"].shape == (2,)
    assert np.array_equal(got["a"], [[2.5]]) and np.array_equal(got["b"], [-1.0, 1.0])
    assert update_norm(got, reference) == pytest.approx(2.5, rel=1e-7)
    assert np.array_equal(params["a"], [[4.0]])  # inputs untouched


def test_clip_leaves_updates_within_the_bound_alone():
    params = {"v": np.array([0.375, 0.5], np.float32)}  # exact in float32, and so is the norm, 0.625
    reference = {"v": np.zeros(2, np.float32)}
    assert clip_update(params, reference, max_norm=0.625)["v"] is params["v"]  # exactly on the bound
    assert clip_update(params, params, max_norm=1e-30)["v"] is params["v"]  # a zero delta stays zero


def test_update_norm_accumulates_in_float64():
    # (3e20)^2 overflows float32; the norm does not.
    params = {"a": np.array([3e20], np.float32), "b": np.array([4e20], np.float32)}
    reference = {"a": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)}
    assert update_norm(params, reference) == pytest.approx(5e20, rel=1e-7)
    np.testing.assert_allclose(clip_update(params, reference, 10.0)["b"], [8.0], rtol=1e-7)


def test_clip_refuses_mismatches_and_bad_bounds():
    params = {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="'b'"):
        clip_update(params, {"a": np.zeros(3, np.float32)}, 1.0)
    with pytest.raises(ValueError, match=r"'a': shape \(3,\) != reference shape \(4,\)"):
        clip_update(params, {"a": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}, 1.0)
    for bound in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            clip_update(params, params, bound)
    with pytest.raises(ValueError, match="not finite"):
        clip_update({"a": np.array([np.inf, 0, 0], np.float32), "b": params["b"]}, params, 1.0)

"""The accelerator parts of bench/worker.py and bench/aggregate.py, on the CPU and by value:
the peak table, FLOP counts against a hand count, the bandwidth kernels and the device-side
mean, and one tiny --bare-only run of worker.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def worker():
    return load("worker")


@pytest.fixture(scope="module")
def aggregate():
    # aggregate.py re-executes itself under .venv-bench when flwr is missing: never inside pytest.
    saved = os.environ.get("FEDPIPE_BENCH_REEXEC")
    os.environ["FEDPIPE_BENCH_REEXEC"] = "1"
    try:
        return load("aggregate")
    finally:
        if saved is None:
            del os.environ["FEDPIPE_BENCH_REEXEC"]
        else:
            os.environ["FEDPIPE_BENCH_REEXEC"] = saved


@pytest.mark.parametrize("kind, platform, precision, peak", [
    ("NVIDIA H200", "gpu", None, 494.7e12),  # TF32 tensor cores: jax's default for float32 matmuls
    ("NVIDIA H200", "gpu", "highest", 66.9e12),
    ("NVIDIA H200 NVL", "gpu", None, 417.5e12),
    ("NVIDIA H100 80GB HBM3", "gpu", None, 494.7e12),
    ("NVIDIA H100 PCIe", "gpu", None, 378.0e12),
    ("NVIDIA A100-SXM4-80GB", "gpu", None, 156.0e12),
    ("NVIDIA L4", "gpu", None, 60.5e12),
    ("TPU v5 lite", "tpu", None, 197.0e12),
    ("TPU v5 lite", "tpu", "highest", 197.0e12 / 6),
    ("TPU v6 lite", "tpu", None, 918.0e12),
    ("TPU v5", "tpu", None, 459.0e12),  # the v5p, as jax names it
    ("TPU v5p", "tpu", None, 459.0e12),
])
def test_peak_table(worker, kind, platform, precision, peak):
    value, basis = worker.peak_flops(kind, platform, precision)
    assert value == pytest.approx(peak), (kind, basis)


@pytest.mark.parametrize("kind, platform", [("cpu", "cpu"), ("NVIDIA L40S", "gpu"), ("NVIDIA GeForce RTX 4090", "gpu")])
def test_unknown_devices_have_no_peak(worker, kind, platform):
    value, basis = worker.peak_flops(kind, platform, None)
    assert value is None and basis.startswith("unknown peak")


def test_step_flops_match_the_hand_count(worker):
    import jax

    from workers.trainer import models

    params = models.init_params("mlp", 32, 10, (64, 64), seed=0)
    assert worker.dense_flops_per_sample(params) == 6 * (32 * 64 + 64 * 64 + 64 * 10) - 2 * 32 * 64
    opt, step = worker.make_bare_step("mlp", 1e-3)
    params = jax.device_put(params)
    xb, yb = np.zeros((128, 32), np.float32), np.zeros(128, np.int32)
    flops, source = worker.step_flops(step, params, opt.init(params), xb, yb)
    assert source == "compiled"
    # XLA counts the matmuls plus the elementwise work (relu, softmax, adam): a little more than the hand count.
    assert 1.0 <= flops / (128 * worker.dense_flops_per_sample(params)) < 1.3


def test_wide_shrinks_on_the_cpu(worker):
    acc, cpu = worker.WIDE["accelerator"], worker.WIDE["cpu"]
    spec = lambda s: sum(6 * a * b for a, b in zip([s.features, *s.hidden], [*s.hidden, 10]))  # noqa: E731
    assert spec(acc) / spec(cpu) > 50  # ~0.8 GFLOP vs ~14 MFLOP per sample
    assert acc.model == cpu.model == "mlp" and acc.samples % acc.batch == 0 and cpu.samples % cpu.batch == 0


def test_worker_bare_only_run_prints_mfu_fields(worker):
    cmd = [sys.executable, str(REPO / "bench" / "worker.py"), "--model", "wide", "--features", "16", "--hidden", "32,32",
           "--samples", "512", "--batch", "128", "--epochs", "1", "--repeats", "1", "--bare-only"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["worker_path"].startswith("skipped") and result["ratio"] is None
    assert result["hidden"] == [32, 32] and result["params"] == 16 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    assert result["flops_per_step"] > 128 * result["flops_per_sample_matmuls_by_hand"]
    assert result["bare_samples_per_s"] > 0 and result["bare_tflops_per_s"] is not None
    assert result["peak_flops_per_s"] is None and result["bare_mfu"] is None and result["peak_basis"].startswith("unknown peak")


def test_bandwidth_kernels(aggregate):
    import jax

    rates = aggregate.measure_bandwidth(jax.devices("cpu")[0], 8 << 20, with_numpy=True, trials=2)
    assert set(rates) == {"jax_sum_read", "jax_copy_read_write", "numpy_gemv_read"}
    assert all(0 < r < 10_000 for r in rates.values()), rates  # GB/s


def test_device_mean_agrees_with_numpy(aggregate):
    rng = np.random.default_rng(0)
    stacked = rng.standard_normal((5, 10_000), dtype=np.float32)
    w = rng.integers(1, 100, 5).astype(np.float32)
    w /= w.sum()
    ref = np.tensordot(w.astype(np.float64), stacked.astype(np.float64), axes=1)
    row = aggregate.device_mean(stacked, w, trials=2, ref=ref)
    assert row["device_agg_method"] in ("tensordot", "fused_sum")
    assert row["device_agg_gbps"] == max(row["device_tensordot_gbps"], row["device_fused_sum_gbps"])
    assert row["device_tensordot_rel_diff_vs_ours"] < 1e-6 and row["device_fused_sum_rel_diff_vs_ours"] < 1e-6
    assert 0 < row["device_agg_incl_transfer_gbps"] <= row["device_agg_gbps"]

"""The JAX training core: models, Trainer (fit/eval/FedProx/data parallel) and weight I/O."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save as st_save
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from shared.jobs import TrainSpec
from shared.weights import WeightsMismatch, from_bytes, spec_of, to_bytes
from workers.trainer import models
from workers.trainer.training import (
    TrainConfig,
    Trainer,
    _masked_batches,
    epoch_order,
    feature_stats,
    standardize,
    step_loop_for,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn digits (8x8 -> 64 features, 10 classes), standardized on the train split."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = feature_stats(x_tr)
    return standardize(x_tr, mean, std), y_tr, standardize(x_te, mean, std), y_te


@pytest.fixture(scope="module")
def mlp() -> Trainer:
    """One shared trainer, so the module compiles the mlp epoch once."""
    return Trainer(TrainConfig(model="mlp", hidden=(64,), epochs=15, batch_size=64, learning_rate=3e-3, seed=0), 64, 10)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


def _sq_dist(a: dict, b: dict) -> float:
    return sum(float(np.sum((np.asarray(a[k]) - np.asarray(b[k])) ** 2)) for k in a)


# ---- models -------------------------------------------------------------------------


def test_param_counts_are_pinned() -> None:
    # logreg 64*10 + 10; mlp (64*64 + 64) + (64*10 + 10).
    assert models.param_count(models.init_params("logreg", 64, 10, (64,), 0)) == 650
    assert models.param_count(models.init_params("mlp", 64, 10, (64,), 0)) == 4810
    # FedAvg CNN on 28x28x1, 'SAME' padding so only the pools shrink (28 -> 14 -> 7):
    # conv 5*5*1*32+32 = 832; conv 5*5*32*64+64 = 51,264; dense 7*7*64*512+512 = 1,606,144;
    # out 512*10+10 = 5,130; total 1,663,370, as in McMahan et al. 2017.
    assert models.param_count(models.init_params("cnn", 784, 10, (), 0)) == 1_663_370
    # On digits' 8x8 (8 -> 4 -> 2): 832 + 51,264 + (2*2*64*512+512) + 5,130.
    assert models.param_count(models.init_params("cnn", 64, 10, (), 0)) == 188_810


def test_params_are_flat_named_float32_and_seeded() -> None:
    p = models.init_params("mlp", 64, 10, (32, 16), 3)
    assert sorted(p) == [f"dense_{i}.{t}" for i in range(3) for t in ("bias", "kernel")]
    assert p["dense_1.kernel"].shape == (32, 16) and all(v.dtype == jnp.float32 for v in p.values())
    assert _max_diff(p, models.init_params("mlp", 64, 10, (32, 16), 3)) == 0.0
    assert _max_diff(p, models.init_params("mlp", 64, 10, (32, 16), 4)) > 0.0


@pytest.mark.parametrize("model,n_features", [("logreg", 64), ("mlp", 64), ("cnn", 64), ("cnn", 784)])
def test_apply_gives_logits_for_flat_input(model: str, n_features: int) -> None:
    p = models.init_params(model, n_features, 10, (16,), 0)
    logits = models.apply(model, p, jnp.ones((3, n_features), jnp.float32))
    assert logits.shape == (3, 10) and bool(jnp.all(jnp.isfinite(logits)))


def test_bad_model_or_image_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="'resnet'"):
        models.init_params("resnet", 64, 10, (), 0)
    with pytest.raises(ValueError, match="n_features=60"):
        models.init_params("cnn", 60, 10, (), 0)
    with pytest.raises(ValueError, match="n_features=60"):
        Trainer(TrainConfig(model="cnn"), 60, 10)


# ---- training -----------------------------------------------------------------------


def test_mlp_learns_digits_and_reports_each_epoch(mlp: Trainer, digits) -> None:
    x_tr, y_tr, x_te, y_te = digits
    seen: list[tuple[int, dict]] = []
    params, history = mlp.fit(mlp.init_params(), x_tr, y_tr, on_epoch=lambda i, m: seen.append((i, m)))
    result = mlp.evaluate(params, x_te, y_te)
    assert result["accuracy"] >= 0.9 and result["examples"] == len(y_te)
    assert [i for i, _ in seen] == list(range(15)) and [m for _, m in seen] == history
    assert set(history[0]) == {"loss", "accuracy"} and history[-1]["loss"] < history[0]["loss"]


def test_logreg_learns_digits(digits) -> None:
    x_tr, y_tr, x_te, y_te = digits
    trainer = Trainer(TrainConfig(model="logreg", epochs=20, batch_size=64, learning_rate=1e-2), 64, 10)
    params, _ = trainer.fit(trainer.init_params(), x_tr, y_tr)
    assert trainer.evaluate(params, x_te, y_te)["accuracy"] > 0.9


def test_second_fit_with_new_params_does_not_recompile(mlp: Trainer, digits) -> None:
    x_tr, y_tr, x_te, y_te = digits
    first, _ = mlp.fit(mlp.init_params(), x_tr, y_tr, epochs=1)
    mlp.evaluate(first, x_te, y_te)
    traces, cache = dict(mlp.traces), mlp._train_epoch._cache_size()
    # A new round: different starting params (as numpy, as they arrive off the wire).
    fresh = {k: np.asarray(v) for k, v in models.init_params("mlp", 64, 10, (64,), 7).items()}
    second, _ = mlp.fit(fresh, x_tr, y_tr, epochs=2)
    mlp.evaluate(second, x_te, y_te)
    assert dict(mlp.traces) == traces and traces["train_epoch"] == 1 and traces["eval"] == 1
    assert mlp._train_epoch._cache_size() == cache == 1


def test_fit_is_deterministic_in_seed(mlp: Trainer, digits) -> None:
    x_tr, y_tr, *_ = digits
    start = mlp.init_params()
    a, ha = mlp.fit(start, x_tr, y_tr, epochs=2)
    b, hb = mlp.fit(start, x_tr, y_tr, epochs=2)
    assert _max_diff(a, b) == 0.0 and ha == hb


def test_every_example_is_used_each_epoch_ragged_batch_masked() -> None:
    order = epoch_order(0, 0, 203)
    idx, mask = _masked_batches(order, 30, 4)  # 7 batches of 30 (+2 pad rows each for 4 devices)
    assert idx.shape == mask.shape == (7, 32) and idx.dtype == np.int32 and mask.dtype == bool
    assert sorted(idx[mask].tolist()) == list(range(203))
    assert idx[mask].tolist() == order.tolist()  # batches follow the epoch's order
    assert int(mask[-1].sum()) == 203 - 6 * 30 and not mask[:, 30:].any() and not idx[~mask].any()


def test_epoch_order_is_a_host_permutation_fixed_by_seed_and_epoch() -> None:
    a = epoch_order(0, 0, 1000)
    assert isinstance(a, np.ndarray) and sorted(a.tolist()) == list(range(1000))
    assert np.array_equal(a, epoch_order(0, 0, 1000))  # deterministic
    assert not np.array_equal(a, epoch_order(0, 1, 1000))  # reshuffled every epoch
    assert not np.array_equal(a, epoch_order(1, 0, 1000))  # and per seed
    assert sorted(epoch_order(-3, 0, 10).tolist()) == list(range(10))  # any int seed


def test_epoch_mode_is_a_step_loop_only_for_conv_models_on_cpu() -> None:
    cnn, mlp_cfg = TrainConfig(model="cnn"), TrainConfig(model="mlp")
    assert step_loop_for(cnn, 784, 10, "cpu") and step_loop_for(cnn, 64, 10, "cpu")
    assert not step_loop_for(cnn, 784, 10, "gpu") and not step_loop_for(cnn, 784, 10, "tpu")
    assert not step_loop_for(mlp_cfg, 64, 10, "cpu") and not step_loop_for(TrainConfig(model="logreg"), 64, 10, "cpu")
    assert Trainer(cnn, 64, 10, devices=jax.devices("cpu")).step_loop
    assert not Trainer(mlp_cfg, 64, 10, devices=jax.devices("cpu")).step_loop


def test_step_loop_matches_scan_epoch(digits) -> None:
    x_tr, y_tr, *_ = digits
    x, y = x_tr[:203], y_tr[:203]  # ragged: 203 = 6 * 30 + 23
    cfg = TrainConfig(model="mlp", hidden=(32,), epochs=3, batch_size=30, prox_mu=0.1)
    scan, loop = Trainer(cfg, 64, 10, step_loop=False), Trainer(cfg, 64, 10, step_loop=True)
    start = scan.init_params()
    a, ha = scan.fit(start, x, y)
    b, hb = loop.fit(start, x, y)
    assert _max_diff(a, b) < 1e-5
    assert np.allclose([h["loss"] for h in ha], [h["loss"] for h in hb], atol=1e-5)
    assert [h["accuracy"] for h in ha] == [h["accuracy"] for h in hb]
    assert scan.traces == {"train_epoch": 1} and loop.traces == {"train_step": 1}


def test_cnn_step_loop_learns_digits_without_recompiling(digits) -> None:
    x_tr, y_tr, x_te, y_te = digits
    cnn = Trainer(TrainConfig(model="cnn", epochs=3, batch_size=64, learning_rate=1e-3), 64, 10, devices=jax.devices("cpu"))
    assert cnn.step_loop
    params, history = cnn.fit(cnn.init_params(), x_tr, y_tr)
    assert history[-1]["loss"] < history[0]["loss"] and cnn.evaluate(params, x_te, y_te)["accuracy"] > 0.8
    traces, cache = dict(cnn.traces), cnn._train_step._cache_size()
    again, _ = cnn.fit({k: np.asarray(v) for k, v in params.items()}, x_tr, y_tr, epochs=1)
    cnn.evaluate(again, x_te, y_te)
    assert dict(cnn.traces) == traces == {"train_step": 1, "eval": 1} and cnn._train_step._cache_size() == cache == 1


def test_fedprox_mu_zero_is_plain_fit_and_large_mu_stays_near_global(mlp: Trainer, digits) -> None:
    x_tr, y_tr, *_ = digits
    start = mlp.init_params()
    other = models.init_params("mlp", 64, 10, (64,), 99)
    plain, _ = mlp.fit(start, x_tr, y_tr, epochs=3)
    cfg0 = TrainConfig(model="mlp", hidden=(64,), epochs=15, batch_size=64, learning_rate=3e-3, seed=0, prox_mu=0.0)
    assert cfg0 == mlp.config
    mu0, _ = Trainer(cfg0, 64, 10).fit(start, x_tr, y_tr, epochs=3, global_params=other)
    assert _max_diff(plain, mu0) == 0.0  # mu = 0 ignores global_params entirely

    prox = Trainer(TrainConfig(model="mlp", hidden=(64,), batch_size=64, learning_rate=3e-3, prox_mu=1.0), 64, 10)
    near, _ = prox.fit(start, x_tr, y_tr, epochs=3)  # anchor defaults to the starting params
    assert _sq_dist(near, start) < 0.5 * _sq_dist(plain, start)


def test_fit_rejects_bad_labels_and_shapes(mlp: Trainer, digits) -> None:
    x_tr, y_tr, *_ = digits
    with pytest.raises(ValueError, match="labels"):
        mlp.fit(mlp.init_params(), x_tr, np.full_like(y_tr, 10), epochs=1)
    with pytest.raises(ValueError, match="x"):
        mlp.evaluate(mlp.init_params(), x_tr[:, :10], y_tr)


def test_config_from_spec_and_standardize() -> None:
    spec = TrainSpec(model="logreg", hidden=[8, 4], epochs=3, batch_size=16, learning_rate=0.1, seed=5)
    assert TrainConfig.from_spec(spec) == TrainConfig("logreg", (8, 4), 3, 16, 0.1, 5, 0.0)
    assert TrainConfig.from_spec(spec, prox_mu=0.01).prox_mu == 0.01
    with pytest.raises(ValueError):
        TrainConfig(model="nope")
    x = np.array([[1.0, 5.0], [3.0, 5.0]])
    out = standardize(x, *feature_stats(x))
    assert out.dtype == np.float32 and np.allclose(out, [[-1.0, 0.0], [1.0, 0.0]])  # constant column -> 0


# ---- data parallel ------------------------------------------------------------------

_MULTI_DEVICE = textwrap.dedent(
    """
    import jax, numpy as np
    from workers.trainer.training import TrainConfig, Trainer
    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(203, 64)).astype(np.float32)          # 203: ragged batches
    y = ((x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0)).astype(np.int32)
    cfg = TrainConfig(model="mlp", hidden=(32,), epochs=3, batch_size=30, prox_mu=0.1)  # 30: not a multiple of 4
    four, one = Trainer(cfg, 64, 4), Trainer(cfg, 64, 4, devices=jax.devices()[:1])
    assert four.mesh is not None and one.mesh is None
    start = four.init_params()
    a, ha = four.fit(start, x, y)
    b, hb = one.fit(start, x, y)
    assert a["dense_0.kernel"].sharding.is_fully_replicated
    assert len(a["dense_0.kernel"].sharding.device_set) == 4
    diff = max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in a)
    assert diff < 1e-5, diff
    assert np.allclose([h["loss"] for h in ha], [h["loss"] for h in hb], atol=1e-5)
    ea, eb = four.evaluate(a, x, y), one.evaluate(b, x, y)
    assert abs(ea["loss"] - eb["loss"]) < 1e-5 and ea["accuracy"] == eb["accuracy"], (ea, eb)
    p = four._put_params(start)
    batches = four._put(four._epoch_batches(len(y), 0))
    hlo = four._train_epoch.lower(p, four.optimizer.init(p), p, four._put((x, y)), batches).compile().as_text()
    assert "all-reduce" in hlo or "reduce-scatter" in hlo  # gradients really are combined across devices
    loop = Trainer(cfg, 64, 4, step_loop=True)  # the step-loop epoch (cnn on CPU) shards the same way
    c, hc = loop.fit(start, x, y)
    diff_loop = max(float(np.abs(np.asarray(c[k]) - np.asarray(b[k])).max()) for k in c)
    assert diff_loop < 1e-5, diff_loop
    assert np.allclose([h["loss"] for h in hc], [h["loss"] for h in hb], atol=1e-5)
    assert c["dense_0.kernel"].sharding.is_fully_replicated and len(c["dense_0.kernel"].sharding.device_set) == 4
    assert loop.traces["train_step"] == 1 and loop._train_step._cache_size() == 1  # no recompiles across steps
    hlo = loop._train_step.lower(p, loop.optimizer.init(p), p, loop._put((x, y)), batches, 0,
                                 *loop._put((np.float32(0), np.int32(0)))).compile().as_text()
    assert "all-reduce" in hlo or "reduce-scatter" in hlo
    print("OK", diff)
    """
)


def test_four_cpu_devices_match_one_device() -> None:
    env = {
        **os.environ,
        "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip(),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run([sys.executable, "-c", _MULTI_DEVICE], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


# ---- weights ------------------------------------------------------------------------


def test_weights_round_trip_exactly_with_metadata() -> None:
    params = models.init_params("mlp", 64, 10, (64,), 0)
    data = to_bytes(params, {"round": "3", "site": "a"})
    back, meta = from_bytes(data, expected=spec_of(params))
    assert meta == {"round": "3", "site": "a", "format": "fedpipe-weights-v1"}
    assert back.keys() == params.keys()
    for k in params:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], np.asarray(params[k]))
    assert spec_of(back) == spec_of(params) == {
        "dense_0.kernel": ((64, 64), "float32"), "dense_0.bias": ((64,), "float32"),
        "dense_1.kernel": ((64, 10), "float32"), "dense_1.bias": ((10,), "float32"),
    }


def test_weights_mismatch_names_the_tensor() -> None:
    params = {"a.kernel": np.zeros((2, 3), np.float32), "a.bias": np.zeros((3,), np.float32)}
    data = to_bytes(params)
    spec = spec_of(params)
    with pytest.raises(WeightsMismatch, match=r"'a.kernel' has shape \(2, 3\), expected \(3, 2\)"):
        from_bytes(data, {**spec, "a.kernel": ((3, 2), "float32")})
    with pytest.raises(WeightsMismatch, match="'a.bias' has dtype float32, expected float64"):
        from_bytes(data, {**spec, "a.bias": ((3,), "float64")})
    with pytest.raises(WeightsMismatch, match="missing tensor 'b.bias'"):
        from_bytes(data, {**spec, "b.bias": ((1,), "float32")})
    with pytest.raises(WeightsMismatch, match="unexpected tensor 'a.bias'"):
        from_bytes(data, {"a.kernel": spec["a.kernel"]})


@pytest.mark.parametrize(
    "blob",
    [b"", b"garbage", b"\xff" * 64, (10).to_bytes(8, "little") + b"not json!!", (2).to_bytes(8, "little") + b"[]"],
)
def test_garbage_bytes_raise_weights_mismatch(blob: bytes) -> None:
    with pytest.raises(WeightsMismatch):
        from_bytes(blob)


def test_foreign_or_truncated_safetensors_are_refused() -> None:
    foreign = st_save({"w": np.zeros(3, np.float32)})  # valid safetensors, not our format tag
    with pytest.raises(WeightsMismatch, match="format"):
        from_bytes(foreign)
    data = to_bytes({"w": np.arange(100, dtype=np.float32)})
    with pytest.raises(WeightsMismatch):
        from_bytes(data[:-8])
    with pytest.raises(ValueError, match="reserved"):
        to_bytes({"w": np.zeros(1)}, {"format": "pickle"})

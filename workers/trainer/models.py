"""Model definitions as pure functions over a flat ``{name: array}`` params dict.

Params are flat (``"dense_0.kernel"``, ``"conv_1.bias"``...) rather than nested
so they serialize directly to safetensors and a federated hub can average
them by name without knowing anything about the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from shared.model_spec import CNN_CHANNELS, CNN_DENSE, CNN_KERNEL, MODELS, image_side, pooled_side  # one definition of the shapes

Params = dict[str, jax.Array]  # init_params returns NumPy arrays (drawn on the host)


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")


def _he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(math.sqrt(2.0 / fan_in))).astype(np.float32)


def _dense(rng: np.random.Generator, name: str, fan_in: int, fan_out: int) -> Params:
    """He-normal kernel (suits relu; harmless for the linear output layer), zero bias."""
    return {f"{name}.kernel": _he_normal(rng, (fan_in, fan_out), fan_in), f"{name}.bias": np.zeros((fan_out,), np.float32)}


def _conv(rng: np.random.Generator, name: str, size: int, c_in: int, c_out: int) -> Params:
    """HWIO kernel, He-normal over the receptive field."""
    kernel = _he_normal(rng, (size, size, c_in, c_out), size * size * c_in)
    return {f"{name}.kernel": kernel, f"{name}.bias": np.zeros((c_out,), np.float32)}


def init_params(model: str, n_features: int, n_classes: int, hidden: tuple[int, ...], seed: int) -> Params:
    """Fresh params for `model`; deterministic in `seed` so every site can start identically.

    Drawn on the host with NumPy: in JAX each eager random op is its own XLA compile,
    which made initialisation the slowest part of a worker's start-up. Every layer has
    its own stream (seed, layer index).
    `hidden` is used by "mlp" only (logreg has no hidden layer, the cnn's shape is fixed).
    """
    _check_model(model)
    params: Params = {}
    if model == "cnn":
        side, c_in = image_side(n_features), 1
        for i, c_out in enumerate(CNN_CHANNELS):
            params |= _conv(np.random.default_rng([seed, i]), f"conv_{i}", CNN_KERNEL, c_in, c_out)
            c_in, side = c_out, pooled_side(side)
        sizes, first = [side * side * c_in, CNN_DENSE, n_classes], len(CNN_CHANNELS)
    else:
        sizes, first = [n_features, *(hidden if model == "mlp" else ()), n_classes], 0
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        params |= _dense(np.random.default_rng([seed, first + i]), f"dense_{i}", fan_in, fan_out)
    return params


def _n_layers(params: Mapping[str, jax.Array], prefix: str) -> int:
    return sum(1 for name in params if name.startswith(prefix) and name.endswith(".kernel"))


def _apply_dense_stack(params: Mapping[str, jax.Array], h: jax.Array) -> jax.Array:
    """dense_0 .. dense_{n-1}, relu between layers, raw logits out."""
    n = _n_layers(params, "dense_")
    for i in range(n):
        h = h @ params[f"dense_{i}.kernel"] + params[f"dense_{i}.bias"]
        if i < n - 1:
            h = jax.nn.relu(h)
    return h


def _max_pool_2x2(h: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")


def _apply_cnn(params: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    side = image_side(x.shape[-1])
    h = x.reshape(x.shape[0], side, side, 1)
    for i in range(_n_layers(params, "conv_")):
        h = jax.lax.conv_general_dilated(
            h, params[f"conv_{i}.kernel"], window_strides=(1, 1), padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        h = _max_pool_2x2(jax.nn.relu(h + params[f"conv_{i}.bias"]))
    return _apply_dense_stack(params, h.reshape(h.shape[0], -1))


def apply(model: str, params: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    """Logits [batch, n_classes] for x [batch, n_features] (float32 for every model)."""
    _check_model(model)
    if model == "cnn":
        return _apply_cnn(params, x)
    return _apply_dense_stack(params, x)


def param_count(params: Mapping[str, jax.Array]) -> int:
    """Total number of scalars, e.g. for logging and for sanity-checking a received model."""
    return sum(math.prod(p.shape) for p in params.values())

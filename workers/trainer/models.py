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

from shared.model_spec import MODELS, image_side, initial_params, param_spec  # one definition of the shapes and the start

Params = dict[str, jax.Array]  # init_params returns NumPy arrays (drawn on the host)


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")


def init_params(model: str, n_features: int, n_classes: int, hidden: tuple[int, ...], seed: int) -> Params:
    """Fresh params for `model`, exactly the hub's `initial_params` (shared/model_spec.py).
    `hidden` is used by "mlp" only (logreg has no hidden layer, the cnn's shape is fixed)."""
    _check_model(model)
    return initial_params(param_spec(model, n_features, n_classes, hidden), seed)


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

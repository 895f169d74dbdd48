"""The tensors each model has, and the model every node starts from, without JAX.

The hub checks every uploaded update against `param_spec`, and rebuilds round 1's
starting point with `initial_params` (the reference DP clips against); workers start
from the same `initial_params`, so the two cannot drift.
"""

from __future__ import annotations

import math

import numpy as np

MODELS = ("logreg", "mlp", "cnn")
# The FedAvg paper's CNN (McMahan et al. 2017): two 5x5 convs (32, 64 channels), each
# followed by 2x2 max pooling, a 512-unit dense layer, then the output layer.
CNN_CHANNELS = (32, 64)
CNN_KERNEL = 5
CNN_DENSE = 512

Spec = dict[str, tuple[tuple[int, ...], str]]


def image_side(n_features: int) -> int:
    """Side of the square single-channel image the cnn expects; ValueError if not square."""
    side = math.isqrt(n_features) if n_features > 0 else 0
    if side * side != n_features or side == 0:
        raise ValueError(f"cnn needs a square single-channel image, but n_features={n_features} is not a perfect square")
    return side


def pooled_side(side: int) -> int:
    """Side after one 2x2/stride-2 'SAME' max pool (ceil, as with 'SAME')."""
    return -(-side // 2)


def _dense(name: str, fan_in: int, fan_out: int) -> Spec:
    return {f"{name}.kernel": ((fan_in, fan_out), "float32"), f"{name}.bias": ((fan_out,), "float32")}


def param_spec(model: str, n_features: int, n_classes: int, hidden: tuple[int, ...]) -> Spec:
    """name -> (shape, dtype) of `model`'s parameters."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    if model == "cnn":
        side, c_in, spec = image_side(n_features), 1, {}
        for i, c_out in enumerate(CNN_CHANNELS):
            spec[f"conv_{i}.kernel"] = ((CNN_KERNEL, CNN_KERNEL, c_in, c_out), "float32")
            spec[f"conv_{i}.bias"] = ((c_out,), "float32")
            c_in, side = c_out, pooled_side(side)
        return spec | _dense("dense_0", side * side * c_in, CNN_DENSE) | _dense("dense_1", CNN_DENSE, n_classes)
    sizes = [n_features, *(hidden if model == "mlp" else ()), n_classes]
    spec = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        spec |= _dense(f"dense_{i}", fan_in, fan_out)
    return spec


def initial_params(spec: Spec, seed: int) -> dict[str, np.ndarray]:
    """The model every node starts round 1 from: deterministic in `seed`, so every site starts alike.

    He-normal kernels (they suit relu; harmless for the linear output layer), zero biases.
    Each layer draws from its own NumPy stream (seed, layer index), convolutions first. NumPy,
    not JAX: in JAX each eager random op is its own XLA compile, which made initialisation the
    slowest part of a worker's start-up.
    """
    convs = sum(1 for name in spec if name.startswith("conv_") and name.endswith(".kernel"))
    params: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in spec.items():
        layer, _, kind = name.partition(".")
        if kind == "bias":
            params[name] = np.zeros(shape, dtype)
            continue
        family, index = layer.rsplit("_", 1)
        stream = int(index) + (convs if family == "dense" else 0)
        draw = np.random.default_rng([seed, stream]).standard_normal(shape, dtype=np.float32)
        params[name] = (draw * np.float32(math.sqrt(2.0 / math.prod(shape[:-1])))).astype(dtype)
    return params

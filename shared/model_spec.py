"""The tensors each model has, without JAX: the hub checks every uploaded update against them.

workers/trainer/models.py builds the same names and shapes (a unit test pins that
they agree), so an update of the wrong model or shape is refused at the hub.
"""

from __future__ import annotations

import math

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

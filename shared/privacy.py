"""Client-level differential privacy at the hub: clip, average unweighted, add Gaussian noise, account.

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018), with every node in every round. Each node's change from the round's
reference model is clipped to L2 norm C, so adding or removing one node moves the sum of
changes by at most C; Gaussian noise of standard deviation z*C on that sum (z*C/m on the
mean of the round's m participants) makes each round a Gaussian mechanism with noise
multiplier z. The accountant composes those rounds with sampling rate 1 (no node is
sampled out), so the spent epsilon grows with every training round.

What it bounds: what anyone who sees the global models (the other nodes, whoever gets
the final model) can learn about any one node's data. Not what the hub sees: the hub
reads every raw update before it adds the noise. The per-node metrics the round
documents record (held-out accuracy and loss, training loss) are not noised either.

NumPy only, as shared/aggregation.py; dp-accounting is imported when a round is accounted.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shared.aggregation import Params, StreamingMean, clip_update

MAX_CLIP_NORM = 1e6  # far above any useful clip: a model's change in one round is a few units of L2 norm
MAX_NOISE_MULTIPLIER = 100.0  # z = 100 already drowns any update of a federation of 1000 nodes


class PrivacyConfig(BaseModel, frozen=True):
    """A federation's client-level DP: clip norm C, noise multiplier z, and the delta epsilon is reported at."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    clip_norm: float = Field(gt=0, le=MAX_CLIP_NORM, description="C: each node's change in a round is clipped to this L2 norm")
    noise_multiplier: float = Field(
        ge=0, le=MAX_NOISE_MULTIPLIER, description="z: the noise on the sum of changes has standard deviation z*C; 0 gives no guarantee"
    )
    delta: float = Field(default=1e-5, gt=0, lt=1, description="the delta of the reported (epsilon, delta)")


class PrivacySpent(BaseModel, frozen=True):
    """The (epsilon, delta) spent by a federation's released models so far, over every node."""

    model_config = ConfigDict(allow_inf_nan=False)

    rounds: int = Field(ge=0, description="training rounds released with noise, each with every node")
    epsilon: float | None = Field(default=None, ge=0, description="None: no finite bound (noise multiplier 0)")
    delta: float = Field(gt=0, lt=1)
    noise_std: float = Field(ge=0, description="per coordinate, on the mean of the last round's participants")


def noise_std(config: PrivacyConfig, participants: int) -> float:
    """The noise per coordinate of the mean of `participants` clipped changes: z*C/m."""
    if participants < 1:
        raise ValueError(f"a round needs at least one participant, got {participants}")
    return config.noise_multiplier * config.clip_norm / participants


def private_mean(updates: Iterable[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray], config: PrivacyConfig,
                 rng: np.random.Generator) -> tuple[Params, int]:
    """reference + the unweighted mean of each update's change clipped to C, + N(0, (z*C/m)^2) per coordinate; and m.

    Unweighted: an example count is the node's own claim, and weighting by it would let one
    node's share of the mean exceed C/m. Updates stream (one model of memory, as FedAvg).
    """
    mean = StreamingMean()
    mean.extend((clip_update(params, reference, config.clip_norm), 1.0) for params in updates)
    m = mean.count
    std = noise_std(config, m)
    noised = {name: (a + rng.normal(0.0, std, a.shape)).astype(a.dtype) for name, a in mean.result().items()}
    return noised, m


def secure_rng() -> np.random.Generator:
    """A generator seeded from the OS's secure source: no node can reproduce the noise (the federation seed is public)."""
    return np.random.default_rng(secrets.randbits(256))


def spent(config: PrivacyConfig, rounds: int, participants: int) -> PrivacySpent:
    """(epsilon, delta) after `rounds` Gaussian rounds of multiplier z, by dp-accounting's RDP accountant.

    RDP's conversion is an upper bound (for z=1, 10 rounds, delta=1e-5: 19.05, where the
    exact value is 17.8): what is reported is never less than what is spent.
    """
    import dp_accounting  # 0.9 s to import: only hubs of DP federations pay it
    from dp_accounting import rdp

    std = noise_std(config, participants)
    if config.noise_multiplier == 0:
        return PrivacySpent(rounds=rounds, epsilon=None, delta=config.delta, noise_std=std)
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(config.noise_multiplier), rounds)
    epsilon = accountant.get_epsilon(config.delta)
    return PrivacySpent(rounds=rounds, epsilon=epsilon if math.isfinite(epsilon) else None, delta=config.delta, noise_std=std)

"""shared.privacy: clipping and noise scale in closed form, the accountant against dp-accounting and the exact
Gaussian bound, the hub's rebuilt seed model against the workers' own initialisation, and what `fed show` prints."""

from __future__ import annotations

import io
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from pydantic import ValidationError
from rich.console import Console

from fedpipe import fed_views
from shared.aggregation import clip_update, update_norm
from shared.model_spec import initial_params, param_spec
from shared.privacy import PrivacyConfig, PrivacySpent, noise_std, private_mean, secure_rng, spent
from workers.trainer import models

pytestmark = pytest.mark.unit


def _params(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {"w": (rng.standard_normal((30, 20)) * scale).astype(np.float32), "b": (rng.standard_normal(20) * scale).astype(np.float32)}


def test_without_noise_it_is_the_unweighted_mean_of_the_clipped_changes():
    rng = np.random.default_rng(3)
    reference = _params(rng, 1.0)
    updates = [{k: v + d for k, v, d in zip(reference, reference.values(), _params(rng, s).values())} for s in (0.01, 1.0, 50.0)]
    config = PrivacyConfig(clip_norm=2.0, noise_multiplier=0.0)
    got, m = private_mean(iter(updates), reference, config, secure_rng())
    clipped = [clip_update(u, reference, 2.0) for u in updates]
    assert m == 3
    assert [round(update_norm(c, reference), 4) for c in clipped][1:] == [2.0, 2.0]  # the two big ones clipped, the small one kept
    for name in reference:
        want = np.mean([c[name].astype(np.float64) for c in clipped], axis=0)
        np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-6)
        assert got[name].dtype == np.float32


def test_one_node_moves_the_mean_by_at_most_c_over_m_whatever_it_sends():
    reference = {"w": np.zeros(1000, np.float32)}
    honest = [{"w": np.full(1000, 0.001, np.float32)} for _ in range(3)]
    hostile = {"w": np.full(1000, 1e4, np.float32)}
    config = PrivacyConfig(clip_norm=1.0, noise_multiplier=0.0)
    without, _ = private_mean(iter(honest), reference, config, secure_rng())
    with_it, m = private_mean(iter([*honest, hostile]), reference, config, secure_rng())
    # Its clipped change is 1.0 in norm; the others' share shrinks from 1/3 to 1/4 each.
    assert m == 4
    assert update_norm(with_it, {"w": without["w"] * 3 / 4}) == pytest.approx(1.0 / 4, rel=1e-5)


def test_the_noise_per_coordinate_has_standard_deviation_z_c_over_m():
    reference = {"a": np.zeros((400, 500), np.float32), "b": np.zeros(1000, np.float32)}
    config = PrivacyConfig(clip_norm=2.0, noise_multiplier=1.5)
    got, m = private_mean(iter([reference] * 4), reference, config, secure_rng())  # zero changes: all that is left is the noise
    flat = np.concatenate([a.ravel().astype(np.float64) for a in got.values()])
    assert m == 4 and noise_std(config, 4) == 0.75
    assert flat.std() == pytest.approx(0.75, rel=0.01)  # 201,000 draws: the sample std is within 0.2% at 3 sigma
    assert abs(flat.mean()) < 0.01


def test_the_noise_comes_from_a_fresh_secure_seed_each_time():
    reference = {"w": np.zeros(64, np.float32)}
    config = PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0)
    first, _ = private_mean(iter([reference]), reference, config, secure_rng())
    second, _ = private_mean(iter([reference]), reference, config, secure_rng())
    assert not np.array_equal(first["w"], second["w"])


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The tight epsilon of mu-GDP (Dong, Roth, Su 2019), which T Gaussian rounds of multiplier z are, with mu = sqrt(T)/z."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731

    def delta_at(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


def test_reported_epsilon_is_dp_accountings_and_sits_between_the_exact_and_the_classic_rdp_bound():
    config = PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    got = spent(config, rounds=10, participants=4)
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.0), 10)
    assert got == PrivacySpent(rounds=10, epsilon=accountant.get_epsilon(1e-5), delta=1e-5, noise_std=0.25)
    classic = 10 / 2 + math.sqrt(2 * 10 * math.log(1e5))  # min over orders a of 10a/2 + log(1/delta)/(a-1)
    exact = _exact_gaussian_epsilon(math.sqrt(10), 1e-5)
    assert exact == pytest.approx(17.8, abs=0.1)
    assert exact < got.epsilon < classic
    assert got.epsilon == pytest.approx(19.05, abs=0.01)


def test_epsilon_grows_with_rounds_falls_with_noise_and_is_unbounded_without_noise():
    base = PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0)
    eps = [spent(base, r, 2).epsilon for r in (1, 2, 10)]
    assert eps == sorted(eps) and len(set(eps)) == 3
    assert spent(base.model_copy(update={"noise_multiplier": 4.0}), 10, 2).epsilon < eps[-1]
    assert spent(base.model_copy(update={"noise_multiplier": 0.0}), 10, 2).epsilon is None


@pytest.mark.parametrize(
    "bad",
    [{"clip_norm": 0.0, "noise_multiplier": 1.0}, {"clip_norm": float("inf"), "noise_multiplier": 1.0},
     {"clip_norm": 1e7, "noise_multiplier": 1.0}, {"clip_norm": 1.0, "noise_multiplier": -0.1},
     {"clip_norm": 1.0, "noise_multiplier": 101.0}, {"clip_norm": 1.0, "noise_multiplier": float("nan")},
     {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 0.0}, {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.0},
     {"clip_norm": 1.0, "noise_multiplier": 1.0, "epsilon": 3.0}],
)
def test_every_setting_is_finite_and_bounded(bad):
    with pytest.raises(ValidationError):
        PrivacyConfig.model_validate(bad)


@pytest.mark.parametrize(("model", "n_features", "hidden"), [("logreg", 5, ()), ("mlp", 64, (32, 16)), ("cnn", 64, ())])
def test_the_hub_and_every_node_start_from_one_seeded_he_normal_model(model, n_features, hidden):
    spec = param_spec(model, n_features, 10, hidden)
    start = initial_params(spec, seed=7)

    assert {k: (v.shape, v.dtype.name) for k, v in start.items()} == {k: (tuple(s), d) for k, (s, d) in spec.items()}
    assert all(np.array_equal(v, initial_params(spec, seed=7)[k]) for k, v in start.items())  # what a worker builds too
    kernels = [k for k in spec if k.endswith(".kernel")]
    assert not np.array_equal(start[kernels[0]], initial_params(spec, seed=8)[kernels[0]])
    assert all(not start[k].any() for k in spec if k.endswith(".bias"))
    for k in kernels:
        fan_in = int(np.prod(start[k].shape[:-1]))
        if start[k].size >= 1000:  # enough draws to see the He scale
            assert start[k].std() == pytest.approx(np.sqrt(2.0 / fan_in), rel=0.1), k
    np.testing.assert_array_equal(models.init_params(model, n_features, 10, hidden, 7)[kernels[-1]], start[kernels[-1]])


def _fed_doc(privacy: dict | None, spent_doc: dict | None) -> dict:
    config = {"id": "f", "strategy": "fedavg", "nodes": [{"name": "us"}, {"name": "eu"}], "privacy": privacy}
    return {"config": config, "status": "running", "round": 3, "privacy": spent_doc}


def test_fed_show_says_what_the_released_models_spent():
    dp = {"clip_norm": 1.0, "noise_multiplier": 1.1, "delta": 1e-5}
    spent_doc = spent(PrivacyConfig.model_validate(dp), 2, 2).model_dump()
    assert fed_views.privacy_line(_fed_doc(None, None)) is None
    assert fed_views.privacy_line(_fed_doc(dp, None)) == (
        "client-level DP (clip 1, noise multiplier 1.1): nothing released yet; every node counted in every round (RDP accountant, an upper bound)")
    line = fed_views.privacy_line(_fed_doc(dp, spent_doc))
    assert line.startswith(f"client-level DP (clip 1, noise multiplier 1.1): ε {spent_doc['epsilon']:.2f} at δ 1e-05 after 2 round(s)")
    assert fed_views.epsilon_text({"epsilon": None, "delta": 1e-5}) == "ε ∞ (no noise) at δ 1e-05"


def test_the_rounds_table_has_a_privacy_column_only_for_dp_federations():
    dp = {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}
    rd = {"round": 1, "kind": "train", "status": "closed", "updates": {}, "reason": "all 2 nodes reported",
          "privacy": {"epsilon": 7.891, "delta": 1e-5, "rounds": 1, "noise_std": 0.5}}
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(fed_views.rounds_table(_fed_doc(dp, rd["privacy"]), [rd]))
    assert "privacy spent" in out.getvalue() and "ε 7.89 at δ 1e-05" in out.getvalue()
    plain = io.StringIO()
    Console(file=plain, width=200, color_system=None).print(fed_views.rounds_table(_fed_doc(None, None), [rd]))
    assert "privacy spent" not in plain.getvalue() and "ε" not in plain.getvalue()

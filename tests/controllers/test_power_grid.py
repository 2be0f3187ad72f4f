"""The cached integer grid of the power model gives what direct evaluation and bisection give."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rackguard.controllers.power import OnlinePowerModel


def _bisect(model: OnlinePowerModel, p: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The former per-call bisection over conservative_power_w (the reference)."""
    low = np.full(model.n_gpus, lo, dtype=np.int64)
    high = np.full(model.n_gpus, hi, dtype=np.int64)
    ok_hi = model.conservative_power_w(high.astype(float)) <= p
    for _ in range(max(1, math.ceil(math.log2(hi - lo + 1)) + 1)):
        mid = (low + high + 1) // 2
        ok = model.conservative_power_w(mid.astype(float)) <= p
        low = np.where(ok, mid, low)
        high = np.where(ok, high, mid - 1)
    return np.where(ok_hi, hi, low)


@pytest.mark.parametrize("n_obs", [0, 5, 40, 400])
@pytest.mark.parametrize(("lo", "hi"), [(0, 256), (1, 256), (8, 2048), (200, 256)])
def test_grid_matches_bisection_and_direct(n_obs: int, lo: int, hi: int) -> None:
    rng = np.random.default_rng(n_obs + hi)
    n = 8
    model = OnlinePowerModel(n, 700.0)
    for _ in range(n_obs):
        conc = rng.uniform(0, 300, n) * (np.arange(n) + 1) / n
        power = 120 + 580 * (1 - np.exp(-conc / 48)) + rng.normal(0, 10, n)
        model.update(conc, power, rng.random(n) > 0.1)
    for _ in range(50):
        p = rng.uniform(-10, 750, n)
        p[rng.random(n) < 0.1] = 700.0
        assert np.array_equal(model.max_concurrency(p, lo, hi), _bisect(model, p, lo, hi))
        caps = rng.integers(0, hi + 1, n)
        assert np.array_equal(model.power_at_caps_w(caps, hi), model.conservative_power_w(caps.astype(float)))

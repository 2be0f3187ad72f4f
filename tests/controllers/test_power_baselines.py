"""Online power model and baselines (the scenario harness and bench CLI: tests/bench/test_harness.py)."""

from __future__ import annotations

import numpy as np
import pytest

from rackguard.controllers.api import CoolantObs, GpuObs, Limits, Observation
from rackguard.controllers.baselines import PidController, ThresholdController
from rackguard.controllers.power import CONSERVATIVE_CURVE, OnlinePowerModel, PowerCurve


def test_power_model_learns_a_saturating_curve() -> None:
    truth = PowerCurve(130.0, 200.0, 40.0)  # decode-like: 130 W → 330 W
    model = OnlinePowerModel(1, 700.0)
    rng = np.random.default_rng(0)
    for _ in range(400):
        c = float(rng.uniform(0, 256))
        p = float(truth.power_w(c)) + rng.normal(0, 5)
        model.update(np.array([c]), np.array([p]), np.array([True]))
    grid = np.array([[8.0, 32.0, 128.0, 256.0]])
    est = model.conservative_power_w(grid)[0]
    np.testing.assert_allclose(est, truth.power_w(grid[0]), atol=20.0)
    assert np.all(np.diff(est) >= 0)


def test_power_model_is_conservative_beyond_what_it_has_seen() -> None:
    model = OnlinePowerModel(1, 700.0)
    assert model.conservative_power_w(np.array([16.0]))[0] >= CONSERVATIVE_CURVE.power_w(16.0) - 1e-9
    for _ in range(50):
        model.update(np.array([10.0]), np.array([200.0]), np.array([True]))
    assert model.conservative_power_w(np.array([200.0]))[0] == pytest.approx(700.0)
    assert model.conservative_power_w(np.array([10.0]))[0] < 250.0
    cap = model.max_concurrency(np.array([300.0]), 1, 256)[0]
    assert 10 <= cap <= 10 * model.explore_factor + model.explore_step


def _obs(t: float, temp: float, power: float = 300.0) -> Observation:
    return Observation(t, (GpuObs(temp, 60.0, power, 50.0),), CoolantObs(30.0, 12.0))


def test_threshold_trips_and_restores_with_hysteresis() -> None:
    lim = Limits()
    ctl = ThresholdController(lim, 1, t_hi_c=80.0, t_lo_c=75.0)
    assert ctl.step(_obs(0, 70.0)).caps == (lim.max_cap,)
    assert ctl.step(_obs(1, 80.0)).caps == (lim.min_cap,)
    assert ctl.step(_obs(2, 77.0)).caps == (lim.min_cap,)  # between: hold
    assert ctl.step(_obs(3, 74.0)).caps == (lim.max_cap,)


def test_pid_lowers_cap_when_hot_and_raises_when_cool() -> None:
    lim = Limits()
    ctl = PidController(lim, 1, setpoint_c=80.0)
    caps = [ctl.step(_obs(k, 70.0)).caps[0] for k in range(10)]
    assert caps[-1] > caps[0]
    hot = [ctl.step(_obs(10 + k, 86.0)).caps[0] for k in range(10)]
    assert hot[-1] < caps[-1]

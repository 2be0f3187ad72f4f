"""MPC: integer caps in range, zero time over limit on the scenarios, disturbance rejection."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rackguard.bench.harness import load_scenario, run, scenario_files
from rackguard.controllers.api import CoolantObs, GpuObs, Limits, NodeShare, Observation
from rackguard.controllers.mpc import MpcController, MpcSettings
from rackguard.controllers.power import PowerCurve, RequestTiming
from rackguard.controllers.safety import SafetyLayer
from rackguard.controllers.thermal import DEFAULT_PARAMS
from rackguard.sim.plant import Plant, PlantConfig

SCENARIOS = scenario_files()


def test_scenarios_shipped() -> None:
    assert len(SCENARIOS) >= 6


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_mpc_zero_seconds_over_limit(path: Path) -> None:
    scn = load_scenario(path)
    res = run(scn, "mpc")
    assert res.seconds_over_limit == 0.0
    assert res.max_temp_c <= scn.limits.gpu_temp_max_c
    assert res.served > 0.0
    if scn.leaks:
        assert res.leak_to_cap_s is not None and res.leak_to_cap_s < 0.5


@pytest.mark.parametrize("seed", [101, 104])
@pytest.mark.parametrize("name", ["model_mismatch", "steady_full_load"])
def test_mpc_zero_seconds_over_limit_on_unseen_noise(name: str, seed: int) -> None:
    """The 2 K margin is not tuned to the shipped noise draw: other seeds stay under the limit too."""
    path = next(p for p in SCENARIOS if p.stem == name)
    scn = load_scenario(path)
    res = run(replace(scn, seed=seed), "mpc")
    assert res.seconds_over_limit == 0.0
    assert res.max_temp_c <= scn.limits.gpu_temp_max_c


gpu_st = st.builds(
    GpuObs,
    gpu_temp_c=st.one_of(st.none(), st.floats(20, 100)),
    mem_temp_c=st.one_of(st.none(), st.floats(20, 100)),
    power_w=st.one_of(st.none(), st.floats(0, 750)),
    concurrency=st.floats(0, 300),
    lost=st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.lists(gpu_st, min_size=4, max_size=4),
            st.one_of(st.none(), st.floats(15, 50)),
            st.one_of(st.none(), st.floats(0, 20)),
            st.booleans(),
            st.floats(0.01, 5.0),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_caps_are_integers_in_range(
    steps: list[tuple[list[GpuObs], float | None, float | None, bool, float]],
) -> None:
    lim = Limits(min_cap=2, max_cap=128, node_power_budget_w=2000.0)
    mpc = MpcController(lim, 4)
    t = 0.0
    for gpus, supply, flow, stale, dt in steps:
        t += dt
        d = mpc.step(Observation(t, tuple(gpus), CoolantObs(supply, flow, stale)))
        assert len(d.caps) == 4
        assert all(isinstance(c, int) and lim.min_cap <= c <= lim.max_cap for c in d.caps)
        assert d.reason == "mpc"


def _closed_loop(resistance_factor: float, seconds: int) -> tuple[MpcController, list[float], list[int]]:
    """MPC (nominal model) on a plant `resistance_factor` hotter, 42 °C water, full load."""
    lim = Limits()
    truth = DEFAULT_PARAMS.scaled(1.35 * resistance_factor)
    cfg = PlantConfig(n_gpus=2, thermal=truth, power=PowerCurve(120.0, 580.0, 48.0))
    plant = Plant(cfg, supply_c=42.0, seed=11)
    mpc = MpcController(lim, 2, DEFAULT_PARAMS.scaled(1.35))
    safety = SafetyLayer(lim)
    die, caps = [], []
    for k in range(seconds):
        obs = plant.observe(float(k))
        d = safety.apply(obs, mpc.step(obs))
        plant.advance(1.0, np.array(d.caps, float), np.full(2, 256.0), 42.0, 12.0, lim)
        die.append(float(np.max(plant.die_c())))
        caps.append(d.caps[0])
    return mpc, die, caps


def test_disturbance_rejection_hotter_plant_converges_without_drift() -> None:
    lim = Limits()
    mpc, die, caps = _closed_loop(1.3, 400)
    target = lim.gpu_temp_max_c - lim.margin_c
    assert max(die) <= lim.gpu_temp_max_c
    # Identified: the gain estimate moved towards the true 1.3 from the nominal 1.0.
    assert np.all(mpc.die.gain > 1.15)
    # Converged: the last 100 s sit just under the target, with no trend (no drift).
    tail = np.array(die[-100:])
    assert target - 3.0 <= tail.mean() <= target + 0.5
    slope_k_per_s = np.polyfit(np.arange(100), tail, 1)[0]
    assert abs(slope_k_per_s) < 0.01
    # And it still serves: the cap is not stuck at the floor.
    assert np.mean(caps[-100:]) > 20


def test_cooler_plant_is_used_not_wasted() -> None:
    """A plant cooler than the model: the MPC learns it and serves more than with a hot plant."""
    _, die_cool, caps_cool = _closed_loop(0.85, 300)
    _, _, caps_hot = _closed_loop(1.3, 300)
    assert np.mean(caps_cool[-100:]) > np.mean(caps_hot[-100:])
    assert max(die_cool) <= Limits().gpu_temp_max_c


def test_unidentified_power_curve_is_conservative() -> None:
    """Before any data the MPC assumes hot power; with data it allows more."""
    lim = Limits()
    mpc = MpcController(lim, 1)
    hot = Observation(0.0, (GpuObs(75.0, 70.0, 300.0, 0.0),), CoolantObs(45.0, 12.0))
    first = mpc.step(hot).caps[0]
    t = 0.0
    for k in range(60):
        t += 1.0
        c = float(5 + k)
        mpc.step(Observation(t, (GpuObs(75.0, 70.0, 120.0 + 1.0 * c, c),), CoolantObs(45.0, 12.0)))
    later = mpc.step(Observation(t + 1.0, (GpuObs(75.0, 70.0, 185.0, 65.0),), CoolantObs(45.0, 12.0))).caps[0]
    assert later > first


def test_coolant_flow_constraint_binds() -> None:
    """Low flow: caps keep conservative node power within what the flow carries at design ΔT."""
    lim = Limits()
    mpc = MpcController(lim, 8)
    flow = 6.0
    t = 0.0
    curve = PowerCurve(120.0, 580.0, 48.0)
    for k in range(80):
        t += 1.0
        c = float(min(4 * k, 256))
        p = float(curve.power_w(c))
        die = 20.0 + DEFAULT_PARAMS.steady_rise_k(p, flow)[0]  # consistent, cool die
        gpus = tuple(GpuObs(die, die, p, c) for _ in range(8))
        d = mpc.step(Observation(t, gpus, CoolantObs(20.0, flow)))
    assert d.binding == "coolant_flow"
    p_caps = mpc.power_model.conservative_power_w(np.array(d.caps, float))
    assert float(np.sum(p_caps)) <= lim.coolant_heat_max_w(flow) + 1e-6


@pytest.mark.parametrize("split", ["even", "packed"])
def test_node_budget_split_policy(split: str) -> None:
    """``even`` gives every GPU the same cap; ``packed`` fills some GPUs (more per watt, slower requests)."""
    lim = Limits(node_power_budget_w=4200.0)
    mpc = MpcController(lim, 8, settings=MpcSettings(split=split))  # type: ignore[arg-type]
    curve = PowerCurve(120.0, 580.0, 48.0)
    t = 0.0
    caps = [256] * 8  # in flight follows the caps (the gate admits up to the cap)
    for k in range(120):
        t += 1.0
        conc = [float(min(4 * k, cap)) for cap in caps]
        gpus = tuple(GpuObs(40.0, 40.0, float(curve.power_w(c)), c) for c in conc)
        d = mpc.step(Observation(t, gpus, CoolantObs(30.0, 12.0)))
        caps = list(d.caps)
    assert d.binding == "power"
    p_caps = mpc.power_model.conservative_power_w(np.array(d.caps, float))
    assert float(np.sum(p_caps)) <= 4200.0
    if split == "packed":
        # An equal split of the same budget would give each GPU well under 100.
        assert max(d.caps) == lim.max_cap and sum(d.caps) > 8 * 100
    else:
        assert max(d.caps) - min(d.caps) <= 1 and 30 < min(d.caps) < 100


def test_slow_hbm_does_not_bind_far_from_its_limit() -> None:
    """HBM much slower than the model (τ 20 s vs 1 s, like the old demo simulator): no mem_temp cut.

    Regression: the gain tracker clipped the gain at gain_min but kept the offset fitted to
    the unclipped (negative) gain, so the HBM estimate ran ~40 K above the reading and the
    MPC cut a cold node with binding = mem_temp.
    """
    from dataclasses import replace

    lim = Limits()
    truth = replace(DEFAULT_PARAMS, r_mem_k_per_w=0.035, tau_mem_s=20.0, mem_offset_c=3.0)
    cfg = PlantConfig(n_gpus=8, thermal=truth, power=PowerCurve(70.0, 630.0, 24.0))
    plant = Plant(cfg, 32.0, seed=1)
    mpc = MpcController(lim, 8)
    safety = SafetyLayer(lim)
    caps = np.full(8, float(lim.safe_cap))
    for k in range(60):
        obs = plant.observe(0.5 * k)
        d = safety.apply(obs, mpc.step(obs))
        hbm_max = max(g.mem_temp_c or 0.0 for g in obs.gpus)
        assert hbm_max < 70.0
        assert d.binding != "mem_temp", (k, d, mpc.mem.offset_k)
        # The HBM estimate stays near the reading (it was 40 K off).
        mem_rise = mpc.mem.estimate_k(mpc._x[:, 2])
        meas_rise = np.array([g.mem_temp_c or 0.0 for g in obs.gpus]) - 32.0 - mpc.model.mem_offset_c
        assert np.all(np.abs(mem_rise - meas_rise) < 6.0)
        caps = np.array(d.caps, dtype=float)
        plant.advance(0.5, caps, np.full(8, 256.0), 32.0, 12.0)
    assert d.total == 8 * lim.max_cap


def test_gain_clip_keeps_the_estimate() -> None:
    from rackguard.controllers.ident import GainOffsetTracker

    tr = GainOffsetTracker(1)
    r = np.array([20.0])
    for _ in range(30):
        tr.update(r, np.array([2.0]), np.array([True]), 1.0)  # wants gain ≈ 0.1 < gain_min
    assert tr.gain[0] == tr.gain_min
    assert abs(float(tr.estimate_k(r)[0]) - 2.0) < 1.0


def test_mpc_respects_a_lowered_max_cap() -> None:
    """A config reload may lower max_cap: the held caps must follow at once."""
    from rackguard.controllers.api import CoolantObs, GpuObs, Limits, Observation
    from rackguard.controllers.mpc import MpcController

    mpc = MpcController(Limits(), 2)
    caps = (1, 1)
    for k in range(60):
        gpus = tuple(GpuObs(45.0, 45.0, 150.0 + c, float(c)) for c in caps)
        caps = mpc.step(Observation(float(k), gpus, CoolantObs(30.0, 12.0))).caps
    assert max(caps) > 16
    mpc.limits = Limits(max_cap=16)
    gpus = tuple(GpuObs(45.0, 45.0, 300.0, float(c)) for c in caps)
    assert max(mpc.step(Observation(60.0, gpus, CoolantObs(30.0, 12.0))).caps) <= 16


def test_rack_share_tightens_the_node_and_never_loosens_it() -> None:
    """A rack share below the node budget binds; one above it changes nothing."""
    lim = Limits(node_power_budget_w=2400.0)
    cfg = PlantConfig(n_gpus=4, thermal=DEFAULT_PARAMS, power=PowerCurve(120.0, 580.0, 48.0))

    def node_power(share: NodeShare | None) -> tuple[float, str]:
        plant = Plant(cfg, supply_c=30.0, seed=3)
        mpc = MpcController(lim, 4)
        binding = ""
        for k in range(90):
            base = plant.observe(float(k))
            obs = replace(base, share=share)
            d = mpc.step(obs)
            binding = d.binding
            plant.advance(1.0, np.array(d.caps, float), np.full(4, 256.0), 30.0, 12.0, lim)
        return plant_power(plant), binding

    def plant_power(plant: Plant) -> float:
        return sum(g.power_w or 0.0 for g in plant.observe(0.0).gpus)

    p_none, b_none = node_power(None)
    p_loose, _ = node_power(NodeShare(power_w=10_000.0, coolant_heat_w=10_000.0))
    p_tight, b_tight = node_power(NodeShare(power_w=1200.0, coolant_heat_w=10_000.0))
    _, b_heat = node_power(NodeShare(power_w=10_000.0, coolant_heat_w=1000.0))
    assert b_none == "power" and b_tight == "rack_power" and b_heat == "rack_coolant"
    assert abs(p_loose - p_none) < 150.0
    assert p_tight <= 1200.0 * 1.1 < p_none


def _run_node(
    lim: Limits,
    *,
    steps: int,
    flow_lpm: object = 12.0,
    offered: float = 256.0,
    share: NodeShare | None = None,
    n: int = 4,
) -> tuple[list[int], list[float], list[float], Plant]:
    """Run the MPC (no safety layer) against the plant; totals of caps, node power and heat per step."""
    cfg = PlantConfig(n_gpus=n, thermal=DEFAULT_PARAMS.scaled(1.35), power=PowerCurve(120.0, 580.0, 48.0))
    plant = Plant(cfg, supply_c=32.0, seed=5)
    mpc = MpcController(lim, n, cfg.thermal)
    caps_t, power_t, heat_t = [], [], []
    for k in range(steps):
        t = float(k)
        flow = flow_lpm(t) if callable(flow_lpm) else float(flow_lpm)  # type: ignore[arg-type]
        obs = plant.observe(t)
        obs = replace(obs, coolant=replace(obs.coolant, flow_lpm=round(flow, 2)), share=share)
        d = mpc.step(obs)
        e0 = float(np.sum(plant.energy_j))
        plant.advance(1.0, np.array(d.caps, float), np.full(n, offered), 32.0, flow, lim, share)
        caps_t.append(d.total)
        power_t.append(float(np.sum(plant.energy_j)) - e0)
        heat_t.append(plant.coolant_heat_w())
    return caps_t, power_t, heat_t, plant


def test_over_the_limit_admissions_stop_in_proportion_not_at_min_cap() -> None:
    """A budget cut below the power still draining: caps go to what the new budget holds, never min_cap."""
    lim = Limits(node_power_budget_w=2600.0)
    mpc = MpcController(lim, 4)
    curve = PowerCurve(120.0, 580.0, 48.0)
    t, caps = 0.0, [64] * 4
    for _ in range(60):  # identify the curve over a range of concurrencies
        t += 1.0
        conc = [float(c) for c in caps]
        gpus = tuple(GpuObs(50.0, 50.0, float(curve.power_w(c)), c) for c in conc)
        caps = list(mpc.step(Observation(t, gpus, CoolantObs(30.0, 12.0))).caps)
    # 200 in flight per GPU draw ~2.8 kW: above a new 1.6 kW budget however the split goes.
    mpc.limits = Limits(node_power_budget_w=1600.0)
    gpus = tuple(GpuObs(50.0, 50.0, float(curve.power_w(200.0)), 200.0) for _ in range(4))
    d = mpc.step(Observation(t + 1.0, gpus, CoolantObs(30.0, 12.0)))
    assert d.binding == "power"
    assert min(d.caps) > 4 * lim.min_cap, d.caps  # not min_cap
    assert max(d.caps) - min(d.caps) <= 1  # in proportion: an even share
    p_caps = mpc.power_model.conservative_power_w(np.array(d.caps, float))
    assert float(np.sum(p_caps)) <= 1600.0  # what they may hold once drained fits


def test_heat_into_the_coolant_stays_under_what_the_flow_carries_as_flow_swings() -> None:
    """Flow 100 % ↔ 40 %: the plates' stored heat is counted, so the heat limit is never crossed."""
    lim = Limits()

    def flow(t: float) -> float:
        return 8.4 + 3.6 * np.cos(2 * np.pi * max(t - 40.0, 0.0) / 60.0)

    _, power, heat, _ = _run_node(lim, steps=220, flow_lpm=flow, n=8)
    limit = [lim.coolant_heat_max_w(flow(float(k))) for k in range(220)]
    # Without an SLO, 256 in flight per GPU drain for 15 s after a cut: within 1 % here, and
    # 0 s over in the shipped flow_swing scenario (test_mpc_zero_seconds_over_limit).
    assert all(h <= 1.01 * q for h, q in zip(heat, limit, strict=True))
    # And the node still works when the flow is high (not parked at min_cap all along).
    assert max(power[40:]) > 0.6 * lim.coolant_heat_max_w(12.0)


def test_tpot_slo_caps_concurrency() -> None:
    """No cap exceeds the concurrency whose time per output token meets the SLO."""
    lim = Limits(tpot_slo_s=0.05)
    c_slo = RequestTiming().max_concurrency_for_slo(0.05)
    assert 100 < c_slo < 110
    caps, _, _, _ = _run_node(lim, steps=40, offered=256.0)
    mpc = MpcController(lim, 4)
    gpus = tuple(GpuObs(40.0, 40.0, 300.0, 10.0) for _ in range(4))
    assert max(mpc.step(Observation(1.0, gpus, CoolantObs(30.0, 12.0))).caps) <= c_slo
    assert max(caps) <= 4 * int(c_slo)


def test_node_power_ramp_limit() -> None:
    """With a ramp limit, node power rises at most that fast per step (plus the power noise)."""
    ramp = 150.0
    lim = Limits(node_power_ramp_w_per_s=ramp)
    _, power, _, _ = _run_node(lim, steps=60, n=4)
    _, power_free, _, _ = _run_node(Limits(), steps=60, n=4)
    idle_w = 4 * 120.0  # the plant starts idle
    rises = np.diff([idle_w, *power])
    assert float(np.max(rises)) <= ramp + 60.0  # 4 GPUs × 10 W AR(1) noise, measured over 1 s
    assert float(np.max(np.diff([idle_w, *power_free]))) > 2 * ramp  # unlimited, it jumps


@pytest.mark.parametrize(("name", "max_reversals"), [("hbm_binds", 1), ("budget_cut", 1)])
def test_mpc_caps_do_not_reverse_on_noise(name: str, max_reversals: int) -> None:
    """Whole-degree HBM readings at a flat power curve (hbm_binds) and the noise of a node
    limit's split (budget_cut) do not make the caps go down and up again (#13)."""
    scn = load_scenario(next(p for p in SCENARIOS if p.stem == name)).with_duration(150.0)
    res = run(scn, "mpc")
    assert res.seconds_over_limit == 0.0
    assert res.smoothness()["cap_reversals_per_min"] * 150.0 / 60.0 <= max_reversals + 1e-9


def test_mpc_node_power_falls_no_further_than_needed() -> None:
    """A falling flow anticipated: node power falls in a step by at most what the heat limit
    needs plus 10 % of it (flow_swing's first minimum, #13)."""
    scn = load_scenario(next(p for p in SCENARIOS if p.stem == "flow_swing")).with_duration(150.0)
    res = run(scn, "mpc")
    assert res.seconds_over_limit == 0.0
    assert res.smoothness()["max_drop_beyond_need_frac"] <= 0.1

"""Scenario harness: runs controllers against the true-parameter plant and scores them.

A scenario (TOML, see ``bench/scenarios/``) gives the plant, the offered load, coolant
supply temperature and flow schedules, leak events, stale-sensor intervals and limits.
Every controller's decision goes through the :class:`~rackguard.controllers.safety.SafetyLayer`.
Leak events are delivered between ticks after ``leak_delay_s`` (the agent applies
safety immediately on a leak message).

The oracle is a clairvoyant controller: it reads the true plant state, knows the future
load, supply and flow, has no measurement noise and no model error, and each tick holds
for 30 s the allocation that serves most while its noise-free future keeps the same
constraints the MPC is given (die ≤ max − margin, HBM ≤ mem max − margin, node power ≤
what the flow carries and ≤ budget less 3σ of the node's 1 s power noise, which it
cannot foresee). Allocations: one common cap, or k GPUs at the hottest GPU's thermal cap,
one at a remainder and the rest at min_cap (with a concave power curve this serves more
per watt under a node limit). It goes through the same safety layer. It is a
receding-horizon optimum over caps held for 30 s, not a global one: a controller that
changes caps every tick (duty cycling on a concave power curve) can exceed it.
"""

from __future__ import annotations

import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rackguard.controllers.api import Controller, Decision, Limits, Observation
from rackguard.controllers.baselines import PidController, ThresholdController
from rackguard.controllers.mpc import MpcController, MpcSettings
from rackguard.controllers.power import PowerCurve, RequestTiming
from rackguard.controllers.safety import SafetyLayer
from rackguard.controllers.thermal import DEFAULT_PARAMS, ThermalParams
from rackguard.sim.plant import Plant, PlantConfig, predict_max

FloatArray = NDArray[np.float64]

CONTROLLERS = ("mpc", "pid", "threshold")
SCENARIO_DIR = Path(__file__).parent / "scenarios"  # the shipped scenarios (package data)

# Baseline tuning: the most aggressive settings with 0 s over limit on the shipped scenarios,
# from a grid sweep on the plant with request draining, through the same safety layer as
# the MPC (margin 2 K: trips at 87 °C) (BENCHMARKS.md, "## Controllers"). Temperature
# targets were swept up to 86 °C; every setting above these crosses the 87 °C limit. The
# threshold policy exceeds the node power budget in budget_stale at every setting swept
# (bang-bang between min and max cap cannot hold a 1 s average under a budget); its tuning
# is the best on the rest.
THRESHOLD_TUNING: dict[str, float] = {
    "t_hi_c": 84.0,
    "t_lo_c": 83.0,
    "node_hi_frac": 1.0,
    "node_lo_frac": 0.9,
}
PID_TUNING: dict[str, float] = {
    "setpoint_c": 83.0,
    "kp_per_k": 2.0,
    "ki_per_k_s": 5.0,
    "kd_s_per_k": 0.0,
    "node_frac": 0.9,
    "node_ki_per_w_s": 0.02,
}


class ScenarioError(ValueError):
    """A scenario file is invalid."""


@dataclass(frozen=True, slots=True)
class Schedule:
    """A piecewise-linear (or step) function of time from [t_s, value] points."""

    t_s: tuple[float, ...]
    values: tuple[float, ...]
    step: bool = False

    def at(self, t_s: float) -> float:
        """Value at a time (held constant outside the points)."""
        if self.step:
            i = int(np.searchsorted(self.t_s, t_s, side="right")) - 1
            return self.values[max(i, 0)]
        return float(np.interp(t_s, self.t_s, self.values))

    @staticmethod
    def constant(value: float) -> Schedule:
        """A constant schedule."""
        return Schedule((0.0,), (float(value),))


@dataclass(frozen=True, slots=True)
class SquareLoad:
    """Bursty load: ``high`` for ``on_s`` of every ``period_s``, else ``low``."""

    period_s: float
    on_s: float
    high: float
    low: float
    start_s: float = 0.0

    def at(self, t_s: float) -> float:
        """Offered concurrency per GPU at a time."""
        if t_s < self.start_s:
            return self.low
        return self.high if (t_s - self.start_s) % self.period_s < self.on_s else self.low


@dataclass(frozen=True, slots=True)
class Scenario:
    """A benchmark scenario (see the module docstring)."""

    name: str
    description: str
    duration_s: float
    plant: PlantConfig
    controller_model: ThermalParams
    limits: Limits
    load: Schedule | SquareLoad
    supply_c: Schedule
    flow_lpm: Schedule
    leaks: tuple[tuple[float, str], ...] = ()
    stale: tuple[tuple[float, float], ...] = ()
    tick_s: float = 1.0
    leak_delay_s: float = 0.05
    seed: int = 0
    source: dict[str, Any] = field(default_factory=dict)

    def with_duration(self, duration_s: float) -> Scenario:
        """A shorter (or longer) copy: events past the end are simply not reached."""
        return replace(self, duration_s=duration_s)


def _schedule(raw: Any, key: str, *, step: bool = False) -> Schedule:
    if isinstance(raw, int | float):
        return Schedule.constant(float(raw))
    try:
        pts = sorted((float(t), float(v)) for t, v in raw)
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"{key}: expected a number or a list of [t_s, value] pairs") from exc
    if not pts:
        raise ScenarioError(f"{key}: empty schedule")
    return Schedule(tuple(p[0] for p in pts), tuple(p[1] for p in pts), step)


def _thermal(raw: dict[str, Any], key: str) -> ThermalParams:
    base = DEFAULT_PARAMS
    extra = {k: v for k, v in raw.items() if k != "thermal_scale"}
    names = {f.name for f in fields(ThermalParams)}
    unknown = set(extra) - names
    if unknown:
        raise ScenarioError(f"{key}: unknown thermal parameter(s) {sorted(unknown)}")
    params = replace(base, **{k: float(v) for k, v in extra.items()})
    return params.scaled(float(raw.get("thermal_scale", 1.0)))


def parse_scenario(text: str, *, name: str = "scenario") -> Scenario:
    """Parse a scenario TOML document.

    Args:
        text: TOML text.
        name: Name used when the document has none (e.g. the file's stem).

    Returns:
        The scenario.

    Raises:
        ScenarioError: The document is invalid.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"invalid TOML: {exc}") from exc
    try:
        plant_raw = dict(doc.get("plant", {}))
        n_gpus = int(plant_raw.pop("n_gpus", 8))
        curve = PowerCurve(
            float(plant_raw.pop("power_idle_w", 120.0)),
            float(plant_raw.pop("power_span_w", 580.0)),
            float(plant_raw.pop("power_sat_concurrency", 48.0)),
        )
        noise = {k: float(plant_raw.pop(k)) for k in ("power_noise_w", "temp_noise_c") if k in plant_raw}
        req_defaults = RequestTiming()
        requests = RequestTiming(
            float(plant_raw.pop("request_base_s", req_defaults.base_s)),
            float(plant_raw.pop("request_per_concurrency_s", req_defaults.per_concurrency_s)),
        )
        thermal = _thermal(plant_raw, "plant")
        ctrl_raw = dict(doc.get("controller", {}))
        controller_model = _thermal(ctrl_raw, "controller") if ctrl_raw else thermal
        plant = PlantConfig(n_gpus=n_gpus, thermal=thermal, power=curve, requests=requests, **noise)
        limits = Limits(**doc.get("limits", {}))
        load_raw = doc.get("load", {})
        load: Schedule | SquareLoad
        if "period_s" in load_raw:
            load = SquareLoad(**{k: float(v) for k, v in load_raw.items()})
        else:
            load = _schedule(load_raw.get("points", 256), "load.points")
        cool = doc.get("coolant", {})
        leaks = tuple(sorted((float(t), str(state)) for t, state in cool.get("leaks", [])))
        for _, state in leaks:
            if state not in ("ok", "warning", "critical"):
                raise ScenarioError(f"coolant.leaks: unknown state {state!r}")
        return Scenario(
            name=str(doc.get("name", name)),
            description=str(doc.get("description", "")),
            duration_s=float(doc.get("duration_s", 600.0)),
            plant=plant,
            controller_model=controller_model,
            limits=limits,
            load=load,
            supply_c=_schedule(cool.get("supply_c", 32.0), "coolant.supply_c"),
            flow_lpm=_schedule(cool.get("flow_lpm", thermal.flow_ref_lpm), "coolant.flow_lpm"),
            leaks=leaks,
            stale=tuple((float(a), float(b)) for a, b in cool.get("stale", [])),
            tick_s=float(doc.get("tick_s", 1.0)),
            seed=int(doc.get("seed", 0)),
            source=doc,
        )
    except (TypeError, ValueError, KeyError) as exc:
        if isinstance(exc, ScenarioError):
            raise
        raise ScenarioError(str(exc)) from exc


class OracleController:
    """Clairvoyant controller reading the plant's truth (see the module docstring).

    Args:
        scenario: The scenario (future load, supply, flow).
        plant: The plant being controlled (its true state).
        horizon_s: Look-ahead.
    """

    def __init__(self, scenario: Scenario, plant: Plant, horizon_s: float = 30.0) -> None:
        self.scn = scenario
        self.plant = plant
        self.horizon_s = horizon_s
        self._cands = np.arange(scenario.limits.min_cap, scenario.limits.max_cap + 1, dtype=float)
        # Standard deviation of one GPU's power averaged over a tick (AR(1), time constant
        # 0.5 s as in the plant), summed over the node's independent GPUs.
        cfg, tau_s, tick_s = scenario.plant, 0.5, scenario.tick_s
        var_mean = 2 * tau_s / tick_s * (1 - tau_s / tick_s * (1 - math.exp(-tick_s / tau_s)))
        self._node_noise_w = cfg.power_noise_w * math.sqrt(var_mean * cfg.n_gpus)

    def step(self, obs: Observation) -> Decision:
        """The allocation serving most whose noise-free future stays within limits."""
        scn, lim = self.scn, self.scn.limits
        n = scn.plant.n_gpus
        step_s = scn.tick_s
        ts = obs.t_s + step_s * np.arange(1, int(self.horizon_s / step_s) + 1)
        offered = np.array([scn.load.at(t - step_s) for t in ts])
        supply = np.array([scn.supply_c.at(t) for t in ts])
        flow = np.array([scn.flow_lpm.at(t) for t in ts])
        admitted = np.minimum(self._cands[:, None], offered[None, :])  # (caps, steps)
        # Requests in flight drain as they complete (the gate kills none): per GPU, the mean
        # in flight over each step is at least its drain from now (duration held at the start).
        n0 = self.plant.served.copy()
        tau_s = scn.plant.requests.duration_s(n0)[:, None]
        t0 = (ts - obs.t_s - step_s)[None, :]
        drained = n0[:, None] * tau_s / step_s * (np.exp(-t0 / tau_s) - np.exp(-(t0 + step_s) / tau_s))
        served_g = np.maximum(admitted[None, :, :], drained[:, None, :])  # (gpus, caps, steps)
        power_g = scn.plant.power.power_w(served_g)
        hot = int(np.argmax(n0))
        x_hot = np.max(self.plant.x, axis=0)
        die_max, mem_max = predict_max(scn.plant.thermal, x_hot, power_g[hot], supply, flow, step_s)
        ok = (die_max <= lim.gpu_temp_max_c - lim.margin_c) & (mem_max <= lim.mem_temp_max_c - lim.margin_c)
        i_th = int(np.nonzero(ok)[0][-1]) if np.any(ok) else 0
        # Node limit per future step: heat the flow carries, and the budget less 3σ of the
        # node's 1 s average power noise (the noise is not known in advance).
        node_lim = np.array([lim.coolant_heat_max_w(f) for f in flow])
        if lim.node_power_budget_w is not None:
            node_lim = np.minimum(node_lim, lim.node_power_budget_w - 3.0 * self._node_noise_w)
        # Equal caps, or k GPUs (the busiest now) at the thermal cap, one at a remainder, the
        # rest at min_cap (with a concave power curve the latter serves more per watt).
        order = np.argsort(-n0, kind="stable")
        value_g = served_g.sum(axis=2)  # (gpus, caps)
        best_v, best = -1.0, (int(self._cands[0]),) * n
        for k in range(n):
            hi_g, mid_g, lo_g = order[:k], order[k], order[k + 1 :]
            base = power_g[hi_g, i_th].sum(axis=0) + power_g[lo_g, 0].sum(axis=0)
            fits = np.all(base[None, :] + power_g[mid_g, : i_th + 1] <= node_lim, axis=1)
            if not np.any(fits):
                break
            j = int(np.nonzero(fits)[0][-1])
            v = float(value_g[hi_g, i_th].sum() + value_g[mid_g, j] + value_g[lo_g, 0].sum())
            if v > best_v:
                caps = np.full(n, int(self._cands[0]))
                caps[hi_g] = int(self._cands[i_th])
                caps[mid_g] = int(self._cands[j])
                best_v, best = v, tuple(int(c) for c in caps)
        fits = np.all(power_g[:, : i_th + 1].sum(axis=0) <= node_lim, axis=1)
        if np.any(fits):
            j = int(np.nonzero(fits)[0][-1])
            if float(value_g[:, j].sum()) >= best_v:
                best = (int(self._cands[j]),) * n
        return Decision(best, "mpc", "none", float(np.max(die_max)))


def make_controller(name: str, scenario: Scenario, plant: Plant) -> Controller:
    """Build a controller by name ("mpc", "pid", "threshold", "oracle")."""
    lim, n = scenario.limits, scenario.plant.n_gpus
    if name == "mpc":
        # The MPC knows the gate's semantics and the configured request duration.
        return MpcController(
            lim, n, scenario.controller_model, settings=MpcSettings(requests=scenario.plant.requests)
        )
    if name == "pid":
        return PidController(lim, n, **PID_TUNING)
    if name == "threshold":
        return ThresholdController(lim, n, **THRESHOLD_TUNING)
    if name == "oracle":
        return OracleController(scenario, plant)
    raise ValueError(f"unknown controller {name!r}")


@dataclass(slots=True)
class RunResult:
    """Scores and traces of one controller on one scenario.

    ``seconds_over_limit`` counts true die/HBM above their max, coolant heat above the
    flow's capacity, or node power above budget; ``seconds_over_target`` counts a true die
    above max − margin (the MPC's design target).
    """

    served: float = 0.0
    seconds_over_limit: float = 0.0
    seconds_over_target: float = 0.0
    max_temp_c: float = -math.inf
    cap_changes: int = 0
    leak_to_cap_s: float | None = None
    solve_s: list[float] = field(default_factory=list)
    t_s: list[float] = field(default_factory=list)
    cap_total: list[int] = field(default_factory=list)
    served_total: list[float] = field(default_factory=list)
    max_die_c: list[float] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        """The JSON-able scores."""
        return {
            "served": round(self.served, 1),
            "seconds_over_limit": round(self.seconds_over_limit, 2),
            "seconds_over_target": round(self.seconds_over_target, 2),
            "max_temp_c": round(self.max_temp_c, 2),
            "cap_changes": self.cap_changes,
            "leak_to_cap_s": None if self.leak_to_cap_s is None else round(self.leak_to_cap_s, 3),
        }


def scenario_files(directory: Path = SCENARIO_DIR) -> list[Path]:
    """The scenario TOMLs in ``directory`` (default: the shipped ones), sorted by name."""
    return sorted(directory.glob("*.toml"))


def load_scenario(path: Path) -> Scenario:
    """Read and parse one scenario file; its name is the file's stem."""
    return parse_scenario(path.read_text(), name=path.stem)


def leak_state(scn: Scenario, t_s: float) -> str:
    """The leak state (``ok``, ``warning``, ``critical``) the controllers see at ``t_s``."""
    state = "ok"
    for t_ev, s in scn.leaks:
        if t_ev + scn.leak_delay_s <= t_s:
            state = s
    return state


def _leak_ceiling(lim: Limits, state: str) -> int | None:
    return {"warning": lim.leak_cap, "critical": 0}.get(state)


def run(scenario: Scenario, controller: str, *, clock: Callable[[], float] = time.perf_counter) -> RunResult:
    """Run one controller (through the safety layer) over a scenario.

    Args:
        scenario: The scenario.
        controller: "mpc", "pid", "threshold" or "oracle".
        clock: Timer for solve times.

    Returns:
        Scores and traces.
    """
    scn, lim = scenario, scenario.limits
    plant = Plant(scn.plant, scn.supply_c.at(0.0), seed=scn.seed)
    ctrl = make_controller(controller, scn, plant)
    safety = SafetyLayer(lim)
    res = RunResult()
    n_ticks = round(scn.duration_s / scn.tick_s)
    caps = np.zeros(scn.plant.n_gpus)
    prev_caps: tuple[int, ...] | None = None
    pending_leaks = [(t + scn.leak_delay_s, t, s) for t, s in scn.leaks]
    first_leak_t = next((t for t, s in scn.leaks if s != "ok"), None)

    def note_leak(t_s: float, state: str, dec: Decision) -> None:
        ceiling = _leak_ceiling(lim, state)
        known = res.leak_to_cap_s is not None
        if not known and first_leak_t is not None and ceiling is not None and max(dec.caps) <= ceiling:
            res.leak_to_cap_s = t_s - first_leak_t

    for k in range(n_ticks):
        t = k * scn.tick_s
        stale = any(a <= t < b for a, b in scn.stale)
        obs = plant.observe(t, leak=leak_state(scn, t), stale=stale)
        t0 = clock()
        proposed = ctrl.step(obs)
        res.solve_s.append(clock() - t0)
        dec = safety.apply(obs, proposed)
        res.reasons[dec.reason] = res.reasons.get(dec.reason, 0) + 1
        note_leak(t, obs.coolant.leak, dec)
        caps = np.array(dec.caps, dtype=float)
        if prev_caps is not None and dec.caps != prev_caps:
            res.cap_changes += 1
        prev_caps = dec.caps
        # Advance to the next tick, delivering leak messages in between.
        t_now, t_end = t, t + scn.tick_s
        offered = np.full(scn.plant.n_gpus, scn.load.at(t))
        supply, flow = scn.supply_c.at(t), scn.flow_lpm.at(t)
        while True:
            due = [p for p in pending_leaks if t_now < p[0] < t_end]
            t_next = min([p[0] for p in due], default=t_end)
            st = plant.advance(t_next - t_now, caps, offered, supply, flow, lim)
            res.served += st.served_s
            res.seconds_over_limit += st.over_limit_s
            res.seconds_over_target += st.over_target_s
            res.max_temp_c = max(res.max_temp_c, st.max_die_c)
            t_now = t_next
            if t_now >= t_end - 1e-9:
                break
            for p in due:
                if abs(p[0] - t_now) < 1e-9:
                    pending_leaks.remove(p)
            leak_obs = Observation(t_now, obs.gpus, replace(obs.coolant, leak=leak_state(scn, t_now)))  # type: ignore[arg-type]
            dec = safety.apply(leak_obs, dec)
            note_leak(t_now, leak_obs.coolant.leak, dec)
            caps = np.array(dec.caps, dtype=float)
            prev_caps = dec.caps
        res.t_s.append(t)
        res.cap_total.append(int(np.sum(caps)))
        res.served_total.append(float(np.sum(plant.served)))
        res.max_die_c.append(float(np.max(plant.die_c())))
    return res


def bench_scenario(scenario: Scenario, controllers: tuple[str, ...] = CONTROLLERS) -> dict[str, Any]:
    """Scores of each controller and its ratio to the oracle on one scenario."""
    oracle = run(scenario, "oracle")
    out: dict[str, Any] = {"name": scenario.name, "oracle_served": round(oracle.served, 1), "controllers": {}}
    runs: dict[str, RunResult] = {}
    for name in controllers:
        r = run(scenario, name)
        runs[name] = r
        m = r.metrics()
        m["oracle_ratio"] = round(r.served / oracle.served, 4) if oracle.served > 0 else None
        if name == "mpc":
            solve_ms = np.asarray(r.solve_s) * 1e3
            m["solve_ms_p50"] = round(float(np.percentile(solve_ms, 50)), 3)
            m["solve_ms_p99"] = round(float(np.percentile(solve_ms, 99)), 3)
        out["controllers"][name] = m
    out["_runs"] = runs
    out["_oracle"] = oracle
    return out

"""Scenario harness: runs controllers against the true-parameter plant and scores them.

A scenario (TOML, see ``bench/scenarios/README.md``) gives the plant (or a ``model fit`` JSON
file), the offered load (schedule or CSV), coolant supply temperature and flow schedules
(points, periodic, seeded random, sums), the rack share over time, leak detector states with
operator acks, coolant silences with their detection delay (``max_age_s``), limits and the
TPOT SLO. Every controller's decision goes through the
:class:`~rackguard.controllers.safety.SafetyLayer`. Leak events are delivered between ticks
after ``leak_delay_s`` (the agent applies safety immediately on a leak message).

Scores: goodput (tokens per second from requests meeting the TPOT SLO, DistServe's
definition; every request in flight on a GPU decodes at that GPU's TPOT), served
concurrency, seconds over each limit (die, HBM, node power, heat into the coolant) and
smoothness (cap reversals per minute, node power's largest drop and rise between steps,
its total variation per minute, its largest drop beyond what the limit needed).

The oracle is a clairvoyant controller: it reads the true plant state, knows the future
load, supply, flow and rack share, has no measurement noise and no model error, and each
tick holds for 30 s the allocation with the most goodput whose noise-free future keeps the
same constraints the MPC is given (die ≤ max − margin, HBM ≤ mem max − margin, node power ≤
budget and share less 3σ of the node's 1 s power noise, which it cannot foresee, and the
heat into the coolant ≤ what the flow carries at design ΔT and the share's heat, checked at
step ends with 1 % spare). Allocations: one common cap, or k GPUs at the hottest GPU's
thermal cap, one at a remainder and the rest at min_cap. It goes through the same safety
layer. It is a receding-horizon optimum over caps held for 30 s, not a global one.

Knowing the future is not a fair reference while the flow, supply or share change, so
the ``causal`` reference is the same controller told that load, supply, flow and share stay
as they are now (it still reads the true state and has no model error). Both are reported.

``ceiling_goodput`` bounds what any controller capped at the SLO's concurrency can score:
every GPU at that concurrency throughout, with no limit and no safety layer. The baselines
are scored twice: told the SLO (the main comparison) and not (``without_slo``: up to
``max_cap``, as before goodput was the score).
"""

from __future__ import annotations

import csv
import json
import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rackguard.controllers.api import Controller, CoolantObs, Decision, Limits, NodeShare, Observation
from rackguard.controllers.baselines import PidController, ThresholdController
from rackguard.controllers.mpc import MpcController, MpcSettings
from rackguard.controllers.power import PowerCurve, RequestTiming
from rackguard.controllers.safety import SafetyLayer
from rackguard.controllers.thermal import DEFAULT_PARAMS, ThermalParams
from rackguard.sim.plant import Plant, PlantConfig, predict_heat_w, predict_max

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

    @classmethod
    def constant(cls, value: float) -> Schedule:
        """A constant schedule."""
        return cls((0.0,), (value,))


@dataclass(frozen=True, slots=True)
class Periodic:
    """A periodic schedule between ``low`` and ``high`` from ``start_s`` (``low`` before).

    ``shape``: ``sine`` (starts at ``high``, as a cosine), ``triangle`` (the same, linear),
    or ``square`` (``high`` for ``on_s`` of every period).
    """

    period_s: float
    low: float
    high: float
    shape: str = "sine"
    on_s: float = 0.0
    start_s: float = 0.0

    def at(self, t_s: float) -> float:
        """Value at a time."""
        if t_s < self.start_s:
            return self.high if self.shape != "square" else self.low
        phase = ((t_s - self.start_s) % self.period_s) / self.period_s
        if self.shape == "square":
            return self.high if phase * self.period_s < self.on_s else self.low
        if self.shape == "triangle":
            frac = abs(1.0 - 2.0 * phase)  # 1 → 0 → 1
        else:
            frac = 0.5 * (1.0 + math.cos(2.0 * math.pi * phase))
        return self.low + (self.high - self.low) * frac


@dataclass(frozen=True, slots=True)
class RandomSchedule:
    """Seeded random, held for ``every_s`` then redrawn.

    ``kind``: ``uniform`` draws in [low, high]; ``bursts`` gives ``high`` with probability
    ``burst_prob`` and ``low`` otherwise.
    """

    seed: int
    every_s: float
    low: float
    high: float
    kind: str = "uniform"
    burst_prob: float = 0.3
    values: tuple[float, ...] = ()

    @classmethod
    def make(cls, duration_s: float, **kw: Any) -> RandomSchedule:
        """Draw the values for ``duration_s`` (plus one period)."""
        r = cls(**kw)
        if r.every_s <= 0:
            raise ScenarioError("random.every_s must be > 0")
        n = int(duration_s / r.every_s) + 2
        rng = np.random.default_rng(r.seed)
        if r.kind == "bursts":
            vals = np.where(rng.random(n) < r.burst_prob, r.high, r.low)
        elif r.kind == "uniform":
            vals = rng.uniform(r.low, r.high, n)
        else:
            raise ScenarioError(f"random.kind: {r.kind!r} is not 'uniform' or 'bursts'")
        return replace(r, values=tuple(float(v) for v in vals))

    def at(self, t_s: float) -> float:
        """Value at a time."""
        i = min(max(int(t_s // self.every_s), 0), len(self.values) - 1)
        return self.values[i]


@dataclass(frozen=True, slots=True)
class SumSchedule:
    """The sum of schedules (e.g. a drift plus random bursts)."""

    parts: tuple[Any, ...]

    def at(self, t_s: float) -> float:
        """Value at a time."""
        return float(sum(p.at(t_s) for p in self.parts))


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


AnySchedule = Schedule | Periodic | RandomSchedule | SumSchedule | SquareLoad


@dataclass(frozen=True, slots=True)
class Scenario:
    """A benchmark scenario (see the module docstring and ``bench/scenarios/README.md``)."""

    name: str
    description: str
    duration_s: float
    plant: PlantConfig
    controller_model: ThermalParams
    limits: Limits
    load: AnySchedule
    supply_c: AnySchedule
    flow_lpm: AnySchedule
    leaks: tuple[tuple[float, str], ...] = ()
    stale: tuple[tuple[float, float], ...] = ()
    tick_s: float = 1.0
    leak_delay_s: float = 0.05
    seed: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    share_power_w: AnySchedule | None = None
    share_heat_w: AnySchedule | None = None
    leak_acks: tuple[float, ...] = ()
    leak_clear: str = "auto"
    max_age_s: float = 0.0

    def with_duration(self, duration_s: float) -> Scenario:
        """A shorter (or longer) copy: events past the end are simply not reached."""
        return replace(self, duration_s=duration_s)

    def share_at(self, t_s: float) -> NodeShare | None:
        """The rack share the node holds at a time (None outside a rack)."""
        if self.share_power_w is None and self.share_heat_w is None:
            return None
        p = math.inf if self.share_power_w is None else self.share_power_w.at(t_s)
        q = math.inf if self.share_heat_w is None else self.share_heat_w.at(t_s)
        return NodeShare(p, q)

    def silent(self, t_s: float) -> bool:
        """The coolant sensors publish nothing at this time."""
        return any(a <= t_s < b for a, b in self.stale)

    def is_stale(self, t_s: float) -> bool:
        """The coolant reading counts as stale: silent for at least ``max_age_s``."""
        return any(a + self.max_age_s <= t_s < b for a, b in self.stale)

    def events(self) -> list[tuple[float, str]]:
        """Events for plots: leak states, acks, silences, stale and share changes."""
        out = [(t, f"leak {s}") for t, s in self.leaks] + [(t, "ack") for t in self.leak_acks]
        for a, b in self.stale:
            out += [(a, "coolant silent"), (a + self.max_age_s, "stale"), (b, "coolant back")]
        for key, sched in (("share power", self.share_power_w), ("share heat", self.share_heat_w)):
            if isinstance(sched, Schedule):
                out += [(t, key) for t in sched.t_s[1:]]
        return sorted(out)


def _schedule(
    raw: Any, key: str, *, step: bool = False, duration_s: float = 600.0, base: Path | None = None
) -> Any:
    """A schedule from TOML: a number, [[t_s, value], ...], or a table (see the scenarios README)."""
    if isinstance(raw, bool):
        raise ScenarioError(f"{key}: expected a number, a list of [t_s, value] pairs or a table")
    if isinstance(raw, int | float):
        return Schedule.constant(float(raw))
    if isinstance(raw, dict):
        kinds = [k for k in ("points", "periodic", "random", "sum", "csv") if k in raw]
        if len(kinds) != 1:
            raise ScenarioError(f"{key}: a table needs exactly one of points, periodic, random, sum, csv")
        kind = kinds[0]
        try:
            if kind == "points":
                return _schedule(raw["points"], key, step=bool(raw.get("step", step)))
            if kind == "periodic":
                spec = dict(raw["periodic"])
                per = Periodic(**{k: (str(v) if k == "shape" else float(v)) for k, v in spec.items()})  # type: ignore[arg-type]
                if per.period_s <= 0 or per.shape not in ("sine", "triangle", "square"):
                    raise ScenarioError(f"{key}.periodic: period_s > 0 and shape sine/triangle/square")
                return per
            if kind == "random":
                spec = dict(raw["random"])
                conv = {
                    k: (str(v) if k == "kind" else int(v) if k == "seed" else float(v))
                    for k, v in spec.items()
                }
                return RandomSchedule.make(duration_s, **conv)
            if kind == "sum":
                return SumSchedule(
                    tuple(_schedule(r, f"{key}.sum", duration_s=duration_s, base=base) for r in raw["sum"])
                )
            return _csv_schedule(raw["csv"], key, base, str(raw.get("column", "")))
        except TypeError as exc:
            raise ScenarioError(f"{key}.{kind}: {exc}") from exc
    try:
        pts = sorted((float(t), float(v)) for t, v in raw)
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"{key}: expected a number or a list of [t_s, value] pairs") from exc
    if not pts:
        raise ScenarioError(f"{key}: empty schedule")
    return Schedule(tuple(p[0] for p in pts), tuple(p[1] for p in pts), step)


def _csv_schedule(rel: str, key: str, base: Path | None, column: str) -> Schedule:
    """Points from a CSV with a ``t_s`` column and a value column (the second, or ``column``)."""
    path = Path(rel) if base is None or Path(rel).is_absolute() else base / rel
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise ScenarioError(f"{key}.csv: {exc}") from exc
    if not rows or "t_s" not in rows[0]:
        raise ScenarioError(f"{key}.csv: {path} needs a header with a t_s column")
    names = [c for c in rows[0] if c != "t_s"]
    col = column or (names[0] if names else "")
    if col not in rows[0]:
        raise ScenarioError(f"{key}.csv: {path} has no column {col!r}")
    try:
        pts = sorted((float(r["t_s"]), float(r[col])) for r in rows)
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"{key}.csv: {path}: {exc}") from exc
    if not all(math.isfinite(t) and math.isfinite(v) for t, v in pts):
        raise ScenarioError(f"{key}.csv: {path}: non-finite value")
    return Schedule(tuple(p[0] for p in pts), tuple(p[1] for p in pts))


def _fit_params(rel: str, key: str, base: Path | None) -> ThermalParams:
    """ThermalParams from a ``model fit`` JSON file (its ``params``; other keys are ignored)."""
    path = Path(rel) if base is None or Path(rel).is_absolute() else base / rel
    try:
        doc = json.loads(path.read_text())
        params = doc["params"]
        names = {f.name for f in fields(ThermalParams)}
        return ThermalParams(**{k: float(v) for k, v in params.items() if k in names})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ScenarioError(f"{key}.model_fit: {path}: {exc}") from exc


def _thermal(raw: dict[str, Any], key: str, base_dir: Path | None = None) -> ThermalParams:
    base = _fit_params(str(raw["model_fit"]), key, base_dir) if "model_fit" in raw else DEFAULT_PARAMS
    extra = {k: v for k, v in raw.items() if k not in ("thermal_scale", "model_fit")}
    names = {f.name for f in fields(ThermalParams)}
    unknown = set(extra) - names
    if unknown:
        raise ScenarioError(f"{key}: unknown thermal parameter(s) {sorted(unknown)}")
    params = replace(base, **{k: float(v) for k, v in extra.items()})
    return params.scaled(float(raw.get("thermal_scale", 1.0)))


def parse_scenario(text: str, *, name: str = "scenario", base_dir: Path | None = None) -> Scenario:
    """Parse a scenario TOML document.

    Args:
        text: TOML text.
        name: Name used when the document has none (e.g. the file's stem).
        base_dir: Where relative file names (``csv``, ``model_fit``) are found.

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
        duration_s = float(doc.get("duration_s", 600.0))
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
            float(plant_raw.pop("request_tokens", req_defaults.tokens_per_request)),
        )
        thermal = _thermal(plant_raw, "plant", base_dir)
        ctrl_raw = dict(doc.get("controller", {}))
        controller_model = _thermal(ctrl_raw, "controller", base_dir) if ctrl_raw else thermal
        plant = PlantConfig(n_gpus=n_gpus, thermal=thermal, power=curve, requests=requests, **noise)
        limits = Limits(**doc.get("limits", {}))
        load_raw = doc.get("load", {})
        sched = {"duration_s": duration_s, "base": base_dir}
        load: Any
        if "period_s" in load_raw:
            load = SquareLoad(**{k: float(v) for k, v in load_raw.items()})
        elif "points" in load_raw and isinstance(load_raw["points"], list | int | float):
            load = _schedule(load_raw["points"], "load.points", **sched)  # type: ignore[arg-type]
        elif load_raw:
            load = _schedule(load_raw, "load", **sched)  # type: ignore[arg-type]
        else:
            load = Schedule.constant(256.0)
        cool = doc.get("coolant", {})
        leaks = tuple(sorted((float(t), str(state)) for t, state in cool.get("leaks", [])))
        for _, state in leaks:
            if state not in ("ok", "warning", "critical"):
                raise ScenarioError(f"coolant.leaks: unknown state {state!r}")
        leak_clear = str(cool.get("leak_clear", "auto"))
        if leak_clear not in ("auto", "ack"):
            raise ScenarioError(f"coolant.leak_clear: {leak_clear!r} is not 'auto' or 'ack'")
        share = doc.get("share", {})
        unknown = set(share) - {"power_w", "coolant_heat_w"}
        if unknown:
            raise ScenarioError(f"share: unknown key(s) {sorted(unknown)}")
        return Scenario(
            name=str(doc.get("name", name)),
            description=str(doc.get("description", "")),
            duration_s=duration_s,
            plant=plant,
            controller_model=controller_model,
            limits=limits,
            load=load,
            supply_c=_schedule(cool.get("supply_c", 32.0), "coolant.supply_c", **sched),  # type: ignore[arg-type]
            flow_lpm=_schedule(cool.get("flow_lpm", thermal.flow_ref_lpm), "coolant.flow_lpm", **sched),  # type: ignore[arg-type]
            leaks=leaks,
            stale=tuple((float(a), float(b)) for a, b in cool.get("stale", [])),
            tick_s=float(doc.get("tick_s", 1.0)),
            seed=int(doc.get("seed", 0)),
            source=doc,
            share_power_w=(
                _schedule(share["power_w"], "share.power_w", step=True, **sched)  # type: ignore[arg-type]
                if "power_w" in share
                else None
            ),
            share_heat_w=(
                _schedule(share["coolant_heat_w"], "share.coolant_heat_w", step=True, **sched)  # type: ignore[arg-type]
                if "coolant_heat_w" in share
                else None
            ),
            leak_acks=tuple(sorted(float(t) for t in cool.get("leak_acks", []))),
            leak_clear=leak_clear,
            max_age_s=float(cool.get("max_age_s", 0.0)),
        )
    except (TypeError, ValueError, KeyError) as exc:
        if isinstance(exc, ScenarioError):
            raise
        raise ScenarioError(str(exc)) from exc


class OracleController:
    """Clairvoyant controller reading the plant's truth (see the module docstring).

    Args:
        scenario: The scenario (future load, supply, flow, share).
        plant: The plant being controlled (its true state).
        horizon_s: Look-ahead.
        causal: Assume the load, supply, flow and share stay as they are now (it still reads
            the true state and has no model error): a reference that does not see the future.
    """

    def __init__(
        self, scenario: Scenario, plant: Plant, horizon_s: float = 30.0, *, causal: bool = False
    ) -> None:
        self.scn = scenario
        self.plant = plant
        self.horizon_s = horizon_s
        self.causal = causal
        lim = scenario.limits
        hi = slo_max_cap(scenario)
        self._cands = np.arange(lim.min_cap, hi + 1, dtype=float)
        # Standard deviation of one GPU's power averaged over a tick (AR(1), time constant
        # 0.5 s as in the plant), summed over the node's independent GPUs.
        cfg, tau_s, tick_s = scenario.plant, 0.5, scenario.tick_s
        var_mean = 2 * tau_s / tick_s * (1 - tau_s / tick_s * (1 - math.exp(-tick_s / tau_s)))
        self._node_noise_w = cfg.power_noise_w * math.sqrt(var_mean * cfg.n_gpus)

    def step(self, obs: Observation) -> Decision:
        """The allocation with the most goodput whose noise-free future stays within limits."""
        scn, lim = self.scn, self.scn.limits
        n = scn.plant.n_gpus
        step_s = scn.tick_s
        ts = obs.t_s + step_s * np.arange(1, int(self.horizon_s / step_s) + 1)
        at = (lambda sch, t: sch.at(obs.t_s)) if self.causal else (lambda sch, t: sch.at(t))
        # Step k runs from ts[k] − step_s to ts[k] with that start's load, supply, flow, share.
        offered = np.array([at(scn.load, t - step_s) for t in ts])
        supply = np.array([at(scn.supply_c, t - step_s) for t in ts])
        flow = np.array([at(scn.flow_lpm, t - step_s) for t in ts])
        shares = [scn.share_at(obs.t_s if self.causal else t - step_s) for t in ts]
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
        # Node power limit per future step: the budget (and share) less 3σ of the node's 1 s
        # average power noise (the noise is not known in advance); heat into the coolant
        # limit per step: what the flow carries at design ΔT (and the share's heat).
        node_lim = np.full(len(ts), np.inf)
        heat_lim = np.array([lim.coolant_heat_max_w(f) for f in flow])
        for k, sh in enumerate(shares):
            if sh is not None:
                node_lim[k] = sh.power_w
                heat_lim[k] = min(heat_lim[k], sh.coolant_heat_w)
        if lim.node_power_budget_w is not None:
            node_lim = np.minimum(node_lim, lim.node_power_budget_w)
        node_lim = node_lim - 3.0 * self._node_noise_w
        x_node = np.sum(self.plant.x, axis=0)
        thermal = scn.plant.thermal

        def fits(node_w: FloatArray) -> NDArray[np.bool_]:
            # node_w (m, steps): within the power limit and the heat into the coolant.
            ok_p = np.all(node_w <= node_lim, axis=1)
            heat = predict_heat_w(thermal, x_node, node_w, flow, step_s)
            # 1 % spare: heat is checked at step ends, the plant counts every 0.1 s.
            return np.asarray(ok_p & np.all(heat <= 0.99 * heat_lim, axis=1))

        # Equal caps, or k GPUs (the busiest now) at the thermal cap, one at a remainder, the
        # rest at min_cap.
        order = np.argsort(-n0, kind="stable")
        tok = scn.plant.requests.tokens_per_s(served_g, lim.tpot_slo_s)
        value_g = tok.sum(axis=2)  # (gpus, caps)
        best_v, best = -1.0, (int(self._cands[0]),) * n
        for k in range(n):
            hi_g, mid_g, lo_g = order[:k], order[k], order[k + 1 :]
            base = power_g[hi_g, i_th].sum(axis=0) + power_g[lo_g, 0].sum(axis=0)
            ok_c = fits(base[None, :] + power_g[mid_g, : i_th + 1])
            if not np.any(ok_c):
                break
            j = int(np.nonzero(ok_c)[0][-1])
            v = float(value_g[hi_g, i_th].sum() + value_g[mid_g, j] + value_g[lo_g, 0].sum())
            if v > best_v:
                caps = np.full(n, int(self._cands[0]))
                caps[hi_g] = int(self._cands[i_th])
                caps[mid_g] = int(self._cands[j])
                best_v, best = v, tuple(int(c) for c in caps)
        ok_e = fits(power_g[:, : i_th + 1].sum(axis=0))
        if np.any(ok_e):
            j = int(np.nonzero(ok_e)[0][-1])
            if float(value_g[:, j].sum()) >= best_v:
                best = (int(self._cands[j]),) * n
        return Decision(best, "mpc", "none", float(np.max(die_max)))


def slo_max_cap(scenario: Scenario) -> int:
    """The largest cap whose time per output token meets the scenario's SLO (max_cap without one)."""
    lim = scenario.limits
    c = scenario.plant.requests.max_concurrency_for_slo(lim.tpot_slo_s)
    return max(lim.min_cap, min(lim.max_cap, math.floor(c) if math.isfinite(c) else lim.max_cap))


@dataclass(frozen=True)
class _Ceiling:
    """Every GPU at the SLO's concurrency whatever happens (run it with ``safety=False``)."""

    caps: tuple[int, ...]

    def step(self, obs: Observation) -> Decision:
        return Decision(self.caps, "manual", "none")


def make_controller(name: str, scenario: Scenario, plant: Plant) -> Controller:
    """Build a controller by name ("mpc", "pid", "threshold", "oracle", "causal", "ceiling",
    "pid_no_slo", "threshold_no_slo").

    Every controller is told the SLO: the baselines' largest cap is the SLO's concurrency
    (an operator would configure it so), the MPC derives it from ``Limits.tpot_slo_s``. The
    ``_no_slo`` baselines are not: they go up to ``max_cap``, as before goodput was scored.
    """
    lim, n = scenario.limits, scenario.plant.n_gpus
    base_lim = replace(lim, max_cap=slo_max_cap(scenario))
    if name == "mpc":
        # The MPC knows the gate's semantics and the configured request duration.
        return MpcController(
            lim, n, scenario.controller_model, settings=MpcSettings(requests=scenario.plant.requests)
        )
    if name == "pid":
        return PidController(base_lim, n, **PID_TUNING)
    if name == "threshold":
        return ThresholdController(base_lim, n, **THRESHOLD_TUNING)
    # The baselines as they were before goodput: up to the server's max_cap, the SLO unknown.
    if name == "pid_no_slo":
        return PidController(lim, n, **PID_TUNING)
    if name == "threshold_no_slo":
        return ThresholdController(lim, n, **THRESHOLD_TUNING)
    if name == "ceiling":
        return _Ceiling((slo_max_cap(scenario),) * n)
    if name == "oracle":
        return OracleController(scenario, plant)
    if name == "causal":
        return OracleController(scenario, plant, causal=True)
    raise ValueError(f"unknown controller {name!r}")


TRACE_COLUMNS = (
    "t_s",
    "cap_total",
    "served_total",
    "goodput_tokens_per_s",
    "node_power_w",
    "node_power_limit_w",
    "coolant_heat_w",
    "coolant_heat_limit_w",
    "max_die_c",
    "max_mem_c",
    "supply_c",
    "flow_lpm",
    "offered_per_gpu",
    "leak",
    "stale",
    "reason",
    "binding",
    "caps",
)


@dataclass(slots=True)
class RunResult:
    """Scores and traces of one controller on one scenario.

    ``seconds_over_limit`` counts true die/HBM above their max, coolant heat above the
    flow's capacity (or the share's), or node power above the budget (or the share's);
    ``seconds_over`` splits it per limit; ``seconds_over_target`` counts a true die above
    max − margin (the MPC's design target). ``goodput`` is tokens from requests meeting
    the scenario's TPOT SLO (all tokens without one).
    """

    served: float = 0.0
    tokens: float = 0.0
    goodput: float = 0.0
    seconds_over_limit: float = 0.0
    seconds_over: dict[str, float] = field(
        default_factory=lambda: {"die": 0.0, "hbm": 0.0, "node_power": 0.0, "coolant_heat": 0.0}
    )
    seconds_over_target: float = 0.0
    max_temp_c: float = -math.inf
    cap_changes: int = 0
    leak_to_cap_s: float | None = None
    duration_s: float = 0.0
    solve_s: list[float] = field(default_factory=list)
    t_s: list[float] = field(default_factory=list)
    cap_total: list[int] = field(default_factory=list)
    served_total: list[float] = field(default_factory=list)
    max_die_c: list[float] = field(default_factory=list)
    node_power_w: list[float] = field(default_factory=list)
    node_limit_w: list[float] = field(default_factory=list)
    safety_override: list[bool] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    trace: list[dict[str, Any]] = field(default_factory=list)

    def smoothness(self) -> dict[str, float]:
        """Cap reversals per minute, node power's largest drop/rise between steps, its total
        variation per minute, and the largest drop beyond what the limit needed.

        A reversal is the node's total cap changing direction. The drop beyond need at a
        step is drop − max(power − new limit, 0), as a fraction of the new limit; steps
        where the safety layer overrode the controller (leak, stale, thermal) are left out.
        """
        minutes = max(self.duration_s / 60.0, 1e-9)
        d = np.diff(np.asarray(self.cap_total, dtype=float))
        signs = np.sign(d[d != 0])
        reversals = int(np.count_nonzero(signs[1:] != signs[:-1])) if len(signs) > 1 else 0
        p = np.asarray(self.node_power_w, dtype=float)
        dp = np.diff(p) if len(p) > 1 else np.zeros(1)
        lim = np.asarray(self.node_limit_w[1:], dtype=float)
        drop = -dp
        need = np.maximum(p[:-1] - lim, 0.0) if len(p) > 1 else np.zeros(1)
        mask = ~np.asarray(self.safety_override[1:], dtype=bool) if len(p) > 1 else np.zeros(1, bool)
        excess = np.where(
            mask & np.isfinite(lim), (drop - need) / np.where(np.isfinite(lim), lim, 1.0), -np.inf
        )
        return {
            "cap_reversals_per_min": round(reversals / minutes, 3),
            "max_power_drop_w": round(float(max(np.max(drop), 0.0)), 1),
            "max_power_rise_w": round(float(max(np.max(dp), 0.0)), 1),
            "power_tv_w_per_min": round(float(np.sum(np.abs(dp))) / minutes, 1),
            "max_drop_beyond_need_frac": round(float(np.max(excess)), 4) if len(excess) else 0.0,
        }

    def metrics(self) -> dict[str, Any]:
        """The JSON-able scores."""
        return {
            "goodput_tokens_per_s": round(self.goodput / max(self.duration_s, 1e-9), 1),
            "goodput": round(self.goodput, 0),
            "tokens": round(self.tokens, 0),
            "served": round(self.served, 1),
            "seconds_over_limit": round(self.seconds_over_limit, 2),
            "seconds_over": {k: round(v, 2) for k, v in self.seconds_over.items()},
            "seconds_over_target": round(self.seconds_over_target, 2),
            "max_temp_c": round(self.max_temp_c, 2),
            "cap_changes": self.cap_changes,
            **self.smoothness(),
            "leak_to_cap_s": None if self.leak_to_cap_s is None else round(self.leak_to_cap_s, 3),
        }


def scenario_files(directory: Path = SCENARIO_DIR) -> list[Path]:
    """The scenario TOMLs in ``directory`` (default: the shipped ones), sorted by name."""
    return sorted(directory.glob("*.toml"))


def load_scenario(path: Path) -> Scenario:
    """Read and parse one scenario file; its name is the file's stem, relative files beside it."""
    return parse_scenario(path.read_text(), name=path.stem, base_dir=path.parent)


_SEVERITY = {"ok": 0, "warning": 1, "critical": 2}


def leak_state(scn: Scenario, t_s: float) -> str:
    """The leak state (``ok``, ``warning``, ``critical``) the controllers see at ``t_s``.

    The detector's states arrive ``leak_delay_s`` after they happen. With ``leak_clear =
    "ack"`` the worst state is latched until an operator acks while the detector reads ok
    (as the agent's coolant monitor does).
    """
    events = [(t + scn.leak_delay_s, s) for t, s in scn.leaks if t + scn.leak_delay_s <= t_s]
    if scn.leak_clear != "ack":
        return events[-1][1] if events else "ok"
    timeline = sorted([(t, 0, s) for t, s in events] + [(t, 1, "") for t in scn.leak_acks if t <= t_s])
    detector, latched = "ok", "ok"
    for _, is_ack, s in timeline:
        if is_ack:
            if detector == "ok":
                latched = "ok"
        else:
            detector = s
            if _SEVERITY[s] > _SEVERITY[latched]:
                latched = s
    return latched


def _leak_ceiling(lim: Limits, state: str) -> int | None:
    return {"warning": lim.leak_cap, "critical": 0}.get(state)


def observe(scn: Scenario, plant: Plant, t_s: float, held: CoolantObs | None) -> Observation:
    """What the controllers see at ``t_s``: the plant's sensors, the leak state, the share.

    While the coolant sensors are silent but not yet stale (``max_age_s``), the last
    reading is held, as the agent's coolant monitor does.
    """
    obs = plant.observe(t_s, leak=leak_state(scn, t_s), stale=scn.is_stale(t_s))
    if scn.silent(t_s) and not obs.coolant.stale and held is not None:
        obs = replace(obs, coolant=replace(held, leak=obs.coolant.leak))
    return replace(obs, share=scn.share_at(t_s))


def run(
    scenario: Scenario,
    controller: str,
    *,
    safety: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> RunResult:
    """Run one controller (through the safety layer) over a scenario.

    Args:
        scenario: The scenario.
        controller: A name :func:`make_controller` knows.
        safety: False: the controller's caps go to the plant as they are (the ceiling).
        clock: Timer for solve times.

    Returns:
        Scores and traces.
    """
    scn, lim = scenario, scenario.limits
    plant = Plant(scn.plant, scn.supply_c.at(0.0), seed=scn.seed)
    ctrl = make_controller(controller, scn, plant)
    layer = SafetyLayer(lim)
    res = RunResult(duration_s=scn.duration_s)
    n_ticks = round(scn.duration_s / scn.tick_s)
    caps = np.zeros(scn.plant.n_gpus)
    prev_caps: tuple[int, ...] | None = None
    pending_leaks = [(t + scn.leak_delay_s, t, s) for t, s in scn.leaks]
    first_leak_t = next((t for t, s in scn.leaks if s != "ok"), None)
    held: CoolantObs | None = None

    def note_leak(t_s: float, state: str, dec: Decision) -> None:
        ceiling = _leak_ceiling(lim, state)
        known = res.leak_to_cap_s is not None
        if not known and first_leak_t is not None and ceiling is not None and max(dec.caps) <= ceiling:
            res.leak_to_cap_s = t_s - first_leak_t

    for k in range(n_ticks):
        t = k * scn.tick_s
        obs = observe(scn, plant, t, held)
        if not scn.silent(t):
            held = obs.coolant
        t0 = clock()
        proposed = ctrl.step(obs)
        res.solve_s.append(clock() - t0)
        dec = layer.apply(obs, proposed) if safety else proposed
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
        share = scn.share_at(t)
        energy0_j = float(np.sum(plant.energy_j))
        good0 = res.goodput
        while True:
            due = [p for p in pending_leaks if t_now < p[0] < t_end]
            t_next = min([p[0] for p in due], default=t_end)
            st = plant.advance(t_next - t_now, caps, offered, supply, flow, lim, share)
            res.served += st.served_s
            res.tokens += st.tokens
            res.goodput += st.good_tokens
            res.seconds_over_limit += st.over_limit_s
            for key, v in (
                ("die", st.over_die_s),
                ("hbm", st.over_mem_s),
                ("node_power", st.over_power_s),
                ("coolant_heat", st.over_heat_s),
            ):
                res.seconds_over[key] += v
            res.seconds_over_target += st.over_target_s
            res.max_temp_c = max(res.max_temp_c, st.max_die_c)
            t_now = t_next
            if t_now >= t_end - 1e-9:
                break
            for p in due:
                if abs(p[0] - t_now) < 1e-9:
                    pending_leaks.remove(p)
            leak_obs = replace(obs, t_s=t_now, coolant=replace(obs.coolant, leak=leak_state(scn, t_now)))  # type: ignore[arg-type]
            if safety:
                dec = layer.apply(leak_obs, dec)
            note_leak(t_now, leak_obs.coolant.leak, dec)
            caps = np.array(dec.caps, dtype=float)
            prev_caps = dec.caps
        node_w = (float(np.sum(plant.energy_j)) - energy0_j) / scn.tick_s
        p_lim = math.inf if lim.node_power_budget_w is None else lim.node_power_budget_w
        q_lim = lim.coolant_heat_max_w(flow)
        if share is not None:
            p_lim, q_lim = min(p_lim, share.power_w), min(q_lim, share.coolant_heat_w)
        res.t_s.append(t)
        res.cap_total.append(int(np.sum(caps)))
        res.served_total.append(float(np.sum(plant.served)))
        res.max_die_c.append(float(np.max(plant.die_c())))
        res.node_power_w.append(node_w)
        res.node_limit_w.append(min(p_lim, q_lim))
        res.safety_override.append(dec.reason != "mpc")
        res.trace.append(
            dict(
                zip(
                    TRACE_COLUMNS,
                    (
                        t,
                        int(np.sum(caps)),
                        round(float(np.sum(plant.served)), 2),
                        round((res.goodput - good0) / scn.tick_s, 1),
                        round(node_w, 1),
                        p_lim,
                        round(st.heat_w, 1),
                        round(q_lim, 1),
                        round(float(np.max(plant.die_c())), 2),
                        round(float(np.max(plant.mem_c())), 2),
                        round(supply, 2),
                        round(flow, 3),
                        round(float(offered[0]), 1),
                        obs.coolant.leak,
                        int(obs.coolant.stale),
                        dec.reason,
                        dec.binding,
                        ";".join(str(c) for c in dec.caps),
                    ),
                    strict=True,
                )
            )
        )
    return res


def write_trace(path: Path, res: RunResult) -> None:
    """One CSV row per control step (columns: :data:`TRACE_COLUMNS`)."""
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=TRACE_COLUMNS)
        w.writeheader()
        w.writerows(res.trace)


def bench_scenario(scenario: Scenario, controllers: tuple[str, ...] = CONTROLLERS) -> dict[str, Any]:
    """Scores of each controller, the oracle and the causal reference on one scenario.

    ``oracle_ratio`` is goodput over the oracle's; ``causal_ratio`` over the causal reference's.
    """
    oracle = run(scenario, "oracle")
    causal = run(scenario, "causal")
    ceiling = run(scenario, "ceiling", safety=False)
    out: dict[str, Any] = {
        "name": scenario.name,
        "oracle": oracle.metrics(),
        "causal": causal.metrics(),
        "oracle_served": round(oracle.served, 1),
        "oracle_goodput": round(oracle.goodput, 0),
        # No controller capped at the SLO's concurrency gets more goodput than this: every GPU
        # there all the time, limits and safety ignored (it crosses them where they bind).
        "ceiling_goodput": round(ceiling.goodput, 0),
        "controllers": {},
    }
    runs: dict[str, RunResult] = {}
    for name in controllers:
        r = run(scenario, name)
        runs[name] = r
        m = r.metrics()
        m["oracle_ratio"] = round(r.goodput / oracle.goodput, 4) if oracle.goodput > 0 else None
        m["causal_ratio"] = round(r.goodput / causal.goodput, 4) if causal.goodput > 0 else None
        m["oracle_served_ratio"] = round(r.served / oracle.served, 4) if oracle.served > 0 else None
        if name == "mpc":
            solve_ms = np.asarray(r.solve_s) * 1e3
            m["solve_ms_p50"] = round(float(np.percentile(solve_ms, 50)), 3)
            m["solve_ms_p99"] = round(float(np.percentile(solve_ms, 99)), 3)
        out["controllers"][name] = m
    out["without_slo"] = {name: run(scenario, f"{name}_no_slo").metrics() for name in ("pid", "threshold")}
    out["_runs"] = runs
    out["_oracle"] = oracle
    out["_causal"] = causal
    out["_scenario"] = scenario
    return out

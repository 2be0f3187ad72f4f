"""True-parameter plant for the benchmark harness: GPUs, power curve, coolant, sensors.

The thermal model is the same RC ladder as :mod:`rackguard.controllers.thermal` but with the
scenario's true parameters, simulated in small substeps. Served concurrency follows the
cap like the inference server's gate (agent/gate.py): when the cap (or the offered load)
rises, requests are admitted at once; when it falls, nothing is admitted and nothing is
killed, so requests in flight drain as they complete, first order with the time constant
of the mean request duration at the concurrency in flight (:class:`RequestTiming`:
≈ 14.5 s at 256, 0.85 s at 1 for the trace's 128-token decodes). Power has AR(1) noise (bursts); sensors quantise die and HBM
temperatures to whole °C (as NVML does) and average power over the tick (as the H100's
power reading does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from rackguard.controllers.api import CoolantObs, GpuObs, Limits, NodeShare, Observation
from rackguard.controllers.power import PowerCurve, RequestTiming
from rackguard.controllers.thermal import N_STATES, ThermalParams, discretize

FloatArray = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class PlantConfig:
    """A simulated node.

    Attributes:
        n_gpus: GPUs on the node.
        thermal: True thermal parameters (identical GPUs).
        power: True power-vs-concurrency curve.
        power_noise_w: Standard deviation of the power's AR(1) noise.
        temp_noise_c: Standard deviation of sensor noise before quantisation.
        requests: Request duration vs concurrency (in-flight requests drain with it).
        substep_s: Simulation substep.
    """

    n_gpus: int
    thermal: ThermalParams
    power: PowerCurve
    power_noise_w: float = 10.0
    temp_noise_c: float = 0.3
    requests: RequestTiming = field(default_factory=RequestTiming)
    substep_s: float = 0.1


@dataclass(slots=True)
class StepStats:
    """What happened during one :meth:`Plant.advance`.

    Attributes:
        served_s: Served concurrency integrated over time (request·s).
        tokens: Tokens decoded.
        good_tokens: Tokens from requests meeting the TPOT SLO (all of them without one).
        over_limit_s: Time over any limit.
        over_die_s: Time a true die was above its max.
        over_mem_s: Time a true HBM was above its max.
        over_power_s: Time the node power (averaged over the step) was above its limit.
        over_heat_s: Time the plate→coolant heat was above its limit.
        over_target_s: Time a true die was above max − margin.
        max_die_c: Hottest die.
        heat_w: Plate→coolant heat at the end of the step.
    """

    served_s: float = 0.0
    tokens: float = 0.0
    good_tokens: float = 0.0
    over_limit_s: float = 0.0
    over_die_s: float = 0.0
    over_mem_s: float = 0.0
    over_power_s: float = 0.0
    over_heat_s: float = 0.0
    over_target_s: float = 0.0
    max_die_c: float = -np.inf
    heat_w: float = 0.0


class Plant:
    """Simulates a node; read :meth:`observe`, advance with :meth:`advance`.

    Args:
        config: The node.
        supply_c: Initial coolant supply temperature.
        seed: Random seed (noise).
    """

    def __init__(self, config: PlantConfig, supply_c: float, seed: int = 0) -> None:
        self.cfg = config
        self.rng = np.random.default_rng(seed)
        n = config.n_gpus
        p_idle = config.power.idle_w
        die, plate, mem = config.thermal.steady_rise_k(p_idle)
        self.x = np.tile([die, plate, mem], (n, 1)).astype(float)
        self.served = np.zeros(n)
        self.noise_w = np.zeros(n)
        self.power_w = np.full(n, p_idle)
        self.energy_j = np.zeros(n)  # each GPU's energy counter
        self._power_sum_w = np.zeros(n)
        self._power_time_s = 0.0
        self.supply_c = supply_c
        self.flow_lpm = config.thermal.flow_ref_lpm

    # --- truth -----------------------------------------------------------------------------------
    def die_c(self) -> FloatArray:
        """True die temperatures."""
        return np.asarray(self.supply_c + self.x[:, 0])

    def mem_c(self) -> FloatArray:
        """True HBM temperatures."""
        return np.asarray(self.supply_c + self.cfg.thermal.mem_offset_c + self.x[:, 2])

    def coolant_heat_w(self) -> float:
        """Heat flowing from the plates into the coolant now."""
        return float(np.sum(self.x[:, 1]) / self.cfg.thermal.r_plate_at(self.flow_lpm))

    # --- dynamics --------------------------------------------------------------------------------
    def advance(
        self,
        duration_s: float,
        cap: FloatArray,
        offered: FloatArray,
        supply_c: float,
        flow_lpm: float,
        limits: Limits | None = None,
        share: NodeShare | None = None,
    ) -> StepStats:
        """Simulate ``duration_s`` with caps and offered load held.

        Args:
            duration_s: How long.
            cap: Concurrency cap per GPU.
            offered: Offered concurrency per GPU.
            supply_c: Coolant supply temperature.
            flow_lpm: Node coolant flow.
            limits: Limits to count violations against (true die/HBM temperature above
                their max, plate→coolant heat above what the flow carries at design ΔT,
                node power averaged over the step above budget) and the TPOT SLO goodput
                is counted against.
            share: The node's rack share; it tightens the node power and coolant heat limits.

        Returns:
            Served concurrency integral, tokens, time over each limit, and the hottest die.
        """
        cfg = self.cfg
        self.supply_c = supply_c
        self.flow_lpm = flow_lpm
        steps = max(1, round(duration_s / cfg.substep_s))
        dt = duration_s / steps
        ad, bd = discretize(cfg.thermal, dt, flow_lpm)
        stats = StepStats()
        node_energy_j = 0.0
        rho = np.exp(-dt / 0.5)
        heat_max_w = np.inf
        if limits is not None:
            heat_max_w = limits.coolant_heat_max_w(flow_lpm)
            if share is not None:
                heat_max_w = min(heat_max_w, share.coolant_heat_w)
        slo = None if limits is None else limits.tpot_slo_s
        for _ in range(steps):
            target = np.minimum(offered, cap)
            decay = np.exp(-dt / cfg.requests.duration_s(self.served))
            self.served = np.where(target >= self.served, target, np.maximum(target, self.served * decay))
            self.noise_w = rho * self.noise_w + np.sqrt(
                1 - rho**2
            ) * cfg.power_noise_w * self.rng.standard_normal(cfg.n_gpus)
            self.power_w = np.maximum(cfg.power.power_w(self.served) + self.noise_w, 0.0)
            self.x = self.x @ ad.T + self.power_w[:, None] * bd[None, :]
            self._power_sum_w += self.power_w * dt
            self.energy_j += self.power_w * dt
            self._power_time_s += dt
            stats.served_s += float(np.sum(self.served)) * dt
            stats.tokens += float(np.sum(cfg.requests.tokens_per_s(self.served))) * dt
            stats.good_tokens += float(np.sum(cfg.requests.tokens_per_s(self.served, slo))) * dt
            die = self.die_c()
            stats.max_die_c = max(stats.max_die_c, float(np.max(die)))
            if limits is not None:
                over_die = bool(np.any(die > limits.gpu_temp_max_c))
                over_mem = bool(np.any(self.mem_c() > limits.mem_temp_max_c))
                over_heat = self.coolant_heat_w() > heat_max_w
                stats.over_die_s += dt if over_die else 0.0
                stats.over_mem_s += dt if over_mem else 0.0
                stats.over_heat_s += dt if over_heat else 0.0
                stats.over_limit_s += dt if (over_die or over_mem or over_heat) else 0.0
                hot = bool(np.any(die > limits.gpu_temp_max_c - limits.margin_c))
                stats.over_target_s += dt if hot else 0.0
                node_energy_j += float(np.sum(self.power_w)) * dt
        stats.heat_w = self.coolant_heat_w()
        # The node power budget is an average over the step (like a power-capping window).
        budget = limits.node_power_budget_w if limits is not None else None
        if share is not None:
            budget = share.power_w if budget is None else min(budget, share.power_w)
        if budget is not None and node_energy_j / duration_s > budget:
            stats.over_limit_s = duration_s
            stats.over_power_s = duration_s
        return stats

    def observe(self, t_s: float, *, leak: str = "ok", stale: bool = False) -> Observation:
        """What the sensors read now (power averaged since the last observation).

        Args:
            t_s: Time stamp.
            leak: Leak detector state.
            stale: Whether coolant sensors are stale (then supply and flow are None).

        Returns:
            The observation.
        """
        n = self.cfg.n_gpus
        noise = self.cfg.temp_noise_c
        die = np.round(self.die_c() + noise * self.rng.standard_normal(n))
        mem = np.round(self.mem_c() + noise * self.rng.standard_normal(n))
        p = self._power_sum_w / self._power_time_s if self._power_time_s > 0 else self.power_w
        self._power_sum_w = np.zeros(n)
        self._power_time_s = 0.0
        gpus = tuple(
            GpuObs(
                gpu_temp_c=float(die[i]),
                mem_temp_c=float(mem[i]),
                power_w=float(p[i]),
                concurrency=float(self.served[i]),
            )
            for i in range(n)
        )
        coolant = CoolantObs(
            supply_temp_c=None if stale else round(self.supply_c, 1),
            flow_lpm=None if stale else round(self.flow_lpm, 2),
            stale=stale,
            leak=leak,  # type: ignore[arg-type]
        )
        return Observation(t_s=t_s, gpus=gpus, coolant=coolant)


def predict_max(
    thermal: ThermalParams,
    x0: FloatArray,
    power_w: FloatArray,
    supply_c: FloatArray,
    flow_lpm: FloatArray,
    step_s: float,
) -> tuple[FloatArray, FloatArray]:
    """Max die and HBM temperature over a trajectory, for many candidates at once.

    Args:
        thermal: Parameters.
        x0: Initial state (3,).
        power_w: Power, shape (m candidates, K steps).
        supply_c: Supply per step (K,).
        flow_lpm: Flow per step (K,).
        step_s: Step length.

    Returns:
        (max die °C, max HBM °C), each (m,).
    """
    m, k_steps = power_w.shape
    x = np.tile(np.asarray(x0, dtype=float), (m, 1))
    die_max = np.full(m, -np.inf)
    mem_max = np.full(m, -np.inf)
    for k in range(k_steps):
        ad, bd = discretize(thermal, step_s, float(flow_lpm[k]))
        x = x @ ad.T + power_w[:, k, None] * bd[None, :]
        die_max = np.maximum(die_max, supply_c[k] + x[:, 0])
        mem_max = np.maximum(mem_max, supply_c[k] + thermal.mem_offset_c + x[:, 2])
    assert x.shape[1] == N_STATES
    return die_max, mem_max


def predict_heat_w(
    thermal: ThermalParams,
    x0: FloatArray,
    power_w: FloatArray,
    flow_lpm: FloatArray,
    step_s: float,
) -> FloatArray:
    """Plate → coolant heat at the end of each step, for many power trajectories at once.

    The GPUs are identical and the model linear, so a node's summed state follows the same
    dynamics with the node's summed power: pass the summed state and node power for the node.

    Args:
        thermal: Parameters.
        x0: Initial state (3,).
        power_w: Power, shape (m candidates, K steps).
        flow_lpm: Flow per step (K,).
        step_s: Step length.

    Returns:
        Heat into the coolant, (m, K).
    """
    m, k_steps = power_w.shape
    x = np.tile(np.asarray(x0, dtype=float), (m, 1))
    out = np.empty((m, k_steps))
    for k in range(k_steps):
        ad, bd = discretize(thermal, step_s, float(flow_lpm[k]))
        x = x @ ad.T + power_w[:, k, None] * bd[None, :]
        out[:, k] = x[:, 1] / thermal.r_plate_at(float(flow_lpm[k]))
    return out

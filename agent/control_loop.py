"""The control step: one observation → MPC → safety layer → decision.

The controllers are pure; this module only builds their limits from config and
the GPUs' own thresholds, holds the operator's bounded overrides (pause, manual
ceiling), and times each step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rackguard.agent import log as logmod
from rackguard.agent.config import Config, ControlConfig, CoolantConfig, read_thermal_model
from rackguard.controllers.api import Decision, Limits, Observation
from rackguard.controllers.ident import AheadError
from rackguard.controllers.mpc import MpcController
from rackguard.controllers.safety import SafetyLayer
from rackguard.controllers.thermal import DEFAULT_PARAMS, ThermalParams
from rackguard.sensors.base import GpuInfo


def limits_from(cfg: ControlConfig, coolant: CoolantConfig, infos: list[GpuInfo]) -> Limits:
    """Limits from config, defaulting temperatures to the strictest GPU's thresholds."""

    def strictest(attr: str, fallback: float) -> float:
        values = [v for i in infos if (v := getattr(i.thresholds, attr)) is not None]
        return min(values) if values else fallback

    power_max = [i.power_limit_max_w for i in infos if i.power_limit_max_w]
    return Limits(
        gpu_temp_max_c=cfg.gpu_temp_max_c or strictest("gpu_max_c", 87.0),
        mem_temp_max_c=cfg.mem_temp_max_c or strictest("mem_max_c", 95.0),
        slowdown_c=cfg.slowdown_c or strictest("slowdown_c", 89.0),
        margin_c=cfg.margin_c,
        node_power_budget_w=cfg.node_power_budget_w,
        design_delta_t_c=coolant.design_delta_t_c,
        coolant_cp_j_per_kg_k=coolant.cp_j_per_kg_k,
        coolant_density_kg_per_l=coolant.density_kg_per_l,
        min_cap=cfg.min_cap,
        max_cap=cfg.max_cap,
        safe_cap=cfg.safe_cap,
        leak_cap=cfg.leak_cap,
        cap_rise_per_s=cfg.cap_rise_per_s,
        node_power_ramp_w_per_s=cfg.node_power_ramp_w_per_s,
        tpot_slo_s=cfg.tpot_slo_s,
        gpu_power_max_w=max(power_max) if power_max else 700.0,
    )


@dataclass(frozen=True, slots=True)
class ThermalModel:
    """The thermal model in force: where it came from, and the file's fit figures."""

    params: ThermalParams = DEFAULT_PARAMS
    source: str = "built-in"
    fit: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: ControlConfig) -> ThermalModel:
        """The configured model file, or the built-in model (the file was checked by the config)."""
        path: Path | None = cfg.thermal_model_file
        if path is None:
            return cls()
        params, doc = read_thermal_model(path)
        fit = {k: doc.get(k) for k in ("trace", "fitted_at", "rmse_open_loop_c", "rmse_10s_c", "warnings")}
        return cls(params, str(path), fit)


@dataclass(frozen=True, slots=True)
class StepTiming:
    mpc_s: float
    safety_s: float


class ControlLoop:
    """Holds the MPC and the safety layer for one node."""

    def __init__(self, limits: Limits, n_gpus: int, model: ThermalModel | None = None) -> None:
        self.limits = limits
        self.model = model or ThermalModel()
        self.mpc = MpcController(limits, n_gpus, self.model.params)
        self.ahead = AheadError(self.model.params, n_gpus)
        self.safety = SafetyLayer(limits)
        self.n_gpus = n_gpus
        self.paused = False
        self.manual_ceiling: int | None = None
        self.proposed: Decision | None = None
        self.decision: Decision | None = None
        self.timings: deque[StepTiming] = deque(maxlen=10_000)
        self.last_step_mono: float | None = None
        self.infos: list[GpuInfo] = []  # the GPUs' thresholds default the limits on reload

    @classmethod
    def from_config(cls, cfg: Config, infos: list[GpuInfo]) -> ControlLoop:
        loop = cls(
            limits_from(cfg.control, cfg.coolant, infos), len(infos), ThermalModel.from_config(cfg.control)
        )
        loop.infos = list(infos)
        return loop

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded config: new limits (``control.*``), the learned models kept.

        The thermal model file is re-read; a changed model restarts the thermal
        identification from it (the learned power curves are kept).
        """
        limits = limits_from(cfg.control, cfg.coolant, self.infos)
        if limits != self.limits:
            self.set_limits(limits)
        try:
            model = ThermalModel.from_config(cfg.control)
        except ValueError as exc:  # changed between the config's check and now
            logmod.get("control").error("thermal_model_rejected", error=str(exc), kept=self.model.source)
            return
        if model != self.model:
            self.set_model(model)

    def set_model(self, model: ThermalModel) -> None:
        """Run on another thermal model: the MPC and the prediction error start from it."""
        power_model = self.mpc.power_model
        self.mpc = MpcController(self.limits, self.n_gpus, model.params)
        self.mpc.power_model = power_model
        self.ahead = AheadError(model.params, self.n_gpus)
        self.model = model
        logmod.get("control").info("thermal_model", source=model.source)

    def model_info(self) -> dict[str, Any]:
        """Which thermal model is in force and how well it predicts now (``/v1/model``)."""
        return {
            "source": self.model.source,
            "params": self.model.params.as_dict(),
            "fit": self.model.fit,
            "rmse_10s_ahead_c": [None if v is None else round(v, 3) for v in self.ahead.rmse_c()],
            "rmse_10s_ahead_samples": self.ahead.samples(),
        }

    def set_limits(self, limits: Limits) -> None:
        """Apply new limits from a reloaded config; the learned models are kept."""
        self.limits = limits
        self.mpc.limits = limits
        self.safety.limits = limits

    def step(self, obs: Observation) -> Decision:
        """A full control step: identify, optimise (unless paused), then safety."""
        flow = obs.coolant.flow_lpm if not obs.coolant.stale else None
        self.ahead.update(
            obs.t_s,
            np.array([np.nan if g.power_w is None or g.lost else g.power_w for g in obs.gpus]),
            np.array([np.nan if g.gpu_temp_c is None or g.lost else g.gpu_temp_c for g in obs.gpus]),
            flow,
        )
        t0 = time.perf_counter()
        proposal = self.mpc.step(obs)  # identification continues while paused
        if not self.paused or self.proposed is None:
            self.proposed = proposal
        t1 = time.perf_counter()
        self.decision = self.safety.apply(obs, self.proposed, manual_ceiling=self.manual_ceiling)
        t2 = time.perf_counter()
        self.timings.append(StepTiming(t1 - t0, t2 - t1))
        self.last_step_mono = time.monotonic()
        return self.decision

    def react(self, obs: Observation) -> Decision:
        """Safety only, between steps (a leak, an operator command): no solver, at once."""
        proposed = self.proposed or Decision(
            caps=(self.limits.safe_cap,) * self.n_gpus, reason="mpc", binding="none"
        )
        self.decision = self.safety.apply(obs, proposed, manual_ceiling=self.manual_ceiling)
        return self.decision

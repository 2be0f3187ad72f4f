"""Baseline controllers the MPC is benchmarked against.

Both watch node power against the node limit (power budget, or the heat the measured
flow carries at design ΔT), like DCGM power policies, so that all controllers face the
same constraints. Their tuning for the shipped scenarios is in BENCHMARKS.md.
"""

from __future__ import annotations

import math

import numpy as np

from rackguard.controllers.api import Binding, Decision, Limits, Observation


def node_limit_w(limits: Limits, obs: Observation) -> tuple[float, Binding]:
    """The node power limit now: the tighter of the budget and the coolant's capacity.

    Args:
        limits: Limits.
        obs: The node now.

    Returns:
        (limit in W, which constraint); (inf, "none") if neither applies.
    """
    out, kind = math.inf, "none"
    if limits.node_power_budget_w is not None:
        out, kind = limits.node_power_budget_w, "power"
    flow = obs.coolant.flow_lpm
    if flow is not None and not obs.coolant.stale and obs.share is None:  # in a rack the share replaces it
        q = limits.coolant_heat_max_w(flow)
        if q < out:
            out, kind = q, "coolant_flow"
    if obs.share is not None:
        if obs.share.power_w < out:
            out, kind = obs.share.power_w, "rack_power"
        if obs.share.coolant_heat_w < out:
            out, kind = obs.share.coolant_heat_w, "rack_coolant"
    return out, kind  # type: ignore[return-value]


def _node_power_w(obs: Observation) -> float:
    return sum(g.power_w for g in obs.gpus if g.power_w is not None and not g.lost)


class ThresholdController:
    """DCGM-style policy: a GPU at/above ``t_hi_c`` gets ``min_cap``, restored below ``t_lo_c``.

    Node power at/above ``node_hi_frac`` of the node limit puts every GPU at ``min_cap``
    until it falls below ``node_lo_frac``.

    Args:
        limits: Limits (min/max cap).
        n_gpus: GPUs on the node.
        t_hi_c: Trip temperature.
        t_lo_c: Restore temperature.
        node_hi_frac: Node power trip fraction of the node limit.
        node_lo_frac: Node power restore fraction.
    """

    def __init__(
        self,
        limits: Limits,
        n_gpus: int,
        *,
        t_hi_c: float = 80.0,
        t_lo_c: float = 75.0,
        node_hi_frac: float = 0.97,
        node_lo_frac: float = 0.85,
    ) -> None:
        self.limits = limits
        self.t_hi_c = t_hi_c
        self.t_lo_c = t_lo_c
        self.node_hi_frac = node_hi_frac
        self.node_lo_frac = node_lo_frac
        self._hot = [False] * n_gpus
        self._node_hot = False

    def step(self, obs: Observation) -> Decision:
        """Trip or restore each GPU on its die temperature."""
        lim = self.limits
        for i, g in enumerate(obs.gpus):
            t = g.gpu_temp_c
            if t is None:
                continue
            if t >= self.t_hi_c:
                self._hot[i] = True
            elif t < self.t_lo_c:
                self._hot[i] = False
        node_w, kind = node_limit_w(lim, obs)
        p = _node_power_w(obs)
        if p >= self.node_hi_frac * node_w:
            self._node_hot = True
        elif p < self.node_lo_frac * node_w:
            self._node_hot = False
        caps = tuple(lim.min_cap if (h or self._node_hot) else lim.max_cap for h in self._hot)
        binding: Binding = kind if self._node_hot else ("gpu_temp" if any(self._hot) else "none")
        return Decision(caps, "mpc", binding, None)


class PidController:
    """PID on each GPU's die temperature (velocity form, tracking anti-windup).

    The output is the cap; a PI loop on node power against ``node_frac`` × node limit
    gives a common ceiling. Both are clamped to [min_cap, max_cap].

    Args:
        limits: Limits.
        n_gpus: GPUs on the node.
        setpoint_c: Die temperature the loop holds.
        kp_per_k: Proportional gain (cap per K).
        ki_per_k_s: Integral gain (cap per K·s).
        kd_s_per_k: Derivative gain (cap·s per K).
        node_frac: Node power setpoint as a fraction of the node limit.
        node_ki_per_w_s: Node loop integral gain (cap per W·s).
        track_factor: Anti-windup: a cap stays ≤ in-flight × track_factor + track_step.
        track_step: See track_factor.
    """

    def __init__(
        self,
        limits: Limits,
        n_gpus: int,
        *,
        setpoint_c: float = 80.0,
        kp_per_k: float = 4.0,
        ki_per_k_s: float = 1.0,
        kd_s_per_k: float = 0.0,
        node_frac: float = 0.95,
        node_ki_per_w_s: float = 0.01,
        track_factor: float = 1.5,
        track_step: float = 8.0,
    ) -> None:
        self.track_factor = track_factor
        self.track_step = track_step
        self.limits = limits
        self.setpoint_c = setpoint_c
        self.kp = kp_per_k
        self.ki = ki_per_k_s
        self.kd = kd_s_per_k
        self.node_frac = node_frac
        self.node_ki = node_ki_per_w_s
        self._u = np.full(n_gpus, float(limits.safe_cap))
        self._e_prev: list[float | None] = [None] * n_gpus
        self._de_prev = [0.0] * n_gpus
        self._u_node = float(limits.max_cap)
        self._t_s: float | None = None

    def step(self, obs: Observation) -> Decision:
        """One PID update per GPU."""
        lim = self.limits
        dt = 1.0 if self._t_s is None else max(obs.t_s - self._t_s, 1e-3)
        self._t_s = obs.t_s
        for i, g in enumerate(obs.gpus):
            if g.gpu_temp_c is None or g.lost:
                continue
            e = self.setpoint_c - g.gpu_temp_c
            e_prev = self._e_prev[i]
            de = 0.0 if e_prev is None else e - e_prev
            du = self.kp * de + self.ki * e * dt + self.kd * (de - self._de_prev[i]) / dt
            # Anti-windup: the cap may not run far ahead of the load actually in flight.
            ceiling = max(g.concurrency * self.track_factor + self.track_step, lim.min_cap)
            self._u[i] = float(np.clip(self._u[i] + du, lim.min_cap, min(lim.max_cap, ceiling)))
            self._e_prev[i] = e
            self._de_prev[i] = de
        node_w, kind = node_limit_w(lim, obs)
        node_bound = False
        if math.isfinite(node_w):
            e_w = self.node_frac * node_w - _node_power_w(obs)
            in_flight = max((g.concurrency for g in obs.gpus if not g.lost), default=0.0)
            ceiling = max(in_flight * self.track_factor + self.track_step, lim.min_cap)
            u_node = self._u_node + self.node_ki * e_w * dt
            self._u_node = float(np.clip(u_node, lim.min_cap, min(lim.max_cap, ceiling)))
            node_bound = bool(np.any(self._u > self._u_node))
        caps = np.minimum(self._u, self._u_node)
        caps_i = tuple(int(max(lim.min_cap, min(lim.max_cap, math.floor(c)))) for c in caps)
        binding: Binding = kind if node_bound else ("gpu_temp" if min(caps_i) < lim.max_cap else "none")
        return Decision(caps_i, "mpc", binding, None)

"""The safety layer: always applied after any controller, always wins.

Precedence of the decision's reason: leak > thermal > gpu_lost > stale > manual > the
controller's own. Every ceiling only lowers caps. Conditions are node-wide, because the
GPUs share one coolant loop: a lost GPU may still be heating it, and a hot GPU means
the loop is in trouble. Caps drop at once; they rise at most ``cap_rise_per_s`` per
second of ``Observation.t_s``. Every trip sits above the MPC's target for the same
temperature (die: slowdown − margin vs max − margin; HBM: max vs max − margin), so the two
never fight over the same degree. ``apply`` is cheap (no model, no solver), so the agent
can call it between ticks the moment a leak message arrives.
"""

from __future__ import annotations

import math

from rackguard.controllers.api import Binding, Decision, Limits, Observation, Reason


class SafetyLayer:
    """Overrides a proposed decision when something is wrong, and rate-limits rises.

    Args:
        limits: Caps and thresholds.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._allowed: list[float] | None = None  # rate-limited ceiling per GPU (fractional)
        self._t_s: float | None = None

    def reset(self) -> None:
        """Forget the rise history (the next call starts from ``safe_cap``)."""
        self._allowed = None
        self._t_s = None

    def ceiling(
        self, obs: Observation, manual_ceiling: int | None = None
    ) -> tuple[int | None, Reason | None]:
        """The tightest safety ceiling now and its reason (None, None when all is well).

        Args:
            obs: The node now.
            manual_ceiling: An operator's ceiling, if any.

        Returns:
            (ceiling, reason) by precedence.
        """
        lim = self.limits
        leak = obs.coolant.leak
        if leak == "critical":
            return 0, "leak"
        if leak == "warning":
            return lim.leak_cap, "leak"
        trip_c = lim.slowdown_c - lim.margin_c
        mem_trip_c = lim.mem_temp_max_c  # the MPC's HBM target is margin_c below it
        for g in obs.gpus:
            if g.lost:
                continue
            if (g.gpu_temp_c is not None and g.gpu_temp_c >= trip_c) or (
                g.mem_temp_c is not None and g.mem_temp_c >= mem_trip_c
            ):
                return lim.safe_cap, "thermal"
        if any(g.lost for g in obs.gpus):
            return lim.safe_cap, "gpu_lost"
        if obs.coolant.stale:
            return lim.safe_cap, "stale"
        if manual_ceiling is not None:
            return max(int(manual_ceiling), 0), "manual"
        return None, None

    def apply(self, obs: Observation, proposed: Decision, *, manual_ceiling: int | None = None) -> Decision:
        """Lower the proposed caps as safety requires and rate-limit rises.

        Args:
            obs: The node now (its ``t_s`` drives the rise limit).
            proposed: The controller's decision.
            manual_ceiling: An operator's ceiling; it only ever lowers caps.

        Returns:
            The decision to act on.
        """
        lim = self.limits
        n = len(obs.gpus)
        caps = [min(max(int(c), 0), lim.max_cap) for c in proposed.caps[:n]]  # never above max_cap
        caps += [lim.safe_cap] * (n - len(caps))
        reason: Reason = proposed.reason
        binding: Binding = proposed.binding

        ceiling, why = self.ceiling(obs, manual_ceiling)
        if ceiling is not None and why is not None:
            lowered = any(c > ceiling for c in caps)
            caps = [min(c, ceiling) for c in caps]
            if why != "manual" or lowered:
                reason = why
                binding = "manual" if why == "manual" else "safety"

        # Rate limit: drop at once, rise at most cap_rise_per_s.
        if self._allowed is None or len(self._allowed) != n:
            self._allowed = [float(lim.safe_cap)] * n
            dt_s = 0.0
        else:
            dt_s = 0.0 if self._t_s is None else max(obs.t_s - self._t_s, 0.0)
        if self._t_s is None or obs.t_s >= self._t_s:
            self._t_s = obs.t_s
        rise = lim.cap_rise_per_s * dt_s
        out = []
        for i, c in enumerate(caps):
            allowed = self._allowed[i] + rise
            if c <= allowed:
                self._allowed[i] = float(c)
                out.append(c)
            else:
                self._allowed[i] = allowed
                out.append(math.floor(allowed))
        return Decision(tuple(out), reason, binding, proposed.predicted_max_temp_c)

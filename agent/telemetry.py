"""Aggregating polled samples into one telemetry message per publish window."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rackguard.agent.messages import GpuTelemetry, Stat
from rackguard.agent.sensing import GpuState

_STAT_FIELDS = ("power_w", "gpu_temp_c", "mem_temp_c", "sm_clock_mhz", "util_pct")


@dataclass(slots=True)
class _Acc:
    n: int = 0
    total: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf

    def add(self, v: float) -> None:
        self.n += 1
        self.total += v
        if v < self.lo:
            self.lo = v
        if v > self.hi:
            self.hi = v

    def stat(self) -> Stat | None:
        if not self.n:
            return None
        return Stat(mean=round(self.total / self.n, 3), min=self.lo, max=self.hi)


@dataclass(slots=True)
class _GpuWindow:
    accs: dict[str, _Acc] = field(default_factory=lambda: {f: _Acc() for f in _STAT_FIELDS})
    samples: int = 0
    last_t_s: float | None = None
    events: dict[str, None] = field(default_factory=dict)  # ordered set
    seen_t_s: float | None = None


class Window:
    """Mean/min/max of each GPU's readings over one publish period.

    A sample is counted once even if the GPU was polled again before it changed
    (``t_s`` identifies a read).
    """

    def __init__(self) -> None:
        self._gpus: dict[int, _GpuWindow] = {}
        self.start_s: float | None = None
        self.end_s: float | None = None

    def add(self, gpus: list[GpuState]) -> None:
        for g in gpus:
            s = g.sample
            if g.state != "ok" or s is None:
                continue
            w = self._gpus.get(g.info.index)
            if w is None:
                w = self._gpus[g.info.index] = _GpuWindow()
            if w.seen_t_s == s.t_s:
                continue
            w.seen_t_s = s.t_s
            w.samples += 1
            w.last_t_s = s.t_s
            for f in _STAT_FIELDS:
                v = getattr(s, f)
                if v is not None and math.isfinite(v):
                    w.accs[f].add(float(v))
            for e in s.clock_events:
                w.events[e] = None
            self.start_s = s.t_s if self.start_s is None else min(self.start_s, s.t_s)
            self.end_s = s.t_s if self.end_s is None else max(self.end_s, s.t_s)

    def gpu_messages(self, gpus: list[GpuState]) -> list[GpuTelemetry]:
        out = []
        for g in gpus:
            w = self._gpus.get(g.info.index, _GpuWindow())
            s = g.sample
            stats = {f: w.accs[f].stat() for f in _STAT_FIELDS}
            out.append(
                GpuTelemetry(
                    index=g.info.index,
                    uuid=g.info.uuid,
                    state=g.state,
                    error=g.error,
                    samples=w.samples,
                    t_s=w.last_t_s,
                    energy_j=s.energy_j if s is not None and g.state == "ok" else None,
                    power_limit_w=s.power_limit_w if s is not None and g.state == "ok" else None,
                    clock_events=list(w.events),
                    **stats,
                )
            )
        return out

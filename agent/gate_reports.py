"""The agent's side of the gates: reports from inference servers on ``.../gate/+``.

Each gate (agent/gate.py) publishes cumulative counters about once a second. The
tracker keeps the latest report per gate, turns the counters into per-window
deltas (a counter that goes backwards means the gate restarted: its new total
is the delta), and answers "how many requests are in flight on GPU i" from
fresh reports only.

A gate seen for the first time only sets the baseline: its history before the
agent saw it is not attributed to the current window.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError

from rackguard.agent import log as logmod
from rackguard.agent.messages import GateReport
from rackguard.agent.metrics import Metrics

if TYPE_CHECKING:
    from rackguard.agent.config import Config

FORGET_AFTER_S = 600.0  # a gate silent this long is dropped from the table
MAX_GATES = 1024  # gates tracked at once: a report from one more is rejected (memory, metric series)
MAX_CLASSES = 64  # distinct workload-class names counted (metrics labels stay bounded)
_CLASS_OUTCOMES = (
    ("completed_total", "ok"),
    ("slo_met_total", "slo_met"),
    ("shed_total", "shed"),
    ("spilled_total", "spilled"),
    ("error_total", "error"),
)


@dataclass(slots=True)
class _Gate:
    report: GateReport
    received_mono_s: float


class GateTracker:
    """Latest report per gate, and token/request deltas per publish window.

    Args:
        max_age_s: A report older than this no longer counts for in-flight.
        metrics: The agent's metrics.
        monotonic: Monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        max_age_s: float,
        *,
        metrics: Metrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age_s = max_age_s
        self.metrics = metrics
        self.monotonic = monotonic
        self.gates: dict[str, _Gate] = {}
        self.window_tokens = 0
        self.window_requests = 0
        self.rejected_total = 0
        self.class_names: set[str] = set()
        self.class_totals: dict[str, dict[str, int]] = {}
        self.log = logmod.get("gates")
        self._rl = logmod.RateLimitedLog(self.log, 60.0)

    def reconfigure(self, cfg: Config) -> None:
        self.max_age_s = cfg.gate.report_max_age_s

    def handle(self, topic: str, payload: bytes) -> GateReport | None:
        """The MQTT handler for ``.../gate/+``. Never raises on any payload."""
        try:
            report = GateReport.model_validate_json(payload)
        except ValidationError as exc:
            err = exc.errors()[0]
            self._reject(topic, f"invalid_{err['type']}"[:48], str(err["msg"]))
            return None
        if topic.rsplit("/", 1)[-1] != report.gate_id:
            self._reject(topic, "gate_id_mismatch", "gate_id does not match the topic")
            return None
        now = self.monotonic()
        prev = self.gates.get(report.gate_id)
        if prev is None and len(self.gates) >= MAX_GATES:
            self._reject(topic, "too_many_gates", f"{MAX_GATES} gates tracked already")
            return None
        if prev is not None:
            self.window_requests += _delta(prev.report.completed_total, report.completed_total)
            tokens = _delta(prev.report.tokens_total, report.tokens_total)
            self.window_tokens += tokens
            if self.metrics is not None and tokens:
                self.metrics.tokens.inc(tokens)
            self._classes(prev.report, report)
        self.gates[report.gate_id] = _Gate(report, now)
        return report

    def _classes(self, before: GateReport, after: GateReport) -> None:
        """Per-class deltas of a gateway's report (goodput and SLO attainment per class)."""
        if after.classes is None:
            return
        old = before.classes or {}
        for name, c in after.classes.items():
            if name not in self.class_names:
                if len(self.class_names) >= MAX_CLASSES:
                    continue
                self.class_names.add(name)
            prev = old.get(name)
            totals = self.class_totals.setdefault(name, dict.fromkeys([o for _, o in _CLASS_OUTCOMES], 0))
            for field, outcome in _CLASS_OUTCOMES:
                d = _delta(getattr(prev, field) if prev else 0, getattr(c, field))
                totals[outcome] += d
                if self.metrics is not None and d:
                    self.metrics.class_requests.labels(name, outcome).inc(d)
            goodput = _delta(prev.goodput_tokens_total if prev else 0, c.goodput_tokens_total)
            energy_j = c.energy_j_total - (prev.energy_j_total if prev else 0.0)
            energy_j = energy_j if energy_j >= 0 else c.energy_j_total
            if self.metrics is not None:
                self.metrics.class_goodput_tokens.labels(name).inc(goodput)
                self.metrics.class_energy.labels(name).inc(energy_j)

    def slo_attainment(self, name: str) -> float | None:
        """Share of a class's ok requests within its SLOs, since the agent started (None: none yet)."""
        t = self.class_totals.get(name)
        return t["slo_met"] / t["ok"] if t and t["ok"] else None

    def _reject(self, topic: str, reason: str, detail: str) -> None:
        self.rejected_total += 1
        if self.metrics is not None:
            self.metrics.gate_reports_rejected.inc()
        self._rl.warning("gate_report_rejected", reason, topic=topic[-120:], detail=detail[:200])

    def fresh(self) -> list[GateReport]:
        """Reports younger than ``max_age_s``; forgets gates silent for long."""
        now = self.monotonic()
        for gid in [g for g, s in self.gates.items() if now - s.received_mono_s > FORGET_AFTER_S]:
            del self.gates[gid]
            if self.metrics is not None:
                self.metrics.gate_in_flight.remove(gid)
        return [s.report for s in self.gates.values() if now - s.received_mono_s <= self.max_age_s]

    def in_flight(self, n_gpus: int) -> list[float | None]:
        """Requests in flight per GPU from fresh reports (None: no fresh gate covers that GPU).

        A node-wide gate (``gpu`` null) is spread evenly over all GPUs, a gate over several
        GPUs (``gpus``, a gateway's upstream) evenly over those.
        """
        out: list[float | None] = [None] * n_gpus
        for r in self.fresh():
            if r.gpus is not None:
                targets = [g for g in r.gpus if g < n_gpus]
                share = r.in_flight / max(len(r.gpus), 1)
            elif r.gpu is None:
                targets, share = list(range(n_gpus)), r.in_flight / max(n_gpus, 1)
            elif r.gpu < n_gpus:
                targets, share = [r.gpu], float(r.in_flight)
            else:
                continue
            for i in targets:
                out[i] = (out[i] or 0.0) + share
        return out

    def take_window(self) -> tuple[int, int]:
        """(tokens, requests) completed since the last call; resets both."""
        out = (self.window_tokens, self.window_requests)
        self.window_tokens = self.window_requests = 0
        return out

    def update_metrics(self) -> None:
        if self.metrics is None:
            return
        for r in self.fresh():
            self.metrics.gate_in_flight.labels(r.gate_id).set(r.in_flight)


def _delta(before: int, after: int) -> int:
    """Counter delta; a counter that went backwards restarted from zero."""
    return after - before if after >= before else after

"""The agent's local HTTP routes: ``/healthz``, ``/metrics``, ``/v1/cap``, ``/v1/model``, ``/debug/timings``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rackguard.agent.http import METRICS_CONTENT_TYPE, Route, json_response
from rackguard.agent.messages import dump

if TYPE_CHECKING:
    from rackguard.agent.daemon import Agent


def health(agent: Agent) -> list[str]:
    """What is wrong right now (empty when healthy)."""
    problems = []
    now = time.monotonic()
    cfg = agent.cfg
    poll_stall_s = max(2.0, 5 * cfg.sensors.poll_period_s)
    if agent.poller is None or agent.last_poll_mono is None or now - agent.last_poll_mono > poll_stall_s:
        problems.append("sensing loop stalled")
    elif lost := [g.info.index for g in agent.poller.gpus if g.state == "lost"]:
        problems.append(f"gpu lost: {lost}")
    for sink in agent.sinks:
        problems += sink.problems()
    control_stall_s = max(3.0, 3 * cfg.control.period_s)
    last = agent.control.last_step_mono if agent.control else None
    if last is None or now - last > control_stall_s:
        problems.append("control loop stalled")
    return problems


def degraded(agent: Agent) -> list[str]:
    """What keeps the agent from full service although it runs (``/healthz`` stays 200)."""
    out = []
    link = agent.link
    box = link.outbox
    if box.fault:
        out.append(f"outbox not durable: {box.fault}")
    if box.lost_on_open:
        out.append("outbox was lost at start (corrupt or emptied): queued messages and their seq may be gone")
    if refusal := link.refusing():
        out.append(f"broker refuses publishes: {refusal}")
    if not link.connected:
        out.append("mqtt disconnected")
    elif agent.coolant.priority_topics() and not link.priority_connected:
        out.append("mqtt safety link (leak detectors) disconnected")
    snap = agent.coolant.snapshot()
    if snap.stale:
        out.append(f"coolant stale: {', '.join(snap.stale_sensors)}")
    if snap.leak != "ok":
        out.append(f"leak {snap.leak}: {', '.join(snap.leak_sensors) or 'detector'}")
    msg = agent.cap_msg
    if msg is not None and msg.reason not in ("mpc", "manual"):
        out.append(f"cap held by safety: {msg.reason} (total {msg.total})")
    return out


def routes(agent: Agent) -> dict[str, Route]:
    """The routes, bound to a running agent."""

    def metrics() -> tuple[int, str, bytes]:
        agent.reports.link_metrics()
        return 200, METRICS_CONTENT_TYPE, agent.metrics.render()

    def healthz() -> tuple[int, str, bytes]:
        problems = health(agent)
        worse = degraded(agent)
        agent.metrics.degraded.set(1.0 if worse else 0.0)
        status = "failed" if problems else "degraded" if worse else "ok"
        body = {"ok": not problems, "status": status, "problems": problems, "degraded": worse}
        return json_response(503 if problems else 200, body)

    def cap() -> tuple[int, str, bytes]:
        msg = agent.cap_msg
        if msg is None:
            return json_response(503, {"error": "no cap decided yet"})
        return 200, "application/json", dump(msg)

    def model() -> tuple[int, str, bytes]:
        if agent.control is None:
            return json_response(503, {"error": "control loop not started"})
        return json_response(200, agent.control.model_info())

    def timings() -> tuple[int, str, bytes]:
        steps = list(agent.control.timings) if agent.control else []
        return json_response(
            200,
            {
                "ticks_total": agent.ticks_total,
                "tick_late_s": list(agent.tick_late_s),
                "control_late_s": list(agent.control_late_s),
                "steps_total": len(steps),
                "mpc_s": [t.mpc_s for t in steps],
                "safety_s": [t.safety_s for t in steps],
            },
        )

    return {
        "/metrics": metrics,
        "/healthz": healthz,
        "/v1/cap": cap,
        "/v1/model": model,
        "/debug/timings": timings,
    }

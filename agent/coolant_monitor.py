"""Coolant, CDU and leak sensors over MQTT: subscription, state, leak latch, metrics.

:class:`CoolantMonitor` owns the MQTT side of ``sensors/coolant.py``. Every
message on a declared sensor topic or on a ``coolant.subscribe`` filter goes
through :meth:`CoolantMonitor.handle`, which parses it, counts a rejection in
``rackguard_sensor_rejected_total{sensor,reason}`` (rate-limit logged), or
stores the valid reading. A leak is handed to ``on_leak`` inside the same call,
then its detector's alarm state is set on ``alarm/<sensor>``: retained, latest
value wins, and re-published on every (re)connect, so a subscriber that arrives
after a broker restart without persistence still sees a latched leak.

Leak latch: a ``Warning``/``Critical`` reading latches the detector. With
``leak_clear = "ack"`` the latch clears only when the detector reads OK (fresh)
*and* an operator calls :meth:`CoolantMonitor.acknowledge` after that; with
``"auto"`` an OK reading clears it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from rackguard.agent import inbox
from rackguard.agent import log as logmod
from rackguard.agent.config import CoolantConfig
from rackguard.agent.messages import Alarm, CoolantSensorTelemetry, CoolantTelemetry, NodeId, dump
from rackguard.agent.metrics import LEAK_STATES, Metrics
from rackguard.agent.mqtt import topic_matches
from rackguard.physics import flow_required_lpm
from rackguard.sensors.coolant import (
    LEAK_SEVERITY,
    CoolantSensor,
    CoolantSnapshot,
    LeakSensor,
    LeakState,
    Reading,
    Rejected,
    heat_removed_w,
    parse,
    quantities,
)

UNDECLARED = "_undeclared"  # sensor label for messages on no declared topic


@dataclass(frozen=True, slots=True)
class LeakEvent:
    """A change of one detector's leak state, delivered to the safety hook.

    Attributes:
        sensor_id: The detector.
        state: What the detector reads now (``ok`` on a clear).
        latched: The latched state after this event (``ok`` = latch cleared).
        t_s: Wall-clock sample time of the reading (or of the acknowledgement).
        received_mono_s: ``time.monotonic()`` when the message was handled.
    """

    sensor_id: str
    state: LeakState
    latched: LeakState
    t_s: float
    received_mono_s: float


class _Subscriber(Protocol):
    def subscribe(
        self, topic_filter: str, handler: Callable[[str, bytes], None], lane: Callable[[str], int]
    ) -> None: ...
    def subscribe_priority(self, topic: str) -> None: ...


class _SensorState:
    __slots__ = ("decl", "latched", "leak", "rejected", "stale_logged", "t_s", "valid_mono_s", "values")

    def __init__(self, decl: CoolantSensor) -> None:
        self.decl = decl
        self.values: dict[str, float] = {}
        self.leak: LeakState | None = None
        self.latched: LeakState = "ok"
        self.t_s: float | None = None  # wall-clock sample time of the latest valid reading
        self.valid_mono_s: float | None = None  # the same instant on the monotonic clock
        self.rejected = 0
        self.stale_logged = False

    def age_s(self, now_mono_s: float) -> float | None:
        return None if self.valid_mono_s is None else max(0.0, now_mono_s - self.valid_mono_s)

    def stale(self, now_mono_s: float) -> bool:
        age = self.age_s(now_mono_s)
        return age is None or age > self.decl.max_age_s


class CoolantMonitor:
    """The agent's view of the coolant loop.

    Args:
        cfg: The ``[coolant]`` config section.
        node: This node (for alarm messages).
        metrics: The agent's metrics (rejections are counted there).
        set_alarm: Sets a retained state message (``MqttLink.set_state``: topic, payload);
            each detector's alarm goes to ``<alarm_topic>/<sensor>``.
        alarm_topic: The prefix of the per-sensor alarm topics.
        on_leak: The safety hook, called synchronously on every leak state change.
        clock: Wall-clock seconds (tests pass their own).
        monotonic: Monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        cfg: CoolantConfig,
        *,
        node: NodeId,
        metrics: Metrics,
        set_alarm: Callable[[str, bytes], None] | None = None,
        alarm_topic: str | None = None,
        on_leak: Callable[[LeakEvent], None] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.node = node
        self.metrics = metrics
        self.set_alarm = set_alarm
        self.alarm_topic = alarm_topic
        self.on_leak = on_leak
        self.clock = clock
        self.monotonic = monotonic
        self.sensors = {s.id: _SensorState(s) for s in cfg.sensors}
        self.by_topic = {s.topic: self.sensors[s.id] for s in cfg.sensors}
        self.accepted_total = 0
        self.rejected_total = 0
        self.undeclared_total = 0
        self.log = logmod.get("coolant")
        self._rl = logmod.RateLimitedLog(self.log, 60.0)

    # -- MQTT ------------------------------------------------------------------------------
    def topic_filters(self) -> list[str]:
        """The filters to subscribe: ``coolant.subscribe`` plus declared topics they miss."""
        filters = list(dict.fromkeys(self.cfg.subscribe))
        for topic in self.by_topic:
            if not any(topic_matches(f, topic) for f in filters):
                filters.append(topic)
        return filters

    def attach(self, link: _Subscriber) -> None:
        """Subscribe :meth:`handle` on the link (once per filter, so no message is seen twice)."""
        for f in self.topic_filters():
            link.subscribe(f, self._on_message, self.lane)
        for topic in self.priority_topics():
            link.subscribe_priority(topic)

    def priority_topics(self) -> list[str]:
        """Topics of the leak detectors (and CDUs, which may carry one): the safety connection's."""
        return [t for t in self.by_topic if self.lane(t) == inbox.LEAK]

    def lane(self, topic: str) -> int:
        """Inbox lane of a topic: leak detectors first, then the other declared sensors, then the rest."""
        state = self.by_topic.get(topic)
        if state is None:
            return inbox.OTHER
        return inbox.LEAK if state.decl.kind in ("leak", "cdu") else inbox.SENSOR

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.handle(topic, payload)

    def handle(self, topic: str, payload: bytes) -> Reading | Rejected:
        """Parse and apply one message; the MQTT handler. Never raises on any payload."""
        state = self.by_topic.get(topic)
        if state is None:
            r = Rejected(UNDECLARED, "undeclared_topic", f"topic {topic[:120]!r}")
            self.undeclared_total += 1
            self._reject(r)
            return r
        result = parse(state.decl, payload, now_s=self.clock(), max_future_s=self.cfg.max_future_s)
        if isinstance(result, Rejected):
            state.rejected += 1
            self._reject(result)
            return result
        self.accepted_total += 1
        self._apply(state, result)
        return result

    def _reject(self, r: Rejected) -> None:
        self.rejected_total += 1
        self.metrics.sensor_rejected.labels(r.sensor_id, r.reason).inc()
        self._rl.warning("coolant_payload_rejected", r.reason, sensor=r.sensor_id, detail=r.detail)

    def _apply(self, state: _SensorState, reading: Reading) -> None:
        now_mono = self.monotonic()
        # Place the sample time on the monotonic clock, so age survives wall-clock steps.
        sample_mono = now_mono - max(0.0, self.clock() - reading.t_s)
        if state.valid_mono_s is not None and sample_mono < state.valid_mono_s:
            return  # older than what we have (reordered or replayed): keep the newer
        was_stale = state.stale(now_mono)
        state.valid_mono_s = sample_mono
        state.t_s = reading.t_s
        if was_stale and state.stale_logged:
            self.log.info("coolant_sensor_fresh", sensor=state.decl.id)
        state.stale_logged = False
        if reading.leak is not None:
            self._apply_leak(state, reading.leak, reading.t_s, now_mono)
            return
        state.values = dict(reading.values)

    # -- leaks -----------------------------------------------------------------------------
    def _apply_leak(self, state: _SensorState, leak: LeakState, t_s: float, now_mono: float) -> None:
        before = (state.leak or "ok", state.latched)
        state.leak = leak
        if LEAK_SEVERITY[leak] > LEAK_SEVERITY[state.latched]:
            state.latched = leak
        elif leak == "ok" and self.cfg.leak_clear == "auto":
            state.latched = "ok"
        if (leak, state.latched) != before:
            self._leak_event(LeakEvent(state.decl.id, leak, state.latched, t_s, now_mono))

    def acknowledge(self, sensor_id: str | None = None) -> list[str]:
        """An operator acknowledges leak latches (one detector, or all with None).

        A latch clears only if its detector's latest reading is a fresh OK; an
        acknowledgement while it still leaks (or is stale) changes nothing.

        Returns:
            The ids of the detectors whose latch was cleared.

        Raises:
            KeyError: ``sensor_id`` is not a declared leak detector.
        """
        if sensor_id is not None and not isinstance(self.sensors[sensor_id].decl, LeakSensor):
            raise KeyError(f"{sensor_id!r} is not a leak detector")
        now_mono = self.monotonic()
        cleared: list[str] = []
        for s in self.sensors.values():
            if not isinstance(s.decl, LeakSensor) or s.latched == "ok":
                continue
            if sensor_id is not None and s.decl.id != sensor_id:
                continue
            if s.leak != "ok" or s.stale(now_mono):
                self.log.warning(
                    "leak_ack_refused", sensor=s.decl.id, reading=s.leak, stale=s.stale(now_mono)
                )
                continue
            s.latched = "ok"
            cleared.append(s.decl.id)
            self._leak_event(LeakEvent(s.decl.id, "ok", "ok", self.clock(), now_mono))
        return cleared

    def _leak_event(self, ev: LeakEvent) -> None:
        if self.on_leak is not None:
            try:
                self.on_leak(ev)  # the safety hook first: nothing may delay it
            except Exception:
                self.log.exception("on_leak_failed", sensor=ev.sensor_id)
        self.update_metrics()
        level = self.log.info if ev.latched == "ok" else self.log.error
        level("leak_state", sensor=ev.sensor_id, state=ev.state, latched=ev.latched)
        if self.set_alarm is not None and self.alarm_topic is not None:
            alarm = Alarm(
                t_s=ev.t_s,
                node=self.node,
                alarm="coolant_leak",
                sensor=ev.sensor_id,
                state=ev.state,
                latched=ev.latched,
                ack_required=ev.latched != "ok" and self.cfg.leak_clear == "ack",
            )
            self.set_alarm(f"{self.alarm_topic}/{ev.sensor_id}", dump(alarm))

    # -- staleness and snapshots -----------------------------------------------------------
    def check(self) -> list[str]:
        """Log sensors that just went stale (call once per tick). Returns the stale ids."""
        now_mono = self.monotonic()
        stale = [s for s in self.sensors.values() if s.stale(now_mono)]
        for s in stale:
            if not s.stale_logged:
                s.stale_logged = True
                self.log.warning("coolant_sensor_stale", sensor=s.decl.id, age_s=s.age_s(now_mono))
        return [s.decl.id for s in stale]

    def update_metrics(self) -> None:
        """Each sensor's staleness and age, and each leak detector's reading and latch."""
        m = self.metrics
        now_mono = self.monotonic()
        for s in self.sensors.values():
            sid = s.decl.id
            m.coolant_sensor_stale.labels(sid).set(1.0 if s.stale(now_mono) else 0.0)
            age = s.age_s(now_mono)
            m.coolant_sensor_age_s.labels(sid).set(float("nan") if age is None else age)
            if isinstance(s.decl, LeakSensor):
                for state in LEAK_STATES:
                    m.leak_state.labels(sid, state).set(1.0 if (s.leak or "ok") == state else 0.0)
                m.leak_latched.labels(sid).set(0.0 if s.latched == "ok" else 1.0)

    def snapshot(self, gpu_power_w: float | None = None) -> CoolantSnapshot:
        """The loop as plain data: fresh values only, staleness, the worst leak state.

        Args:
            gpu_power_w: The node's electrical GPU power, for the derived values.
        """
        now_mono = self.monotonic()
        best: dict[str, tuple[float, float]] = {}  # quantity -> (sample mono, value)
        stale_ids: list[str] = []
        leak: LeakState = "ok"
        leak_ids: list[str] = []
        for s in self.sensors.values():
            if s.stale(now_mono):
                stale_ids.append(s.decl.id)
            elif s.valid_mono_s is not None:
                for q in quantities(s.decl):
                    if q in s.values and (q not in best or s.valid_mono_s > best[q][0]):
                        best[q] = (s.valid_mono_s, s.values[q])
            if s.latched != "ok":
                leak_ids.append(s.decl.id)
            worst = max(s.latched, s.leak or "ok", key=LEAK_SEVERITY.__getitem__)
            leak = max(leak, worst, key=LEAK_SEVERITY.__getitem__)
        v = {q: x for q, (_, x) in best.items()}
        supply, ret, flow = v.get("supply_temp_c"), v.get("return_temp_c"), v.get("flow_lpm")
        c = self.cfg
        heat = None
        if supply is not None and ret is not None and flow is not None:
            heat = heat_removed_w(
                flow, supply, ret, cp_j_per_kg_k=c.cp_j_per_kg_k, density_kg_per_l=c.density_kg_per_l
            )
        required = None
        if gpu_power_w is not None:
            required = flow_required_lpm(
                gpu_power_w,
                design_delta_t_c=c.design_delta_t_c,
                cp_j_per_kg_k=c.cp_j_per_kg_k,
                density_kg_per_l=c.density_kg_per_l,
            )
        return CoolantSnapshot(
            t_s=self.clock(),
            supply_temp_c=supply,
            return_temp_c=ret,
            flow_lpm=flow,
            diff_pressure_kpa=v.get("diff_pressure_kpa"),
            stale=bool(stale_ids),
            stale_sensors=tuple(stale_ids),
            leak=leak,
            leak_sensors=tuple(leak_ids),
            gpu_power_w=gpu_power_w,
            heat_removed_w=heat,
            flow_required_lpm=required,
            flow_margin=flow / required if flow is not None and required else None,
            heat_capture_ratio=heat / gpu_power_w if heat is not None and gpu_power_w else None,
        )

    def telemetry(self, snap: CoolantSnapshot) -> CoolantTelemetry:
        """The ``coolant`` section of a telemetry message: ``snap`` (the tick's) plus each sensor's state."""
        now_mono = self.monotonic()

        def r(x: float | None, nd: int = 3) -> float | None:
            return None if x is None else round(x, nd)

        sensors = []
        for s in self.sensors.values():
            age = s.age_s(now_mono)
            sensors.append(
                CoolantSensorTelemetry(
                    id=s.decl.id,
                    kind=s.decl.kind,
                    state="stale" if s.stale(now_mono) else "ok",
                    age_s=r(age),
                    t_s=s.t_s,
                    values={k: round(x, 4) for k, x in s.values.items()},
                    leak=s.leak,
                    leak_latched=s.latched if isinstance(s.decl, LeakSensor) else None,
                    rejected=s.rejected,
                )
            )
        return CoolantTelemetry(
            supply_temp_c=r(snap.supply_temp_c),
            return_temp_c=r(snap.return_temp_c),
            flow_lpm=r(snap.flow_lpm),
            diff_pressure_kpa=r(snap.diff_pressure_kpa),
            stale=snap.stale,
            leak=snap.leak,
            leak_latched=bool(snap.leak_sensors),
            gpu_power_w=r(snap.gpu_power_w, 1),
            heat_removed_w=r(snap.heat_removed_w, 1),
            flow_required_lpm=r(snap.flow_required_lpm),
            flow_margin=r(snap.flow_margin, 4),
            heat_capture_ratio=r(snap.heat_capture_ratio, 4),
            rejected_undeclared=self.undeclared_total,
            sensors=sensors,
        )

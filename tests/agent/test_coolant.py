"""agent/coolant_monitor.py: coolant sensors through a real mosquitto, plus the monitor's state rules in-process."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from rackguard.agent import config as configmod
from rackguard.agent.coolant_monitor import CoolantMonitor, LeakEvent
from rackguard.agent.daemon import Agent
from rackguard.agent.messages import NodeId, Telemetry
from rackguard.agent.metrics import Metrics

BASE = "rackguard/demo/r1/n1"
CDU_TOPIC = "bms/demo/r1/cdu"
LEAK_TOPIC = "bms/demo/r1/leak-tray"
POLL_S = 0.1


def cdu_doc(
    supply_c: float = 32.0, return_c: float = 40.0, flow_lpm: float = 12.0, dp_kpa: float = 80.0
) -> bytes:
    return json.dumps(
        {
            "SupplyTemperatureCelsius": {"Reading": supply_c},
            "ReturnTemperatureCelsius": {"Reading": return_c},
            "FlowLitersPerMinute": {"Reading": flow_lpm},
            "DeltaPressurekPa": {"Reading": dp_kpa},
        }
    ).encode()


def leak_doc(state: str) -> bytes:
    return json.dumps({"DetectorState": state}).encode()


def coolant_cfg(**over: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "subscribe": ["bms/demo/r1/#"],
        "sensors": [
            {"id": "cdu", "kind": "cdu", "topic": CDU_TOPIC, "max_age_s": 0.5},
            {"id": "leak-tray", "kind": "leak", "topic": LEAK_TOPIC, "max_age_s": 5.0},
        ],
    }
    c.update(over)
    return c


def make_cfg(port: int, **coolant: Any) -> configmod.Config:
    return configmod.validate(
        {
            "node": {"site": "demo", "rack": "r1", "name": "n1"},
            "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.1},
            "sensors": {"backend": "sim", "poll_period_s": POLL_S, "slow_period_s": 0.5},
            "sim": {"gpus": 2},
            "telemetry": {"publish_period_s": POLL_S},
            "http": {"port": 0},
            "coolant": coolant_cfg(**coolant),
        }
    )


class Publisher:
    """A plain paho client publishing with QoS 1 (the BMS gateway)."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def publisher(broker: Any) -> Iterator[Publisher]:
    p = Publisher(broker.port)
    yield p
    p.close()


class Running:
    def __init__(
        self, agent: Agent, telemetry: list[tuple[float, Telemetry]], leaks: list[LeakEvent]
    ) -> None:
        self.agent = agent
        self.telemetry = telemetry
        self.leaks = leaks

    async def until(self, pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not pred():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)


async def start_agent(cfg: configmod.Config) -> tuple[Running, asyncio.Task[int]]:
    telemetry: list[tuple[float, Telemetry]] = []
    leaks: list[LeakEvent] = []
    agent = Agent(
        cfg,
        on_telemetry=lambda t: telemetry.append((time.monotonic(), t)),
        on_leak=leaks.append,
    )
    task = asyncio.create_task(agent.run())
    r = Running(agent, telemetry, leaks)
    await r.until(lambda: agent.link.subscribed)  # every SUBACK in: a message sent now arrives
    return r, task


async def stop_agent(r: Running, task: asyncio.Task[int]) -> None:
    r.agent.request_stop("test")
    assert await asyncio.wait_for(task, 10) == 0


async def feed(pub: Publisher, topic: str, payload: bytes, period_s: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.to_thread(pub.send, topic, payload)
        await asyncio.sleep(period_s)


# -- through mosquitto -------------------------------------------------------------------------
async def test_valid_readings_reach_telemetry_with_derived_physics(
    broker: Any, publisher: Publisher, subscriber: Any
) -> None:
    sub = subscriber(broker, f"{BASE}/telemetry")
    r, task = await start_agent(make_cfg(broker.port))
    stop = asyncio.Event()
    feeder = asyncio.create_task(feed(publisher, CDU_TOPIC, cdu_doc(30.0, 38.0, 9.0, 70.0), 0.05, stop))
    try:
        await r.until(lambda: any(t.coolant and t.coolant.flow_lpm == 9.0 for _, t in r.telemetry))
        tel = next(t for _, t in reversed(r.telemetry) if t.coolant and t.coolant.flow_lpm == 9.0)
        c = tel.coolant
        assert c is not None
        assert (c.supply_temp_c, c.return_temp_c, c.diff_pressure_kpa) == (30.0, 38.0, 70.0)
        heat_w = 9.0 / 60 * 0.997 * 4186 * 8.0
        assert c.heat_removed_w == pytest.approx(heat_w, abs=0.1)
        assert c.gpu_power_w is not None and c.gpu_power_w > 0
        required = c.gpu_power_w / (0.997 * 4186 * 10.0) * 60
        assert c.flow_required_lpm == pytest.approx(required, rel=1e-3)
        assert c.flow_margin == pytest.approx(9.0 / required, rel=1e-3)
        assert c.heat_capture_ratio == pytest.approx(heat_w / c.gpu_power_w, rel=1e-3)
        cdu = next(s for s in c.sensors if s.id == "cdu")
        assert cdu.state == "ok" and cdu.age_s is not None and cdu.age_s < 0.5
        # Consumers on the broker see the same section.
        msg = (
            await asyncio.to_thread(
                sub.wait_for, lambda m: (m.json().get("coolant") or {}).get("flow_lpm") == 9.0, 10
            )
        )[0]
        assert msg.json()["coolant"]["heat_removed_w"] == pytest.approx(heat_w, abs=0.1)
        # Garbage on a declared topic and a message on an undeclared topic are counted, not used.
        await asyncio.to_thread(publisher.send, CDU_TOPIC, b'{"FlowLitersPerMinute": NaN}')
        await asyncio.to_thread(publisher.send, "bms/demo/r1/mystery", b"12")
        m = r.agent.metrics.sensor_rejected
        await r.until(lambda: m.labels("_undeclared", "undeclared_topic")._value.get() == 1)
        assert m.labels("cdu", "not_finite")._value.get() == 1
        assert r.agent.coolant.snapshot().flow_lpm == 9.0
        assert (
            b'rackguard_sensor_rejected_total{reason="not_finite",sensor="cdu"} 1.0'
            in r.agent.metrics.render()
        )
    finally:
        stop.set()
        await feeder
        await stop_agent(r, task)


async def test_silent_sensor_goes_stale_within_max_age_plus_one_poll(
    broker: Any, publisher: Publisher
) -> None:
    r, task = await start_agent(make_cfg(broker.port))
    stop = asyncio.Event()
    feeder = asyncio.create_task(feed(publisher, CDU_TOPIC, cdu_doc(), 0.05, stop))
    try:

        def cdu_state(t: Telemetry) -> str:
            assert t.coolant is not None
            return next(s.state for s in t.coolant.sensors if s.id == "cdu")

        await r.until(lambda: bool(r.telemetry) and cdu_state(r.telemetry[-1][1]) == "ok")
        stop.set()
        await feeder
        n_before = len(r.telemetry)
        cdu = r.agent.coolant.sensors["cdu"]
        await r.until(lambda: cdu_state(r.telemetry[-1][1]) == "stale")
        t_mono, tel = next((tm, t) for tm, t in r.telemetry[n_before:] if cdu_state(t) == "stale")
        assert cdu.valid_mono_s is not None
        elapsed_s = t_mono - cdu.valid_mono_s
        # max_age_s + one poll period, plus a little for this shared 2-core machine's scheduling.
        assert 0.5 < elapsed_s <= 0.5 + POLL_S + 0.05, elapsed_s
        assert tel.coolant is not None and tel.coolant.flow_lpm is None  # a stale value is not valid
        assert tel.coolant.stale
        snap = r.agent.coolant.snapshot()
        assert snap.stale and "cdu" in snap.stale_sensors and snap.flow_lpm is None
    finally:
        stop.set()
        await stop_agent(r, task)


async def test_leak_reaches_safety_hook_alarm_is_retained_and_ack_needs_ok(
    broker: Any, publisher: Publisher, subscriber: Any
) -> None:
    r, task = await start_agent(make_cfg(broker.port))
    try:
        await asyncio.to_thread(publisher.send, LEAK_TOPIC, leak_doc("OK"))
        await asyncio.to_thread(publisher.send, LEAK_TOPIC, leak_doc("Critical"))
        await r.until(lambda: bool(r.leaks))
        ev = r.leaks[0]
        assert (ev.sensor_id, ev.state, ev.latched) == ("leak-tray", "critical", "critical")
        assert r.agent.leak_events[-1] == ev
        assert r.agent.coolant.snapshot().leak == "critical"

        live = subscriber(broker, f"{BASE}/alarm/+")
        await asyncio.to_thread(live.wait_for, lambda m: m.json()["latched"] == "critical", 5)
        late = subscriber(broker, f"{BASE}/alarm/+")  # arrives after the fact: sees it retained
        alarm = (await asyncio.to_thread(late.wait_for, lambda m: m.retain, 5))[0].json()
        assert alarm["alarm"] == "coolant_leak" and alarm["sensor"] == "leak-tray"
        assert (alarm["state"], alarm["latched"], alarm["ack_required"]) == ("critical", "critical", True)
        assert alarm["node"]["name"] == "n1" and alarm["t_s"] > 0

        assert r.agent.coolant.acknowledge("leak-tray") == []  # still leaking: the ack does nothing
        await asyncio.to_thread(publisher.send, LEAK_TOPIC, leak_doc("OK"))
        await r.until(lambda: r.agent.coolant.sensors["leak-tray"].leak == "ok")
        snap = r.agent.coolant.snapshot()
        assert snap.leak == "critical" and snap.leak_sensors == ("leak-tray",)  # OK alone does not clear
        assert r.agent.coolant.acknowledge() == ["leak-tray"]
        assert r.agent.coolant.snapshot().leak == "ok"
        assert r.leaks[-1].latched == "ok"
        cleared = (await asyncio.to_thread(late.wait_for, lambda m: m.json()["latched"] == "ok", 5))[0].json()
        assert cleared["state"] == "ok" and cleared["ack_required"] is False
    finally:
        await stop_agent(r, task)


async def test_latched_alarm_is_republished_after_broker_restart_without_persistence(
    broker: Any, subscriber: Any
) -> None:
    """A broker that restarts without persistence forgets retained messages; the agent re-sends its alarms."""
    r, task = await start_agent(make_cfg(broker.port))
    try:
        pub = Publisher(broker.port)
        await asyncio.to_thread(pub.send, LEAK_TOPIC, leak_doc("Warning"))
        await r.until(lambda: bool(r.leaks))
        first = subscriber(broker, f"{BASE}/alarm/+")
        await asyncio.to_thread(first.wait_for, lambda m: m.json()["latched"] == "warning", 5)
        pub.close()
        connects = r.agent.link.connects
        broker.stop()
        broker.start()  # same port, persistence off: every retained message is gone
        await r.until(lambda: r.agent.link.connected and r.agent.link.connects > connects, 20)
        # The re-send may reach a subscriber live (retain flag clear) or as retained: wait for it ...
        watch = subscriber(broker, f"{BASE}/alarm/#")
        await asyncio.to_thread(watch.wait_for, lambda m: m.json()["latched"] == "warning", 10)
        # ... then a subscriber that comes later still gets it, from the broker's retained store.
        late = subscriber(broker, f"{BASE}/alarm/#")
        hit = (await asyncio.to_thread(late.wait_for, lambda m: m.retain, 5))[0]
        alarm = hit.json()
        assert hit.topic == f"{BASE}/alarm/leak-tray"
        assert (alarm["sensor"], alarm["state"], alarm["latched"]) == ("leak-tray", "warning", "warning")
        # Nothing but the agent re-sent it: the broker kept nothing.
        assert not broker.persistence
    finally:
        await stop_agent(r, task)


# -- the monitor's rules, in-process ----------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0
        self.mono = 100.0

    def advance(self, dt_s: float) -> None:
        self.t += dt_s
        self.mono += dt_s


def monitor(clock: Clock, **over: Any) -> tuple[CoolantMonitor, list[LeakEvent], list[tuple[str, bytes]]]:
    cfg = configmod.validate({"coolant": coolant_cfg(**over)}).coolant
    events: list[LeakEvent] = []
    out: list[tuple[str, bytes]] = []
    m = CoolantMonitor(
        cfg,
        node=NodeId(site="s", rack="r", name="n"),
        metrics=Metrics(),
        set_alarm=lambda topic, payload: out.append((topic, payload)),
        alarm_topic="x/alarm",
        on_leak=events.append,
        clock=lambda: clock.t,
        monotonic=lambda: clock.mono,
    )
    return m, events, out


def test_leak_auto_clear_and_escalation() -> None:
    clock = Clock()
    m, events, out = monitor(clock, leak_clear="auto")
    for state in ("OK", "Warning", "Warning", "Critical", "Warning", "OK"):
        m.handle(LEAK_TOPIC, leak_doc(state))
    assert [(e.state, e.latched) for e in events] == [
        ("warning", "warning"),
        ("critical", "critical"),
        ("warning", "critical"),
        ("ok", "ok"),
    ]
    assert [t for t, _ in out] == ["x/alarm/leak-tray"] * 4
    assert [json.loads(p)["latched"] for _, p in out] == ["warning", "critical", "critical", "ok"]


def test_ack_refused_while_stale_and_unknown_sensor() -> None:
    clock = Clock()
    m, _, _ = monitor(clock)
    m.handle(LEAK_TOPIC, leak_doc("Critical"))
    m.handle(LEAK_TOPIC, leak_doc("OK"))
    clock.advance(6.0)  # the OK is now older than max_age_s
    assert m.acknowledge() == []
    m.handle(LEAK_TOPIC, leak_doc("OK"))
    assert m.acknowledge("leak-tray") == ["leak-tray"]
    with pytest.raises(KeyError):
        m.acknowledge("cdu")


def test_staleness_from_payload_timestamps_and_reordering() -> None:
    clock = Clock()
    over = {
        "sensors": [
            {"id": "flow", "kind": "flow", "topic": "bms/demo/r1/flow", "field": "v", "timestamp_field": "ts"}
        ]
    }
    m, _, _ = monitor(clock, **over)
    assert m.snapshot().stale  # no reading yet: stale, not "fine"
    m.handle("bms/demo/r1/flow", json.dumps({"v": 10.0, "ts": clock.t - 9.0}).encode())
    assert m.snapshot().flow_lpm == 10.0
    m.handle("bms/demo/r1/flow", json.dumps({"v": 7.0, "ts": clock.t - 9.5}).encode())  # older: ignored
    assert m.snapshot().flow_lpm == 10.0
    clock.advance(1.1)
    assert m.snapshot().stale and m.snapshot().flow_lpm is None
    assert m.check() == ["flow"]


def test_rejections_are_logged_at_most_once_a_minute(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    m, _, _ = monitor(clock)
    for _ in range(50):
        m.handle(CDU_TOPIC, b"garbage")
    logged = [ln for ln in capsys.readouterr().out.splitlines() if "coolant_payload_rejected" in ln]
    assert len(logged) == 1
    assert m.metrics.sensor_rejected.labels("cdu", "malformed")._value.get() == 50

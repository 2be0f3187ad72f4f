"""Property: random and malformed payloads through the real MQTT handler path never crash it,
are each either accepted or counted as rejected, and never yield an invalid value."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import aiomqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rackguard.agent import config as configmod
from rackguard.agent.coolant_monitor import CoolantMonitor
from rackguard.agent.messages import NodeId
from rackguard.agent.metrics import Metrics
from rackguard.agent.mqtt import MqttLink, Topics, aiomqtt_factory
from rackguard.sensors.coolant import (
    LEAK_SEVERITY,
    MAX_PAYLOAD_BYTES,
    CduSensor,
    LeakSensor,
    Reading,
    Rejected,
)

NOW_S = 1_700_000_000.0
P = "bms/f"
SENSORS: list[dict[str, Any]] = [
    {"id": "sup", "kind": "coolant_supply_temp", "topic": f"{P}/sup", "format": "plain"},
    {
        "id": "ret",
        "kind": "coolant_return_temp",
        "topic": f"{P}/ret",
        "field": "d.t",
        "timestamp_field": "ts",
    },
    {"id": "retf", "kind": "coolant_return_temp", "topic": f"{P}/retf", "format": "plain", "unit": "f"},
    {
        "id": "flow",
        "kind": "flow",
        "topic": f"{P}/flow",
        "format": "redfish",
        "timestamp_field": "ReadingTime",
    },
    {"id": "dp", "kind": "diff_pressure", "topic": f"{P}/dp", "field": "v", "unit": "bar"},
    {"id": "cdu", "kind": "cdu", "topic": f"{P}/cdu"},
    {
        "id": "cduj",
        "kind": "cdu",
        "topic": f"{P}/cduj",
        "format": "json",
        "values": ["flow_lpm", "supply_temp_c"],
    },
    {"id": "leak", "kind": "leak", "topic": f"{P}/leak"},
    {"id": "leakb", "kind": "leak", "topic": f"{P}/leakb", "format": "json", "field": "wet"},
    {"id": "leakp", "kind": "leak", "topic": f"{P}/leakp", "format": "plain"},
]
CFG = configmod.validate({"coolant": {"subscribe": [f"{P}/#"], "sensors": SENSORS}}).coolant
DECL = {s.topic: s for s in CFG.sensors}
TOPICS = [*DECL, f"{P}/unknown", f"{P}/cdu/extra"]
KEYS = [
    "SupplyTemperatureCelsius",
    "ReturnTemperatureCelsius",
    "FlowLitersPerMinute",
    "DeltaPressurekPa",
    "DetectorState",
    "Reading",
    "ReadingTime",
    "d",
    "t",
    "ts",
    "v",
    "wet",
    "flow_lpm",
    "supply_temp_c",
]

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-100, max_value=1200),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([NOW_S, NOW_S - 3, NOW_S + 100, NOW_S * 1000, 32.0, 45.0, 12.0, 0.8, 89.6]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    numbers,
    st.text(max_size=12),
    st.sampled_from(["OK", "Warning", "Critical", "Unavailable", "Absent", "2023-11-14T22:13:19+00:00"]),
)
json_values = st.recursive(
    scalars,
    lambda c: (
        st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), c, max_size=5)
    ),
    max_leaves=12,
)
redfishy = st.dictionaries(
    st.sampled_from(KEYS), st.one_of(scalars, st.fixed_dictionaries({"Reading": scalars})), max_size=6
)


def _dumps(v: Any) -> bytes:
    return json.dumps(v, allow_nan=True).encode()


payloads = st.one_of(
    st.binary(max_size=64),
    numbers.map(lambda x: str(x).encode()),
    st.text(max_size=20).map(str.encode),
    json_values.map(_dumps),
    redfishy.map(_dumps),
    st.sampled_from(
        [
            b"",
            b"NaN",
            b"inf",
            b"1e400",
            b'{"v": 1, "v": 2}',
            b"[" * 5000,
            b'{"d": {"t": 35}, "ts": 1700000000}',
            b'{"wet": true}',
            b" 0.8 ",
            b"1" * (MAX_PAYLOAD_BYTES + 1),
        ]
    ),
)
# Near-valid payloads, shaped for one declared sensor: values near (and past) the valid range,
# fields sometimes missing or of the wrong type, timestamps fresh, old, future or malformed.
in_range = st.floats(min_value=5, max_value=70)  # valid for every declared quantity
near = st.one_of(in_range, in_range, in_range, st.floats(min_value=-60, max_value=1100), numbers, scalars)
stamps = st.sampled_from(
    [NOW_S, NOW_S - 1, NOW_S - 30, NOW_S + 2, NOW_S + 60, "2023-11-14T22:13:19Z", "x", None]
)
states = st.sampled_from(["OK", "Warning", "Critical", "Unavailable", "Absent", "ok", True, False, 1, None])


def _maybe_ts(key: str, doc: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    with_ts = stamps.map(lambda t: {**doc, key: t})
    return st.one_of(with_ts, with_ts, with_ts, st.just(doc))


def shaped(topic: str) -> st.SearchStrategy[bytes]:
    d = DECL[topic]
    kind = d.kind
    if kind == "leak":
        if d.format == "plain":
            return states.map(lambda v: str(v).encode())
        key = "wet" if d.format == "json" else "DetectorState"
        return states.map(lambda v: _dumps({key: v}))
    if d.format == "plain":
        return near.map(lambda v: str(v).encode())
    if kind == "cdu":
        keys = ["flow_lpm", "supply_temp_c"] if d.format == "json" else list(REDFISH.values())
        wrap = st.one_of(
            in_range, in_range.map(lambda v: {"Reading": v}), near, near.map(lambda v: {"Reading": v})
        )
        return st.fixed_dictionaries({k: wrap for k in keys}).map(_dumps)
    if d.format == "json":
        path = (d.field or "v").split(".")
        doc = near.map(lambda v: {path[0]: {path[1]: v}} if len(path) == 2 else {path[0]: v})
        return doc.flatmap(lambda x: _maybe_ts("ts", x)).map(_dumps)
    key = REDFISH[{"flow": "flow_lpm"}.get(kind, "flow_lpm")]
    return (
        near.map(lambda v: {key: {"Reading": v}}).flatmap(lambda x: _maybe_ts("ReadingTime", x)).map(_dumps)
    )


REDFISH = {
    "supply_temp_c": "SupplyTemperatureCelsius",
    "return_temp_c": "ReturnTemperatureCelsius",
    "flow_lpm": "FlowLitersPerMinute",
    "diff_pressure_kpa": "DeltaPressurekPa",
}
messages = st.one_of(
    st.tuples(st.sampled_from(TOPICS), payloads),
    st.sampled_from(list(DECL)).flatmap(lambda t: st.tuples(st.just(t), shaped(t))),
)


def check_valid(reading: Reading) -> None:
    """Every accepted value is a finite float inside its sensor's declared range."""
    decl = next(s for s in CFG.sensors if s.id == reading.sensor_id)
    assert math.isfinite(reading.t_s) and NOW_S - decl.max_age_s <= reading.t_s <= NOW_S
    if isinstance(decl, LeakSensor):
        assert reading.leak in LEAK_SEVERITY and not reading.values
        return
    assert reading.leak is None and reading.values
    for q, x in reading.values.items():
        assert type(x) is float and math.isfinite(x), (q, x)
        if q.endswith("temp_c"):
            lo, hi = decl.valid_temp_c
        elif q == "flow_lpm":
            lo, hi = decl.valid_flow_lpm
        else:
            lo, hi = decl.valid_diff_pressure_kpa
        assert lo <= x <= hi, (q, x)
    if isinstance(decl, CduSensor):
        assert set(reading.values) == set(decl.values)


def rejected_sum(metrics: Metrics) -> float:
    return sum(
        s.value
        for m in metrics.registry.collect()
        if m.name == "rackguard_sensor_rejected"
        for s in m.samples
        if s.name.endswith("_total")
    )


def new_monitor() -> CoolantMonitor:
    return CoolantMonitor(
        CFG, node=NodeId(site="s", rack="r", name="n"), metrics=Metrics(), clock=lambda: NOW_S
    )


def test_ten_thousand_random_payloads_in_process() -> None:
    sent = [0]

    @settings(max_examples=220, deadline=None, suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(messages, min_size=50, max_size=50))
    def run(batch: list[tuple[str, bytes]]) -> None:
        m = new_monitor()
        for topic, payload in batch:
            r = m.handle(topic, payload)  # the MQTT handler itself: it must not raise
            if isinstance(r, Reading):
                check_valid(r)
            else:
                assert isinstance(r, Rejected)
        sent[0] += len(batch)
        assert m.accepted_total + rejected_sum(m.metrics) == len(batch)
        assert m.accepted_total + m.rejected_total == len(batch)
        snap = m.snapshot(gpu_power_w=5000.0)  # whatever got in, the snapshot is sane
        for v in (snap.supply_temp_c, snap.return_temp_c, snap.flow_lpm, snap.diff_pressure_kpa):
            assert v is None or math.isfinite(v)

    run()
    assert sent[0] >= 10_000


@settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(messages.filter(lambda tp: len(tp[1]) < 4096), min_size=300, max_size=300))
def test_a_few_hundred_random_payloads_through_mosquitto(broker: Any, batch: list[tuple[str, bytes]]) -> None:
    asyncio.run(_through_broker(broker.port, batch))


async def _through_broker(port: int, batch: list[tuple[str, bytes]]) -> None:
    cfg = configmod.validate({"mqtt": {"host": "127.0.0.1", "port": port}}).mqtt
    m = CoolantMonitor(CFG, node=NodeId(site="s", rack="r", name="n"), metrics=Metrics())
    link = MqttLink(
        cfg,
        Topics("rackguard/s/r/fuzz"),
        client_factory=aiomqtt_factory(cfg, "fuzz-agent"),
        offline_payload=lambda reason: reason.encode(),
    )
    m.attach(link)
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    while not link.subscribed:  # a message published before the SUBACK would reach no one
        await asyncio.sleep(0.01)
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as pub:
        for topic, payload in batch:
            await pub.publish(topic, payload, qos=1)
    deadline = time.monotonic() + 15
    while m.accepted_total + rejected_sum(m.metrics) < len(batch) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    stop.set()
    await task
    assert m.accepted_total + rejected_sum(m.metrics) == len(batch)

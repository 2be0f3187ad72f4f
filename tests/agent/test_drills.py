"""Fault drills: the agent stays up, keeps publishing, holds a safe cap and recovers by itself.

Each drill runs the real Agent (sim backend) against a real mosquitto, with a
consumer recording what the node publishes.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from rackguard.agent import config as configmod
from rackguard.agent.daemon import Agent
from rackguard.sim.node import SimBackend
from tests.agent.test_resilience import Consumer, assert_no_gaps
from tests.conftest import Broker, BrokerFactory

SAFE_CAP = 8
SUPPLY_TOPIC = "bms/s1/r1/n1/supply_temp"


def agent_config(broker: Broker, tmp_path: Path, **over: dict[str, Any]) -> configmod.Config:
    data: dict[str, Any] = {
        "node": {"site": "s1", "rack": "r1", "name": "n1"},
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "sensors": {
            "backend": "sim",
            "poll_period_s": 0.05,
            "lost_retry_min_s": 0.2,
            "lost_retry_max_s": 0.5,
        },
        "telemetry": {"publish_period_s": 0.2},
        "control": {"period_s": 0.2, "safe_cap": SAFE_CAP},
        "outbox": {"path": str(tmp_path / "outbox.sqlite"), "replay_rate_msgs_s": 500},
        "http": {"port": 0},
        "log": {"level": "warning"},
    }
    for k, v in over.items():
        data.setdefault(k, {}).update(v)
    return configmod.validate(data)


async def until(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.05)


def drive(
    agent: Agent, scenario: Callable[[asyncio.Task[int]], Awaitable[None]], timeout_s: float = 90
) -> None:
    """Run the agent and a scenario beside it; the agent must still be running when it ends."""

    async def main() -> None:
        task = asyncio.create_task(agent.run())
        try:
            await asyncio.wait_for(scenario(task), timeout_s)
            assert not task.done(), "the agent exited during the drill"
        finally:
            agent.request_stop()
            assert await asyncio.wait_for(task, 10) == 0

    asyncio.run(main())


@pytest.fixture
def consumer(broker: Broker) -> Any:
    c = Consumer(broker, client_id="drill-consumer")
    yield c
    c.close()


def gpu_states(c: Consumer) -> list[list[str]]:
    return [[g["state"] for g in p["gpus"]] for p in c.telemetry()]


def test_drill_nvml_raises_mid_run(broker: Broker, consumer: Consumer, tmp_path: Path) -> None:
    backend = SimBackend(2, seed=1)
    agent = Agent(agent_config(broker, tmp_path), backend)

    async def scenario(task: asyncio.Task[int]) -> None:
        await until(lambda: len(consumer.seqs()) >= 3, 20, "telemetry")
        backend.lose_gpu(1, "NVML_ERROR_GPU_IS_LOST")
        await until(lambda: ["ok", "lost"] in gpu_states(consumer), 10, "gpu 1 reported lost")
        assert agent.control is not None and agent.control.decision is not None
        await until(lambda: agent.control.decision.reason == "gpu_lost", 5, "safe cap for a lost GPU")  # type: ignore[union-attr]
        assert max(agent.control.decision.caps) <= SAFE_CAP  # type: ignore[union-attr]
        n = len(consumer.seqs())
        await until(lambda: len(consumer.seqs()) >= n + 5, 10, "telemetry keeps flowing")
        backend.restore_gpu(1)
        n = len(consumer.seqs())
        await until(lambda: gpu_states(consumer)[-1] == ["ok", "ok"], 10, "gpu 1 recovered")
        await until(lambda: agent.control.decision.reason != "gpu_lost", 10, "cap released")  # type: ignore[union-attr]

    drive(agent, scenario)
    seqs = consumer.seqs()
    assert_no_gaps(seqs, min(seqs), max(seqs))


def test_drill_coolant_sensor_goes_silent(broker: Broker, consumer: Consumer, tmp_path: Path) -> None:
    cfg = agent_config(
        broker,
        tmp_path,
        coolant={
            "subscribe": ["bms/s1/r1/#"],
            "sensors": [
                {
                    "id": "supply",
                    "kind": "coolant_supply_temp",
                    "topic": SUPPLY_TOPIC,
                    "format": "json",
                    "field": "value",
                    "max_age_s": 1.0,
                    "valid_temp_c": [5.0, 70.0],
                },
            ],
        },
    )
    agent = Agent(cfg)
    bms = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bms", protocol=paho.MQTTv5)
    bms.connect(broker.host, broker.port)
    bms.loop_start()
    sending = {"on": True}

    async def feed() -> None:
        while True:
            if sending["on"]:
                bms.publish(SUPPLY_TOPIC, json.dumps({"value": 32.0}), qos=1)
            await asyncio.sleep(0.2)

    def reason() -> str | None:
        d = agent.control.decision if agent.control else None
        return d.reason if d else None

    async def scenario(task: asyncio.Task[int]) -> None:
        feeder = asyncio.create_task(feed())
        try:
            await until(
                lambda: len(consumer.seqs()) >= 3 and reason() not in (None, "stale"), 20, "fresh coolant"
            )
            sending["on"] = False  # the sensor goes silent
            await until(lambda: reason() == "stale", 10, "stale coolant → safe cap")
            assert agent.control is not None and agent.control.decision is not None
            assert max(agent.control.decision.caps) <= SAFE_CAP
            n = len(consumer.seqs())
            await until(lambda: len(consumer.seqs()) >= n + 5, 10, "telemetry keeps flowing while stale")
            sending["on"] = True
            await until(lambda: reason() != "stale", 10, "recovered when the sensor returns")
        finally:
            feeder.cancel()

    try:
        drive(agent, scenario)
    finally:
        bms.loop_stop()
        bms.disconnect()


@pytest.mark.slow
def test_drill_broker_flapping(broker_factory: BrokerFactory, tmp_path: Path) -> None:
    """The broker goes down and up every ~2 s for ~16 s: no telemetry is lost, the agent stays up."""
    d = tmp_path / "db"
    d.mkdir()
    broker = broker_factory(f"user {getpass.getuser()}\npersistence true\npersistence_location {d}/\n")
    consumer = Consumer(broker, client_id="flap-consumer")
    agent = Agent(agent_config(broker, tmp_path))

    async def scenario(task: asyncio.Task[int]) -> None:
        await until(lambda: len(consumer.seqs()) >= 3, 20, "telemetry")
        for _ in range(4):
            await asyncio.to_thread(broker.stop)
            await asyncio.sleep(2.0)
            await asyncio.to_thread(broker.start)
            await asyncio.sleep(2.0)
        last = agent.telemetry_seq
        await until(
            lambda: set(range(1, last + 1)) <= set(consumer.seqs()), 30, "every seq after the flapping"
        )

    try:
        drive(agent, scenario)
    finally:
        consumer.close()
    assert agent.link.connects >= 2  # reconnected (a connect may span a flap under load)
    seqs = consumer.seqs()
    assert_no_gaps(seqs, 1, max(seqs))
    assert any(p["historical"] for p in consumer.telemetry())


@pytest.mark.parametrize("jump_s", [3600.0, -3600.0])
def test_drill_wall_clock_jump(
    broker: Broker, consumer: Consumer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jump_s: float
) -> None:
    """time.time() jumps an hour (NTP step, bad RTC): scheduling is monotonic, so nothing stalls or bursts."""
    agent = Agent(agent_config(broker, tmp_path))
    real_time = time.time
    offset = {"s": 0.0}
    monkeypatch.setattr(time, "time", lambda: real_time() + offset["s"])
    marks: dict[str, int] = {}

    async def scenario(task: asyncio.Task[int]) -> None:
        await until(lambda: len(consumer.seqs()) >= 3, 20, "telemetry")
        marks["before"] = agent.telemetry_seq
        offset["s"] = jump_s
        t0 = time.monotonic()
        await asyncio.sleep(3.0)
        marks["after"] = agent.telemetry_seq
        marks["elapsed_ms"] = round((time.monotonic() - t0) * 1000)
        await until(lambda: max(consumer.seqs()) >= marks["after"], 10, "telemetry after the jump")

    drive(agent, scenario)
    # ~15 windows in 3 s at 0.2 s: the cadence ignored the jump (neither stalled nor caught up).
    windows = marks["after"] - marks["before"]
    expected = marks["elapsed_ms"] / 200
    assert expected - 4 <= windows <= expected + 2
    tele = {p["seq"]: p for p in consumer.telemetry()}
    after = tele[marks["after"]]
    assert abs(after["t_s"] - (real_time() + jump_s)) < 60  # timestamps follow the wall clock
    assert_no_gaps(list(tele), min(tele), marks["after"])

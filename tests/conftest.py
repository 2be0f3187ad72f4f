"""Shared fixtures: a real mosquitto on a free loopback port, and the gpu marker's skip."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from rackguard.agent.mosquitto import Mosquitto, free_port

REPO = Path(__file__).resolve().parent.parent


Broker = Mosquitto  # a real mosquitto on 127.0.0.1:port; stop()/start() simulate outages


def _have_mosquitto() -> bool:
    return bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())


BrokerFactory = Callable[..., Broker]


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Start mosquitto processes with extra config lines; all are stopped afterwards."""
    if not _have_mosquitto():
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto mosquitto-clients")
    started: list[Broker] = []

    def make(extra: str = "", *, anonymous: bool = True, port: int | None = None) -> Broker:
        port = port or free_port()
        b = Mosquitto(port, tmp_path / f"mosquitto-{port}", extra_conf=extra, anonymous=anonymous)
        b.start()
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> Broker:
    """One anonymous mosquitto on loopback for this test."""
    return broker_factory()


@pytest.fixture
def shared_data() -> Path:
    """The real H100 traces the tests use, shipped in tests/data (copied from shared/data)."""
    return Path(__file__).resolve().parent / "data"


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    t_mono: float

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """A real paho MQTT 5 client on its own thread that records every message."""

    def __init__(self, broker: Broker, topic: str, **auth: Any) -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if auth:
            self.client.username_pw_set(auth["username"], auth.get("password"))
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(10), "subscriber did not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, msg.payload, bool(msg.retain), time.monotonic()))
            self._cond.notify_all()

    def wait_for(
        self, pred: Callable[[Received], bool], timeout: float = 10.0, count: int = 1
    ) -> list[Received]:
        """Wait until ``count`` messages satisfy ``pred``; return them all (fails on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [m for m in self.messages if pred(m)]
                if len(hits) >= count:
                    return hits
                left = deadline - time.monotonic()
                if left <= 0:
                    topics = sorted({m.topic for m in self.messages})
                    raise AssertionError(f"timed out: {len(hits)}/{count} matching; topics seen: {topics}")
                self._cond.wait(left)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def subscriber() -> Iterator[Callable[..., Subscriber]]:
    """``subscriber(broker, "topic/#")`` → a recording client; closed afterwards."""
    subs: list[Subscriber] = []

    def make(broker: Broker, topic: str, **auth: Any) -> Subscriber:
        s = Subscriber(broker, topic, **auth)
        subs.append(s)
        return s

    yield make
    for s in subs:
        s.close()

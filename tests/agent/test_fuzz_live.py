"""Fuzzing a live agent (#17): 10,000 generated gate reports and 10,000 generated commands
go through its MQTT handlers while it runs. It must not exit or log a traceback, and no
bad input may raise the cap above the operator's ceiling."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rackguard.agent import config as configmod
from rackguard.agent import log as logmod
from rackguard.agent.daemon import Agent
from rackguard.agent.localbus import LocalBroker
from rackguard.agent.operator_commands import signed_payload

GPUS = 4
CEILING = 16
SECRET = "k" * 40
BASE = "rackguard/f/r1/n1"

huge = st.sampled_from([10**400, -(10**400), 2**63, 2**64, 1e308, -1e308, float("inf"), float("nan"), -0.0])
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30), huge)
json_value = st.recursive(
    scalar,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=12,
)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


gate_fields = st.fixed_dictionaries(
    {
        "schema": st.sampled_from(["rackguard.gate/1", "x"]),
        "gate_id": st.sampled_from(["g1", "g2", "sim-gpu0"]) | st.text(max_size=70),
        "gpu": st.one_of(st.none(), st.integers(-5, 2000), huge),
        "t_s": st.one_of(st.floats(), huge, st.just(time.time())),
        "in_flight": st.one_of(st.integers(-10, 10**7), huge, st.text(max_size=5)),
        "limit": st.one_of(st.integers(-10, 10**7), huge),
        "completed_total": st.one_of(st.integers(-10, 2**60), huge),
        "tokens_total": st.one_of(st.integers(-10, 2**60), huge),
    }
)
gate_payloads = st.one_of(
    st.binary(max_size=200),
    json_value.map(dumps),
    gate_fields.map(dumps),
    gate_fields.map(lambda d: dumps([d])),
)
cmd_fields = st.fixed_dictionaries(
    {
        "id": st.text(max_size=70),
        "t_s": st.one_of(st.floats(), huge, st.just(time.time())),
        "command": st.sampled_from(
            [
                "set_manual_ceiling",
                "clear_manual_ceiling",
                "pause_mpc",
                "resume_mpc",
                "ack_leak",
                "rebirth",
                "x",
            ]
        ),
        "ceiling": st.one_of(st.integers(-5, 10**6), huge),
    }
)


def forged(d: dict[str, Any]) -> bytes:
    """A well-formed envelope, but signed with the wrong key (or not signed at all)."""
    return signed_payload(d, "wrong-key-" + "x" * 30)


cmd_payloads = st.one_of(
    st.binary(max_size=200),
    json_value.map(dumps),
    cmd_fields.map(dumps),
    cmd_fields.map(forged),
    st.builds(lambda s, d: dumps({"signed": s, "sig": d}), st.text(max_size=80), st.text(max_size=70)),
)


class LiveAgent:
    """An agent running on its own event loop thread, fed through its real MQTT handlers."""

    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "hmac").write_text(SECRET)
        cfg = configmod.validate(
            {
                "node": {"site": "f", "rack": "r1", "name": "n1"},
                "sensors": {"backend": "sim", "poll_period_s": 0.1},
                "sim": {"gpus": GPUS},
                "control": {"period_s": 0.2, "max_cap": 64},
                "telemetry": {"publish_period_s": 0.5},
                "http": {"port": 0},
                "log": {"level": "warning", "format": "json"},
                "commands": {"hmac_secret_file": str(tmp_path / "hmac"), "require_signature": True},
            }
        )
        self.broker = LocalBroker()
        self.agent = Agent(cfg, client_factory=self.broker.client)
        self.loop = asyncio.new_event_loop()
        self.max_total_seen = 0
        self.pending: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "agent did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.task = self.loop.create_task(self.agent.run())
        self.loop.create_task(self._until_ready())
        self.loop.run_until_complete(self.task)

    async def _until_ready(self) -> None:
        while not (self.agent.link.connected and self.agent.cap_msg is not None):
            await asyncio.sleep(0.01)
        self.ready.set()

    def send(self, topic: str, payload: bytes, batch: int = 1) -> None:
        """Queue a message; every ``batch`` messages, deliver them and wait until all are handled."""
        self.pending.append((topic, payload))
        if len(self.pending) >= batch:
            self.flush()

    def flush(self) -> None:
        todo, self.pending = self.pending, []
        asyncio.run_coroutine_threadsafe(self._send(todo), self.loop).result(30)

    async def _send(self, todo: list[tuple[str, bytes]]) -> None:
        for topic, payload in todo:
            self.broker.route(topic, payload, False)
            await asyncio.sleep(0)
            self._note_cap()
        for _ in range(10_000):
            if not len(self.agent.link.inbox) and all(s.queue.empty() for s in self.broker.sessions):
                break
            await asyncio.sleep(0)
            self._note_cap()
        assert not len(self.agent.link.inbox)

    def _note_cap(self) -> None:
        cap = self.agent.cap_msg
        assert cap is not None
        self.max_total_seen = max(self.max_total_seen, cap.total)

    def stop(self) -> int:
        self.loop.call_soon_threadsafe(self.agent.request_stop, "test done")
        self.thread.join(15)
        return self.task.result()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[LiveAgent, io.StringIO]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        logmod.configure("warning", "json")
        agent = LiveAgent(tmp_path)
        ceiling = signed_payload(
            {"id": "ceiling-1", "t_s": time.time(), "command": "set_manual_ceiling", "ceiling": CEILING},
            SECRET,
        )
        agent.send(f"{BASE}/cmd", ceiling)
        assert agent.agent.control is not None and agent.agent.control.manual_ceiling == CEILING
        time.sleep(0.5)
        agent.max_total_seen = 0
        yield agent, out
        assert agent.thread.is_alive(), "the agent exited"
        assert agent.stop() == 0
    logmod.configure("info", "auto")


def check(agent: LiveAgent, out: io.StringIO) -> None:
    assert agent.thread.is_alive(), "the agent exited"
    assert agent.agent.control is not None and agent.agent.control.manual_ceiling == CEILING
    assert agent.max_total_seen <= CEILING * GPUS, "bad input raised the cap above the ceiling"
    text = out.getvalue()
    assert "Traceback" not in text and "mqtt_handler_failed" not in text, text[-2000:]


@pytest.mark.slow
def test_10000_generated_gate_reports(live: tuple[LiveAgent, io.StringIO]) -> None:
    agent, out = live

    @settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(gate_id=st.sampled_from(["g1", "g2", "sim-gpu0", "x" * 64]), payload=gate_payloads)
    def fuzz(gate_id: str, payload: bytes) -> None:
        agent.send(f"{BASE}/gate/{gate_id}", payload, batch=100)

    fuzz()
    agent.flush()
    check(agent, out)
    gates = agent.agent.gates
    assert gates.rejected_total > 1000  # the bad ones were seen and refused, not skipped


@pytest.mark.slow
def test_10000_generated_commands(live: tuple[LiveAgent, io.StringIO]) -> None:
    agent, out = live

    @settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(payload=cmd_payloads)
    def fuzz(payload: bytes) -> None:
        agent.send(f"{BASE}/cmd", payload, batch=100)

    fuzz()
    agent.flush()
    check(agent, out)
    rejected = sum(
        s.value
        for m in agent.agent.metrics.registry.collect()
        if m.name == "rackguard_commands"
        for s in m.samples
        if s.labels.get("result") == "rejected" and s.name.endswith("_total")
    )
    assert rejected >= 9_000  # every unsigned or forged one

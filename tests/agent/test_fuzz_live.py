"""Fuzzing a live agent (#17): 10,000 generated gate reports, 10,000 generated commands and
10,000 generated rack claims go through its MQTT handlers while it runs. It must not exit or log
a traceback, and no bad input may raise the cap above the operator's ceiling.

Each hypothesis example is a batch of ``BATCH`` messages delivered together: the same 10,000
generated cases, at a fraction of hypothesis's per-example cost."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
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
from rackguard.sim.rack import RackSpec, rack_config

GPUS = 4
CEILING = 16
SECRET = "k" * 40
BASE = "rackguard/f/r1/n1"
CASES = 10_000
BATCH = 50
FUZZ = settings(
    max_examples=CASES // BATCH, deadline=None, suppress_health_check=list(HealthCheck), database=None
)

huge = st.sampled_from([10**400, -(10**400), 2**63, 2**64, 1e308, -1e308, float("inf"), float("nan"), -0.0])
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30), huge)
json_value = st.recursive(
    scalar,  # (kept small: hypothesis's cost grows with the size of what it draws)
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

    def __init__(self, raw: dict[str, Any]) -> None:
        cfg = configmod.validate(raw)
        self.broker = LocalBroker()
        self.agent = Agent(cfg, client_factory=self.broker.client)
        self.loop = asyncio.new_event_loop()
        self.max_total_seen = 0
        self.sent = 0
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
        while not (self.agent.link.subscribed and self.agent.cap_msg is not None):
            await asyncio.sleep(0.01)
        self.ready.set()

    def send(self, messages: list[tuple[str, bytes]]) -> None:
        """Deliver ``messages`` and wait until every one is handled."""
        self.sent += len(messages)
        asyncio.run_coroutine_threadsafe(self._send(messages), self.loop).result(30)

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


def node_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "node": {"site": "f", "rack": "r1", "name": "n1"},
        "sensors": {"backend": "sim", "poll_period_s": 0.1},
        "sim": {"gpus": GPUS},
        "control": {"period_s": 0.2, "max_cap": 64},
        "telemetry": {"publish_period_s": 0.5},
        "http": {"port": 0},
        "log": {"level": "warning", "format": "json"},
        "commands": {"hmac_secret_file": str(tmp_path / "hmac"), "require_signature": True},
    }


RACK = RackSpec(nodes=4, gpus=GPUS, site="f", rack="r1")


def member_config(tmp_path: Path) -> dict[str, Any]:
    """Member n1 of a 4-node rack (its peers are the fuzzer)."""
    node = node_config(tmp_path)
    return rack_config(
        RACK,
        1,
        offered_concurrency=256.0,
        extra={k: node[k] for k in ("sensors", "control", "telemetry", "commands")},
    )


def start(tmp_path: Path, raw: dict[str, Any]) -> LiveAgent:
    (tmp_path / "hmac").write_text(SECRET)
    agent = LiveAgent(raw)
    ceiling = signed_payload(
        {"id": "ceiling-1", "t_s": time.time(), "command": "set_manual_ceiling", "ceiling": CEILING},
        SECRET,
    )
    agent.send([(f"{BASE}/cmd", ceiling)])
    assert agent.agent.control is not None and agent.agent.control.manual_ceiling == CEILING
    time.sleep(0.5)
    agent.max_total_seen = 0
    agent.sent = 0
    return agent


@contextlib.contextmanager
def running(tmp_path: Path, raw: dict[str, Any]) -> Iterator[tuple[LiveAgent, io.StringIO]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        logmod.configure("warning", "json")
        try:
            agent = start(tmp_path, raw)
            yield agent, out
            assert agent.thread.is_alive(), "the agent exited"
            assert agent.stop() == 0
        finally:
            logmod.configure("info", "auto")


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[LiveAgent, io.StringIO]]:
    with running(tmp_path, node_config(tmp_path)) as pair:
        yield pair


def check(agent: LiveAgent, out: io.StringIO) -> None:
    assert agent.thread.is_alive(), "the agent exited"
    assert agent.agent.control is not None and agent.agent.control.manual_ceiling == CEILING
    assert agent.max_total_seen <= CEILING * GPUS, "bad input raised the cap above the ceiling"
    assert agent.sent >= CASES, f"only {agent.sent} cases generated"
    print(
        f"fuzz: {agent.sent} cases, highest cap total {agent.max_total_seen} (ceiling {CEILING * GPUS})",
        file=sys.stderr,
    )
    text = out.getvalue()
    assert "Traceback" not in text and "mqtt_handler_failed" not in text, text[-2000:]


@pytest.mark.slow
def test_10000_generated_gate_reports(live: tuple[LiveAgent, io.StringIO]) -> None:
    agent, out = live

    gate_ids = st.sampled_from(["g1", "g2", "sim-gpu0", "x" * 64])

    @FUZZ
    @given(st.lists(st.tuples(gate_ids, gate_payloads), min_size=BATCH, max_size=BATCH))
    def fuzz(batch: list[tuple[str, bytes]]) -> None:
        agent.send([(f"{BASE}/gate/{gate_id}", payload) for gate_id, payload in batch])

    fuzz()
    check(agent, out)
    gates = agent.agent.gates
    assert gates.rejected_total > 1000  # the bad ones were seen and refused, not skipped
    print(f"gate reports rejected: {gates.rejected_total}", file=sys.stderr)


@pytest.mark.slow
def test_10000_generated_commands(live: tuple[LiveAgent, io.StringIO]) -> None:
    agent, out = live

    @FUZZ
    @given(st.lists(cmd_payloads, min_size=BATCH, max_size=BATCH))
    def fuzz(batch: list[bytes]) -> None:
        agent.send([(f"{BASE}/cmd", payload) for payload in batch])

    fuzz()
    check(agent, out)
    rejected = sum(
        s.value
        for m in agent.agent.metrics.registry.collect()
        if m.name == "rackguard_commands"
        for s in m.samples
        if s.labels.get("result") == "rejected" and s.name.endswith("_total")
    )
    assert rejected >= 9_000  # every unsigned or forged one
    print(f"commands rejected: {rejected:.0f}", file=sys.stderr)


peer = st.sampled_from(["n0", "n2", "n3", "n1", "x", "n0/extra"])
CLAIM_KEYS = [
    "schema", "node", "inc", "seq", "t_s", "heat_w", "power_w", "floor_w", "demand", "cap_total",
    "share_w", "next_w", "view", "cfg", "capacity_w", "budget_w", "degraded_w", "fallback",
]  # fmt: skip
bad = st.one_of(huge, st.integers(-(10**6), 10**12), st.none(), st.text(max_size=5), st.floats(), st.just([]))
bad_demand = st.lists(
    st.fixed_dictionaries({"cls": st.sampled_from(["default", "", "x" * 40]), "prio": bad, "demand_w": bad}),
    max_size=10,
)


def claim_doc(node: str, inc: int, seq: int, watts: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """A well-formed claim (the peer's ``watts`` everywhere), with some fields made bad."""
    doc: dict[str, Any] = {
        "schema": "rackguard.claim/1",
        "node": node,
        "inc": inc,
        "seq": seq,
        "t_s": time.time(),
        "heat_w": watts,
        "power_w": watts,
        "floor_w": min(watts, 300),
        "demand": [{"cls": "default", "prio": 0, "demand_w": watts}],
        "cap_total": 16,
        "share_w": watts,
        "next_w": watts,
        "view": "abc",
        "cfg": "def",
        "capacity_w": 6000,
        "budget_w": 6000,
        "degraded_w": 3000,
        "fallback": False,
    }
    return {**doc, **overrides}


claim_fields = st.builds(
    claim_doc,
    peer,
    st.integers(0, 5),
    st.integers(0, 10**6),
    st.integers(0, 3000) | st.integers(3000, 10**9),
    st.dictionaries(st.sampled_from(CLAIM_KEYS), bad, max_size=3)
    | st.fixed_dictionaries({"demand": bad_demand}),
)
claim_payloads = st.one_of(
    st.binary(max_size=200),
    json_value.map(dumps),
    claim_fields.map(dumps),
    claim_fields.map(dumps),
    st.binary(min_size=1025, max_size=1100),
)
status_payloads = st.one_of(
    st.binary(max_size=60),
    st.fixed_dictionaries(
        {
            "state": st.sampled_from(["offline", "online", "x"]),
            "incarnation": st.one_of(st.integers(-2, 10), huge),
        }
    ).map(dumps),
)
# A well-formed claim on its sender's own topic demanding more than max_node_power_w (20 kW): random
# topic/node pairs rarely line up, and a run once drew none of these.
absurd_claims = st.sampled_from(["n0", "n2", "n3"]).flatmap(
    lambda n: st.tuples(
        st.just(f"rackguard/f/r1/{n}/claim"),
        st.builds(
            claim_doc,
            st.just(n),
            st.integers(0, 5),
            st.integers(0, 10**6),
            st.integers(20_001, 10**9),
            st.just({}),
        ).map(dumps),
    )
)
rack_messages = st.one_of(
    absurd_claims,
    st.tuples(peer.map(lambda n: f"rackguard/f/r1/{n}/claim"), claim_payloads),
    st.tuples(peer.map(lambda n: f"rackguard/f/r1/{n}/claim"), claim_payloads),
    st.tuples(peer.map(lambda n: f"rackguard/f/r1/{n}/claim"), claim_payloads),
    st.tuples(peer.map(lambda n: f"rackguard/f/r1/{n}/status"), status_payloads),
)


@pytest.mark.slow
def test_10000_generated_rack_claims(tmp_path: Path) -> None:
    """Claims and wills from 'peers' (and impostors): every one either passes the bounds or is
    rejected and counted; none takes the node's share past the rack's capacity."""
    with running(tmp_path, member_config(tmp_path)) as (agent, out):
        rack = agent.agent.rack
        assert rack is not None
        lim = rack.rc.max_node_power_w
        share_max = [0]

        @FUZZ
        @given(st.lists(rack_messages, min_size=BATCH, max_size=BATCH))
        def fuzz(batch: list[tuple[str, bytes]]) -> None:
            agent.send(batch)
            share_max[0] = max(share_max[0], rack.share_w)
            for name, p in rack.peers.items():
                c = p.claim
                if c is None:
                    continue
                assert c.node == name
                assert max(c.heat_w, c.power_w, c.floor_w, c.share_w, c.next_w) <= lim
                assert sum(d.demand_w for d in c.demand) <= lim

        fuzz()
        check(agent, out)
        assert share_max[0] <= RACK.power_budget_w
        assert sum(rack.rejected.values()) > 1000, rack.rejected
        print(
            f"claims rejected: {rack.rejected}, wills ignored: {rack.wills_ignored}, share max {share_max[0]} W",
            file=sys.stderr,
        )
        for reason in ("malformed", "too_large", "not_member", "absurd"):
            assert rack.rejected[reason] > 0, rack.rejected

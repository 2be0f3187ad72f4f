"""Hardening (#17): the leak lane, refused publishes, storage faults, seq across restarts,
the nonce window, rate-limited rejection logs and bounded HTTP connections."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rackguard.agent import config as configmod
from rackguard.agent import log as logmod
from rackguard.agent.daemon import Agent
from rackguard.agent.inbox import LEAK, OTHER, SENSOR, Inbox
from rackguard.agent.localbus import LocalBroker
from rackguard.agent.mosquitto import free_port
from rackguard.agent.mqtt import topic_matches
from rackguard.agent.operator_commands import MAX_REMEMBERED_IDS, Actions, CommandProcessor
from rackguard.agent.outbox import OutMsg, ResilientOutbox
from rackguard.agent.routes import degraded
from rackguard.agent.seqstore import SeqStore
from tests.conftest import Broker, BrokerFactory, Subscriber

LEAK_TOPIC = "bms/h/r1/leak"
FLOW_TOPIC = "bms/h/r1/flow"


def agent_cfg(broker: Broker | None, tmp_path: Path, **sections: dict[str, Any]) -> configmod.Config:
    base: dict[str, Any] = {
        "node": {"site": "h", "rack": "r1", "name": "n1"},
        "sensors": {"backend": "sim", "poll_period_s": 0.1},
        "sim": {"gpus": 2},
        "telemetry": {"publish_period_s": 0.2},
        "control": {"period_s": 0.2},
        "http": {"port": 0},
        "log": {"level": "error"},
        "outbox": {"path": str(tmp_path / "state" / "outbox.sqlite")},
        "coolant": {
            "subscribe": ["bms/h/r1/#"],
            "leak_clear": "auto",
            "sensors": [
                {"id": "leak", "kind": "leak", "topic": LEAK_TOPIC, "max_age_s": 600},
                {"id": "flow", "kind": "flow", "topic": FLOW_TOPIC, "format": "plain", "max_age_s": 600},
            ],
        },
    }
    if broker is not None:
        base["mqtt"] = {
            "host": broker.host,
            "port": broker.port,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1,
        }
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return configmod.validate(base)


@contextlib.asynccontextmanager
async def running(agent: Agent) -> Any:
    task = asyncio.create_task(agent.run())
    try:
        for _ in range(500):
            # subscribed: every SUBACK in, so what a test publishes from now on arrives
            if agent.link.subscribed and agent.cap_msg is not None and agent.link.priority_connected:
                break
            await asyncio.sleep(0.02)
        assert agent.link.subscribed and agent.cap_msg is not None
        yield agent
    finally:
        agent.request_stop("test done")
        await asyncio.wait_for(task, 15)


# -- the inbox ------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([LEAK, SENSOR, OTHER]), st.integers(0, 20)), max_size=600))
def test_inbox_priority_and_bounds(items: list[tuple[int, int]]) -> None:
    box = Inbox(per_topic=4, max_per_lane=30)
    for n, (lane, topic) in enumerate(items):
        box.put(lane, f"t{topic}", str(n).encode())
        assert all(lane_.size <= 30 for lane_ in box.lanes)
        assert all(len(q) <= lane_.per_topic for lane_ in box.lanes for q in lane_.topics.values())
    kept = len(box)
    assert kept + sum(box.dropped_total.values()) == len(items)  # every drop is counted
    out = []
    while (item := box.get_nowait()) is not None:
        out.append(item)
    assert len(out) == kept
    lanes = [lane for lane, _, _, _ in out]
    assert lanes == sorted(lanes)  # leak before sensors before the rest
    for key in {(lane, t) for lane, t, _, _ in out}:  # each topic keeps its order (its newest messages)
        seq = [int(p) for lane, t, p, _ in out if (lane, t) == key]
        assert seq == sorted(seq)


def test_inbox_round_robin_between_topics() -> None:
    box = Inbox(per_topic=100, max_per_lane=1000)
    for i in range(50):
        box.put(SENSOR, "storm", str(i).encode())
    box.put(SENSOR, "quiet", b"q")
    firsts = [box.get_nowait() for _ in range(3)]
    assert (SENSOR, "quiet", b"q", False) in firsts  # not behind the 50 storm messages


# -- a leak in a storm ----------------------------------------------------------------------
async def test_a_leak_is_handled_before_a_storm_on_other_topics(
    broker: Broker, tmp_path: Path, subscriber: Callable[..., Subscriber]
) -> None:
    """20,000 malformed payloads on the flow and undeclared topics, then a leak Critical:
    the agent acts on the leak while most of the storm is still unread (own connection, lane 0)."""
    handled_at_leak: list[int] = []
    agent = Agent(agent_cfg(broker, tmp_path), on_leak=lambda ev: handled_at_leak.append(seen()))

    def seen() -> int:
        return agent.coolant.accepted_total + agent.coolant.rejected_total

    storm = 20_000
    async with running(agent):
        assert agent.link.priority_connected
        watch = subscriber(broker, "bms/h/r1/#")
        pub = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        try:

            def blast() -> None:
                for i in range(storm):
                    pub.publish(FLOW_TOPIC if i % 2 else f"bms/h/r1/x/{i % 50}", b"\xff garbage", qos=0)
                # The broker has sent the storm on (to the agent's socket or its own queue) once
                # another subscriber has stopped receiving it.
                last, deadline = -1, time.monotonic() + 30
                while (last != len(watch.messages) or last < storm // 4) and time.monotonic() < deadline:
                    last = len(watch.messages)
                    time.sleep(0.5)
                pub.publish(LEAK_TOPIC, json.dumps({"DetectorState": "Critical"}), qos=1).wait_for_publish(5)

            # The agent is busy (its loop blocked) while the storm and then the leak arrive: the storm
            # waits unread in its socket and the broker, the leak on the safety connection.
            at_publish = seen()
            sender = threading.Thread(target=blast)
            sender.start()
            sender.join(60)  # blocks the event loop on purpose
            for _ in range(1000):
                if handled_at_leak:
                    break
                await asyncio.sleep(0.01)
            assert handled_at_leak, "the leak was never handled"
            assert agent.cap_msg is not None and agent.cap_msg.reason == "leak"
            # The storm the agent had yet to handle when the leak was sent (what the broker delivered).
            final, deadline = -1, time.monotonic() + 30
            while final != seen() and time.monotonic() < deadline:
                final = seen()
                await asyncio.sleep(1.0)
            backlog, waited = final - at_publish, handled_at_leak[0] - at_publish
            assert backlog >= 5000, f"only {backlog} storm messages were waiting: no test of priority"
            assert waited <= max(100, backlog // 2), (
                f"the leak waited behind {waited} of the {backlog} storm messages not yet handled"
            )
            # Still responsive afterwards (the broker itself drops QoS 0 to a slow reader).
            pub.publish(LEAK_TOPIC, json.dumps({"DetectorState": "OK"}), qos=1)
            for _ in range(1500):
                if agent.cap_msg.reason != "leak":
                    break
                await asyncio.sleep(0.02)
            assert agent.cap_msg.reason != "leak" and agent.link.connected
        finally:
            pub.loop_stop()
            pub.disconnect()


# -- a broker that refuses ------------------------------------------------------------------
async def test_refused_publishes_stay_queued_and_are_reported(
    broker_factory: BrokerFactory, tmp_path: Path, subscriber: Callable[..., Subscriber]
) -> None:
    """The ACL lets the node write its cap but not its telemetry: telemetry stays in the
    outbox (PUBACK 0x87 is not delivery), /healthz says degraded, the cap still goes out."""
    acl = tmp_path / "acl"
    acl.write_text(
        "user n1\ntopic write rackguard/h/r1/n1/cap\ntopic write rackguard/h/r1/n1/status\n"
        "topic read bms/#\ntopic read rackguard/h/r1/n1/#\n\nuser watcher\ntopic read #\n"
    )
    pw = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "n1", "pw-n1"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "watcher", "pw-w"], check=True)
    # Started as root, mosquitto drops to user "mosquitto", who cannot read tmp_path: stay us.
    broker = broker_factory(
        f"user {getpass.getuser()}\npassword_file {pw}\nacl_file {acl}\n", anonymous=False
    )
    (tmp_path / "n1.pw").write_text("pw-n1\n")
    cfg = agent_cfg(broker, tmp_path, mqtt={"username": "n1", "password_file": str(tmp_path / "n1.pw")})
    watch = subscriber(broker, "rackguard/#", username="watcher", password="pw-w")
    agent = Agent(cfg)
    async with running(agent):
        await asyncio.to_thread(watch.wait_for, lambda m: m.topic.endswith("/cap"), 10)
        for _ in range(300):
            if agent.link.refused_total >= 2 and len(agent.link.outbox) >= 3:
                break
            await asyncio.sleep(0.05)
        queued = len(agent.link.outbox)
        assert agent.link.refused_total >= 1 and queued >= 3
        assert any("broker refuses publishes" in d for d in degraded(agent))
        await asyncio.sleep(1.0)
        assert len(agent.link.outbox) >= queued  # nothing was removed as if delivered
        assert not [m for m in watch.messages if m.topic.endswith("/telemetry")]
        # Backoff: far fewer refusals than publish attempts would make at full speed.
        assert agent.link.refused_total < 40


# -- storage faults -------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB tmpfs (needs root, as CI has); skipped where mounting is not allowed."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


async def test_disk_full_live_telemetry_continues_and_recovers_with_no_seq_lost(
    broker: Broker, small_disk: Path, tmp_path: Path, subscriber: Callable[..., Subscriber]
) -> None:
    cfg = agent_cfg(broker, tmp_path, outbox={"path": str(small_disk / "state" / "outbox.sqlite")})
    sub = subscriber(broker, "rackguard/h/r1/n1/telemetry")
    agent = Agent(cfg)
    async with running(agent):
        await asyncio.to_thread(sub.wait_for, lambda m: True, 10, 3)
        filler = fill(small_disk)
        for _ in range(200):
            if agent.link.outbox.fault:
                break
            await asyncio.sleep(0.05)
        assert agent.link.outbox.fault and "full" in agent.link.outbox.fault
        assert any(d.startswith("outbox not durable") for d in degraded(agent))
        during = len(sub.messages)
        await asyncio.sleep(1.5)
        assert len(sub.messages) >= during + 4  # live telemetry goes on without the disk
        filler.unlink()
        for _ in range(300):
            if agent.link.outbox.fault is None:
                break
            await asyncio.sleep(0.05)
        assert agent.link.outbox.fault is None and agent.link.outbox.durable
        await asyncio.sleep(1.0)
        seqs = sorted({m.json()["seq"] for m in sub.messages})
        assert seqs == list(range(seqs[0], seqs[-1] + 1))  # 0 sequence numbers lost
        assert not [d for d in degraded(agent) if d.startswith("outbox")]


async def test_disk_full_during_replay_keeps_the_link_up(
    broker: Broker, small_disk: Path, tmp_path: Path, subscriber: Callable[..., Subscriber]
) -> None:
    """A backlog replays while the disk is full: deletes fail, nothing raises, all arrive."""
    path = small_disk / "state" / "outbox.sqlite"
    box = ResilientOutbox(path, 100_000)
    topic = "rackguard/h/r1/n1/telemetry"
    for n in range(1, 1501):
        box.put(OutMsg(topic, json.dumps({"seq": n, "historical": False}).encode(), seq=n))
    box.close()
    sub = subscriber(broker, topic)
    cfg = agent_cfg(broker, tmp_path, outbox={"path": str(path), "replay_rate_msgs_s": 300})
    agent = Agent(cfg)
    async with running(agent):
        await asyncio.to_thread(sub.wait_for, lambda m: m.json().get("historical") is True, 30, 100)
        filler = fill(small_disk)  # the disk fills in the middle of the replay
        await asyncio.to_thread(sub.wait_for, lambda m: m.json().get("historical") is True, 60, 1500)
        assert agent.link.connected and agent.link.connects == 1
        assert agent.link.outbox.fault  # it did hit the full disk
        filler.unlink()
        await asyncio.sleep(0.5)
    assert {m.json()["seq"] for m in sub.messages} >= set(range(1, 1501))


async def test_read_only_state_directory_is_loud_and_recovers(small_disk: Path, tmp_path: Path) -> None:
    (small_disk / "state").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    box = ResilientOutbox(small_disk / "state" / "outbox.sqlite", 100, retry_s=0.1)
    assert box.fault and not box.durable
    box.put(OutMsg("t", b"1", seq=1))
    assert [m.payload for _, m in box.peek(10)] == [b"1"]  # still queued (in memory)
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    time.sleep(0.15)
    box.put(OutMsg("t", b"2", seq=2))
    assert box.durable and box.fault is None
    assert [m.payload for _, m in box.peek(10)] == [b"1", b"2"]  # moved into the database
    box.close()
    reopened = ResilientOutbox(small_disk / "state" / "outbox.sqlite", 100)
    assert [m.payload for _, m in reopened.peek(10)] == [b"1", b"2"] and reopened.last_seq("telemetry") == 2
    reopened.close()


# -- seq across restarts --------------------------------------------------------------------
async def test_cap_seq_continues_across_restarts(tmp_path: Path) -> None:
    seqs = []
    for _ in range(2):
        agent = Agent(agent_cfg(None, tmp_path), client_factory=LocalBroker().client)
        async with running(agent):
            await asyncio.sleep(0.5)
            assert agent.cap_msg is not None
            seqs.append((agent.cap_msg.seq, agent.telemetry_seq))
    (cap1, tele1), (cap2, tele2) = seqs
    assert cap2 > cap1 and tele2 > tele1


def test_seq_store_never_repeats_after_a_crash_and_reports_a_lost_file(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    a = SeqStore(path, block=10)
    used = [a.next("cap") for _ in range(25)]
    b = SeqStore(path, block=10)  # a crash: no clean shutdown
    assert b.next("cap") > max(used)
    path.write_text("{not json")
    c = SeqStore(path)
    assert c.fault and c.next("cap") > max(used)  # above the clock in ms: above anything used


async def test_an_emptied_outbox_is_reported(tmp_path: Path) -> None:
    cfg = agent_cfg(None, tmp_path)
    agent = Agent(cfg, client_factory=LocalBroker().client)
    async with running(agent):
        await asyncio.sleep(0.6)
    (tmp_path / "state" / "outbox.sqlite").write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            (tmp_path / "state" / f"outbox.sqlite{suffix}").unlink()
    agent = Agent(cfg, client_factory=LocalBroker().client)
    assert agent.link.outbox.lost_on_open
    async with running(agent):
        assert any("outbox was lost" in d for d in degraded(agent))


# -- commands -------------------------------------------------------------------------------
def processor(clock: Callable[[], float]) -> CommandProcessor:
    cfg = configmod.validate({"commands": {"max_skew_s": 30}}).commands
    actions = Actions(
        max_cap=64,
        set_manual_ceiling=lambda c: None,
        set_mpc_paused=lambda p: None,
        rebirth=lambda: None,
        react=lambda: 0,
        ack_leak=None,
    )
    return CommandProcessor(cfg, actions, clock=clock)


def test_nonces_are_kept_for_the_whole_window_and_a_full_memory_refuses() -> None:
    now = [1_000_000.0]
    p = processor(lambda: now[0])

    def cmd(i: int, t: float) -> bytes:
        return json.dumps({"id": f"c{i}", "t_s": t, "command": "pause_mpc"}).encode()

    for i in range(MAX_REMEMBERED_IDS):
        assert p.handle(cmd(i, now[0])).accepted
    extra = p.handle(cmd(MAX_REMEMBERED_IDS, now[0]))
    assert not extra.accepted and extra.reason.startswith("overloaded")
    replay = p.handle(cmd(0, now[0]))  # the oldest id is still remembered
    assert not replay.accepted and replay.reason.startswith("replayed")
    now[0] += 31  # the window has passed: the ids expire, new commands are taken again
    assert p.handle(cmd(MAX_REMEMBERED_IDS + 1, now[0])).accepted


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append(event)

    def exception(self, event: str, **kw: Any) -> None:
        self.lines.append(event)

    def info(self, event: str, **kw: Any) -> None:
        pass


def test_rejection_logs_are_rate_limited_by_reason_not_by_topic() -> None:
    from rackguard.agent.gate_reports import GateTracker

    gates = GateTracker(3.0)
    gates._rl = logmod.RateLimitedLog(Lines(), 60.0)
    for i in range(501):
        gates.handle(f"rackguard/s/r/n/gate/g{i}", b'{"in_flight": "x"}')
    assert gates.rejected_total == 501
    assert len(gates._rl.log.lines) <= 2
    p = processor(time.time)
    p._rl = logmod.RateLimitedLog(Lines(), 60.0)
    for i in range(5000):
        p.handle(
            b"not json" if i % 2 else json.dumps({"id": f"x{i}", "t_s": 0, "command": "pause_mpc"}).encode()
        )
    assert len(p._rl.log.lines) <= 3


# -- HTTP -----------------------------------------------------------------------------------
CLIENTS = r"""
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
socks = []
for _ in range(2000):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        pass
    socks.append(s)
print(len(socks), flush=True)
time.sleep(2.0)
"""


async def test_2000_http_connections_at_1024_descriptors(tmp_path: Path) -> None:
    """No traceback, the agent keeps controlling, and /healthz answers afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
    agent = Agent(agent_cfg(None, tmp_path, http={"port": free_port()}), client_factory=LocalBroker().client)
    try:
        async with running(agent):
            assert agent.http is not None and agent.control is not None
            port = agent.http.port
            steps_before = agent.control.last_step_mono
            # The clients are another process (with its own descriptor limit), as they would be.
            clients = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CLIENTS, str(port), stdout=asyncio.subprocess.PIPE
            )
            assert clients.stdout is not None
            opened = int((await asyncio.wait_for(clients.stdout.readline(), 60)).decode())
            assert opened >= 1500
            await asyncio.sleep(1.0)  # all held open at once
            assert agent.control.last_step_mono is not None and steps_before is not None
            assert agent.control.last_step_mono > steps_before  # control went on
            await asyncio.wait_for(clients.wait(), 30)
            await asyncio.sleep(0.5)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status = (await asyncio.wait_for(reader.readline(), 10)).decode()
            writer.close()
            assert status.startswith("HTTP/1.1 200") or status.startswith("HTTP/1.1 503")
            assert agent.http.busy_total > 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not [e for e in errors if "accept" in str(e.get("message", ""))], errors[:3]
    assert os.getpid()  # the test process (the agent) is still here


level = st.sampled_from(["a", "b", "", "$SYS", "x y", "é"])
filter_level = st.one_of(level, st.just("+"))


@settings(max_examples=3000, deadline=None)
@given(
    topic=st.lists(level, min_size=1, max_size=5).map("/".join),
    filt=st.tuples(st.lists(filter_level, min_size=1, max_size=5), st.booleans()).map(
        lambda p: "/".join(p[0] + (["#"] if p[1] else []))
    ),
)
def test_topic_matching_agrees_with_paho(topic: str, filt: str) -> None:
    """The agent's own matcher (paho's was a quarter of its time under a storm) gives paho's answers."""
    assert topic_matches(filt, topic) == paho.topic_matches_sub(filt, topic), (filt, topic)


def test_topic_matching_of_long_topics_is_not_cached() -> None:
    """Topics up to the 64 KiB packet size cannot fill memory through the matcher's cache."""
    from rackguard.agent.mqtt import _matches

    before = _matches.cache_info().currsize
    for i in range(100):
        assert topic_matches("bms/#", "bms/" + "x" * 1000 + str(i))
    assert _matches.cache_info().currsize == before
    assert not topic_matches("bms/+", "bms/" + "x" * 1000 + "/y")

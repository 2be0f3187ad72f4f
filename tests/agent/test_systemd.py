"""systemd integration: sd_notify (READY, STATUS, WATCHDOG from the tick loop), SIGHUP reload, the unit."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rackguard.agent import config as configmod
from rackguard.agent.config import split_reload
from rackguard.agent.daemon import Agent
from rackguard.agent.notify import Notifier

REPO = Path(__file__).resolve().parents[2]


class NotifySocket:
    """A datagram socket standing in for systemd's; a thread records (monotonic time, message) pairs."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.got: list[tuple[float, str]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    def _recv(self) -> None:
        while not self._closed:
            try:
                self.got.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                continue
            except OSError:
                return

    def drain(self) -> list[str]:
        time.sleep(0.05)
        return [m for _, m in self.got]

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self.sock.close()

    def wait_for(self, needle: str, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(needle in m for m in self.drain()):
                return
            time.sleep(0.05)
        raise AssertionError(f"no {needle!r} in {self.drain()[-10:]}")


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[tuple[str, NotifySocket]]:
    path = str(tmp_path / "notify.sock")
    s = NotifySocket(path)
    yield path, s
    s.close()


def test_notifier_path_and_abstract_sockets(notify_path: tuple[str, NotifySocket]) -> None:
    path, s = notify_path
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert n.ready("up") and n.status("fine")
    assert n.watchdog(100.0) and not n.watchdog(100.5) and n.watchdog(101.0)  # every half interval
    assert s.drain() == ["READY=1\nSTATUS=up", "STATUS=fine", "WATCHDOG=1", "WATCHDOG=1"]
    name = f"rackguard-test-{os.getpid()}"
    a = NotifySocket("\0" + name)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert a.drain() == ["READY=1"]
    finally:
        a.close()
    off = Notifier({})
    assert not off.enabled and not off.ready() and not off.watchdog()
    # WATCHDOG_PID of another process: not our watchdog.
    assert (
        Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_period_s
        is None
    )


def write(path: Path, extra: str = "") -> None:
    path.write_text(
        '[sensors]\nbackend = "sim"\npoll_period_s = 0.1\n[sim]\ngpus = 2\n[http]\nport = 0\n'
        '[mqtt]\nport = 1\nreconnect_min_s = 5\nreconnect_max_s = 5\n[log]\nformat = "json"\n' + extra
    )


def test_daemon_ready_watchdog_status_and_sighup_reload(
    tmp_path: Path, notify_path: tuple[str, NotifySocket]
) -> None:
    path, s = notify_path
    cfg = tmp_path / "rackguard.toml"
    write(cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
    env.update(NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000", STATE_DIRECTORY=str(tmp_path / "state"))
    log = tmp_path / "agent.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rackguard.agent.cli", "run", "--config", str(cfg)],
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        s.wait_for("READY=1")
        s.wait_for("STATUS=")
        time.sleep(2.2)
        s.drain()
        pings = [t for t, m in s.got if m == "WATCHDOG=1"]
        assert len(pings) >= 3
        # The status line says what the cap is and why (STATUS= every publish period).
        statuses = [m for _, m in s.got if m.startswith("STATUS=")]
        assert re.search(r"STATUS=2/2 GPUs ok, cap \d+ \(mpc, binding \w+\), MQTT", statuses[-1]), statuses
        assert (tmp_path / "state" / "outbox.sqlite").exists()  # $STATE_DIRECTORY holds the outbox
        # An invalid config: rejected with the reason, the agent keeps running on the old one.
        cfg.write_text("[telemetry]\npublish_period_s = -1\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload_rejected" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        line = next(ln for ln in log.read_text().splitlines() if "reload_rejected" in ln)
        assert "telemetry.publish_period_s" in line
        assert proc.poll() is None
        # A valid one: live keys apply, restart-only keys are named and kept.
        write(cfg, "[telemetry]\npublish_period_s = 0.5\n")
        cfg.write_text(cfg.read_text().replace("[mqtt]\nport = 1\n", "[mqtt]\nport = 2\n"))
        proc.send_signal(signal.SIGHUP)
        while "reloaded" not in log.read_text() and time.monotonic() < deadline + 10:
            time.sleep(0.05)
        reloaded = json.loads(next(ln for ln in log.read_text().splitlines() if '"reloaded"' in ln))
        assert reloaded["needs_restart"] == ["mqtt.port"]
        msgs = s.drain()
        assert any(m.startswith("RELOADING=1") for m in msgs)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(15)
    assert rc == 0
    assert "STOPPING=1" in s.drain()


async def test_watchdog_is_fed_by_the_tick_loop(
    tmp_path: Path, notify_path: tuple[str, NotifySocket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stalled tick loop stops the WATCHDOG=1 pings (so systemd would restart the agent)."""
    path, s = notify_path
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    cfg = configmod.validate(
        {
            "sensors": {"backend": "sim", "poll_period_s": 0.05},
            "sim": {"gpus": 1},
            "http": {"port": 0},
            "mqtt": {"port": 1, "reconnect_min_s": 5, "reconnect_max_s": 5},
        }
    )
    agent = Agent(cfg)
    stalled = {"done": False}
    real_step = agent.control_step

    def stall_once(snap: object = None) -> object:
        if not stalled["done"] and agent.telemetry_seq >= 1:
            stalled["done"] = True
            time.sleep(1.5)  # the loop itself is stuck (e.g. a blocking call on the event loop)
        return real_step(snap)  # type: ignore[arg-type]

    monkeypatch.setattr(agent, "control_step", stall_once)
    task = asyncio.create_task(agent.run())
    deadline = time.monotonic() + 30
    while not stalled["done"]:
        assert not task.done(), task.result()
        assert time.monotonic() < deadline, "the tick loop never ran control_step after a telemetry"
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    agent.request_stop()
    await task
    s.drain()
    pings = [t for t, m in s.got if m == "WATCHDOG=1"]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) >= 1.4  # no ping while stalled
    assert sorted(gaps)[len(gaps) // 2] < 0.35  # otherwise every ~0.2 s


def test_split_reload_keeps_restart_keys() -> None:
    old = configmod.validate({"mqtt": {"port": 1883}, "telemetry": {"publish_period_s": 1.0}})
    new = configmod.validate(
        {"mqtt": {"port": 1884}, "telemetry": {"publish_period_s": 2.0}, "log": {"level": "debug"}}
    )
    applied, kept = split_reload(old, new)
    assert kept == ["mqtt.port"]
    assert (
        applied.mqtt.port == 1883
        and applied.telemetry.publish_period_s == 2.0
        and applied.log.level == "debug"
    )


def test_example_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mqtt-password").write_text("x\n")
    ca = REPO / "tests" / "data" / "tls" / "ca.crt"
    text = (REPO / "systemd" / "rackguard.toml.example").read_text().replace("/etc/rackguard/ca.crt", str(ca))
    f = tmp_path / "rackguard.toml"
    f.write_text(text)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = configmod.load(f, environ={})
    assert cfg.mqtt.password_file == tmp_path / "mqtt-password"
    assert cfg.outbox.resolved_path({"STATE_DIRECTORY": "/var/lib/rackguard"}) == Path(
        "/var/lib/rackguard/outbox.sqlite"
    )


def test_unit_passes_systemd_analyze() -> None:
    """CI's .ci/systemd-checks: `verify` clean and offline security exposure <= 2.0."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed (CI installs it)")
    r = subprocess.run([str(REPO / ".ci" / "systemd-checks")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    unit = (REPO / "systemd" / "rackguard.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "RestartPreventExitStatus=78",
        "StateDirectory=rackguard",
        "LoadCredential=",
        "DevicePolicy=closed",
        "ExecStopPost=-",
    ):
        assert line in unit


async def test_reload_applies_control_limits_live() -> None:
    """A SIGHUP that lowers control.max_cap takes effect without a restart, models kept."""
    from rackguard.agent.localbus import LocalBroker
    from rackguard.sim.node import SimBackend

    base = {
        "node": {"name": "reload"},
        "sensors": {"backend": "sim", "poll_period_s": 0.05, "slow_period_s": 0.1},
        "telemetry": {"publish_period_s": 0.2},
        "control": {"period_s": 0.1, "cap_rise_per_s": 1000.0},
        "http": {"port": 0},
        "sim": {"gpus": 2},
    }
    new_cfg = configmod.validate({**base, "control": {**base["control"], "max_cap": 16}})  # type: ignore[dict-item]
    agent = Agent(
        configmod.validate(base),
        SimBackend(2),
        client_factory=LocalBroker().client,
        reload_config=lambda: new_cfg,
    )
    task = asyncio.create_task(agent.run())
    try:
        for _ in range(200):
            if agent.cap_msg is not None and max(agent.cap_msg.caps) > 16:
                break
            await asyncio.sleep(0.02)
        assert agent.cap_msg is not None and max(agent.cap_msg.caps) > 16
        mpc_before = agent.control.mpc if agent.control else None
        agent.reload()
        for _ in range(100):
            if agent.cap_msg.max_cap == 16 and max(agent.cap_msg.caps) <= 16:
                break
            await asyncio.sleep(0.02)
        assert agent.cap_msg.max_cap == 16 and max(agent.cap_msg.caps) <= 16
        assert agent.control is not None and agent.control.mpc is mpc_before
        assert agent.commands.actions.max_cap == 16  # operator ceilings are bounded by the new max
    finally:
        agent.request_stop("test")
        assert await asyncio.wait_for(task, 10) == 0


async def test_status_line_says_when_the_cap_is_held_at_safe_cap() -> None:
    from rackguard.agent import config as configmod
    from rackguard.agent.daemon import Agent
    from rackguard.agent.localbus import LocalBroker
    from rackguard.sim.node import SimBackend

    cfg = configmod.validate(
        {
            "sensors": {"backend": "sim", "poll_period_s": 0.05},
            "control": {"period_s": 0.1, "safe_cap": 8},
            "http": {"port": 0},
            "sim": {"gpus": 2},
            # A declared sensor that never reports: stale, so the safety layer holds safe_cap.
            "coolant": {"sensors": [{"id": "cdu", "kind": "cdu", "topic": "bms/cdu", "max_age_s": 1.0}]},
        }
    )
    agent = Agent(cfg, SimBackend(2), client_factory=LocalBroker().client)
    assert agent.status_line().startswith("0/0 GPUs ok, no cap yet, MQTT disconnected")
    task = asyncio.create_task(agent.run())
    try:
        for _ in range(200):
            if agent.cap_msg is not None:
                break
            await asyncio.sleep(0.02)
        assert agent.status_line().startswith("2/2 GPUs ok, cap 16 at safe_cap (stale), MQTT ")
    finally:
        agent.request_stop("test")
        assert await asyncio.wait_for(task, 10) == 0

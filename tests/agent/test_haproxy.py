"""Must-show: a real HAProxy's ``maxconn`` follows the cap, and ``safe_cap`` once the agent is gone.

The agent's ``[actuators.haproxy]`` sink writes each decision and ``safe_cap`` when it
stops; ``rackguard haproxy-follow`` covers an agent that is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rackguard.agent.haproxy import HaproxyRuntime
from rackguard.agent.mosquitto import free_port
from tests.conftest import REPO, Broker

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
KEEPALIVE_S = 2
BASE = "rackguard/s/r/n1"


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[HaproxyRuntime]:
    if not Path(HAPROXY).exists():
        pytest.fail("haproxy is not installed: apt-get install -y haproxy")
    sock = tmp_path / "haproxy.sock"
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        f"""global
    maxconn 1000
    stats socket {sock} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
frontend fe
    bind 127.0.0.1:{free_port()}
    default_backend vllm
backend vllm
    server gpu0 127.0.0.1:{free_port()} maxconn 100
    server gpu1 127.0.0.1:{free_port()} maxconn 100
"""
    )
    proc = subprocess.Popen(
        [HAPROXY, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    rt = HaproxyRuntime(sock)
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert time.monotonic() < deadline, "haproxy did not start"
        time.sleep(0.05)
    assert rt.maxconn("vllm", "gpu0") == 100
    yield rt
    proc.terminate()
    proc.wait(10)


def config(broker: Broker, tmp_path: Path, sock: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(
        f"""
[node]
site = "s"
rack = "r"
name = "n1"
[mqtt]
host = "{broker.host}"
port = {broker.port}
keepalive_s = {KEEPALIVE_S}
[sensors]
backend = "sim"
[sim]
gpus = 2
offered_concurrency = 4
[control]
period_s = 0.1
safe_cap = 1
[http]
port = 0
[log]
level = "warning"
[actuators.haproxy]
socket = "{sock}"
backend = "vllm"
servers = [{{name = "gpu0", gpus = [0]}}, {{name = "gpu1", gpus = [1]}}]
"""
    )
    return p


def start(cmd: str, cfg: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen(
        [sys.executable, "-m", "rackguard.agent.cli", cmd, "--config", str(cfg)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def until(pred: Callable[[], bool], timeout_s: float) -> float:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout_s, "timed out"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_maxconn_follows_the_cap_and_safe_cap_after_the_agent_dies(
    broker: Broker, haproxy: HaproxyRuntime, tmp_path: Path, subscriber: Any
) -> None:
    sub = subscriber(broker, f"{BASE}/cap")
    cfg = config(broker, tmp_path, haproxy.path)

    def ceiling(n: int) -> None:
        cmd = {
            "command": "set_manual_ceiling",
            "id": f"t-{time.monotonic_ns()}",
            "t_s": time.time(),
            "ceiling": n,
        }
        sub.client.publish(f"{BASE}/cmd", json.dumps(cmd), qos=1)

    def maxconn() -> tuple[int | None, int | None]:
        return haproxy.maxconn("vllm", "gpu0"), haproxy.maxconn("vllm", "gpu1")

    procs = [start("run", cfg)]
    try:
        # The agent's sink: maxconn is each GPU's cap.
        sub.wait_for(lambda m: m.topic.endswith("/cap"), timeout=30)
        ceiling(3)
        until(lambda: maxconn() == (3, 3), 10)
        ceiling(2)
        took_s = until(lambda: maxconn() == (2, 2), 5)
        print(f"haproxy maxconn follows a ceiling of 2 in {took_s * 1000:.0f} ms")
        # A clean stop: safe_cap.
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(20) == 0
        assert maxconn() == (1, 1)
        # Killed: the follower sees the agent's will and writes safe_cap within 1.5 × keepalive.
        seen = len(sub.messages)
        procs = [start("run", cfg), start("haproxy-follow", cfg)]
        # The restarted agent is up (its first cap) before it is sent a command.
        sub.wait_for(
            lambda m: m.topic.endswith("/cap") and any(m is x for x in sub.messages[seen:]), timeout=30
        )
        ceiling(4)
        until(lambda: maxconn() == (4, 4), 20)
        procs[0].kill()
        took_s = until(lambda: maxconn() == (1, 1), 10)
        print(f"haproxy maxconn = safe_cap {took_s * 1000:.0f} ms after SIGKILL (keepalive {KEEPALIVE_S} s)")
        assert took_s <= 1.5 * KEEPALIVE_S, took_s
    finally:
        for p in procs:
            p.kill()
            p.wait(10)

"""Must-show: the gateway obeys the cap of a simulated agent over a real mosquitto.

The agent runs as its own process (``rackguard run --sim``) so that it can be SIGKILLed;
the gateway, the fake upstream and the official ``openai`` client run in the test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import openai
import pytest

from rackguard.agent import config as configmod
from rackguard.agent.gateway.server import Gateway
from rackguard.bench.fake_openai import FakeUpstream
from tests.conftest import REPO, Broker, Subscriber

KEEPALIVE_S = 2
BASE = "rackguard/s/r/n1"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def agent(broker: Broker, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A simulated agent (2 GPUs, safe_cap 1) in its own process; killed afterwards."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
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
poll_period_s = 0.1
slow_period_s = 0.1
[sim]
gpus = 2
offered_concurrency = 4
[telemetry]
publish_period_s = 0.5
[control]
period_s = 0.1
safe_cap = 1
[http]
port = 0
[log]
level = "warning"
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rackguard.agent.cli", "run", "--sim", "--config", str(cfg)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    yield proc
    proc.kill()
    proc.wait(10)


def gateway_config(broker: Broker, up: FakeUpstream, **energy: Any) -> configmod.Config:
    return configmod.validate(
        {
            "node": {"site": "s", "rack": "r", "name": "n1"},
            "mqtt": {"host": broker.host, "port": broker.port},
            "http": {"port": 0},
            "energy": energy,
            "gateway": {
                "listen": "127.0.0.1:0",
                "upstreams": [{"name": "vllm", "url": up.url, "gpus": [0]}],
                "safe_cap": 1,
                "classes": [{"name": "d", "priority": 0, "max_queue_s": 60}],
                "gateway_id": "gw1",
                "report_period_s": 0.2,
            },
        }
    )


def command(sub: Subscriber, ceiling: int) -> None:
    cmd = {
        "command": "set_manual_ceiling",
        "id": f"t-{time.monotonic_ns()}",
        "t_s": time.time(),
        "ceiling": ceiling,
    }
    sub.client.publish(f"{BASE}/cmd", json.dumps(cmd), qos=1)


async def until(pred: Any, timeout_s: float, step_s: float = 0.01) -> float:
    """Wait until ``pred()``; returns the seconds it took (fails on timeout)."""
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout_s, "timed out"
        await asyncio.sleep(step_s)
    return time.monotonic() - t0


async def load(gw: Gateway, stop: asyncio.Event, clients: int, errors: list[BaseException]) -> int:
    """``clients`` loops, half streaming, until ``stop``; returns the requests completed."""
    c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="k", max_retries=0, timeout=30)
    done = [0]

    async def loop(i: int) -> None:
        while not stop.is_set():
            try:
                if i % 2:
                    text = ""
                    async for ch in await c.chat.completions.create(model="m", messages=MSG, stream=True):
                        assert ch.usage is None
                        text += ch.choices[0].delta.content or ""
                    assert text == "x" * 8
                else:
                    r = await c.chat.completions.create(model="m", messages=MSG)
                    assert r.choices[0].message.content == "x" * 8
                done[0] += 1
            except Exception as exc:
                errors.append(exc)
                return

    await asyncio.gather(*(loop(i) for i in range(clients)))
    await c.close()
    return done[0]


async def healthz(gw: Gateway) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/healthz", timeout=5) as r:
            assert r.status == 200
            return cast(dict[str, Any], json.loads(r.read()))

    return await asyncio.to_thread(get)


async def test_cap_obeyed_ceiling_within_1s_safe_cap_after_sigkill(
    broker: Broker, agent: subprocess.Popen[bytes], subscriber: Any
) -> None:
    sub = subscriber(broker, f"{BASE}/#")
    sub.wait_for(lambda m: m.topic.endswith("/cap"), timeout=30)
    up = FakeUpstream("vllm", delay_s=0.05, tokens=8, token_interval_s=0.01)
    await up.start()
    gw = Gateway(gateway_config(broker, up))
    await gw.start()
    u = gw.upstreams[0]
    try:
        command(sub, 3)
        await until(lambda: (u.adm.limit, u.rules.limit()[1]) == (3, "mqtt"), 15)
        health = await healthz(gw)
        assert health["status"] == "ok" and health["degraded"] == [], health
        # 1. 24 clients (streaming and not) against a cap of 3: the upstream never sees more than 3.
        stop, errors = asyncio.Event(), []
        task = asyncio.create_task(load(gw, stop, 24, errors))
        await asyncio.sleep(2.0)
        assert up.max_in_flight == 3 and not errors  # reached, never exceeded
        # 2. A manual ceiling of 2 is in force at the gateway within 1 s ...
        command(sub, 2)
        took_s = await until(lambda: u.adm.limit == 2, 5)
        print(f"ceiling 2 in force at the gateway after {took_s * 1000:.0f} ms")
        assert took_s < 1.0, took_s
        # ... and once the requests admitted before it drain (0.13 s each), the upstream sees at most 2.
        await asyncio.sleep(0.5)
        up.max_in_flight = up.in_flight
        await asyncio.sleep(1.5)
        assert up.max_in_flight == 2 and not errors
        assert u.adm.max_admitted_over_limit == 0 and up.cancelled == 0  # the drop cancelled nothing
        # 3. SIGKILL the agent: its will (status offline) brings safe_cap within 1.5 × keepalive.
        t0 = time.monotonic()
        agent.kill()
        await until(lambda: u.rules.limit() == (1, "safe") and u.adm.limit == 1, 10)
        took_s = time.monotonic() - t0
        print(f"safe_cap {took_s * 1000:.0f} ms after SIGKILL (keepalive {KEEPALIVE_S} s)")
        assert took_s <= 1.5 * KEEPALIVE_S, took_s
        health = await healthz(gw)  # still 200: it serves, with less
        assert health["status"] == "degraded" and "vllm: no valid cap" in health["degraded"][0], health
        await asyncio.sleep(0.5)
        up.max_in_flight = up.in_flight
        await asyncio.sleep(1.0)
        assert up.max_in_flight == 1
        stop.set()
        n = await task
        print(f"{n} requests (half streamed), upstream peak in flight 3 / 2 / 1 under caps 3 / 2 / safe 1")
        assert n > 50 and not errors
    finally:
        await gw.close()
        await up.close()


async def test_energy_adds_up_with_carbon_and_water(
    broker: Broker, agent: subprocess.Popen[bytes], subscriber: Any
) -> None:
    sub = subscriber(broker, f"{BASE}/telemetry")
    sub.wait_for(lambda m: m.topic.endswith("/telemetry"), timeout=30)
    up = FakeUpstream("vllm", tokens=8, token_interval_s=0.02)
    await up.start()
    gw = Gateway(gateway_config(broker, up, grid_carbon_g_per_kwh=400.0, wue_l_per_kwh=1.8))
    await gw.start()
    u = gw.upstreams[0]
    try:
        await until(lambda: u.rules.limit()[1] == "mqtt" and u.ledger.seen_window, 15)
        stop, errors = asyncio.Event(), []
        t_start = time.time()
        task = asyncio.create_task(load(gw, stop, 8, errors))
        await asyncio.sleep(5.0)
        stop.set()
        n = await task
        t_end = time.time()
        assert n > 50 and not errors
        await until(lambda: not u.ledger.finished and not u.ledger.open, 10)
        assert u.last_energy is not None
        t_last = u.last_energy[0]
    finally:
        await gw.close()
        await up.close()
    # The gateway settled on a message our subscriber may not have received yet.
    sub.wait_for(lambda m: m.json()["t_s"] >= t_last, timeout=10)
    # The node's GPU 0 energy over every telemetry window that overlaps the load, from raw telemetry.
    points = [
        (t["t_s"], t["gpus"][0]["energy_j"])
        for t in (m.json() for m in sub.messages)
        if not t["historical"] and t["gpus"][0]["energy_j"] is not None
    ]
    measured_j = sum(
        e1 - e0 for (t0, e0), (t1, e1) in itertools.pairwise(points) if t1 > t_start and t0 < t_end
    )
    attributed_j = sum(c.energy_j_total for c in u.counters.values())
    assert measured_j > 100  # the simulated H100 draws at least its idle 70 W
    assert attributed_j == pytest.approx(measured_j, rel=0.05), (attributed_j, measured_j, u.ledger.idle_j)
    # Carbon and water follow the energy.
    carbon_g = gw.metrics.carbon.labels("d")._value.get()
    water_l = gw.metrics.water.labels("d")._value.get()
    assert carbon_g == pytest.approx(attributed_j / 3.6e6 * 400.0, rel=1e-6)
    assert water_l == pytest.approx(attributed_j / 3.6e6 * 1.8, rel=1e-6)
    tokens = gw.metrics.tokens.labels("d", "completion")._value.get()
    print(
        f"energy: measured {measured_j:.1f} J, attributed {attributed_j:.1f} J, idle {u.ledger.idle_j:.1f} J; "
        f"per completion token {attributed_j / tokens:.3f} J, {carbon_g / tokens * 1000:.4f} mg CO2, "
        f"{water_l / tokens * 1e6:.3f} µL water"
    )

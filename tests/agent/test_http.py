"""Local HTTP: /metrics parses, /healthz turns 503 on a lost GPU or a stalled loop, /v1/cap."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from rackguard.agent import config as configmod
from rackguard.agent.daemon import Agent
from rackguard.agent.localbus import LocalBroker
from rackguard.agent.mosquitto import free_port
from rackguard.sim.node import SimBackend


def cfg() -> configmod.Config:
    return configmod.validate(
        {
            "node": {"name": "http"},
            "sensors": {"backend": "sim", "poll_period_s": 0.05, "slow_period_s": 0.1, "read_timeout_s": 0.2},
            "telemetry": {"publish_period_s": 0.2},
            "control": {"period_s": 0.2},
            "http": {"port": free_port()},
            "sim": {"gpus": 2},
        }
    )


async def get(port: int, path: str) -> tuple[int, bytes]:
    def fetch() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    return await asyncio.to_thread(fetch)


async def start(backend: SimBackend) -> tuple[Agent, asyncio.Task[int], int]:
    agent = Agent(cfg(), backend, client_factory=LocalBroker().client)
    task = asyncio.create_task(agent.run())
    for _ in range(200):
        if agent.http is not None and agent.http.port and agent.cap_msg is not None:
            break
        await asyncio.sleep(0.02)
    assert agent.http is not None
    return agent, task, agent.http.port


async def test_metrics_health_and_cap() -> None:
    backend = SimBackend(2)
    agent, task, port = await start(backend)
    try:
        for _ in range(100):
            status, body = await get(port, "/healthz")
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200, body
        assert json.loads(body)["ok"] is True

        status, body = await get(port, "/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        for name in (
            "rackguard_gpu_power_watts",
            "rackguard_nvml_call_seconds",
            "rackguard_mqtt_queue_depth",
        ):
            assert name in families, sorted(families)
        nvml = families["rackguard_nvml_call_seconds"]
        assert any(s.name.endswith("_count") and s.value > 0 for s in nvml.samples)

        status, body = await get(port, "/v1/cap")
        cap = json.loads(body)
        assert status == 200 and len(cap["caps"]) == 2 and cap["total"] == sum(cap["caps"])

        backend.lose_gpu(1)
        for _ in range(100):
            status, body = await get(port, "/healthz")
            if status == 503:
                break
            await asyncio.sleep(0.05)
        assert status == 503 and "gpu lost: [1]" in json.loads(body)["problems"]
        backend.restore_gpu(1)
        status, body = await get(port, "/nope")
        assert status == 404
    finally:
        agent.request_stop("test")
        assert await asyncio.wait_for(task, 10) == 0


async def test_healthz_503_when_loop_stalls() -> None:
    agent, task, port = await start(SimBackend(2))
    try:
        assert agent.poller is not None
        stalled = asyncio.Event()

        async def hang() -> list:  # type: ignore[type-arg]
            stalled.set()
            await asyncio.sleep(3600)
            return []

        agent.poller.poll = hang  # type: ignore[method-assign]
        await asyncio.wait_for(stalled.wait(), 5)
        for _ in range(150):
            status, body = await get(port, "/healthz")
            if status == 503:
                break
            await asyncio.sleep(0.05)
        problems = json.loads(body)["problems"]
        assert status == 503 and "sensing loop stalled" in problems
    finally:
        agent.request_stop("test")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

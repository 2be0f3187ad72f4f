"""Must-show: one GPU failing (fake NVML at the boundary) never hides the others."""

from __future__ import annotations

import asyncio
import json

import pynvml as real
import pytest

from rackguard.agent import config as configmod
from rackguard.agent.daemon import Agent
from rackguard.agent.messages import Telemetry
from rackguard.sensors import nvml
from rackguard.sensors.nvml import NvmlBackend
from tests.sensors.fake_pynvml import FakeNvml, h100s


def make_cfg(port: int) -> configmod.Config:
    return configmod.validate(
        {
            "node": {"site": "s", "rack": "r", "name": "fault"},
            "mqtt": {"host": "127.0.0.1", "port": port},
            "sensors": {
                "backend": "nvml",
                "poll_period_s": 0.05,
                "slow_period_s": 0.2,
                "read_timeout_s": 0.2,
                "lost_retry_min_s": 0.2,
                "lost_retry_max_s": 0.4,
            },
            "telemetry": {"publish_period_s": 0.25},
            "http": {"port": 0},
        }
    )


async def wait_telemetry(seen: list[Telemetry], pred, timeout: float = 10.0) -> Telemetry:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    start = len(seen)
    while asyncio.get_running_loop().time() < deadline:
        for t in seen[start:]:
            if pred(t):
                return t
        await asyncio.sleep(0.02)
    raise AssertionError(f"no matching telemetry; last: {seen[-1].model_dump() if seen else None}")


async def test_gpu_lost_midrun_others_keep_publishing(
    broker, subscriber, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    fake = FakeNvml(h100s(4))
    monkeypatch.setattr(nvml, "pynvml", fake)
    sub = subscriber(broker, "rackguard/s/r/fault/telemetry")
    seen: list[Telemetry] = []
    agent = Agent(make_cfg(broker.port), NvmlBackend(), on_telemetry=seen.append)
    task = asyncio.create_task(agent.run())
    try:
        await wait_telemetry(seen, lambda t: all(g.state == "ok" and g.samples > 0 for g in t.gpus))

        # GPU 2 falls off the bus; GPU 1 starts hanging past the read timeout.
        fake.gpus[2].fail = real.NVML_ERROR_GPU_IS_LOST
        fake.gpus[1].hang_s = 30.0

        def isolated(t: Telemetry) -> bool:
            g = {x.index: x for x in t.gpus}
            return (
                g[2].state == "lost"
                and g[1].state == "lost"
                and all(g[i].state == "ok" and g[i].samples >= 3 for i in (0, 3))
            )

        t = await wait_telemetry(seen, isolated)
        g = {x.index: x for x in t.gpus}
        assert "lost" in (g[2].error or "").lower()
        assert "timed out" in (g[1].error or "")
        assert g[2].power_w is None and g[2].samples == 0

        # Over the broker, consumers see the same thing.
        msgs = await asyncio.to_thread(
            sub.wait_for, lambda m: json.loads(m.payload)["gpus"][2]["state"] == "lost", 5
        )
        body = msgs[-1].json()
        assert body["gpus"][0]["state"] == "ok" and body["gpus"][0]["power_w"] is not None

        # The GPUs come back: retried with backoff, reported ok again.
        fake.gpus[2].fail = None
        fake.gpus[1].hang_s = 0.0
        fake.release.set()
        await wait_telemetry(seen, lambda t: all(x.state == "ok" and x.samples > 0 for x in t.gpus))
    finally:
        agent.request_stop("test")
        assert await asyncio.wait_for(task, 10) == 0


async def test_gpu_unidentifiable_at_start_is_lost_then_joins(
    broker, subscriber, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    fake = FakeNvml(h100s(3))
    fake.gpus[1].fail = real.NVML_ERROR_GPU_IS_LOST  # cannot even read its UUID at start
    monkeypatch.setattr(nvml, "pynvml", fake)
    status = subscriber(broker, "rackguard/s/r/fault/status")
    seen: list[Telemetry] = []
    agent = Agent(make_cfg(broker.port), NvmlBackend(), on_telemetry=seen.append)
    task = asyncio.create_task(agent.run())
    try:
        t = await wait_telemetry(
            seen, lambda t: t.gpus[1].state == "lost" and all(t.gpus[i].samples >= 2 for i in (0, 2))
        )
        assert "not identified" in (t.gpus[1].error or "") and t.gpus[1].uuid == ""
        assert agent.cap_msg is not None and agent.cap_msg.reason == "gpu_lost"
        birth = await asyncio.to_thread(status.wait_for, lambda m: m.json()["state"] == "online", 5)
        assert [g["uuid"] for g in birth[-1].json()["gpus"]] == [fake.gpus[0].uuid, "", fake.gpus[2].uuid]

        fake.gpus[1].fail = None
        t = await wait_telemetry(seen, lambda t: t.gpus[1].state == "ok" and t.gpus[1].samples > 0)
        assert t.gpus[1].uuid == fake.gpus[1].uuid
        # Consumers get the completed inventory, retained for those who subscribe later.
        await asyncio.to_thread(
            status.wait_for, lambda m: m.json()["gpus"][1]["uuid"] == fake.gpus[1].uuid, 5
        )
        late = subscriber(broker, "rackguard/s/r/fault/status")
        msgs = await asyncio.to_thread(late.wait_for, lambda m: m.retain, 5)
        assert msgs[-1].json()["gpus"][1]["uuid"] == fake.gpus[1].uuid
    finally:
        agent.request_stop("test")
        assert await asyncio.wait_for(task, 10) == 0

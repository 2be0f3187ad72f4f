"""The simulated node: one physics with the benchmark plant, and servers that obey the cap over MQTT."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np

from rackguard.agent import config as configmod
from rackguard.agent.messages import Cap, NodeId, dump
from rackguard.agent.mqtt import aiomqtt_factory
from rackguard.sim.node import SimBackend, SimServers, from_config, plant_config
from rackguard.sim.plant import Plant

SECONDS = 90
# Full load, a cut to 1 per GPU at 30 s, a partial release at 60 s.
CAPS = [256.0] * 30 + [1.0] * 30 + [64.0] * 30


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def sim_power_per_second(seed: int) -> np.ndarray:
    """The demo's simulated node, read like the agent reads it: every 0.1 s, caps once a second."""
    clock = FakeClock()
    sim = SimBackend(8, offered_concurrency=256.0, supply_temp_c=32.0, flow_lpm=12.0, seed=seed, clock=clock)
    out = []
    for cap in CAPS:
        sim.set_caps([cap] * 8)
        readings = []
        for _ in range(10):
            clock.t += 0.1
            readings.append(sum(sim.read(i, slow=False).power_w or 0.0 for i in range(8)))
        out.append(np.mean(readings))
    return np.asarray(out)


def plant_power_per_second(seed: int) -> np.ndarray:
    """The benchmark harness's plant with the same cap sequence."""
    plant = Plant(plant_config(8), 32.0, seed=seed)
    offered = np.full(8, 256.0)
    out = []
    for cap in CAPS:
        plant.advance(1.0, np.full(8, cap), offered, 32.0, 12.0)
        out.append(sum(g.power_w for g in plant.observe(0.0).gpus if g.power_w is not None))
    return np.asarray(out)


def test_demo_node_and_benchmark_plant_give_the_same_power_trajectory() -> None:
    sim, plant = sim_power_per_second(seed=3), plant_power_per_second(seed=4)
    # Node power noise: AR(1) σ 10 W per GPU → about 28 W on 8 GPUs; 1 s means are within 4σ.
    assert np.max(np.abs(sim - plant)) < 120.0, np.round(sim - plant)
    # After the cut nothing is killed: requests in flight finish (≈ 14 s at 256), so power stays up
    # for seconds and then falls, instead of dropping at once.
    full, settled = sim[29], sim[59]
    assert settled < 0.2 * full
    assert min(sim[30:36]) > 0.9 * full  # still draining 5 s after the cut
    assert sim[50] < 0.3 * full  # and drained 20 s after it


def test_energy_counter_integrates_power() -> None:
    clock = FakeClock()
    sim = SimBackend(2, offered_concurrency=64.0, seed=1, clock=clock)
    e0 = sim.read(0, slow=True).energy_j
    powers = []
    for _ in range(100):
        clock.t += 0.1
        powers.append(sim.read(0, slow=False).power_w)
    e1 = sim.read(0, slow=True).energy_j
    assert e0 is not None and e1 is not None
    assert abs((e1 - e0) - 0.1 * sum(p or 0.0 for p in powers)) < 0.02 * (e1 - e0)


async def until(pred: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_servers_obey_the_cap_report_load_and_feel_the_water(broker: Any, subscriber: Any) -> None:
    cfg = configmod.validate(
        {
            "node": {"site": "s", "rack": "r", "name": "n"},
            "mqtt": {"port": broker.port},
            "sim": {"gpus": 2},
            "control": {"safe_cap": 3},
            "coolant": {
                "subscribe": ["bms/#"],
                "sensors": [{"id": "cdu", "kind": "cdu", "topic": "bms/cdu", "format": "redfish"}],
            },
        }
    )
    backend, servers = from_config(cfg)
    assert isinstance(servers, SimServers)
    base = "rackguard/s/r/n"
    reports = subscriber(broker, f"{base}/gate/+")
    factory = aiomqtt_factory(cfg.mqtt, "test-sim")
    stop = asyncio.Event()
    task = asyncio.create_task(servers.run(factory, stop))
    try:
        # Before any cap: safe_cap, as a gate.
        await until(lambda: list(backend.caps) == [3.0, 3.0])
        async with aiomqtt_factory(cfg.mqtt, "test-operator")(None) as client:
            now = time.time()
            cap = Cap(
                seq=1,
                t_s=now,
                valid_until_s=now + 30,
                node=NodeId(site="s", rack="r", name="n"),
                caps=[5, 7],
                total=12,
                reason="mpc",
                binding="none",
                safe_cap=3,
                max_cap=256,
            )
            await client.publish(
                f"{base}/status", json.dumps({"state": "online"}).encode(), 1, True, timeout=5
            )
            await client.publish(f"{base}/cap", dump(cap), 1, True, timeout=5)
            await until(lambda: list(backend.caps) == [5.0, 7.0])
            msg = (await asyncio.to_thread(reports.wait_for, lambda m: m.json()["limit"] == 7, 10))[0]
            assert msg.topic == f"{base}/gate/sim-gpu1" and msg.json()["source"] == "mqtt"
            assert msg.json()["in_flight"] <= 7
            # The CDU's reading is the water the GPUs feel.
            cdu = {
                "SupplyTemperatureCelsius": 40.0,
                "ReturnTemperatureCelsius": 45.0,
                "FlowLitersPerMinute": 6.0,
                "DeltaPressurekPa": 50.0,
            }
            await client.publish("bms/cdu", json.dumps(cdu).encode(), 1, False, timeout=5)
            await until(lambda: (backend.plant.supply_c, backend.plant.flow_lpm) == (40.0, 6.0))
            # The agent goes offline (its will): back to safe_cap.
            await client.publish(
                f"{base}/status", json.dumps({"state": "offline"}).encode(), 1, True, timeout=5
            )
            await until(lambda: list(backend.caps) == [3.0, 3.0])
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)

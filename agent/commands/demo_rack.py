"""``rackguard demo --rack N``: a simulated rack of N nodes on one simulated CDU, in process.

N real agents (simulated GPUs and servers) share one CDU's flow and the rack's power
budget over an in-process broker, with no leader: each publishes its claim and computes
the same split. Half the nodes are busy, half nearly idle. At 20 s the CDU's pump fails
(40 % flow); at 45 s it is restored. Every second one line shows the rack (flow, capacity,
total power) and every node's share and power, as a consumer of the claims sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from rackguard.agent import config as configmod

SCENARIO: dict[str, Any] = {
    "events": [
        {"at_s": 20, "kind": "pump_failure", "flow_fraction": 0.4},
        {"at_s": 45, "kind": "pump_restore"},
    ]
}


def configs(nodes: int) -> tuple[Any, list[configmod.Config]]:
    """The rack's spec and its members' configs (busy first half, nearly idle second half)."""
    from rackguard.sim.rack import RackSpec, rack_config

    spec = RackSpec(nodes=nodes, power_budget_w=1500.0 * nodes, degraded_capacity_w=750.0 * nodes)
    cfgs = [
        configmod.validate(
            rack_config(
                spec,
                i,
                offered_concurrency=256.0 if i < (nodes + 1) // 2 else 2.0,
                extra={"log": {"level": "error"}, "control": {"period_s": 1.0}},
            )
        )
        for i in range(nodes)
    ]
    return spec, cfgs


class RackConsole:
    """Claims and the CDU's readings → one line a second."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.claims: dict[str, dict[str, Any]] = {}
        self.cdu: dict[str, Any] = {}
        self.t0 = time.monotonic()

    def handle(self, topic: str, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            return
        if topic.endswith("/claim"):
            self.claims[body.get("node", "?")] = body
        elif topic.endswith("/cdu"):
            self.cdu = body

    def header(self) -> str:
        nodes = "  ".join(f"{n:>11}" for n in self.names)
        sub = "  ".join(f"{'share/power':>11}" for _ in self.names)
        return f"  t_s  flow_lpm  capacity_w  power_w  {nodes}\n{'':37}{sub}"

    def line(self) -> str:
        flow = (self.cdu.get("FlowLitersPerMinute") or {}).get("Reading")
        cap = max((c.get("capacity_w", 0) for c in self.claims.values()), default=0)
        total = sum(c.get("power_w", 0) for c in self.claims.values())
        cells = []
        for n in self.names:
            c = self.claims.get(n)
            cells.append(f"{c['share_w']:>5}/{c['power_w']:<5}" if c else f"{'-':>11}")
        flow_s = f"{flow:8.1f}" if isinstance(flow, int | float) else f"{'-':>8}"
        return f"{time.monotonic() - self.t0:5.0f}  {flow_s}  {cap:>10}  {total:>7}  " + "  ".join(cells)


async def run(nodes: int, seconds: float) -> int:
    from rackguard.agent.commands import sim_cdu
    from rackguard.agent.daemon import Agent
    from rackguard.agent.localbus import LocalBroker
    from rackguard.sim.cdu import Scenario
    from rackguard.sim.node import from_config

    spec, cfgs = configs(nodes)
    broker = LocalBroker()
    stop = asyncio.Event()
    console = RackConsole(spec.names())
    agents = []
    tasks: list[asyncio.Task[Any]] = []
    for cfg in cfgs:
        backend, servers = from_config(cfg)
        agent = Agent(cfg, backend, client_factory=broker.client)
        agents.append(agent)
        tasks.append(asyncio.create_task(agent.run()))
        tasks.append(asyncio.create_task(servers.run(broker.client, stop)))
    cdu = asyncio.create_task(
        sim_cdu.run(
            cfgs[0],
            Scenario.model_validate(SCENARIO),
            0.5,
            None,
            None,
            factory=broker.client,
            stop=stop,
            tau_flow_s=0.3,
        )
    )
    print(
        f"rackguard demo --rack {nodes}: {nodes} simulated nodes ({spec.gpus} GPUs each) share one CDU "
        f"and a {spec.power_budget_w:.0f} W budget, no leader. Pump fails at 20 s (40 % flow), back at 45 s.",
        flush=True,
    )
    print(console.header(), flush=True)
    async with broker.client() as consumer:
        await consumer.subscribe(f"rackguard/{spec.site}/{spec.rack}/+/claim")
        await consumer.subscribe(spec.cdu_topic)

        async def consume() -> None:
            async for m in consumer.messages:
                console.handle(str(m.topic), bytes(m.payload))

        reader = asyncio.create_task(consume())
        start = time.monotonic()
        while not seconds or time.monotonic() - start < seconds:
            await asyncio.sleep(1.0)
            print(console.line(), flush=True)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    for a in agents:
        a.request_stop("demo finished")
    stop.set()
    codes = await asyncio.gather(*tasks, cdu, return_exceptions=True)
    return max((c for c in codes if isinstance(c, int)), default=0)

"""``rackguard sim-cdu`` in a rack: one CDU, the flow of every member, heated by every member."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from rackguard.agent import config as configmod
from rackguard.agent.commands import sim_cdu
from rackguard.agent.localbus import LocalBroker
from rackguard.sim.cdu import Scenario
from rackguard.sim.rack import RackSpec, rack_config


def telemetry(power_w: float) -> bytes:
    return json.dumps(
        {"gpus": [{"power_w": {"mean": power_w / 2}}, {"power_w": {"mean": power_w / 2}}]}
    ).encode()


async def test_the_rack_cdu_carries_every_members_flow_and_heat() -> None:
    spec = RackSpec(nodes=3, site="s", rack="r")
    cfg = configmod.validate(rack_config(spec, 0, offered_concurrency=1.0))
    broker = LocalBroker()
    stop = asyncio.Event()
    seen: list[Any] = []
    task = asyncio.create_task(
        sim_cdu.run(cfg, Scenario(), 0.05, 0.0, None, factory=broker.client, stop=stop, on_step=seen.append)
    )
    async with broker.client() as pub:
        for _ in range(20):
            for i, p in enumerate((1000.0, 2000.0, 3000.0)):
                await pub.publish(f"rackguard/s/r/n{i}/telemetry", telemetry(p))
            await asyncio.sleep(0.05)
    stop.set()
    await task
    loop = seen[-1].loop
    assert loop.p.nominal_flow_lpm == 3 * spec.flow_lpm
    # The return is set by the total heat (6 kW), not one node's: invert the loop's first-order lag.
    rise_k = loop.return_temp_c - loop.supply_temp_c
    settled = 1 - math.exp(-loop.t_s / loop.p.tau_return_s)
    heat_w = rise_k / settled / (loop.return_target_c(1000.0) - loop.supply_temp_c) * 1000.0
    assert 4500.0 < heat_w < 6500.0, heat_w

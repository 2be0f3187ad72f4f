"""Must-show 1 in CI: 4 agents as separate processes on a real mosquitto share one rack with 0 overcommit.

A short timeline of the bench's scenario: uneven load, a late joiner, the pump failing to 40 %
flow, a node SIGKILLed and restarted, a node cut off from the broker, then a critical leak on the
rack's tray, which every node hears on its own subscription.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from rackguard.bench.rack import RackOptions, Timeline, arm_metrics, coordination_metrics, run_arm, spec_for

TIMELINE = Timeline(warm=3, join=6, fail=9, restore=17, kill=19, restart=30, cut=21, cut_end=31, end=36)


async def test_four_agents_share_the_rack_with_no_overcommit(tmp_path: Path) -> None:
    spec = spec_for(RackOptions(nodes=4))
    leak = {"at_s": TIMELINE.end - 3, "kind": "leak", "sensor": "rack-leak", "state": "Critical"}
    run = await run_arm("coordinated", spec, TIMELINE, tmp_path, lambda s: None, extra_events=[leak])
    m = arm_metrics(spec, TIMELINE, run)
    c = coordination_metrics(spec, TIMELINE, run)
    assert m["overcommit_power_s"] == 0 and m["overcommit_power_j"] == 0, m
    assert m["overcommit_coolant_s"] == 0 and m["overcommit_coolant_j"] == 0, m
    assert m["served"] > 0
    # Every node heard of the flow drop and lowered its share; all 4 claimed, the late one too.
    assert c["reaction_nodes"] == 4 and c["reaction_p99_s"] is not None, c
    assert c["claim_bytes_max"] <= 500 and c["claims_per_node_period"] <= 1.05, c
    # The rack's leak reached every node through its own subscription (no node relays it).
    t_leak = run.t0 + TIMELINE.end - 3
    leak_caps = {node for t, node, total, reason in run.recorder.caps if t >= t_leak and reason == "leak"}
    assert leak_caps == set(run.nodes), leak_caps
    assert not asyncio.get_running_loop().is_closed()

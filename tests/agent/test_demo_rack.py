"""``rackguard demo --rack N``: N real agents on one simulated CDU print every node's share."""

from __future__ import annotations

import re

import pytest

from rackguard.agent.commands import demo_rack


async def test_demo_rack_prints_every_nodes_share_and_power(capsys: pytest.CaptureFixture[str]) -> None:
    assert await demo_rack.run(3, 6.0) == 0
    out = capsys.readouterr().out
    assert "3 simulated nodes" in out
    lines = [ln for ln in out.splitlines() if re.match(r"\s+\d+\s+\d", ln)]
    assert len(lines) >= 4
    last = lines[-1].split()
    shares = [int(cell.split("/")[0]) for cell in last[4:]]
    assert len(shares) == 3 and sum(shares) <= int(last[2])  # the shares never sum above the capacity
    assert int(last[2]) == 4500  # 3 × 1500 W budget, below the CDU's capacity at full flow

"""Must-show: ``rackguard demo``'s pump failure degrades the cap smoothly (no dive to min_cap).

The demo runs the real agent, the simulated node and the simulated CDU over the in-process
broker; the CDU's pump falls to 40 % flow. After the failure the node's total cap must never
go below half of the value it settles at, and must settle within 5 s.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAIL_AT_S = 10.0
RUN_S = 40.0


def test_demo_pump_failure_settles_without_a_dip(tmp_path: Path) -> None:
    scenario = tmp_path / "pump.toml"
    scenario.write_text(f'[[events]]\nat_s = {FAIL_AT_S}\nkind = "pump_failure"\nflow_fraction = 0.4\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
    cmd = [sys.executable, "-m", "rackguard.agent.cli", "demo", "--raw", "--seconds", str(RUN_S)]
    cmd += ["--scenario", str(scenario)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_S + 60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    caps: list[tuple[float, int]] = []
    flows: list[tuple[float, float]] = []
    for line in out.stdout.splitlines():
        if not line.startswith("{"):
            continue
        msg = json.loads(line)
        if "topic" not in msg or not isinstance(msg.get("payload"), dict):
            continue  # a log line, not a message
        body = msg["payload"]
        if msg["topic"].endswith("/cap") and body.get("reason") == "mpc":
            caps.append((body["t_s"], body["total"]))
        elif msg["topic"].endswith("/telemetry") and (body.get("coolant") or {}).get("flow_lpm"):
            flows.append((body["t_s"], body["coolant"]["flow_lpm"]))
    assert flows and caps
    nominal = flows[0][1]
    t_fail = next(t for t, f in flows if f < 0.9 * nominal)
    assert min(f for _, f in flows[-5:]) < 0.5 * nominal  # the pump did fail
    after = [(t - t_fail, c) for t, c in caps if t >= t_fail]
    end = after[-1][0]
    settled = statistics.median(c for dt, c in after if dt >= end - 5.0)
    assert settled < 0.5 * max(c for _, c in caps)  # the failure did cut the cap
    assert min(c for _, c in after) >= 0.5 * settled, after
    # Settled: inside [0.75, 1.33] × the final value from 5 s after the failure on.
    outside = [dt for dt, c in after if not 0.75 * settled <= c <= settled / 0.75]
    assert not outside or max(outside) <= 5.0, (settled, after)

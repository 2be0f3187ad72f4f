"""Must-show: ``rackguard run`` + ``rackguard sim-cdu`` with a pump failure, through mosquitto."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from rackguard.agent.messages import Status

REPO = Path(__file__).resolve().parents[2]
BASE = "rackguard/demo/r1/sim-node-1"


def test_pump_failure_shows_in_telemetry(broker: Any, subscriber: Any, tmp_path: Path) -> None:
    scenario = tmp_path / "pump.toml"
    scenario.write_text('duration_s = 30\n[[events]]\nat_s = 3\nkind = "pump_failure"\nflow_fraction = 0.3\n')
    sub = subscriber(broker, f"{BASE}/telemetry")
    statuses = subscriber(broker, "rackguard/+/+/+/status")  # a consumer of every agent's status
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
    env |= {
        "RACKGUARD_MQTT__PORT": str(broker.port),
        "RACKGUARD_MQTT__HOST": broker.host,
        "RACKGUARD_HTTP__PORT": "0",
    }
    agent_cmd = [sys.executable, "-m", "rackguard.agent.cli", "run", "--config", "examples/sim.toml"]
    cdu_cmd = [sys.executable, "-m", "rackguard.agent.cli", "sim-cdu", "--config", "examples/sim.toml"]
    cdu_cmd += ["--scenario", str(scenario), "--period-s", "0.25"]
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for cmd in (agent_cmd, cdu_cmd)
    ]
    outs: list[str] = []
    try:

        def coolant(m: Any) -> dict[str, Any]:
            return m.json().get("coolant") or {}

        before = sub.wait_for(lambda m: (coolant(m).get("flow_lpm") or 0) > 11.0, 30)[0]
        c = coolant(before)
        assert c["supply_temp_c"] is not None and c["return_temp_c"] > c["supply_temp_c"]
        assert c["heat_removed_w"] > 0 and c["flow_margin"] > 1.0 and c["gpu_power_w"] > 0
        after = sub.wait_for(lambda m: (coolant(m).get("flow_lpm") or 99) < 5.0, 30)[0]
        a = coolant(after)
        assert a["flow_margin"] < c["flow_margin"] and a["stale"] is False
        assert all(s["state"] == "ok" for s in a["sensors"]), a["sensors"]
        # sim-cdu keeps to its own topics: every status here is an agent's, valid against its schema.
        seen = statuses.wait_for(lambda m: True, 5)
        assert {m.topic for m in seen} == {f"{BASE}/status"}
        assert all(Status.model_validate_json(m.payload).state == "online" for m in seen)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        outs += [p.communicate(timeout=10)[0].decode() for p in procs]
        print(*outs, sep="\n")
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("Traceback" not in o for o in outs), outs

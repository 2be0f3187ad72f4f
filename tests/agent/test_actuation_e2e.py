"""Must-show, end to end through a real mosquitto: the agent, the example worker under load, its gate.

1. In-process agent (simulated GPU) + ``rackguard sim-cdu`` + ``examples/worker.py`` subprocesses:
   in flight never exceeds the cap except while draining; the GPU's load follows the worker's
   reports; energy per token is published; a scripted pump failure lowers the cap before the GPU
   exceeds its limit; a leak detector's Warning drives the cap to ``leak_cap``.
2. ``rackguard run`` subprocess + worker: SIGKILL the agent and the worker falls back to
   ``safe_cap`` within 1.5 × keepalive.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rackguard.agent import config as configmod
from rackguard.agent.daemon import Agent
from rackguard.agent.mqtt import aiomqtt_factory
from rackguard.agent.snapshot import observation
from rackguard.sim.node import from_config, run_beside

REPO = Path(__file__).resolve().parents[2]
GPU_TEMP_MAX_C = 62.0


class Worker:
    """``examples/worker.py`` as a subprocess; its JSON status lines are collected."""

    def __init__(self, broker: Any, node: str, *extra: str) -> None:
        cmd = [sys.executable, str(REPO / "examples" / "worker.py"), "--port", str(broker.port)]
        cmd += ["--site", "demo", "--rack", "r1", "--node", node, "--gpu", "0", "--safe-cap", "3"]
        cmd += ["--clients", "40", "--request-s", "0.15", "--tokens", "32", "--print-s", "0.1"]
        cmd += ["--report-s", "0.5", "--gate-id", "w0", *extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[dict[str, Any]] = []
        self.other: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                self.other.append(raw.decode(errors="replace"))

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._t.join(5)
        return "".join(self.other)


def assert_never_over_admitted(lines: list[dict[str, Any]]) -> None:
    """In flight <= limit, except while draining after a drop: then it only comes from admissions
    under the previous limit (lines are 0.1 s apart), and the gate never admitted over its limit."""
    for prev, cur in itertools.pairwise(lines):
        if cur["in_flight"] > cur["limit"]:
            assert cur["in_flight"] <= max(prev["in_flight"], prev["limit"]), (prev, cur)
    assert all(x["max_admitted_over_limit"] == 0 for x in lines)


async def wait(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


NODE_TOML = """
[node]
site = "demo"
rack = "r1"
name = "e2e"
[mqtt]
host = "127.0.0.1"
port = {port}
keepalive_s = 2
[sensors]
backend = "sim"
poll_period_s = 0.05
slow_period_s = 0.25
[telemetry]
publish_period_s = 0.5
[control]
period_s = 0.25
max_cap = 24
safe_cap = 3
leak_cap = 2
gpu_temp_max_c = {temp_max}
slowdown_c = {slowdown}
cap_ttl_s = 4
cap_refresh_s = 1
[http]
port = 0
[sim]
gpus = 1
offered_concurrency = 0
[coolant]
[[coolant.sensors]]
id = "cdu"
kind = "cdu"
topic = "bms/demo/r1/cdu"
format = "redfish"
max_age_s = 3.0
[[coolant.sensors]]
id = "leak-tray"
kind = "leak"
topic = "bms/demo/r1/e2e/leak"
format = "redfish"
max_age_s = 10.0
"""

# The CDU's pump fails at 6 s (flow spins down to 2.5 % with τ 2 s: 0.3 L/min carries ~210 W at the
# design ΔT, less than the loaded GPU draws), and the leak detector under the node reads Warning at 16 s.
SCENARIO = """
duration_s = 60
[[events]]
at_s = 6
kind = "pump_failure"
flow_fraction = 0.025
[[events]]
at_s = 16
kind = "leak"
sensor = "leak-tray"
state = "Warning"
"""


async def test_worker_obeys_cap_pump_failure_and_leak(broker: Any, subscriber: Any, tmp_path: Path) -> None:
    base = "rackguard/demo/r1/e2e"
    conf = tmp_path / "node.toml"
    conf.write_text(NODE_TOML.format(port=broker.port, temp_max=GPU_TEMP_MAX_C, slowdown=GPU_TEMP_MAX_C + 2))
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO)
    cfg = configmod.load(conf, environ={})
    backend, servers = from_config(cfg)
    agent = Agent(cfg, backend)
    caps = subscriber(broker, f"{base}/cap")
    tel = subscriber(broker, f"{base}/telemetry")
    factory = aiomqtt_factory(cfg.mqtt, "e2e-sim-servers")
    task = asyncio.create_task(run_beside(agent.run(), servers, factory))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
    cdu_cmd = [sys.executable, "-m", "rackguard.agent.cli", "sim-cdu", "--config", str(conf)]
    cdu = subprocess.Popen(
        [*cdu_cmd, "--scenario", str(scenario), "--period-s", "0.25"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    worker = Worker(broker, "e2e")
    out = cdu_out = ""
    try:
        # Under load: the gate follows the MQTT cap, the simulated GPU follows the gate's reports.
        await wait(
            lambda: any(x["source"] == "mqtt" and x["in_flight"] > 10 for x in worker.lines), 8, "load"
        )
        await wait(lambda: agent.gates.in_flight(1)[0] is not None, 5, "gate report")
        t_load = time.monotonic()
        assert 0 < observation(agent.take_snapshot()).gpus[0].concurrency <= 24
        assert agent.control is not None and agent.control.decision is not None
        # The simulated GPU serves the worker's requests (its own servers stand aside for a real gate).
        await wait(lambda: servers.counters[0].external_in_flight is not None, 5, "sim follows the worker")
        assert backend.served(0) > 0
        # Its own server obeys the cap in force (the gate's state machine on the retained cap).
        await wait(
            lambda: agent.cap_msg is not None and backend.caps[0] == agent.cap_msg.caps[0],
            5,
            "sim obeys the cap",
        )
        before = max(m.json()["total"] for m in caps.messages)

        # Pump failure: once telemetry shows the flow falling, the cap drops; the GPU never passes its limit.
        def flow_lpm(m: Any) -> float:
            return float((m.json()["coolant"] or {}).get("flow_lpm") or 99.0)

        t_low = (await asyncio.to_thread(tel.wait_for, lambda m: flow_lpm(m) < 3.0, 15.0))[0].t_mono
        assert t_low > t_load
        dropped = await asyncio.to_thread(
            caps.wait_for, lambda m: m.t_mono > t_low and m.json()["total"] < before / 2, 15.0
        )
        assert dropped[0].json()["binding"] in ("coolant_flow", "gpu_temp", "safety"), dropped[0].json()

        # The leak detector reads Warning: the cap goes to leak_cap at once; the gate follows and drains.
        leak = await asyncio.to_thread(caps.wait_for, lambda m: m.json()["reason"] == "leak", 15.0)
        assert leak[0].json()["caps"] == [2]
        await wait(lambda: worker.lines[-1]["limit"] == 2 and worker.lines[-1]["in_flight"] <= 2, 10, "drain")

        temps = [g["gpu_temp_c"]["max"] for m in tel.messages for g in m.json()["gpus"] if g["gpu_temp_c"]]
        assert temps and max(temps) <= GPU_TEMP_MAX_C, max(temps)
        flows = [(m.json()["coolant"] or {}).get("flow_lpm") for m in tel.messages]
        assert min(f for f in flows if f is not None) < 3.0  # the pump failure was seen (nominal 12)
        energy = [m.json()["energy"] for m in tel.messages]
        e = next(e for e in reversed(energy) if e["tokens"] > 0 and e["energy_per_token_j"])
        assert abs(e["facility_energy_per_token_j"] - 1.2 * e["energy_per_token_j"]) < 1e-3
        assert_never_over_admitted(worker.lines)
        assert max(x["limit"] for x in worker.lines) <= 24
    finally:
        out = worker.stop()
        if cdu.poll() is None:
            cdu.send_signal(signal.SIGTERM)
        cdu_out = cdu.communicate(timeout=10)[0].decode()
        agent.request_stop("test")
        assert await asyncio.wait_for(task, 10) == 0
    assert "Traceback" not in out + cdu_out, out + cdu_out


def test_sigkill_agent_worker_falls_back_to_safe_cap(broker: Any, tmp_path: Path) -> None:
    keepalive_s = 2
    conf = tmp_path / "node.toml"
    conf.write_text(
        f"""
[node]
site = "demo"
rack = "r1"
name = "kill"
[mqtt]
host = "{broker.host}"
port = {broker.port}
keepalive_s = {keepalive_s}
[sensors]
backend = "sim"
poll_period_s = 0.1
[sim]
gpus = 1
[control]
period_s = 0.25
max_cap = 16
safe_cap = 3
[http]
port = 0
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
    agent = subprocess.Popen(
        [sys.executable, "-m", "rackguard.agent.cli", "run", "--config", str(conf)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    worker = Worker(broker, "kill")
    out = ""
    try:
        deadline = time.monotonic() + 30
        while not any(x["source"] == "mqtt" and x["limit"] > 3 and x["in_flight"] > 3 for x in worker.lines):
            assert time.monotonic() < deadline and agent.poll() is None, worker.lines[-3:]
            time.sleep(0.05)
        t_kill = time.time()
        agent.send_signal(signal.SIGKILL)
        agent.wait(5)
        deadline = time.monotonic() + 10
        while not any(x["source"] == "safe" and x["t_s"] > t_kill for x in worker.lines):
            assert time.monotonic() < deadline, worker.lines[-3:]
            time.sleep(0.05)
        first_safe = next(x for x in worker.lines if x["source"] == "safe" and x["t_s"] > t_kill)
        assert first_safe["limit"] == 3
        # Status lines come every 0.1 s: the fallback happened within 1.5 × keepalive of the kill.
        assert first_safe["t_s"] - t_kill <= 1.5 * keepalive_s + 0.1, first_safe["t_s"] - t_kill
        time.sleep(1.0)  # in-flight requests finish; no new ones beyond safe_cap
        assert worker.lines[-1]["in_flight"] <= 3 and worker.lines[-1]["limit"] == 3
        assert_never_over_admitted(worker.lines)
    finally:
        out = worker.stop()
        if agent.poll() is None:
            agent.kill()
        agent.communicate(timeout=5)
    assert "Traceback" not in out, out

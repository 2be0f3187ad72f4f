"""Leak → cap latency in the middle of a storm of malformed sensor payloads.

Three processes and a real mosquitto on loopback: the agent (8 simulated GPUs and no
simulated servers in its process, as on a real node; a leak detector, a flow sensor and a supply probe declared under
``bms/storm/r1/#``); a storm process that publishes ``--storm`` malformed payloads
(QoS 0, as fast as it can) on the flow and supply topics and on undeclared topics
under the same filter; and this process, which sends ``{"DetectorState": "Critical"}``
on the leak topic halfway through each storm and times it until a ``cap`` with
``reason = "leak"`` arrives (then sends ``OK`` and, after the storm, waits for the cap to leave ``leak``).

    python3 -m rackguard.bench.leak_storm [--rounds 40] [--storm 30000] [--agent-tree DIR]

``--agent-tree`` runs the agent from another checkout (a reference measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from rackguard.agent.mosquitto import Mosquitto, free_port

BASE = "bms/storm/r1"
LEAK = f"{BASE}/leak"
CAP = "rackguard/storm/r1/n1/cap"

CONFIG = """
[node]
site = "storm"
rack = "r1"
name = "n1"
[mqtt]
host = "127.0.0.1"
port = {port}
[sensors]
backend = "sim"
[sim]
gpus = 8
[http]
port = 0
[log]
level = "error"
[coolant]
subscribe = ["{base}/#"]
leak_clear = "auto"
[[coolant.sensors]]
id = "leak"
kind = "leak"
topic = "{base}/leak"
max_age_s = 600
[[coolant.sensors]]
id = "flow"
kind = "flow"
topic = "{base}/flow"
format = "plain"
max_age_s = 600
[[coolant.sensors]]
id = "supply"
kind = "coolant_supply_temp"
topic = "{base}/supply"
format = "plain"
max_age_s = 600
"""

# The agent alone, as on a real node: no simulated inference servers in its process.
AGENT = r"""
import asyncio, sys, time, tomllib
from rackguard.agent import config, log
from rackguard.agent.daemon import Agent
log.configure("error", "json")
cfg = config.validate(tomllib.loads(open(sys.argv[1]).read()))
agent = Agent(cfg)
# The safety hook's time (CLOCK_MONOTONIC, the same clock as the bench's perf_counter on Linux).
agent.on_leak = lambda event: print(f"hook {time.perf_counter()} {event.state}", flush=True)
sys.exit(asyncio.run(agent.run()))
"""

STORM = r"""
import random, sys, time
import paho.mqtt.client as mqtt
port, n, base = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id="storm")
c.connect("127.0.0.1", port)
c.loop_start()
rng = random.Random(1)
junk = [b"", b"{", b"nan", b"1e999", b'{"value": "x"}', b"\xff\xfe", b"[" * 500, b"-1" * 300, b"garbage!"]
topics = [base + "/flow", base + "/supply"] + [f"{base}/undeclared/{i}" for i in range(64)]
for line in sys.stdin:  # one storm per line read
    t0 = time.perf_counter()
    for i in range(n):
        c.publish(rng.choice(topics), rng.choice(junk), qos=0)
        if i == n // 2:
            print(f"mark {i}", flush=True)
        while len(c._out_packet) > 2000:  # let the network thread drain
            time.sleep(0.0005)
    while c._out_packet:
        time.sleep(0.001)
    dt = time.perf_counter() - t0
    print(f"done {n / dt:.0f}", flush=True)
"""


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def run(port: int, rounds: int, storm: int, tree: Path | None, workdir: Path) -> dict[str, object]:
    conf = workdir / "storm.toml"
    conf.write_text(CONFIG.format(port=port, base=BASE))
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(conf)],
        env=env,
        cwd=tree or None,
        stdout=subprocess.PIPE,
        text=True,
    )
    hooks: queue.Queue[float] = queue.Queue()

    def read_hooks() -> None:
        assert agent.stdout is not None
        for line in agent.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "hook" and parts[2] == "critical":
                hooks.put(float(parts[1]))

    threading.Thread(target=read_hooks, daemon=True).start()
    stormer = subprocess.Popen(
        [sys.executable, "-c", STORM, str(port), str(storm), BASE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    caps: queue.Queue[tuple[float, str]] = queue.Queue()

    echoes: queue.Queue[float] = queue.Queue()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == LEAK:
            if b"Critical" in msg.payload:
                echoes.put(time.perf_counter())
            return
        try:
            caps.put((time.perf_counter(), json.loads(msg.payload)["reason"]))
        except (ValueError, KeyError):
            pass

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id="storm-bench")
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.subscribe(CAP, qos=1)
    c.subscribe(LEAK, qos=1)  # the broker's echo of the bench's own leak: the broker's share of the time

    def wait_reason(pred: object, timeout_s: float) -> float | None:
        deadline = time.perf_counter() + timeout_s
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            try:
                t, reason = caps.get(timeout=left)
            except queue.Empty:
                return None
            if pred(reason):  # type: ignore[operator]
                return t

    lat_ms: list[float] = []
    hook_ms: list[float] = []  # leak sent -> the agent's safety hook ran
    hook_to_cap_ms: list[float] = []  # the hook -> the cap with reason leak reached the bench
    echo_ms: list[float] = []  # leak sent -> the broker delivered it back to the bench
    missed = 0
    rates: list[float] = []
    try:
        if wait_reason(lambda r: r != "leak", 60) is None:
            raise RuntimeError("the agent published no cap")
        assert stormer.stdin is not None and stormer.stdout is not None
        for _ in range(rounds):
            stormer.stdin.write("go\n")
            stormer.stdin.flush()
            while True:
                line = stormer.stdout.readline().split()
                if not line:
                    raise RuntimeError("storm process died")
                if line[0] == "done":
                    rates.append(float(line[1]))
                    break
                # A mark: a leak now, in the middle of the storm.
                for q in (caps, hooks, echoes):
                    while not q.empty():
                        q.get_nowait()
                t0 = time.perf_counter()
                c.publish(LEAK, json.dumps({"DetectorState": "Critical"}), qos=1)
                t = wait_reason(lambda r: r == "leak", 10)
                if t is None:
                    missed += 1
                else:
                    lat_ms.append((t - t0) * 1000)
                    try:
                        echo_ms.append((echoes.get(timeout=1.0) - t0) * 1000)
                    except queue.Empty:
                        pass
                    try:
                        th = hooks.get(timeout=1.0)
                        hook_ms.append((th - t0) * 1000)
                        hook_to_cap_ms.append((t - th) * 1000)
                    except queue.Empty:
                        pass  # an agent tree without the hook (the reference)
                c.publish(LEAK, json.dumps({"DetectorState": "OK"}), qos=1)
            if wait_reason(lambda r: r != "leak", 15) is None:
                raise RuntimeError("the cap did not leave leak after OK")
            time.sleep(random.uniform(0.0, 0.2))
    finally:
        c.loop_stop()
        c.disconnect()
        stormer.kill()
        agent.terminate()
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    return {
        "agent_tree": str(tree) if tree else "this checkout",
        "events": len(lat_ms),
        "missed": missed,
        "storm_payloads": storm,
        "storm_rate_msgs_s_median": round(statistics.median(rates)) if rates else None,
        "leak_to_cap_ms": {
            "p50": round(pct(lat_ms, 50), 2),
            "p90": round(pct(lat_ms, 90), 2),
            "p99": round(pct(lat_ms, 99), 2),
            "max": round(max(lat_ms), 2),
        }
        if lat_ms
        else None,
        "leak_to_hook_ms": {"p50": round(pct(hook_ms, 50), 2), "p99": round(pct(hook_ms, 99), 2)}
        if hook_ms
        else None,
        "hook_to_cap_ms": {"p50": round(pct(hook_to_cap_ms, 50), 2), "p99": round(pct(hook_to_cap_ms, 99), 2)}
        if hook_to_cap_ms
        else None,
        "leak_to_hook_ms_each": [round(x, 1) for x in hook_ms],
        "broker_echo_ms_each": [round(x, 1) for x in echo_ms],
        "agent_exit": agent.returncode,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--storm", type=int, default=30_000)
    ap.add_argument(
        "--agent-tree", type=Path, action="append", default=[], help="(repeatable) another checkout"
    )
    args = ap.parse_args()
    print(f"host: {platform.node()} {platform.machine()} python {platform.python_version()}", file=sys.stderr)
    out = []
    for tree in [None, *args.agent_tree]:
        with tempfile.TemporaryDirectory() as d:
            port = free_port()
            broker = Mosquitto(port, Path(d))
            broker.start()
            try:
                out.append(run(port, args.rounds, args.storm, tree, Path(d)))
            finally:
                broker.stop()
        print(json.dumps(out[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

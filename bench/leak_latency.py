"""Leak → safety hook latency through mosquitto on loopback.

A full Agent (simulated 8-GPU node, tick loop, control loop, telemetry) runs in
this process. A separate paho client thread plays the BMS gateway: it publishes
``{"DetectorState": "Critical"}`` (QoS 1) and we time from just before the
publish call until the Agent's ``on_leak`` hook runs; then it publishes ``OK``
(``leak_clear = "auto"``) and waits for the clear, and repeats.

    python3 -m rackguard.bench.leak_latency [--events 1000] [--port PORT]

Without ``--port`` it starts its own mosquitto on a free loopback port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from rackguard.agent import config as configmod
from rackguard.agent import log as logmod
from rackguard.agent.coolant_monitor import LeakEvent
from rackguard.agent.daemon import Agent
from rackguard.agent.mosquitto import Mosquitto, free_port

TOPIC = "bms/bench/r1/leak"


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def drive(port: int, n: int, hooked: threading.Event, fired: list[float], out: list[float]) -> None:
    """The BMS gateway: Critical, wait for the hook; OK, wait for the clear; n times."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id="bench-bms")
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for i in range(n + 20):  # the first 20 are warm-up
            for state in ("Critical", "OK"):
                hooked.clear()
                t0 = time.perf_counter()
                c.publish(TOPIC, json.dumps({"DetectorState": state}), qos=1)
                if not hooked.wait(5):
                    raise RuntimeError(f"hook did not fire for {state} #{i}")
                if state == "Critical" and i >= 20:
                    out.append(fired[-1] - t0)
            time.sleep(0.002)
    finally:
        c.loop_stop()
        c.disconnect()


async def bench(port: int, n: int) -> list[float]:
    cfg = configmod.validate(
        {
            "node": {"site": "bench", "rack": "r1", "name": "n1"},
            "mqtt": {"host": "127.0.0.1", "port": port},
            "sensors": {"backend": "sim", "poll_period_s": 0.1},
            "sim": {"gpus": 8},
            "telemetry": {"publish_period_s": 1.0},
            "http": {"port": 0},
            "log": {"level": "error"},
            "coolant": {
                "leak_clear": "auto",
                "sensors": [{"id": "leak", "kind": "leak", "topic": TOPIC, "max_age_s": 60}],
            },
        }
    )
    hooked = threading.Event()
    fired: list[float] = []

    def on_leak(ev: LeakEvent) -> None:
        fired.append(time.perf_counter())
        hooked.set()

    agent = Agent(cfg, on_leak=on_leak)
    task = asyncio.create_task(agent.run())
    while not agent.link.connected:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    out: list[float] = []
    try:
        await asyncio.to_thread(drive, port, n, hooked, fired, out)
    finally:
        agent.request_stop("bench done")
        await task
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--port", type=int, default=None, help="use a running broker on 127.0.0.1:PORT")
    ap.add_argument(
        "--nagle", action="store_true", help="own broker without set_tcp_nodelay (mosquitto's default)"
    )
    args = ap.parse_args()
    logmod.configure("error", "json")
    with tempfile.TemporaryDirectory() as d:
        port = args.port or free_port()
        broker = None if args.port else Mosquitto(port, Path(d), nodelay=not args.nagle)
        if broker is not None:
            broker.start()
        try:
            lat = asyncio.run(bench(port, args.events))
        finally:
            if broker is not None:
                broker.stop()
    ms = [x * 1000 for x in lat]
    broker_desc = (
        f"127.0.0.1:{args.port}" if args.port else f"own mosquitto, set_tcp_nodelay {not args.nagle}"
    )
    print(f"leak -> safety hook, {len(ms)} events, {broker_desc}, agent with 8 simulated GPUs")
    print(f"host: {platform.node()} {platform.machine()} python {platform.python_version()}")
    print(
        f"p50 {pct(ms, 50):.3f} ms  p90 {pct(ms, 90):.3f} ms  p99 {pct(ms, 99):.3f} ms  "
        f"max {max(ms):.3f} ms  mean {statistics.fmean(ms):.3f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Outbox figures for BENCHMARKS.md ("## Outbox"): put cost per fsync policy, and replay throughput
through a local mosquitto with the rate limiter out of the way.

    python3 -m rackguard.bench.outbox_replay
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from rackguard.agent import config as configmod
from rackguard.agent.mosquitto import Mosquitto, free_port
from rackguard.agent.mqtt import MqttLink, Topics, aiomqtt_factory
from rackguard.agent.outbox import OutMsg, SqliteOutbox

PAYLOAD = json.dumps({"seq": 0, "historical": False, "pad": "x" * 1500}).encode()  # ~ one 8-GPU window


def put_cost(d: Path, sync: str, n: int = 2000) -> float:
    box = SqliteOutbox(d / f"put-{sync}.sqlite", 10**6, synchronous=sync)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    for i in range(n):
        box.put(OutMsg("t", PAYLOAD, seq=i + 1))
    dt = (time.perf_counter() - t0) / n
    box.close()
    return dt


async def replay(d: Path, broker: Mosquitto, n: int, rate: float) -> float:
    topics = Topics("rackguard/s/r/n")
    box = SqliteOutbox(d / f"replay-{rate}.sqlite", 10**6)
    for i in range(n):
        box.put(OutMsg(topics.telemetry, PAYLOAD, seq=i + 1))
    cfg = configmod.MqttConfig(host=broker.host, port=broker.port)
    link = MqttLink(
        cfg,
        topics,
        client_factory=aiomqtt_factory(cfg, "bench"),
        offline_payload=lambda r: b"{}",
        outbox=box,
        replay_rate_msgs_s=rate,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    while not link.connected:
        await asyncio.sleep(0.001)
    t0 = time.perf_counter()
    while len(box):
        await asyncio.sleep(0.005)
    dt = time.perf_counter() - t0
    stop.set()
    await task
    box.close()
    return n / dt


def main() -> None:
    d = Path(tempfile.mkdtemp())
    try:
        for sync in ("full", "normal"):
            print(f"put ({sync}): {put_cost(d, sync) * 1e3:.3f} ms/message")
        b = Mosquitto(free_port(), d / "mosquitto")
        b.start()
        try:
            for rate in (50.0, 1e6):
                n = 500 if rate < 1000 else 20000
                got = asyncio.run(replay(d, b, n, rate))
                print(f"replay {n} msgs, limit {rate:g}/s: {got:.0f} msgs/s")
        finally:
            b.stop()
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()

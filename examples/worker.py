"""A fake inference server: N concurrent clients, every request through a rackguard gate.

Each client sends requests back to back; a request takes ``--request-s`` (±20 %)
and produces ``--tokens`` tokens, reported through the gate. Every
``--print-s`` it prints one JSON line: in flight vs the gate's limit and where
the limit came from (mqtt, http or safe)::

    python3 examples/worker.py --port 1883 --site demo --rack r1 --node sim-node-1 --gpu 0 \\
        --safe-cap 4 --clients 64 --http-url http://127.0.0.1:9108/v1/cap
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from rackguard.agent.gate import Gate, node_topic


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="MQTT broker host")
    p.add_argument("--port", type=int, default=1883, help="MQTT broker port")
    p.add_argument("--prefix", default="rackguard")
    p.add_argument("--site", default="demo")
    p.add_argument("--rack", default="r1")
    p.add_argument("--node", default="sim-node-1")
    p.add_argument("--gpu", type=int, default=None, help="GPU index (default: obey the node total)")
    p.add_argument("--safe-cap", type=int, default=4, help="limit without a valid cap")
    p.add_argument("--http-url", default=None, help="the agent's /v1/cap, used while MQTT is unreachable")
    p.add_argument("--gate-id", default=None)
    p.add_argument("--clients", type=int, default=32, help="concurrent clients")
    p.add_argument("--request-s", type=float, default=0.2, help="mean time per request")
    p.add_argument("--tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: forever)")
    p.add_argument("--print-s", type=float, default=0.5, help="status line period")
    p.add_argument("--report-s", type=float, default=1.0, help="gate report period")
    return p.parse_args(argv)


async def client(gate: Gate, args: argparse.Namespace, rng: random.Random) -> None:
    while True:
        async with gate:
            await asyncio.sleep(args.request_s * rng.uniform(0.8, 1.2))
            gate.report_tokens(args.tokens)


async def main(args: argparse.Namespace) -> int:
    gate = Gate(
        node_topic=node_topic(args.site, args.rack, args.node, args.prefix),
        safe_cap=args.safe_cap,
        gpu=args.gpu,
        host=args.host,
        port=args.port,
        http_url=args.http_url,
        gate_id=args.gate_id,
        report_period_s=args.report_s,
    )
    await gate.start()
    rng = random.Random(0)
    clients = [asyncio.create_task(client(gate, args, rng)) for _ in range(args.clients)]
    t0 = time.monotonic()
    try:
        while not args.seconds or time.monotonic() - t0 < args.seconds:
            line = {
                "t_s": round(time.time(), 3),
                "gate_id": gate.gate_id,
                "in_flight": gate.in_flight,
                "limit": gate.limit,
                "source": gate.source,
                "completed_total": gate.completed_total,
                "tokens_total": gate.tokens_total,
                "max_admitted_over_limit": gate.max_admitted_over_limit,
            }
            print(json.dumps(line), flush=True)
            await asyncio.sleep(args.print_s)
    finally:
        for c in clients:
            c.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await gate.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse())))
    except KeyboardInterrupt:
        sys.exit(0)

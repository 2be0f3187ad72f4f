"""``rackguard bench fleet``: the broker's load per node.

``bench fleet`` runs ``--nodes`` Agent instances (each its own MQTT client, topics and
simulated GPUs, on the same code path as ``rackguard run``) in ``--procs`` worker
processes against one mosquitto, and measures the broker's load per node.

Each worker process is ``python -m rackguard.bench.fleet HOST PORT FIRST COUNT GPUS POLL_S``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rackguard.bench.common import (
    LeakDetectorsOk,
    Recorder,
    broker_at,
    extrapolate,
    percentile_ms,
    traffic,
)


@dataclass
class FleetOptions:
    nodes: int = 200
    procs: int = 4
    seconds: float = 30.0
    warmup_s: float = 10.0
    gpus: int = 8
    poll_period_s: float = 1.0
    broker: tuple[str, int] | None = None
    progress: Callable[[str], None] = field(default=lambda s: None)


def fleet_rack(i: int) -> str:
    """The rack of fleet node ``i`` (16 nodes a rack)."""
    return f"r{i // 16:03d}"


def fleet_node_config(host: str, port: int, i: int, *, gpus: int, poll_period_s: float) -> dict[str, Any]:
    """Node ``i`` of the fleet: its own name, rack and simulator seed, its rack's leak detector; no HTTP."""
    leak = {
        "id": "rack-leak",
        "kind": "leak",
        "format": "plain",
        "topic": f"bench/fleet/{fleet_rack(i)}/leak",
    }
    return {
        "node": {"site": "fleet", "rack": fleet_rack(i), "name": f"n{i:05d}"},
        "coolant": {"leak_clear": "auto", "sensors": [leak]},
        "mqtt": {"host": host, "port": port, "keepalive_s": 30},
        "sensors": {
            "backend": "sim",
            "poll_period_s": poll_period_s,
            "slow_period_s": max(1.0, poll_period_s),
        },
        "sim": {"gpus": gpus, "seed": i},
        "telemetry": {"publish_period_s": 1.0},
        "http": {"port": 0},
        "log": {"level": "warning", "format": "json"},
    }


async def fleet_worker(host: str, port: int, first: int, count: int, gpus: int, poll_period_s: float) -> int:
    """Run ``count`` agents in this process until SIGTERM."""
    from rackguard.agent import config as configmod
    from rackguard.agent import log as logmod
    from rackguard.agent.daemon import Agent

    logmod.configure("warning", "json")
    agents = [
        Agent(configmod.validate(fleet_node_config(host, port, i, gpus=gpus, poll_period_s=poll_period_s)))
        for i in range(first, first + count)
    ]
    tasks = [asyncio.create_task(a.run()) for a in agents]
    await asyncio.sleep(0.5)  # each Agent.run installs its own handler; ours replaces them

    def stop_all() -> None:
        for a in agents:
            a.request_stop("bench fleet finished")

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)
    print("ready", flush=True)
    codes = await asyncio.gather(*tasks)
    return max(codes, default=0)


def run_fleet_bench(opts: FleetOptions) -> dict[str, Any]:
    """``nodes`` agents in ``procs`` processes against one broker; the broker's load per node."""
    import psutil

    with (
        tempfile.TemporaryDirectory(prefix="rackguard-fleet-") as d,
        broker_at(Path(d), opts.broker) as (host, port, broker),
    ):
        rec = Recorder(host, port, ["rackguard/#", "$SYS/broker/#"])
        racks = sorted({fleet_rack(i) for i in range(opts.nodes)})
        detectors = LeakDetectorsOk(host, port, [f"bench/fleet/{r}/leak" for r in racks])
        env = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
        procs: list[subprocess.Popen[bytes]] = []
        per = -(-opts.nodes // opts.procs)
        try:
            for first in range(0, opts.nodes, per):
                count = min(per, opts.nodes - first)
                cmd = [
                    sys.executable,
                    "-m",
                    "rackguard.bench.fleet",
                    host,
                    str(port),
                    str(first),
                    str(count),
                    str(opts.gpus),
                    str(opts.poll_period_s),
                ]
                log = (Path(d) / f"worker-{first}.log").open("ab")
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
            opts.progress(
                f"fleet: {opts.nodes} nodes in {len(procs)} processes; waiting for every birth message"
            )
            online = rec.wait(lambda: len(rec.status_online) >= opts.nodes, 60 + opts.nodes * 0.5)
            if not online:
                raise RuntimeError(f"only {len(rec.status_online)}/{opts.nodes} nodes came online")
            time.sleep(opts.warmup_s)
            ps = [psutil.Process(p.pid) for p in procs]

            def cpu() -> float:
                return sum(float(t.user + t.system) for t in (p.cpu_times() for p in ps))

            sys0 = dict(rec.sys)
            caps0 = len(rec.caps)
            c0, w0, wall0 = cpu(), time.monotonic(), time.time()
            time.sleep(opts.seconds)
            c1, w1, wall1 = cpu(), time.monotonic(), time.time()
            sys1 = dict(rec.sys)
            bproc = psutil.Process(broker.proc.pid) if broker and broker.proc else None
            rss = sum(p.memory_info().rss for p in ps) / 2**20
            broker_rss = bproc.memory_info().rss / 2**20 if bproc else None
            wall = w1 - w0
            # Count by sample time: wait for what was sampled in the window to arrive.
            settled = rec.settle(wall1, opts.nodes, 30.0)
            recs, lags = rec.window(wall0, wall1)
            tr = traffic(recs, wall1 - wall0, opts.nodes)
            out: dict[str, Any] = {
                "nodes": opts.nodes,
                "procs": len(procs),
                "gpus": opts.gpus,
                "poll_period_s": opts.poll_period_s,
                "publish_period_s": 1.0,
                "seconds": round(wall, 2),
                "msgs_per_node_s": tr["msgs_per_node_s"],
                "bytes_per_node_s": tr["bytes_per_node_s"],
                "traffic_by_kind": tr["by_kind"],
                "settled": settled,
                "cap_reasons": dict(Counter(r for _, r in rec.caps[caps0:])),
                "delivery_lag_p50_ms": percentile_ms(lags, 50),
                "delivery_lag_p99_ms": percentile_ms(lags, 99),
                "extrapolated": extrapolate(tr["msgs_per_node_s"], tr["bytes_per_node_s"]),
                "workers_cpu_pct_one_core": round(100 * (c1 - c0) / wall, 1),
                "cpu_pct_one_core_per_node": round(100 * (c1 - c0) / wall / opts.nodes, 3),
                "workers_rss_mb": round(rss, 1),
                "broker_rss_mb": round(broker_rss, 1) if broker_rss else None,
                "broker_sys": _sys_rates(sys0, sys1, opts.nodes),
            }
            if broker is None:
                out["broker_sys"] = None  # another broker's $SYS need not be mosquitto's
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            codes = []
            for p in procs:
                try:
                    codes.append(p.wait(30))
                except subprocess.TimeoutExpired:
                    p.kill()
                    codes.append(p.wait())
            detectors.close()
            rec.close()
        out["worker_exit_codes"] = codes
        return out


def _sys_rates(
    a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]], nodes: int
) -> dict[str, float]:
    """Per-node rates of mosquitto's ``$SYS`` counters between two snapshots (all MQTT bytes)."""
    out = {}
    for key, name in (
        ("$SYS/broker/publish/messages/received", "publish_msgs_received_per_node_s"),
        ("$SYS/broker/bytes/received", "bytes_received_per_node_s"),
        ("$SYS/broker/publish/messages/sent", "publish_msgs_sent_per_node_s"),
        ("$SYS/broker/bytes/sent", "bytes_sent_per_node_s"),
    ):
        if key in a and key in b and b[key][0] > a[key][0]:
            out[name] = round((b[key][1] - a[key][1]) / (b[key][0] - a[key][0]) / nodes, 2)
    return out


def main(argv: list[str]) -> int:
    """``python -m rackguard.bench.fleet HOST PORT FIRST COUNT GPUS POLL_S`` (bench fleet's workers)."""
    if len(argv) != 6:
        print(main.__doc__, file=sys.stderr)
        return 2
    host, port, first, count, gpus, poll = argv
    return asyncio.run(fleet_worker(host, int(port), int(first), int(count), int(gpus), float(poll)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

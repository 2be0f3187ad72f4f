"""The agent's ``/metrics`` as Prometheus sees it: size, series, scrape latency, ``promtool check metrics``.

Usage: ``python3 -m rackguard.bench.metrics_scrape [--scrapes 40] TREE [TREE ...]``

For each TREE (a rackguard checkout: its ``rackguard`` package is what runs), starts a
mosquitto on a free port, ``rackguard run --config examples/sim.toml`` (8 simulated GPUs)
from TREE and this checkout's ``sim-cdu`` beside it, waits ``--warmup-s``, scrapes
``/metrics`` ``--scrapes`` times, and prints one JSON line: bytes, metric families,
series, median scrape latency and what ``promtool check metrics`` says. Give the same
trees several times (``A B A B``) to see the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from rackguard.agent.mosquitto import Mosquitto, free_port

HERE = Path(__file__).resolve().parents[1]  # this checkout
CONFIG = HERE / "examples/sim.toml"


def measure(tree: Path, tmp: Path, *, warmup_s: float, scrapes: int) -> dict[str, Any]:
    port, http = free_port(), free_port()
    broker = Mosquitto(port, tmp / f"mosquitto-{port}")
    broker.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
    env |= {
        "RACKGUARD_MQTT__PORT": str(port),
        "RACKGUARD_MQTT__HOST": "127.0.0.1",
        "RACKGUARD_LOG__LEVEL": "warning",
    }
    cli = [sys.executable, "-m", "rackguard.agent.cli"]
    procs = [
        subprocess.Popen(
            [*cli, "run", "--config", str(CONFIG)],
            cwd=tree,
            env=env | {"PYTHONPATH": str(tree), "RACKGUARD_HTTP__PORT": str(http)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [*cli, "sim-cdu", "--config", str(CONFIG)],
            cwd=HERE,
            env=env | {"PYTHONPATH": str(HERE), "RACKGUARD_HTTP__PORT": "0"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    url = f"http://127.0.0.1:{http}/metrics"
    try:
        deadline = time.monotonic() + 60
        while True:  # wait for the agent to listen, then warm up
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    raise
                time.sleep(0.2)
        time.sleep(warmup_s)
        latency_ms, body = [], b""
        for _ in range(scrapes):
            t0 = time.perf_counter()
            with urllib.request.urlopen(url, timeout=5) as r:
                body = r.read()
            latency_ms.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.05)
        check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
        problems = [ln for ln in (check.stdout + check.stderr).decode().splitlines() if ln.strip()]
        lines = body.decode().splitlines()
        return {
            "tree": str(tree),
            "bytes": len(body),
            "families": sum(ln.startswith("# TYPE") for ln in lines),
            "series": sum(1 for ln in lines if ln and not ln.startswith("#")),
            "scrape_ms_median": round(statistics.median(latency_ms), 2),
            "promtool_rc": check.returncode,
            "promtool_problems": problems,
        }
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(10)
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m rackguard.bench.metrics_scrape", description=__doc__)
    ap.add_argument("trees", nargs="+", type=Path, help="rackguard checkouts to measure, in order")
    ap.add_argument("--warmup-s", type=float, default=10.0)
    ap.add_argument("--scrapes", type=int, default=40)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for tree in args.trees:
            print(
                json.dumps(measure(tree.resolve(), Path(tmp), warmup_s=args.warmup_s, scrapes=args.scrapes)),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

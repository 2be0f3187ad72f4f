"""Must-show: ``rackguard run --config examples/sim.toml`` against a real mosquitto."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rackguard.agent.mosquitto import free_port

REPO = Path(__file__).resolve().parents[2]
BASE = "rackguard/demo/r1/sim-node-1"


def test_sim_node_publishes_birth_telemetry_and_offline(broker, subscriber) -> None:  # type: ignore[no-untyped-def]
    sub = subscriber(broker, f"{BASE}/#")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
    http_port = free_port()  # examples/sim.toml serves /metrics on 9108; a free one here
    env |= {
        "RACKGUARD_MQTT__PORT": str(broker.port),
        "RACKGUARD_MQTT__HOST": broker.host,
        "RACKGUARD_HTTP__PORT": str(http_port),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "rackguard.agent.cli", "run", "--config", "examples/sim.toml"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        online = sub.wait_for(lambda m: m.topic.endswith("/status") and m.json()["state"] == "online", 20)[0]
        birth = online.json()
        assert birth["version"] and birth["backend"] == "sim"
        assert [g["index"] for g in birth["gpus"]] == list(range(8))
        assert all(g["thresholds"]["slowdown_c"] == 89.0 and g["uuid"] for g in birth["gpus"])
        late = subscriber(broker, f"{BASE}/status")  # a consumer that arrives later sees it retained
        retained = late.wait_for(lambda m: m.retain, 5)[0]
        assert retained.json()["state"] == "online" and len(retained.json()["gpus"]) == 8

        tel = sub.wait_for(lambda m: m.topic == f"{BASE}/telemetry", timeout=15, count=4)
        payloads = [m.json() for m in tel]
        seqs = [p["seq"] for p in payloads]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] >= 1
        for p in payloads:
            assert len(p["gpus"]) == 8
            assert p["host"] is not None and p["host"]["agent_rss_mb"] > 0
            for g in p["gpus"]:
                assert g["state"] == "ok"
                assert g["samples"] >= 5
                assert g["power_w"]["min"] <= g["power_w"]["mean"] <= g["power_w"]["max"]
                assert 20 < g["gpu_temp_c"]["mean"] < 100
                assert g["energy_j"] is not None and g["energy_j"] >= 0
            # The time is the sampling time: within the window, not after it.
            assert p["window_start_s"] <= p["t_s"] <= p["window_end_s"]
        # One message per publish period (1 s): consecutive windows end about 1 s apart.
        gaps = [b["window_end_s"] - a["window_end_s"] for a, b in itertools.pairwise(payloads)]
        assert all(0.7 < g < 1.3 for g in gaps), gaps
        energy = [p["gpus"][0]["energy_j"] for p in payloads]
        assert energy == sorted(energy) and energy[-1] > energy[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
            assert 'rackguard_gpu_power_watts{gpu="7",uuid="' in r.read().decode()

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - t0 < 5
        off = sub.wait_for(lambda m: m.topic.endswith("/status") and m.json()["state"] == "offline", 5)[0]
        assert off.json()["reason"] == "shutdown"
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=5)[0].decode()
    assert "Traceback" not in out, out

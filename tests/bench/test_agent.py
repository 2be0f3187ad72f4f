"""The benchmark harness runs end to end and reports sane values (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from rackguard.bench.common import extrapolate, parse_hostport, percentile_ms, traffic

AGENT_KEYS = (
    "cpu_pct_one_core",
    "rss_mb",
    "tick_jitter_p50_ms",
    "tick_jitter_p99_ms",
    "control_p50_ms",
    "control_p99_ms",
    "leak_to_cap_p50_ms",
    "leak_to_cap_p99_ms",
    "leak_events",
    "bytes_per_node_s",
    "msgs_per_node_s",
)


def bench(*args: str, timeout_s: float = 120) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-m", "rackguard.agent.cli", "bench", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_percentiles_and_traffic() -> None:
    assert percentile_ms([], 50) is None
    assert percentile_ms([0.001, 0.002, 0.003], 50) == 2.0
    recs = [(float(i), "telemetry", 100) for i in range(20)] + [(float(i), "cap", 100) for i in range(4)]
    t = traffic(recs, 10.0, 2)
    assert t["by_kind"]["telemetry"] == {"msgs_per_node_s": 1.0, "bytes_per_node_s": 100.0}
    assert t["msgs_per_node_s"] == 1.2 and t["bytes_per_node_s"] == 120.0
    assert extrapolate(1.0, 5000.0)["mbytes_s"] == 50.0
    assert parse_hostport("127.0.0.1:1883") == ("127.0.0.1", 1883)


@pytest.mark.slow
def test_bench_agent_runs_and_reports() -> None:
    out = bench(
        "agent", "--seconds", "3", "--warmup-s", "1", "--leak-events", "5", "--outage-s", "2", timeout_s=180
    )
    for key in AGENT_KEYS:
        assert key in out, key
    assert out["agent_exit_code"] == 0
    assert 0 < out["cpu_pct_one_core"] < 200
    assert 10 < out["rss_mb"] < 2000
    assert out["ticks"] >= 20 and out["control_steps"] >= 2
    assert out["tick_jitter_p50_ms"] is not None and out["control_p50_ms"] > 0
    assert 0.5 <= out["traffic_by_kind"]["telemetry"]["msgs_per_node_s"] <= 1.5
    assert out["bytes_per_node_s"] > 1000  # 8 GPUs' mean/min/max JSON
    # Every leak gave a cap with reason "leak", and every clear a cap without it.
    assert out["leak_events"] == 5 and out["leak_missed"] == 0
    assert out["leak_to_cap_p50_ms"] > 0
    # Replay: every seq produced while the broker was down arrives, flagged historical.
    assert out["replay_backlog_msgs"] >= 10
    assert out["replay_missing_seqs"] == 0
    assert out["replay_rate_limit_msgs_s"] > 0


@pytest.mark.slow
def test_bench_fleet_handful_of_nodes() -> None:
    out = bench("fleet", "--nodes", "4", "--procs", "2", "--seconds", "3", "--warmup-s", "1")
    assert out["nodes"] == 4 and out["procs"] == 2
    assert out["worker_exit_codes"] == [0, 0]
    assert 0.5 <= out["traffic_by_kind"]["telemetry"]["msgs_per_node_s"] <= 1.5
    assert out["bytes_per_node_s"] > 1000
    assert out["extrapolated"]["nodes"] == 10_000

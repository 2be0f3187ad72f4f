"""``rackguard bench agent``: what the daemon itself costs.

``bench agent`` runs the real daemon (``rackguard run``, a subprocess, so its CPU and
RSS are its own) on the simulated backend against a mosquitto it starts on loopback
(or ``--broker``). Three phases:

1. **steady**: production periods (0.1 s poll, 1 s publish, 1 s control). CPU % of one
   core and peak RSS of the agent process, tick and control-step lateness, MPC and
   safety time per step (raw samples from ``GET /debug/timings``), and what a
   subscriber to ``rackguard/#`` receives (topic + payload bytes, messages).
2. **leak**: a separate client publishes ``Warning`` on a declared leak detector; a
   subscriber times the new ``cap`` (reason ``leak``). Then ``OK`` (``leak_clear =
   "auto"``) and the cap recovers before the next event.
3. **replay**: a second agent run with a SQLite outbox publishing every 0.1 s (only to
   build a backlog quickly: the replay rate does not depend on the publish period).
   The broker is stopped for ``--outage-s``, restarted on the same port, and the
   arrival rate of the ``historical`` messages is measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rackguard.agent.mosquitto import Mosquitto, free_port
from rackguard.bench.common import (
    Recorder,
    broker_at,
    extrapolate,
    leak_publisher,
    percentile_ms,
    traffic,
)

LEAK_TIMEOUT_S = 2.0  # a leak that yields no cap within this counts as missed
RECOVER_TIMEOUT_S = 5.0


def agent_config(
    host: str,
    port: int,
    *,
    gpus: int,
    http_port: int,
    leak_topic: str,
    name: str = "bench-node",
    publish_period_s: float = 1.0,
    outbox_path: Path | None = None,
) -> str:
    """The bench node's TOML: production periods and control, the sim backend, one leak detector."""
    outbox = f'[outbox]\npath = "{outbox_path}"\n' if outbox_path else ""
    return f"""\
[node]
site = "bench"
rack = "r1"
name = "{name}"

[mqtt]
host = "{host}"
port = {port}
reconnect_min_s = 0.5
reconnect_max_s = 1.0   # bench: reconnect within 1 s of the broker's return

[sensors]
backend = "sim"
poll_period_s = 0.1
slow_period_s = 1.0

[sim]
gpus = {gpus}

[telemetry]
publish_period_s = {publish_period_s}

[coolant]
leak_clear = "auto"         # bench: an OK reading clears the latch (production default: ack)

[[coolant.sensors]]
id = "bench-leak"
kind = "leak"
format = "plain"
topic = "{leak_topic}"

[http]
host = "127.0.0.1"
port = {http_port}

{outbox}"""


class AgentProc:
    """``rackguard run --config FILE`` as a child process, with its HTTP debug route."""

    def __init__(self, workdir: Path, config_toml: str, http_port: int, tag: str) -> None:
        import psutil

        self.http_port = http_port
        cfg = workdir / f"{tag}.toml"
        cfg.write_text(config_toml)
        self.log_path = workdir / f"{tag}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rackguard.agent.cli", "run", "--config", str(cfg)],
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.ps = psutil.Process(self.proc.pid)

    def get(self, path: str, timeout_s: float = 5.0) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout_s) as r:
            return json.loads(r.read())

    def wait_http(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}: {self.tail()}")
            try:
                self.get("/debug/timings", 1.0)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"agent HTTP did not come up: {self.tail()}")

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss_mb(self) -> tuple[float, float | None]:
        """(current RSS, peak RSS from VmHWM) in MiB."""
        rss = self.ps.memory_info().rss / 2**20
        hwm = None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
        return rss, hwm

    def tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-n:]
        return ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


@dataclass
class AgentBenchOptions:
    gpus: int = 8
    seconds: float = 60.0
    warmup_s: float = 5.0
    leak_events: int = 1000
    outage_s: float = 30.0
    broker: tuple[str, int] | None = None
    progress: Callable[[str], None] = field(default=lambda s: None)


def _steady_and_leak(opts: AgentBenchOptions, host: str, port: int, workdir: Path) -> dict[str, Any]:
    node_topic = "rackguard/bench/r1/bench-node"
    leak_topic = "bench/bench-node/leak"
    http_port = free_port()
    rec = Recorder(host, port, [f"{node_topic}/#"])
    pub = leak_publisher(host, port)
    agent = AgentProc(
        workdir,
        agent_config(host, port, gpus=opts.gpus, http_port=http_port, leak_topic=leak_topic),
        http_port,
        "steady",
    )
    out: dict[str, Any] = {}
    try:
        agent.wait_http()
        if not rec.wait(lambda: bool(rec.newest_t_s), 30):
            raise RuntimeError(f"no telemetry from the agent: {agent.tail()}")
        opts.progress(f"steady: warm-up {opts.warmup_s:g} s, then {opts.seconds:g} s measured")
        _sleep_publishing_ok(pub, leak_topic, opts.warmup_s)
        t0 = agent.get("/debug/timings")
        time.sleep(0.3)  # keep the HTTP request itself out of the window
        skip_ticks = 3
        caps0 = len(rec.caps)
        c0, w0, wall0 = agent.cpu_s(), time.monotonic(), time.time()
        rss_samples = [agent.rss_mb()[0]]
        end = w0 + opts.seconds
        while (left := end - time.monotonic()) > 0:
            _sleep_publishing_ok(pub, leak_topic, min(1.0, left))
            rss_samples.append(agent.rss_mb()[0])
        c1, w1, wall1 = agent.cpu_s(), time.monotonic(), time.time()
        rss_now, rss_hwm = agent.rss_mb()
        t1 = agent.get("/debug/timings")
        wall = w1 - w0
        n_ticks = t1["ticks_total"] - t0["ticks_total"] - skip_ticks
        ticks = t1["tick_late_s"][-n_ticks:] if n_ticks > 0 else []
        n_steps = t1["steps_total"] - t0["steps_total"]
        # Control-step records are appended together; take the same last n of each.
        control_late = t1["control_late_s"][-n_steps:] if n_steps > 0 else []
        mpc = t1["mpc_s"][-n_steps:] if n_steps > 0 else []
        safety = t1["safety_s"][-n_steps:] if n_steps > 0 else []
        step = [a + b for a, b in zip(mpc, safety, strict=True)]
        rec.settle(wall1, 1, 10.0)
        recs, lags = rec.window(wall0, wall1)
        tr = traffic(recs, wall1 - wall0, 1)
        out.update(
            gpus=opts.gpus,
            poll_period_s=0.1,
            publish_period_s=1.0,
            control_period_s=1.0,
            seconds=round(wall, 2),
            cpu_pct_one_core=round(100 * (c1 - c0) / wall, 3),
            rss_mb=round(rss_hwm if rss_hwm is not None else max([*rss_samples, rss_now]), 1),
            rss_now_mb=round(rss_now, 1),
            ticks=len(ticks),
            tick_jitter_p50_ms=percentile_ms(ticks, 50),
            tick_jitter_p99_ms=percentile_ms(ticks, 99),
            tick_jitter_max_ms=percentile_ms(ticks, 100),
            control_steps=len(step),
            control_start_late_p50_ms=percentile_ms(control_late, 50),
            control_start_late_p99_ms=percentile_ms(control_late, 99),
            control_p50_ms=percentile_ms(step, 50),
            control_p99_ms=percentile_ms(step, 99),
            mpc_p50_ms=percentile_ms(mpc, 50),
            mpc_p99_ms=percentile_ms(mpc, 99),
            safety_p50_ms=percentile_ms(safety, 50),
            safety_p99_ms=percentile_ms(safety, 99),
            bytes_per_node_s=tr["bytes_per_node_s"],
            msgs_per_node_s=tr["msgs_per_node_s"],
            traffic_by_kind=tr["by_kind"],
            cap_reasons=dict(Counter(r for _, r in rec.caps[caps0:])),
            extrapolated=extrapolate(tr["msgs_per_node_s"], tr["bytes_per_node_s"]),
            delivery_lag_p50_ms=percentile_ms(lags, 50),
            delivery_lag_p99_ms=percentile_ms(lags, 99),
        )
        if opts.leak_events:
            opts.progress(f"leak: {opts.leak_events} events")
            out.update(_leak_events(opts.leak_events, pub, rec, leak_topic))
        else:
            out.update(leak_events=0, leak_to_cap_p50_ms=None, leak_to_cap_p99_ms=None)
    finally:
        code = agent.stop()
        out["agent_exit_code"] = code
        pub.loop_stop()
        pub.disconnect()
        rec.close()
    return out


def _sleep_publishing_ok(pub: Any, leak_topic: str, seconds: float) -> None:
    """Sleep, while the leak detector reports OK once a second (as a real one would)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        pub.publish(leak_topic, b"OK", qos=1)
        time.sleep(min(1.0, left))


def _cap_after(rec: Recorder, i: int, *, leak: bool) -> Callable[[], bool]:
    """A predicate: a cap with (or without) reason ``leak`` arrived after the first ``i`` caps."""
    return lambda: any((r == "leak") == leak for _, r in rec.caps[i:])


def _leak_events(n: int, pub: Any, rec: Recorder, leak_topic: str) -> dict[str, Any]:
    """Leak → cap (timed) → clear → cap recovers, ``n`` times."""
    lat: list[float] = []
    recover: list[float] = []
    missed = 0
    for _ in range(n):
        with rec.cond:
            i = len(rec.caps)
        t0 = time.perf_counter()
        pub.publish(leak_topic, b"Warning", qos=1)
        if rec.wait(_cap_after(rec, i, leak=True), LEAK_TIMEOUT_S):
            with rec.cond:
                t_cap = next(t for t, r in rec.caps[i:] if r == "leak")
            lat.append(t_cap - t0)
        else:
            missed += 1
            if missed >= 3 and not lat:
                break  # the leak path does not publish a cap: stop early
        with rec.cond:
            j = len(rec.caps)
        t1 = time.perf_counter()
        pub.publish(leak_topic, b"OK", qos=1)
        if rec.wait(_cap_after(rec, j, leak=False), RECOVER_TIMEOUT_S):
            with rec.cond:
                recover.append(next(t for t, r in rec.caps[j:] if r != "leak") - t1)
    return {
        "leak_events": len(lat),
        "leak_missed": missed,
        "leak_to_cap_p50_ms": percentile_ms(lat, 50),
        "leak_to_cap_p99_ms": percentile_ms(lat, 99),
        "leak_to_cap_max_ms": percentile_ms(lat, 100),
        "leak_clear_to_cap_p50_ms": percentile_ms(recover, 50),
    }


def _replay(opts: AgentBenchOptions, broker: Mosquitto, workdir: Path) -> dict[str, Any]:
    """Stop the broker for ``outage_s``, restart it, time the historical backlog's arrival."""
    from rackguard.agent.config import OutboxConfig

    http_port = free_port()
    publish_period_s = 0.1
    cfg = agent_config(
        broker.host,
        broker.port,
        gpus=opts.gpus,
        http_port=http_port,
        leak_topic="bench/replay-node/leak",
        name="replay-node",
        publish_period_s=publish_period_s,
        outbox_path=workdir / "replay-outbox.sqlite",
    )
    rec = Recorder(
        broker.host,
        broker.port,
        ["rackguard/bench/r1/replay-node/telemetry"],
        telemetry_seqs=True,
        session_id="rackguard-bench-replay",  # nothing replayed is missed if the agent is back first
    )
    agent = AgentProc(workdir, cfg, http_port, "replay")
    try:
        agent.wait_http()
        if not rec.wait(lambda: len(rec.telemetry) >= 5, 30):
            raise RuntimeError(f"no telemetry from the replay agent: {agent.tail()}")
        opts.progress(f"replay: broker down for {opts.outage_s:g} s")
        broker.stop()
        time.sleep(opts.outage_s)
        with rec.cond:
            before_seq = max(s for _, s, _ in rec.telemetry)
            n_before = len(rec.telemetry)
        broker.start()
        t_up = time.perf_counter()
        expected = round(opts.outage_s / publish_period_s)
        # Done when no historical message arrived for 2 s after the first one.
        deadline = time.monotonic() + 30 + 3 * expected / OutboxConfig().replay_rate_msgs_s
        last_n = -1
        while time.monotonic() < deadline:
            time.sleep(2.0)
            with rec.cond:
                hist = [(t, s) for t, s, h in rec.telemetry[n_before:] if h]
            if hist and len(hist) == last_n:
                break
            last_n = len(hist)
        with rec.cond:
            after = rec.telemetry[n_before:]
            sub_back = next((t for t in rec.connected_at if t >= t_up), None)
    finally:
        agent.stop()
        rec.close()
    hist_t = sorted(t for t, _, h in after if h)
    seqs = {s for _, s, _ in after}
    top = max(seqs, default=before_seq)
    missing = [s for s in range(before_seq + 1, top + 1) if s not in seqs]
    n = len(hist_t)
    span = hist_t[-1] - hist_t[0] if n > 1 else 0.0
    k = n // 2  # the second half: past the saved-up burst
    sustained = (n - 1 - k) / (hist_t[-1] - hist_t[k]) if n > 2 and hist_t[-1] > hist_t[k] else None
    return {
        "replay_outage_s": opts.outage_s,
        "replay_backlog_msgs": n,
        "replay_expected_msgs": expected,
        "replay_missing_seqs": len(missing),
        "replay_reconnect_s": round(hist_t[0] - t_up, 3) if hist_t else None,
        "replay_s": round(span, 3),
        "replay_rate_msgs_s": round((n - 1) / span, 1) if span > 0 else None,
        "replay_rate_sustained_msgs_s": round(sustained, 1) if sustained else None,
        "replay_rate_limit_msgs_s": OutboxConfig().replay_rate_msgs_s,
        "replay_subscriber_first": sub_back is not None and (not hist_t or sub_back <= hist_t[0]),
    }


def run_agent_bench(opts: AgentBenchOptions) -> dict[str, Any]:
    """All three phases; one flat dict of results."""
    with tempfile.TemporaryDirectory(prefix="rackguard-bench-") as d:
        workdir = Path(d)
        with broker_at(workdir, opts.broker) as (host, port, broker):
            out = _steady_and_leak(opts, host, port, workdir)
            if broker is None:
                out["replay_skipped"] = "external broker (--broker): cannot stop it"
            elif opts.outage_s > 0:
                out.update(_replay(opts, broker, workdir))
    return out

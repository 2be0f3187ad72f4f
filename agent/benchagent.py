"""``rackguard bench agent`` and ``rackguard bench fleet``: what the daemon itself costs.

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

``bench fleet`` runs ``--nodes`` Agent instances (each its own MQTT client, topics and
simulated GPUs, on the same code path as ``rackguard run``) in ``--procs`` worker
processes against one mosquitto, and measures the broker's load per node.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rackguard.agent.mosquitto import Mosquitto, free_port

EX_SOFTWARE = 70
FLEET_EXTRAPOLATE_NODES = 10_000
LEAK_TIMEOUT_S = 2.0  # a leak that yields no cap within this counts as missed
RECOVER_TIMEOUT_S = 5.0


# -- helpers -------------------------------------------------------------------------------
def percentile_ms(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile of seconds, in ms (None when empty)."""
    if not values:
        return None
    import numpy as np

    return round(float(np.percentile(np.asarray(values), q)) * 1e3, 3)


def parse_hostport(s: str) -> tuple[str, int]:
    """``host:port`` → (host, port)."""
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {s!r}")
    return host, int(port)


@contextlib.contextmanager
def broker_at(workdir: Path, hostport: tuple[str, int] | None) -> Iterator[tuple[str, int, Mosquitto | None]]:
    """The given broker, or a fresh mosquitto on a free loopback port (stopped on exit)."""
    if hostport is not None:
        yield hostport[0], hostport[1], None
        return
    b = Mosquitto(free_port(), workdir, persistence=True)
    b.start()
    try:
        yield b.host, b.port, b
    finally:
        b.stop()


_T_S = re.compile(rb'"t_s":([-+.eE0-9]+)')  # every message's sample time, near its start


class Recorder:
    """A paho MQTT 5 client on its own thread that records what it receives.

    For every message with a ``t_s`` (all of rackguard's): its sample time, topic kind
    (the last topic level) and topic + payload bytes, so traffic is counted by *sample*
    time, whatever the delivery lag. Also the arrival (``perf_counter``) and reason of
    every cap, the nodes online, the latest ``$SYS`` values and, with ``telemetry_seqs``,
    each telemetry message's arrival time, seq and historical flag.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topics: list[str],
        *,
        telemetry_seqs: bool = False,
        session_id: str | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.cond = threading.Condition()
        self.records: list[tuple[float, str, int]] = []  # (t_s, kind, topic + payload bytes)
        self.newest_t_s: dict[str, float] = {}  # telemetry topic -> newest sample time seen
        self.lag_s: list[tuple[float, float]] = []  # telemetry (t_s, arrival wall time - t_s)
        self.caps: list[tuple[float, str]] = []
        self.status_online: set[str] = set()
        self.sys: dict[str, tuple[float, float]] = {}  # $SYS topic -> (perf_counter, value)
        self.telemetry: list[tuple[float, int, bool]] = []  # (perf_counter, seq, historical)
        self.connected_at: list[float] = []
        self._telemetry_seqs = telemetry_seqs
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=session_id or "", protocol=mqtt.MQTTv5
        )
        # Back before the agent is (paho takes float delays; its hints say int).
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=0.2)  # type: ignore[arg-type]
        subscribed = threading.Event()

        def on_connect(c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
            with self.cond:
                self.connected_at.append(time.perf_counter())
            for t in topics:
                c.subscribe(t, qos=1)

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        props = None
        if session_id:  # a persistent session: the broker queues what arrives while we are away
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.client.connect(host, port, clean_start=not session_id, properties=props)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("bench subscriber did not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now, wall = time.perf_counter(), time.time()
        topic: str = msg.topic
        payload: bytes = msg.payload
        if topic.startswith("$SYS/"):
            with contextlib.suppress(ValueError, IndexError):
                self.sys[topic] = (now, float(payload.split()[0]))
            return
        kind = topic.rsplit("/", 1)[-1]
        reason = status = seq = None
        historical = False
        if kind == "cap" and payload:
            reason = json.loads(payload).get("reason")
        elif kind == "status" and payload:
            status = json.loads(payload).get("state")
        elif kind == "telemetry" and self._telemetry_seqs:
            body = json.loads(payload)
            seq, historical = int(body["seq"]), bool(body.get("historical"))
        m = _T_S.search(payload, 0, 200)
        t_s = float(m[1]) if m else None
        with self.cond:
            if t_s is not None:
                self.records.append((t_s, kind, len(topic) + len(payload)))
                if kind == "telemetry":
                    self.newest_t_s[topic] = max(self.newest_t_s.get(topic, 0.0), t_s)
                    self.lag_s.append((t_s, wall - t_s))
            if reason is not None:
                self.caps.append((now, reason))
            if status == "online":
                self.status_online.add(topic)
            elif status is not None:
                self.status_online.discard(topic)
            if seq is not None:
                self.telemetry.append((now, seq, historical))
            self.cond.notify_all()

    def settle(self, t1_s: float, nodes: int, timeout_s: float) -> bool:
        """Wait until every node's telemetry sampled after ``t1_s`` has arrived (lag drained)."""
        return self.wait(lambda: sum(t >= t1_s for t in self.newest_t_s.values()) >= nodes, timeout_s)

    def window(self, t0_s: float, t1_s: float) -> tuple[list[tuple[float, str, int]], list[float]]:
        """Records and telemetry lags (s) of the messages sampled in ``[t0_s, t1_s)``."""
        with self.cond:
            recs = [r for r in self.records if t0_s <= r[0] < t1_s]
            lags = [lag for t, lag in self.lag_s if t0_s <= t < t1_s]
        return recs, lags

    def wait(self, pred: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``pred()`` (checked under the lock) holds; False on timeout."""
        with self.cond:
            return self.cond.wait_for(pred, timeout_s)

    def close(self) -> None:
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()


def traffic(records: list[tuple[float, str, int]], seconds: float, nodes: int) -> dict[str, Any]:
    """Messages and bytes per node per second, by kind and in total, from ``(t_s, kind, bytes)``."""
    sums: dict[str, list[int]] = {}
    for _, kind, n in records:
        c = sums.setdefault(kind, [0, 0])
        c[0] += 1
        c[1] += n
    by_kind = {
        k: {
            "msgs_per_node_s": round(m / seconds / nodes, 4),
            "bytes_per_node_s": round(b / seconds / nodes, 1),
        }
        for k, (m, b) in sorted(sums.items())
    }
    msgs = sum(m for m, _ in sums.values()) / seconds / nodes
    byts = sum(b for _, b in sums.values()) / seconds / nodes
    return {"msgs_per_node_s": round(msgs, 4), "bytes_per_node_s": round(byts, 1), "by_kind": by_kind}


def extrapolate(
    msgs_per_node_s: float, bytes_per_node_s: float, nodes: int = FLEET_EXTRAPOLATE_NODES
) -> dict[str, Any]:
    """Broker ingress for ``nodes`` nodes (payload + topic only; MQTT framing adds a few %)."""
    return {
        "nodes": nodes,
        "msgs_s": round(msgs_per_node_s * nodes, 1),
        "mbytes_s": round(bytes_per_node_s * nodes / 1e6, 3),
        "mbit_s": round(bytes_per_node_s * nodes * 8 / 1e6, 2),
        "gbytes_per_day": round(bytes_per_node_s * nodes * 86_400 / 1e9, 1),
    }


# -- the agent subprocess ------------------------------------------------------------------
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


def _leak_publisher(host: str, port: int) -> Any:
    import paho.mqtt.client as mqtt

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(host, port)
    pub.loop_start()
    return pub


class LeakDetectorsOk:
    """Leak detectors reporting ``OK`` once a second on ``topics`` (a thread), as real ones would."""

    def __init__(self, host: str, port: int, topics: list[str]) -> None:
        self.pub = _leak_publisher(host, port)
        self.topics = topics
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="leak-ok", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for t in self.topics:
                self.pub.publish(t, b"OK", qos=1)
            self.stop.wait(1.0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.pub.loop_stop()
        self.pub.disconnect()


# -- bench agent ---------------------------------------------------------------------------
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
    pub = _leak_publisher(host, port)
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


# -- bench fleet ---------------------------------------------------------------------------
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


async def _fleet_worker(host: str, port: int, first: int, count: int, gpus: int, poll_period_s: float) -> int:
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
                    "rackguard.agent.benchagent",
                    "fleet-worker",
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


# -- CLI -----------------------------------------------------------------------------------
def register(bsub: Any) -> None:
    """Add ``agent`` and ``fleet`` to the ``rackguard bench`` subcommands."""
    a = bsub.add_parser("agent", help="the daemon's CPU, RSS, jitter, leak-to-cap latency, traffic, replay")
    a.add_argument("--gpus", type=int, default=8, help="simulated GPUs (default 8)")
    a.add_argument("--seconds", type=float, default=60.0, help="steady-state window (default 60)")
    a.add_argument("--warmup-s", type=float, default=5.0, help="before the window (default 5)")
    a.add_argument(
        "--leak-events", type=int, default=1000, help="leak → cap events to time (default 1000; 0 skips)"
    )
    a.add_argument(
        "--outage-s", type=float, default=30.0, help="broker outage for the replay phase (0 skips)"
    )
    a.add_argument(
        "--broker",
        type=parse_hostport,
        metavar="HOST:PORT",
        help="use this broker (default: start mosquitto)",
    )
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.set_defaults(func=cmd_agent)

    f = bsub.add_parser("fleet", help="many simulated nodes against one broker: the broker's load per node")
    f.add_argument("--nodes", type=int, default=200, help="simulated nodes (default 200)")
    f.add_argument("--procs", type=int, default=4, help="worker processes hosting them (default 4)")
    f.add_argument("--seconds", type=float, default=30.0, help="measured window (default 30)")
    f.add_argument("--warmup-s", type=float, default=10.0, help="after every node is online (default 10)")
    f.add_argument("--gpus", type=int, default=8, help="simulated GPUs per node (default 8)")
    f.add_argument(
        "--poll-period-s",
        type=float,
        default=1.0,
        help="GPU poll period (default 1.0: broker load depends only on the 1 s publish period)",
    )
    f.add_argument(
        "--broker",
        type=parse_hostport,
        metavar="HOST:PORT",
        help="use this broker (default: start mosquitto)",
    )
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.set_defaults(func=cmd_fleet)


def _progress(quiet: bool) -> Callable[[str], None]:
    return (lambda s: None) if quiet else (lambda s: print(f"# {s}", file=sys.stderr, flush=True))


def _print(out: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(out))
        return
    for k, v in out.items():
        print(f"{k:32s} {json.dumps(v)}")


def _report(name: str, bench: Callable[[], dict[str, Any]], as_json: bool) -> int:
    """Run one bench and print its figures; a harness failure exits EX_SOFTWARE with the reason."""
    try:
        out = bench()
    except RuntimeError as exc:
        print(f"rackguard bench {name}: {exc}", file=sys.stderr)
        return EX_SOFTWARE
    _print(out, as_json)
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    """``rackguard bench agent``."""
    opts = AgentBenchOptions(
        gpus=args.gpus,
        seconds=args.seconds,
        warmup_s=args.warmup_s,
        leak_events=args.leak_events,
        outage_s=args.outage_s,
        broker=args.broker,
        progress=_progress(False),
    )
    return _report("agent", lambda: run_agent_bench(opts), args.json)


def cmd_fleet(args: argparse.Namespace) -> int:
    """``rackguard bench fleet``."""
    opts = FleetOptions(
        nodes=args.nodes,
        procs=max(1, min(args.procs, args.nodes)),
        seconds=args.seconds,
        warmup_s=args.warmup_s,
        gpus=args.gpus,
        poll_period_s=args.poll_period_s,
        broker=args.broker,
        progress=_progress(False),
    )
    return _report("fleet", lambda: run_fleet_bench(opts), args.json)


def main(argv: list[str]) -> int:
    """``python -m rackguard.agent.benchagent fleet-worker HOST PORT FIRST COUNT GPUS POLL_S`` (bench fleet's workers)."""
    if len(argv) != 7 or argv[0] != "fleet-worker":
        print(main.__doc__, file=sys.stderr)
        return 2
    host, port, first, count, gpus, poll = argv[1:]
    return asyncio.run(_fleet_worker(host, int(port), int(first), int(count), int(gpus), float(poll)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

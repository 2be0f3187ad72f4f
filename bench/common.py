"""What ``bench agent`` and ``bench fleet`` share: the broker, an MQTT recorder, traffic arithmetic."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rackguard.agent.mosquitto import Mosquitto, free_port

FLEET_EXTRAPOLATE_NODES = 10_000


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
        kind = "gate" if "/gate/" in topic else topic.rsplit("/", 1)[-1]
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
    """Messages and bytes per node per second, by kind and in total, from ``(t_s, kind, bytes)``.

    The totals count what the agent publishes; the inference servers' gate reports (kind ``gate``,
    from the simulated servers beside a simulated node) are listed by kind only.
    """
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
    agent = [v for k, v in sums.items() if k != "gate"]
    msgs = sum(m for m, _ in agent) / seconds / nodes
    byts = sum(b for _, b in agent) / seconds / nodes
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


def leak_publisher(host: str, port: int) -> Any:
    """A started paho MQTT 5 client that plays the leak detectors."""
    import paho.mqtt.client as mqtt

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(host, port)
    pub.loop_start()
    return pub


class LeakDetectorsOk:
    """Leak detectors reporting ``OK`` once a second on ``topics`` (a thread), as real ones would."""

    def __init__(self, host: str, port: int, topics: list[str]) -> None:
        self.pub = leak_publisher(host, port)
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

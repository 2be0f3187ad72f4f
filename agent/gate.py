"""A concurrency gate for inference servers that obeys rackguard's cap.

Wrap each request in the gate::

    gate = Gate(node_topic="rackguard/site/rack/node-1", gpu=0, safe_cap=8,
                http_url="http://127.0.0.1:9108/v1/cap")
    await gate.start()
    ...
    async with gate:                 # waits for a free slot
        tokens = await generate(prompt)
        gate.report_tokens(tokens)   # counted, and sent back to the agent
    ...
    await gate.close()

Where the limit comes from:

* MQTT: the retained ``<node_topic>/cap`` (``caps[gpu]`` for a gate bound to one
  GPU, else ``total``), obeyed until its ``valid_until_s`` and its MQTT 5 message
  expiry, whichever comes first.
* HTTP ``GET /v1/cap`` (``http_url``), polled about once a second while the
  broker is unreachable.
* ``safe_cap`` when there is no valid cap: before the first one, once it expires,
  or as soon as the agent's status goes ``offline`` (its last will, which the
  broker publishes within 1.5 × the agent's keepalive of losing it). The limit is
  re-checked every 0.1 s, so expiry takes effect within that.

**Draining:** when the limit drops below the number of requests in flight, those
requests are never cancelled or killed: they run to completion. The gate simply
admits no new request until the number in flight is below the new limit, so
in flight can exceed the limit only by requests admitted before the drop, and it
only decreases until it is under the limit again. Waiting requests are admitted
first come, first served.

The gate publishes cumulative counters on ``<node_topic>/gate/<gate_id>`` about
every ``report_period_s`` (JSON, :class:`rackguard.agent.messages.GateReport`); the agent
uses them for the GPUs' load and for energy per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import aiomqtt

from rackguard.agent import log as logmod
from rackguard.agent.messages import GateReport, dump

TICK_S = 0.1  # how often the limit is re-checked against expiry
Source = Literal["mqtt", "http", "safe"]
# Cap reasons that mean the node is in trouble (a gateway sends everything to its fallback).
SAFETY_REASONS = frozenset({"leak", "thermal", "stale", "gpu_lost"})


class CapRules:
    """What the agent said, and the limit it gives now: the rules every gate obeys.

    The limit is the valid cap (``caps[g]`` summed over ``gpus``, or ``total`` when
    ``gpus`` is None) until its ``valid_until_s`` or MQTT 5 expiry, whichever comes
    first, and ``safe_cap`` otherwise: before the first cap, after expiry, after an
    invalid cap, and while the agent's status is ``offline``.

    Args:
        safe_cap: The limit whenever there is no valid cap.
        gpus: The GPUs obeyed (their caps are summed); None obeys ``total``.
        clock: Wall-clock seconds.
    """

    def __init__(
        self, safe_cap: int, gpus: Sequence[int] | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        if safe_cap < 0:
            raise ValueError("safe_cap must be >= 0")
        self.safe_cap = safe_cap
        self.gpus = None if gpus is None else tuple(gpus)
        self.clock = clock
        self.agent_online: bool | None = None
        self.cap: int | None = None
        self.reason: str | None = None
        self.valid_until_s = 0.0
        self.cap_source: Source = "mqtt"

    def take_cap(self, payload: bytes, source: Source, expiry_s: float | None = None) -> str | None:
        """Take a cap message (MQTT or HTTP); an invalid or empty one means no cap.

        Returns:
            None, or why the message was invalid.
        """
        now = self.clock()
        try:
            msg = json.loads(payload) if payload else None
            if msg is None:
                self.cap = None
                return None
            if self.gpus is None:
                value = msg["total"]
            else:
                parts = [msg["caps"][g] for g in self.gpus]
                if not all(isinstance(v, int) and v >= 0 for v in parts):
                    raise ValueError(f"bad caps {parts!r}")
                value = sum(parts)
            until = float(msg["valid_until_s"])
            if expiry_s is not None:
                until = min(until, now + expiry_s)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"bad cap {value!r}")
            reason = msg.get("reason")
            self.cap, self.valid_until_s, self.cap_source = value, until, source
            self.reason = reason if isinstance(reason, str) else None
            if source == "http":
                self.agent_online = True  # it answered
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            self.cap = None
            return str(exc)[:200] or type(exc).__name__
        return None

    def take_status(self, payload: bytes) -> None:
        """Take the agent's retained status: ``offline`` (its will) means safe_cap at once."""
        try:
            state = json.loads(payload).get("state") if payload else None
        except (ValueError, AttributeError):
            state = None
        self.agent_online = None if state is None else state == "online"
        if self.agent_online is False:
            self.cap = None  # a new agent publishes a new cap

    def valid(self) -> bool:
        """Whether a cap is in force now."""
        return self.agent_online is not False and self.cap is not None and self.clock() < self.valid_until_s

    def limit(self) -> tuple[int, Source]:
        """The limit now, and where it came from."""
        if self.valid():
            assert self.cap is not None
            return self.cap, self.cap_source
        return self.safe_cap, "safe"

    def safety_reason(self) -> str | None:
        """The valid cap's reason when it is a safety reason (leak, thermal, stale, lost GPU)."""
        return self.reason if self.valid() and self.reason in SAFETY_REASONS else None


def mqtt_client(
    host: str,
    port: int,
    *,
    identifier: str,
    keepalive_s: int = 15,
    username: str | None = None,
    password: str | None = None,
    ca_file: Path | str | None = None,
    cert_file: Path | str | None = None,
    key_file: Path | str | None = None,
) -> aiomqtt.Client:
    """An MQTT 5 client for a gate: credentials, and TLS when ``ca_file`` is given."""
    tls = None
    if ca_file is not None:
        tls = aiomqtt.TLSParameters(
            ca_certs=str(ca_file),
            certfile=str(cert_file) if cert_file else None,
            keyfile=str(key_file) if key_file else None,
        )
    return aiomqtt.Client(
        host,
        port,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        keepalive=keepalive_s,
        username=username,
        password=password,
        tls_params=tls,
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    )


def node_topic(site: str, rack: str, node: str, prefix: str = "rackguard") -> str:
    """The agent's topic root ``<prefix>/<site>/<rack>/<node>``."""
    return f"{prefix}/{site}/{rack}/{node}"


def _default_gate_id(gpu: int | None) -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40]
    return f"{host}-{os.getpid()}" + ("" if gpu is None else f"-gpu{gpu}")


class Gate:
    """An asyncio concurrency gate whose size follows the agent's cap.

    Args:
        node_topic: The agent's topic root, e.g. ``rackguard/site/rack/node-1``.
        safe_cap: The limit whenever there is no valid cap.
        gpu: The GPU this server runs on (obeys ``caps[gpu]``); None obeys ``total``.
        host: MQTT broker host.
        port: MQTT broker port.
        http_url: The agent's ``/v1/cap`` URL, used while MQTT is unreachable.
        gate_id: Unique per gate (topic-safe); default ``<host>-<pid>[-gpu<N>]``.
        keepalive_s: This client's MQTT keepalive.
        report_period_s: How often counters are published.
        username: MQTT username.
        password: MQTT password.
        ca_file: TLS: the broker's CA (TLS is on when given).
        cert_file: TLS: this client's certificate (with ``key_file``).
        key_file: TLS: this client's key.
        reconnect_s: Wait between MQTT connection attempts.
        on_limit: Called with (limit, source) whenever either changes.
        clock: Wall-clock seconds (tests pass their own).
    """

    def __init__(
        self,
        *,
        node_topic: str,
        safe_cap: int,
        gpu: int | None = None,
        host: str = "127.0.0.1",
        port: int = 1883,
        http_url: str | None = None,
        gate_id: str | None = None,
        keepalive_s: int = 15,
        report_period_s: float = 1.0,
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | str | None = None,
        cert_file: Path | str | None = None,
        key_file: Path | str | None = None,
        reconnect_s: float = 1.0,
        on_limit: Callable[[int, Source], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rules = CapRules(safe_cap, None if gpu is None else (gpu,), clock)
        self.node_topic = node_topic.rstrip("/")
        self.safe_cap = safe_cap
        self.gpu = gpu
        self.host, self.port = host, port
        self.http_url = http_url
        self.gate_id = gate_id or _default_gate_id(gpu)
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.gate_id):
            raise ValueError(f"gate_id must be topic-safe, 1-64 chars: {self.gate_id!r}")
        self.keepalive_s = keepalive_s
        self.report_period_s = report_period_s
        self.username, self.password = username, password
        self.tls = (ca_file, cert_file, key_file)
        self.reconnect_s = reconnect_s
        self.on_limit = on_limit
        self.clock = clock
        # Admission state.
        self.limit = safe_cap
        self.source: Source = "safe"
        self.in_flight = 0
        self.completed_total = 0
        self.failed_total = 0
        self.tokens_total = 0
        self.max_admitted_over_limit = 0  # stays 0: admissions never exceed the limit
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.mqtt_connected = False
        self._client: aiomqtt.Client | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.log = logmod.get("gate")

    # -- topics ------------------------------------------------------------------------
    @property
    def report_topic(self) -> str:
        return f"{self.node_topic}/gate/{self.gate_id}"

    # -- admission ---------------------------------------------------------------------
    async def __aenter__(self) -> Gate:
        await self.acquire()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release(ok=exc_type is None)

    async def acquire(self) -> None:
        """Wait for a slot (first come, first served), then take it."""
        if not self._waiters and self.in_flight < self.limit:
            self._admit()
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        try:
            while True:
                await fut
                if self.in_flight < self.limit:
                    break
                # The limit dropped again before we ran: keep our place at the front.
                fut = loop.create_future()
                self._waiters.appendleft(fut)
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)
            if fut.done() and not fut.cancelled():
                self._wake()  # we were woken but leave: pass the slot on
            raise
        self._admit()

    def _admit(self) -> None:
        self.in_flight += 1
        self.max_admitted_over_limit = max(self.max_admitted_over_limit, self.in_flight - self.limit)
        self._wake()

    def release(self, *, ok: bool = True) -> None:
        """Free a slot (``async with`` calls this)."""
        self.in_flight -= 1
        if ok:
            self.completed_total += 1
        else:
            self.failed_total += 1
        self._wake()

    def report_tokens(self, n: int) -> None:
        """Count tokens the server produced (cumulative, sent to the agent)."""
        if n < 0:
            raise ValueError("tokens must be >= 0")
        self.tokens_total += n

    def _wake(self) -> None:
        """Wake the first waiter if there is room (it re-checks when it runs, then wakes the next)."""
        while self._waiters and self.in_flight < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    # -- the limit ---------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-check the limit against the clock (the gate's own loop does this every TICK_S)."""
        self._update()

    def _update(self) -> None:
        """Recompute the limit from what the agent said and the clock."""
        limit, source = self.rules.limit()
        if (limit, source) == (self.limit, self.source):
            return
        self.log.info("gate_limit", gate=self.gate_id, limit=limit, source=source, in_flight=self.in_flight)
        self.limit, self.source = limit, source
        self._wake()
        if self.on_limit is not None:
            self.on_limit(self.limit, self.source)

    def handle_cap(self, payload: bytes, source: Source, expiry_s: float | None = None) -> None:
        """Take a cap message (from MQTT or HTTP); an invalid or empty one means no cap."""
        error = self.rules.take_cap(payload, source, expiry_s)
        if error is not None:
            self.log.warning("gate_cap_invalid", gate=self.gate_id, error=error)
        self._update()

    def handle_status(self, payload: bytes) -> None:
        """Take the agent's retained status: ``offline`` (its will) means safe_cap at once."""
        self.rules.take_status(payload)
        self._update()

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and start following the cap (returns at once; the limit is safe_cap until then)."""
        self._tasks = [
            asyncio.create_task(self._mqtt_loop(), name="gate-mqtt"),
            asyncio.create_task(self._tick_loop(), name="gate-tick"),
        ]
        if self.http_url:
            self._tasks.append(asyncio.create_task(self._http_loop(), name="gate-http"))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []

    def report(self) -> GateReport:
        return GateReport(
            gate_id=self.gate_id,
            gpu=self.gpu,
            t_s=self.clock(),
            in_flight=self.in_flight,
            limit=self.limit,
            source=self.source,
            completed_total=self.completed_total,
            tokens_total=self.tokens_total,
        )

    async def _tick_loop(self) -> None:
        next_report = time.monotonic()
        while True:
            self._update()
            if time.monotonic() >= next_report and self._client is not None:
                next_report = time.monotonic() + self.report_period_s
                try:
                    await self._client.publish(self.report_topic, dump(self.report()), qos=0)
                except aiomqtt.MqttError as exc:
                    self.log.debug("gate_report_failed", error=str(exc))
            await asyncio.sleep(TICK_S)

    async def _mqtt_loop(self) -> None:
        while True:
            try:
                async with mqtt_client(
                    self.host,
                    self.port,
                    identifier=f"rackguard-gate-{self.gate_id}",
                    keepalive_s=self.keepalive_s,
                    username=self.username,
                    password=self.password,
                    ca_file=self.tls[0],
                    cert_file=self.tls[1],
                    key_file=self.tls[2],
                ) as client:
                    await client.subscribe(f"{self.node_topic}/status", qos=1)
                    await client.subscribe(f"{self.node_topic}/cap", qos=1)
                    self._client, self.mqtt_connected = client, True
                    self.log.info("gate_mqtt_connected", gate=self.gate_id, host=self.host, port=self.port)
                    async for msg in client.messages:
                        self._on_message(msg)
            except aiomqtt.MqttError as exc:
                if self.mqtt_connected:
                    self.log.warning("gate_mqtt_disconnected", gate=self.gate_id, error=str(exc))
            finally:
                self._client, self.mqtt_connected = None, False
            await asyncio.sleep(self.reconnect_s)

    def _on_message(self, msg: Any) -> None:
        payload = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload or "").encode()
        topic = str(msg.topic)
        if topic.endswith("/status"):
            self.handle_status(payload)
        elif topic.endswith("/cap"):
            expiry = getattr(msg.properties, "MessageExpiryInterval", None) if msg.properties else None
            self.handle_cap(payload, "mqtt", float(expiry) if expiry is not None else None)

    async def _http_loop(self) -> None:
        """Poll ``/v1/cap`` about once a second while MQTT is down."""
        assert self.http_url is not None
        url = self.http_url
        while True:
            if not self.mqtt_connected:
                try:
                    body = await asyncio.to_thread(http_get, url)
                except OSError as exc:
                    self.log.debug("gate_http_failed", gate=self.gate_id, error=str(exc))
                else:
                    self.handle_cap(body, "http")
            await asyncio.sleep(1.0)


def http_get(url: str) -> bytes:
    """GET a small body (the agent's ``/v1/cap``), blocking, with a 2 s time-out."""
    with urllib.request.urlopen(url, timeout=2.0) as r:
        body: bytes = r.read()
        return body

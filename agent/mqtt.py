"""The agent's MQTT 5 link: reconnects with backoff, keeps state topics fresh,
drains the outbox with QoS 1, and dispatches subscribed messages.

Two kinds of outgoing message:

* **state** (``set_state``): retained, latest value wins (status/birth, cap).
  Re-sent on every connect; never queued as history.
* **history** (``enqueue``): telemetry and alarms, kept in the outbox until the
  broker acknowledges them (PUBACK), then removed.

After a (re)connect, outbox messages created before that connection are
*historical*: they are replayed oldest first at ``replay_rate_msgs_s`` with their
original seq and timestamps, flagged ``historical: true`` in the JSON payload and
with the MQTT 5 user property ``historical=true``. Live messages (created during
this connection) go first in every publish window, so they never wait behind a
backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiomqtt
from paho.mqtt.client import topic_matches_sub as _paho_topic_matches
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from rackguard.agent import log as logmod
from rackguard.agent.config import Config, MqttConfig, NodeConfig
from rackguard.agent.outbox import MemoryOutbox, Outbox, OutMsg

Handler = Callable[[str, bytes], None]
RetainHandler = Callable[[str, bytes, bool], None]  # also told whether the broker delivered a retained copy
PUBLISH_WINDOW = 64  # QoS 1 messages in flight at once while draining


def no_local(qos: int = 1) -> SubscribeOptions:
    """MQTT 5 subscription options: the broker does not echo this client's own publishes."""
    return SubscribeOptions(qos=qos, noLocal=True)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether an MQTT topic matches a filter with ``+``/``#`` wildcards.

    This module is the one place paho is imported; everything else uses these names.
    """
    return bool(_paho_topic_matches(topic_filter, topic))


@dataclass(frozen=True, slots=True)
class Topics:
    """``<prefix>/<site>/<rack>/<node>/...``"""

    base: str

    @classmethod
    def for_node(cls, node: NodeConfig, prefix: str = "rackguard") -> Topics:
        return cls(f"{prefix}/{node.site}/{node.rack}/{node.name}")

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def alarm(self) -> str:
        return f"{self.base}/alarm"

    @property
    def cap(self) -> str:
        return f"{self.base}/cap"

    @property
    def cmd(self) -> str:
        return f"{self.base}/cmd"

    @property
    def cmd_ack(self) -> str:
        return f"{self.base}/cmd/ack"


class ClientLike(Protocol):
    """The part of ``aiomqtt.Client`` the link uses (the local demo bus has it too)."""

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: Any = ..., *, timeout: float
    ) -> None: ...
    async def subscribe(self, topic: str, qos: int = 0, options: Any = None) -> Any: ...
    @property
    def messages(self) -> AsyncIterator[Any]: ...


ClientFactory = Callable[[aiomqtt.Will | None], contextlib.AbstractAsyncContextManager[ClientLike]]


def aiomqtt_factory(cfg: MqttConfig, client_id: str) -> ClientFactory:
    """Build real aiomqtt clients (MQTT 5, TLS and credentials per config)."""

    def make(will: aiomqtt.Will | None) -> contextlib.AbstractAsyncContextManager[ClientLike]:
        tls = None
        if cfg.tls is not None:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(cfg.tls.ca_file),
                certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
            )
        password = cfg.password()
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=password.get_secret_value() if password else None,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            keepalive=cfg.keepalive_s,
            timeout=cfg.publish_timeout_s,
            tls_params=tls,
            # No Nagle delay: a cap sent right after a PUBACK would wait ~40 ms for the broker's
            # delayed ACK (the leak-to-cap path; BENCHMARKS.md "Agent overhead").
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )
        client.pending_calls_threshold = 2 * PUBLISH_WINDOW  # a full publish window is no warning
        return client

    return make


def _props(expiry_s: int | None, historical: bool = False) -> Properties | None:
    if expiry_s is None and not historical:
        return None
    props = Properties(PacketTypes.PUBLISH)
    if expiry_s is not None:
        props.MessageExpiryInterval = max(1, int(expiry_s))
    if historical:
        props.UserProperty = ("historical", "true")
    return props


def mark_historical(payload: bytes) -> bytes:
    """Set ``historical: true`` in a JSON object payload that has that key; others unchanged."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(obj, dict) or "historical" not in obj:
        return payload
    obj["historical"] = True
    return json.dumps(obj, separators=(",", ":")).encode()


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self._t = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._t) * self.rate_per_s)
        self._t = now

    def take(self, most: int) -> int:
        """Take up to ``most`` whole tokens; return how many were taken."""
        self._refill()
        n = max(0, min(most, int(self.tokens)))
        self.tokens -= n
        return n

    def wait_s(self) -> float:
        """Seconds until one whole token is available."""
        self._refill()
        return max(0.0, (1.0 - self.tokens) / self.rate_per_s)


class MqttLink:
    """One supervised MQTT connection for the agent."""

    def __init__(
        self,
        cfg: MqttConfig,
        topics: Topics,
        *,
        client_factory: ClientFactory,
        offline_payload: Callable[[str], bytes],
        on_connect: Callable[[], None] | None = None,
        outbox: Outbox | None = None,
        replay_rate_msgs_s: float = 50.0,
    ) -> None:
        self.cfg = cfg
        self.topics = topics
        self.factory = client_factory
        self.offline_payload = offline_payload
        self.on_connect = on_connect
        self.outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self.connected = False
        self.connects = 0
        self.published_total = 0
        self.published_bytes = 0
        self.replayed_total = 0  # historical messages acknowledged
        self.replay = TokenBucket(replay_rate_msgs_s, burst=min(PUBLISH_WINDOW, max(1.0, replay_rate_msgs_s)))
        self._live_from_id = 0  # outbox ids <= this were created before the current connection
        self._states: dict[str, OutMsg] = {}
        self._dirty: dict[str, None] = {}
        self._handlers: list[tuple[str, Handler]] = []
        self._retain_handlers: list[tuple[str, RetainHandler]] = []
        self._wake = asyncio.Event()
        self.log = logmod.get("mqtt")

    # -- API for the rest of the agent ---------------------------------------------------
    def reconfigure(self, cfg: Config) -> None:
        """Reloaded outbox bound and replay rate (the broker connection needs a restart)."""
        self.outbox.max_messages = cfg.outbox.max_messages
        self.replay.rate_per_s = cfg.outbox.replay_rate_msgs_s

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Register a handler; (re)subscribed on every connect. Handlers must not block."""
        self._handlers.append((topic_filter, handler))

    def subscribe_retained(self, topic_filter: str, handler: RetainHandler) -> None:
        """As :meth:`subscribe`; the handler also gets whether the message is a retained copy (old news)."""
        self._retain_handlers.append((topic_filter, handler))

    def set_state(self, topic: str, payload: bytes, *, expiry_s: int | None = None) -> None:
        """Publish a retained latest-value message now (or on the next connect)."""
        self._states[topic] = OutMsg(topic, payload, qos=1, retain=True, expiry_s=expiry_s)
        self._dirty[topic] = None
        self._wake.set()

    def enqueue(self, msg: OutMsg) -> None:
        """Queue a history message (telemetry, alarm) until the broker acknowledges it."""
        self.outbox.put(msg)
        self._wake.set()

    # -- the connection loop -----------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop`` is set; then publish ``offline``, flush, disconnect."""
        delay = self.cfg.reconnect_min_s
        last_error: str | None = None
        will = aiomqtt.Will(self.topics.status, self.offline_payload("connection lost"), qos=1, retain=True)
        while True:
            try:
                async with self.factory(will) as client:
                    self.connected = True
                    self.connects += 1
                    delay = self.cfg.reconnect_min_s
                    self.log.info(
                        "mqtt_connected", host=self.cfg.host, port=self.cfg.port, connects=self.connects
                    )
                    last_error = None
                    self._live_from_id = self.outbox.last_id()
                    if self.on_connect:
                        self.on_connect()
                    self._dirty.update(dict.fromkeys(self._states))
                    for topic_filter in dict.fromkeys(
                        f for f, _ in [*self._handlers, *self._retain_handlers]
                    ):
                        await client.subscribe(topic_filter, qos=1)
                    await self._serve(client, stop)
                    # Graceful shutdown: say goodbye explicitly (the will is only for crashes).
                    await client.publish(
                        self.topics.status,
                        self.offline_payload("shutdown"),
                        qos=1,
                        retain=True,
                        timeout=min(2.0, self.cfg.publish_timeout_s),
                    )
                    self.connected = False
                    self.log.info("mqtt_offline_published")
                    return
            except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
                self.connected = False
                err = f"{type(exc).__name__}: {exc}"
                if err != last_error:
                    self.log.warning("mqtt_disconnected", error=err, retry_in_s=round(delay, 2))
                    last_error = err
            if stop.is_set():
                self.log.warning("mqtt_stopped_while_disconnected", queued=len(self.outbox))
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay * random.uniform(0.8, 1.2))
            delay = min(self.cfg.reconnect_max_s, delay * 2)

    async def _serve(self, client: ClientLike, stop: asyncio.Event) -> None:
        recv = asyncio.create_task(self._receive(client))
        stopping = asyncio.create_task(stop.wait())
        try:
            while True:
                self._wake.clear()
                replay_in_s = await self._flush(client)
                if stop.is_set():
                    return
                if self._dirty:
                    continue
                waker = asyncio.create_task(self._wake.wait())
                await asyncio.wait(
                    {waker, recv, stopping}, timeout=replay_in_s, return_when=asyncio.FIRST_COMPLETED
                )
                waker.cancel()
                if recv.done():
                    recv.result()  # re-raise the disconnect
                    raise aiomqtt.MqttError("message loop ended")
        finally:
            recv.cancel()
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await recv

    async def _publish(self, client: ClientLike, m: OutMsg, historical: bool = False) -> None:
        await client.publish(
            m.topic,
            mark_historical(m.payload) if historical else m.payload,
            qos=m.qos,
            retain=m.retain,
            properties=_props(m.expiry_s, historical),
            timeout=self.cfg.publish_timeout_s,
        )
        self.published_total += 1
        self.published_bytes += len(m.payload) + len(m.topic)

    async def _flush(self, client: ClientLike) -> float | None:
        """Publish dirty state, then the outbox; return seconds until more history may go (None: idle)."""
        while self._dirty:
            topic = next(iter(self._dirty))
            msg = self._states[topic]
            await self._publish(client, msg)
            if self._states[topic] is msg:  # unchanged while in flight
                self._dirty.pop(topic, None)
        while True:
            # Live messages first, then as much history as the replay rate allows.
            live = self.outbox.peek(PUBLISH_WINDOW, after_id=self._live_from_id)
            room = PUBLISH_WINDOW - len(live)
            history = self.outbox.peek(room, upto_id=self._live_from_id) if room else []
            if history:
                history = history[: self.replay.take(len(history))]
            batch = [(i, m, False) for i, m in live] + [(i, m, True) for i, m in history]
            if not batch:
                more = bool(self.outbox.peek(1, upto_id=self._live_from_id))
                return self.replay.wait_s() if more else None
            results = await asyncio.gather(
                *(self._publish(client, m, hist) for _, m, hist in batch), return_exceptions=True
            )
            acked = [i for (i, _, _), r in zip(batch, results, strict=True) if r is None]
            self.outbox.ack(acked)
            self.replayed_total += sum(
                1 for (_, _, h), r in zip(batch, results, strict=True) if h and r is None
            )
            failed = next((r for r in results if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed
            if self._dirty:
                return 0.0  # state (e.g. a new cap) jumps ahead of history

    async def _receive(self, client: ClientLike) -> None:
        async for message in client.messages:
            topic = str(message.topic)
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            for topic_filter, handler in self._handlers:
                if topic_matches(topic_filter, topic):
                    try:
                        handler(topic, payload)
                    except Exception:
                        self.log.exception("mqtt_handler_failed", topic=topic)
            retained = bool(getattr(message, "retain", False))
            for topic_filter, rhandler in self._retain_handlers:
                if topic_matches(topic_filter, topic):
                    try:
                        rhandler(topic, payload, retained)
                    except Exception:
                        self.log.exception("mqtt_handler_failed", topic=topic)

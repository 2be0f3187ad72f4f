"""The agent's MQTT 5 link: reconnects with backoff, keeps state topics fresh,
drains the outbox with QoS 1, and dispatches subscribed messages.

Two kinds of outgoing message:

* **state** (``set_state``): retained, latest value wins (status/birth, cap, alarm/<sensor>).
  Re-sent on every connect; never queued as history.
* **history** (``enqueue``): telemetry and command acks, kept in the outbox until the
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
import functools
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiomqtt
from paho.mqtt.client import MQTT_ERR_AGAIN
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from rackguard.agent import log as logmod
from rackguard.agent.config import Config, MqttConfig, NodeConfig
from rackguard.agent.inbox import OTHER, Inbox
from rackguard.agent.outbox import MemoryOutbox, Outbox, OutMsg

Handler = Callable[[str, bytes], None]
Lane = int | Callable[[str], int]  # a fixed inbox lane, or one per topic
RetainHandler = Callable[[str, bytes, bool], None]  # also told whether the broker delivered a retained copy
PUBLISH_WINDOW = 64  # QoS 1 messages in flight at once while draining
MAX_PACKET_BYTES = 65_536  # MQTT 5 Maximum Packet Size: the broker drops larger messages to us
DISPATCH_BATCH = 8  # handled messages between yields to the socket reader
READ_BURST = 8  # packets parsed per loop turn: short turns, so the safety connection is read between them
RECV_BYTES = 65536  # bytes read from the socket at once (see _Client._on_socket_open)
STABLE_CONNECTION_S = 10.0  # a connection that lasted this long resets the reconnect backoff


class PublishRefused(aiomqtt.MqttError):
    """The broker answered a QoS 1 publish with a failure reason code (e.g. 0x87 not authorized)."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"broker refused publish to {topic}: {reason}")
        self.topic = topic
        self.reason = reason


def no_local(qos: int = 1) -> SubscribeOptions:
    """MQTT 5 subscription options: the broker does not echo this client's own publishes."""
    return SubscribeOptions(qos=qos, noLocal=True)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether an MQTT topic matches a filter with ``+``/``#`` wildcards.

    Split and compared level by level (paho's ``topic_matches_sub`` builds a matcher tree on
    every call: under a storm it was a quarter of the agent's time). Cached: the filters are
    few and fixed, the topics seen are bounded by what the broker lets through.
    """
    if len(topic) > 256:  # the cache holds short topics only: at most 16,384 × 256 characters
        return _matches.__wrapped__(topic_filter, topic)
    return _matches(topic_filter, topic)


@functools.lru_cache(maxsize=16384)
def _matches(topic_filter: str, topic: str) -> bool:
    f, t = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return not (i == 0 and topic.startswith("$"))
        if i >= len(t):
            return False
        if level == "+":
            if i == 0 and t[0].startswith("$"):
                return False
            continue
        if level != t[i]:
            return False
    return len(f) == len(t)


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
        """The prefix of the per-sensor alarm topics (``alarm/<sensor>``)."""
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


class _BufferedRecv:
    """paho's ``_sock_recv`` behind a read buffer: one ``recv`` of RECV_BYTES feeds many packets."""

    __slots__ = ("_data", "_pos", "_raw")

    def __init__(self, raw: Callable[[int], bytes]) -> None:
        self._raw = raw
        self._data = b""
        self._pos = 0

    def pending(self) -> bool:
        return self._pos < len(self._data)

    def __call__(self, bufsize: int) -> bytes:
        if self._pos >= len(self._data):
            data = self._raw(RECV_BYTES)  # BlockingIOError / OSError pass through to paho
            if not data:
                return data  # EOF: paho sees the connection lost
            self._data, self._pos = data, 0
        out = self._data[self._pos : self._pos + bufsize]
        self._pos += len(out)
        return out


class _Client(aiomqtt.Client):
    """aiomqtt's client, but a PUBACK with a failure reason code raises :class:`PublishRefused`.

    aiomqtt 2 ignores the reason code, so a publish the broker's ACL denies would count
    as delivered and leave the outbox.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused: dict[int, str] = {}
        # Set: each message goes to this (topic, payload, retained) inside the socket's read
        # callback, not through aiomqtt's unbounded queue, whose iterator takes a task and
        # several loop turns a message: under a storm that queue grew and the loop lagged by 1 s.
        self.direct: Callable[[str, bytes, bool], None] | None = None

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if self.direct is None:
            super()._on_message(client, userdata, message)
            return
        payload = message.payload if isinstance(message.payload, bytes) else bytes(message.payload)
        self.direct(message.topic, payload, bool(message.retain))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            self._refused[mid] = str(reason_code)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        """As aiomqtt's, but the socket is read in 64 KiB gulps and parsed READ_BURST packets a turn.

        paho reads each packet with three or more ``recv`` calls of a few bytes. Here one
        ``recv`` feeds many packets; a turn ends after READ_BURST of them and the rest are
        parsed on the next turn (``call_soon``: buffered bytes wake no reader), so the safety
        connection is read between turns. With messages handed straight to the inbox
        (``direct``) and our own topic matcher, the event loop's lag under a 25,000 msg/s storm
        went from 0.3–1.1 s to 10–20 ms (bench/leak_storm.py).
        """
        recv = _BufferedRecv(type(client)._sock_recv.__get__(client))
        client._sock_recv = recv  # paho reads its socket only through this
        resume_due = False  # a call_soon for buffered bytes is pending (one at most)

        def read() -> None:
            nonlocal resume_due
            try:
                for _ in range(READ_BURST):
                    rc = client._packet_read()
                    if rc == MQTT_ERR_AGAIN:
                        break
                    if rc > 0:
                        client._loop_rc_handle(rc)
                        return
                sock_now = client._sock
                if sock_now is None or resume_due:
                    return
                # Bytes in our buffer, or decrypted TLS records in the SSL object, wake no reader.
                if recv.pending() or (hasattr(sock_now, "pending") and sock_now.pending()):
                    resume_due = True
                    self._loop.call_soon(resume)
            except Exception as exc:
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def resume() -> None:
            nonlocal resume_due
            resume_due = False
            if client._sock is not None:
                read()

        def create_misc_task() -> None:
            self._misc_task = self._loop.create_task(self._misc_loop())

        self._loop.call_soon_threadsafe(self._loop.add_reader, sock.fileno(), read)
        self._loop.call_soon_threadsafe(create_misc_task)

    async def publish(  # type: ignore[override]
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        info = self._client.publish(topic, payload, qos, retain, properties)
        if info.rc != 0:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if not info.is_published():
            confirmation = asyncio.Event()
            with self._pending_call(info.mid, confirmation, self._pending_publishes):
                await self._wait_for(confirmation.wait(), timeout=timeout)
        reason = self._refused.pop(info.mid, None)
        if reason is not None:
            raise PublishRefused(topic, reason)


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
        connect_props = Properties(PacketTypes.CONNECT)
        connect_props.MaximumPacketSize = MAX_PACKET_BYTES
        client = _Client(
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
            properties=connect_props,
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
        priority_factory: ClientFactory | None = None,
    ) -> None:
        self.cfg = cfg
        self.topics = topics
        self.factory = client_factory
        self.priority_factory = priority_factory or client_factory
        self._priority_topics: dict[str, None] = {}
        self.priority_connected = False
        self._main_client: ClientLike | None = None
        self._priority_client: ClientLike | None = None
        self._state_inflight: dict[str, tuple[asyncio.Task[None], ClientLike]] = {}
        self.offline_payload = offline_payload
        self.on_connect = on_connect
        self.outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self.connected = False
        self.subscribed = False  # connected and every subscription acknowledged
        self.connects = 0
        self.published_total = 0
        self.published_bytes = 0
        self.replayed_total = 0  # historical messages acknowledged
        self.replay = TokenBucket(replay_rate_msgs_s, burst=min(PUBLISH_WINDOW, max(1.0, replay_rate_msgs_s)))
        self._live_from_id = 0  # outbox ids <= this were created before the current connection
        self._states: dict[str, OutMsg] = {}
        self._dirty: dict[str, None] = {}
        self._handlers: list[tuple[str, Handler, Lane]] = []
        self._retain_handlers: list[tuple[str, RetainHandler, Lane]] = []
        self._wake = asyncio.Event()  # the outbox has something new
        self._state_wake = asyncio.Event()  # a state topic changed
        self.inbox = Inbox()
        # Publishes the broker refused (ACL): per state topic, and for the outbox as a whole,
        # (retry at monotonic s, current backoff s). Nothing refused is taken as delivered.
        self._state_refused: dict[str, tuple[float, float]] = {}
        self._outbox_refused: tuple[float, float] | None = None
        self.refused_total = 0
        self.last_refusal: tuple[float, str] | None = None  # (monotonic s, what)
        self.log = logmod.get("mqtt")
        self._rl = logmod.RateLimitedLog(self.log, 60.0)

    # -- API for the rest of the agent ---------------------------------------------------
    def reconfigure(self, cfg: Config) -> None:
        """Reloaded outbox bound and replay rate (the broker connection needs a restart)."""
        self.outbox.max_messages = cfg.outbox.max_messages
        self.replay.rate_per_s = cfg.outbox.replay_rate_msgs_s

    def subscribe(self, topic_filter: str, handler: Handler, lane: Lane = OTHER) -> None:
        """Register a handler; (re)subscribed on every connect. Handlers must not block.

        ``lane`` is the inbox lane (:mod:`rackguard.agent.inbox`) of the messages, or a
        function of the topic that gives it: lower lanes are handled first.
        """
        self._handlers.append((topic_filter, handler, lane))

    def subscribe_priority(self, topic: str) -> None:
        """Also receive ``topic`` (exact, no wildcards) on a dedicated safety connection.

        A leak detector's message must not wait behind a storm on the main connection:
        one TCP stream delivers in order, so the only way past a backlog is another
        stream. While the safety connection is up, copies of these topics that arrive
        on the main one are skipped. Messages go to the handlers that
        :meth:`subscribe` registered for the topic, in the leak lane.
        """
        self._priority_topics[topic] = None

    def refusing(self, within_s: float = 60.0) -> str | None:
        """What the broker refused within the last ``within_s``, or None."""
        if self.last_refusal is None or time.monotonic() - self.last_refusal[0] > within_s:
            return None
        return self.last_refusal[1]

    def subscribe_retained(self, topic_filter: str, handler: RetainHandler, lane: Lane = OTHER) -> None:
        """As :meth:`subscribe`; the handler also gets whether the message is a retained copy (old news)."""
        self._retain_handlers.append((topic_filter, handler, lane))

    def set_state(self, topic: str, payload: bytes, *, expiry_s: int | None = None) -> None:
        """Publish a retained latest-value message now (or on the next connect)."""
        self._states[topic] = OutMsg(topic, payload, qos=1, retain=True, expiry_s=expiry_s)
        self._dirty[topic] = None
        self._start_state_publish(topic)  # now, not a loop turn later (a leak's cap)
        self._state_wake.set()

    def enqueue(self, msg: OutMsg) -> None:
        """Queue a history message (telemetry, command ack) until the broker acknowledges it."""
        self.outbox.put(msg)
        self._wake.set()

    # -- the connection loop -----------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop`` is set; then publish ``offline``, flush, disconnect."""
        priority = asyncio.create_task(self._run_priority(stop)) if self._priority_topics else None
        states = asyncio.create_task(self._state_loop())
        try:
            await self._run_main(stop)
        finally:
            states.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await states
            if priority is not None:
                priority.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await priority

    async def _run_priority(self, stop: asyncio.Event) -> None:
        """The safety connection: subscribe the priority topics, feed the leak lane; reconnect."""
        delay = self.cfg.reconnect_min_s
        while not stop.is_set():
            try:
                async with self.priority_factory(None) as client:
                    for topic in self._priority_topics:
                        await client.subscribe(topic, qos=1)
                    self.priority_connected = True
                    self._priority_client = client
                    self._state_wake.set()  # state goes out on this connection from now on
                    delay = self.cfg.reconnect_min_s
                    self.log.info("mqtt_safety_link_connected", topics=len(self._priority_topics))
                    # Nothing goes before a leak: handle it as soon as it is read, not loop turns later.
                    if isinstance(client, _Client):
                        client.direct = self._handle
                    async for message in client.messages:  # (only a client without ``direct``)
                        payload = message.payload
                        if not isinstance(payload, bytes):
                            payload = str(payload).encode()
                        self._handle(str(message.topic), payload)
            except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
                self._rl.warning("mqtt_safety_link_down", type(exc).__name__, error=str(exc)[:200])
            finally:
                self.priority_connected = False
                if self._priority_client is not None:
                    self._client_gone(self._priority_client)
                self._priority_client = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay * random.uniform(0.8, 1.2))
            delay = min(self.cfg.reconnect_max_s, delay * 2)

    async def _run_main(self, stop: asyncio.Event) -> None:
        delay = self.cfg.reconnect_min_s
        last_error: str | None = None
        will = aiomqtt.Will(self.topics.status, self.offline_payload("connection lost"), qos=1, retain=True)
        while True:
            connected_at: float | None = None
            try:
                async with self.factory(will) as client:
                    self.connected = True
                    self.connects += 1
                    connected_at = time.monotonic()
                    self.log.info(
                        "mqtt_connected", host=self.cfg.host, port=self.cfg.port, connects=self.connects
                    )
                    last_error = None
                    self._live_from_id = self.outbox.last_id()
                    if self.on_connect:
                        self.on_connect()
                    self._dirty.update(dict.fromkeys(self._states))
                    self._state_refused.clear()
                    self._outbox_refused = None
                    for topic_filter in dict.fromkeys(
                        f for f, _, _ in [*self._handlers, *self._retain_handlers]
                    ):
                        await client.subscribe(topic_filter, qos=1)
                    self.subscribed = True  # every filter acknowledged: messages published now arrive
                    await self._serve(client, stop)
                    # Graceful shutdown: say goodbye explicitly (the will is only for crashes).
                    await client.publish(
                        self.topics.status,
                        self.offline_payload("shutdown"),
                        qos=1,
                        retain=True,
                        timeout=min(2.0, self.cfg.publish_timeout_s),
                    )
                    self.connected = self.subscribed = False
                    self.log.info("mqtt_offline_published")
                    return
            except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
                self.connected = self.subscribed = False
                # Only a connection that lasted resets the backoff: a broker that accepts and
                # then drops us at once (an ACL refusing our will or status) is not hammered.
                if connected_at is not None and time.monotonic() - connected_at >= STABLE_CONNECTION_S:
                    delay = self.cfg.reconnect_min_s
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
        dispatch = asyncio.create_task(self._dispatch())
        stopping = asyncio.create_task(stop.wait())
        self._main_client = client
        self._state_wake.set()
        try:
            while True:
                self._wake.clear()
                replay_in_s = await self._flush_outbox(client)
                if stop.is_set():
                    await self._publish_dirty(client)
                    return
                waker = asyncio.create_task(self._wake.wait())
                await asyncio.wait(
                    {waker, recv, stopping}, timeout=replay_in_s, return_when=asyncio.FIRST_COMPLETED
                )
                waker.cancel()
                if recv.done():
                    recv.result()  # re-raise the disconnect
                    raise aiomqtt.MqttError("message loop ended")
        finally:
            self._main_client = None
            self._client_gone(client)
            for task in (recv, dispatch, stopping):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await recv
            with contextlib.suppress(asyncio.CancelledError):
                await dispatch

    def _start_state_publish(self, topic: str) -> bool:
        """Start publishing a dirty state topic unless one is in flight, refused or unconnected."""
        client = self._priority_client or self._main_client
        if client is None or topic in self._state_inflight:
            return False
        refused = self._state_refused.get(topic)
        if refused is not None and time.monotonic() < refused[0]:
            return False
        task = asyncio.create_task(self._publish_state(client, topic))
        self._state_inflight[topic] = (task, client)
        task.add_done_callback(functools.partial(self._state_done, topic))
        return True

    def _state_done(self, topic: str, task: asyncio.Task[None]) -> None:
        if self._state_inflight.get(topic, (None,))[0] is task:
            del self._state_inflight[topic]
        self._state_wake.set()

    def _client_gone(self, client: ClientLike) -> None:
        """A connection ended: its state publishes will never complete; send them again elsewhere."""
        for topic, (task, used) in list(self._state_inflight.items()):
            if used is client:
                task.cancel()
                del self._state_inflight[topic]
        self._state_wake.set()

    async def _state_loop(self) -> None:
        """Publish each changed state topic at once, never behind the outbox's acknowledgements.

        State (the cap, status, alarms) goes out on the safety connection while it is up: its
        PUBACKs do not queue behind a storm of incoming messages the way the main
        connection's do (paho holds a QoS 1 publish back once 20 await their PUBACK), so
        a leak's cap is not held up by a storm either. Otherwise it goes out on the main
        connection. One publish per topic is in flight at a time; a value set meanwhile goes
        next. A refused one is retried with backoff; one lost with its connection stays
        dirty and is sent again on the next connection.
        """
        try:
            while True:
                self._state_wake.clear()
                for topic in list(self._dirty):
                    self._start_state_publish(topic)
                now = time.monotonic()
                retry = [
                    r[0] - now for t, r in self._state_refused.items() if t in self._dirty and r[0] > now
                ]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._state_wake.wait(), timeout=min(retry) if retry else None)
        finally:
            for task, _ in self._state_inflight.values():
                task.cancel()
            self._state_inflight.clear()

    async def _publish_state(self, client: ClientLike, topic: str) -> None:
        msg = self._states[topic]
        try:
            await self._publish(client, msg)
        except PublishRefused as exc:
            self._state_refused[topic] = self._refused(exc, self._state_refused.get(topic))
            return
        except (aiomqtt.MqttError, OSError, TimeoutError):
            return  # the connection is failing: the receive loop notices; resent on reconnect
        self._state_refused.pop(topic, None)
        if self._states[topic] is msg:  # unchanged while in flight
            self._dirty.pop(topic, None)

    async def _publish_dirty(self, client: ClientLike) -> None:
        """Send every dirty state once more (at shutdown, before ``offline``)."""
        for topic in list(self._dirty):
            with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):
                await asyncio.wait_for(self._publish(client, self._states[topic]), 1.0)

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

    def _refused(self, exc: PublishRefused, backoff: tuple[float, float] | None) -> tuple[float, float]:
        """Count and log a refusal; return the next (retry at, backoff) for what was refused."""
        self.refused_total += 1
        self.last_refusal = (time.monotonic(), str(exc))
        delay = min(self.cfg.reconnect_max_s, 2 * backoff[1]) if backoff else self.cfg.reconnect_min_s
        self._rl.warning("mqtt_publish_refused", exc.reason, topic=exc.topic, retry_in_s=delay)
        return time.monotonic() + delay, delay

    async def _flush_outbox(self, client: ClientLike) -> float | None:
        if self._outbox_refused is not None and time.monotonic() < self._outbox_refused[0]:
            return self._outbox_refused[0] - time.monotonic()
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
            refused = next((r for r in results if isinstance(r, PublishRefused)), None)
            failed = next(
                (r for r in results if isinstance(r, BaseException) and not isinstance(r, PublishRefused)),
                None,
            )
            if failed is not None:
                raise failed
            if refused is not None:
                # Refused messages stay queued; retry later (the rest of the batch went out).
                self._outbox_refused = self._refused(refused, self._outbox_refused)
                return self._outbox_refused[1]
            self._outbox_refused = None

    def _lane(self, topic: str) -> int:
        lane = OTHER
        for topic_filter, _, how in [*self._handlers, *self._retain_handlers]:
            if topic_matches(topic_filter, topic):
                lane = min(lane, how(topic) if callable(how) else how)
        return lane

    def _to_inbox(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic in self._priority_topics and self.priority_connected:
            return  # the safety connection delivers it
        self.inbox.put(self._lane(topic), topic, payload, retained)

    async def _receive(self, client: ClientLike) -> None:
        """Move every message from the client into the (bounded) inbox as soon as it is read."""
        if isinstance(client, _Client):
            client.direct = self._to_inbox  # straight from the read callback
        async for message in client.messages:  # (only a client without ``direct``; else: until it drops)
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            self._to_inbox(str(message.topic), payload, bool(getattr(message, "retain", False)))

    async def _dispatch(self) -> None:
        """Hand inbox messages to their handlers, by lane, yielding to the reader often."""
        inbox = self.inbox
        while True:
            await inbox.wait()
            for _ in range(DISPATCH_BATCH):
                item = inbox.get_nowait()
                if item is None:
                    break
                _, topic, payload, retained = item
                self._handle(topic, payload, retained)
            await asyncio.sleep(0)

    def _handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        for topic_filter, handler, _ in self._handlers:
            if topic_matches(topic_filter, topic):
                try:
                    handler(topic, payload)
                except Exception:
                    self._rl.exception("mqtt_handler_failed", topic_filter, topic=topic[:200])
        for topic_filter, rhandler, _ in self._retain_handlers:
            if topic_matches(topic_filter, topic):
                try:
                    rhandler(topic, payload, retained)
                except Exception:
                    self._rl.exception("mqtt_handler_failed", topic_filter, topic=topic[:200])

"""An in-process MQTT-like broker for the no-broker demo.

It speaks the small part of ``aiomqtt.Client`` that ``MqttLink`` uses, so the
demo runs the agent's real code path with only the transport swapped: topic
filters, retained messages and a last will on abnormal disconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiomqtt

from rackguard.agent.mqtt import topic_matches


@dataclass(frozen=True, slots=True)
class LocalMessage:
    topic: str
    payload: bytes
    retain: bool = False


class LocalBroker:
    """Routes messages between ``LocalClient`` sessions in one event loop."""

    def __init__(self) -> None:
        self.retained: dict[str, bytes] = {}
        self.sessions: list[LocalClient] = []

    def client(self, will: aiomqtt.Will | None = None) -> LocalClient:
        return LocalClient(self, will)

    def route(self, topic: str, payload: bytes, retain: bool, sender: LocalClient | None = None) -> None:
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        for s in self.sessions:
            if any(topic_matches(f, topic) and not (s is sender and local) for f, local in s.filters):
                s.queue.put_nowait(LocalMessage(topic, payload))


class LocalClient:
    """One session on a LocalBroker."""

    def __init__(self, broker: LocalBroker, will: aiomqtt.Will | None) -> None:
        self.broker = broker
        self.will = will
        self.filters: list[tuple[str, bool]] = []  # (filter, no_local)
        self.queue: asyncio.Queue[LocalMessage] = asyncio.Queue()

    async def __aenter__(self) -> LocalClient:
        self.broker.sessions.append(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.broker.sessions.remove(self)
        if exc_type is not None and self.will is not None:
            payload = (
                self.will.payload if isinstance(self.will.payload, bytes) else str(self.will.payload).encode()
            )
            self.broker.route(self.will.topic, payload, bool(self.will.retain))

    async def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, properties: Any = None, **_: Any
    ) -> None:
        self.broker.route(topic, bytes(payload), retain, sender=self)

    async def subscribe(self, topic: str, qos: int = 0, options: Any = None) -> None:
        self.filters.append((topic, bool(getattr(options, "noLocal", False))))
        for t, p in self.broker.retained.items():
            if topic_matches(topic, t):
                self.queue.put_nowait(LocalMessage(t, p, retain=True))

    @property
    def messages(self) -> AsyncIterator[LocalMessage]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[LocalMessage]:
        while True:
            yield await self.queue.get()

"""Incoming MQTT messages in priority lanes, so that a leak never waits behind garbage.

The broker delivers everything on one connection, in one order. The link moves each
message from the client into an :class:`Inbox` as soon as it is read (cheap), and
handlers take them out lane by lane: every message of lane 0 (leak detectors) is
handled before any of lane 1 (the other declared sensors, commands), and lane 1 before
lane 2 (everything else: gate reports, undeclared topics). Within a lane, topics take
turns (round robin), so a storm on one topic cannot starve another, and each topic
keeps at most ``per_topic`` messages: a new one pushes out that topic's oldest, and the
drop is counted. A lane also has a bound over all its topics.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque

LEAK, SENSOR, OTHER = 0, 1, 2
LANE_NAMES = ("leak", "sensor", "other")


class _Lane:
    __slots__ = ("dropped_total", "max_total", "per_topic", "size", "topics")

    def __init__(self, per_topic: int, max_total: int) -> None:
        self.per_topic = per_topic
        self.max_total = max_total
        self.topics: OrderedDict[str, deque[tuple[bytes, bool]]] = OrderedDict()
        self.size = 0
        self.dropped_total = 0

    def put(self, topic: str, payload: bytes, retained: bool) -> None:
        q = self.topics.get(topic)
        if q is None:
            q = self.topics[topic] = deque()
        q.append((payload, retained))
        self.size += 1
        if len(q) > self.per_topic:
            q.popleft()
            self.size -= 1
            self.dropped_total += 1
        while self.size > self.max_total:
            # Too many topics at once: the topic next in turn loses its oldest message.
            victim_topic, victim = next(iter(self.topics.items()))
            victim.popleft()
            self.size -= 1
            self.dropped_total += 1
            if not victim:
                del self.topics[victim_topic]

    def get(self) -> tuple[str, bytes, bool]:
        topic, q = next(iter(self.topics.items()))
        payload, retained = q.popleft()
        self.size -= 1
        if q:
            self.topics.move_to_end(topic)
        else:
            del self.topics[topic]
        return topic, payload, retained


class Inbox:
    """Bounded, prioritised incoming messages.

    Args:
        per_topic: Messages kept per topic in lanes 1 and 2 (lane 0 keeps 4× as many).
        max_per_lane: Messages kept per lane over all its topics.
    """

    def __init__(self, per_topic: int = 64, max_per_lane: int = 4096) -> None:
        self.lanes = (
            _Lane(4 * per_topic, max_per_lane),
            _Lane(per_topic, max_per_lane),
            _Lane(per_topic, max_per_lane),
        )
        self.received_total = 0
        self._ready = asyncio.Event()

    def put(self, lane: int, topic: str, payload: bytes, retained: bool = False) -> None:
        """Queue a message (``retained``: the broker's stored copy); never blocks (the oldest of its topic goes when full)."""
        self.lanes[min(max(lane, 0), len(self.lanes) - 1)].put(topic, payload, retained)
        self.received_total += 1
        self._ready.set()

    def get_nowait(self) -> tuple[int, str, bytes, bool] | None:
        """The next message by lane priority (lane, topic, payload, retained), or None when empty."""
        for i, lane in enumerate(self.lanes):
            if lane.size:
                topic, payload, retained = lane.get()
                return i, topic, payload, retained
        self._ready.clear()
        return None

    async def wait(self) -> None:
        """Until a message may be available."""
        await self._ready.wait()

    def __len__(self) -> int:
        return sum(lane.size for lane in self.lanes)

    @property
    def dropped_total(self) -> dict[str, int]:
        """Messages pushed out, per lane name."""
        return {name: lane.dropped_total for name, lane in zip(LANE_NAMES, self.lanes, strict=True)}

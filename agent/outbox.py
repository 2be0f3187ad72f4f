"""The queue of messages waiting for the broker's acknowledgement.

``MemoryOutbox`` is bounded: when full it drops the oldest telemetry first and
never an alarm, and counts every drop. Messages leave only when acknowledged.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, Protocol

Kind = Literal["telemetry", "alarm"]


@dataclass(frozen=True, slots=True)
class OutMsg:
    topic: str
    payload: bytes
    kind: Kind = "telemetry"
    qos: int = 1
    retain: bool = False
    expiry_s: int | None = None


class Outbox(Protocol):
    dropped_total: int

    def put(self, msg: OutMsg) -> None: ...
    def peek(self, limit: int) -> list[tuple[int, OutMsg]]: ...
    def ack(self, ids: list[int]) -> None: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...


class MemoryOutbox:
    """In-memory, bounded, ordered outbox."""

    def __init__(self, max_messages: int = 10_000) -> None:
        self.max_messages = max_messages
        self.dropped_total = 0
        self._ids = itertools.count(1)
        self._q: OrderedDict[int, OutMsg] = OrderedDict()

    def put(self, msg: OutMsg) -> None:
        self._q[next(self._ids)] = msg
        while len(self._q) > self.max_messages:
            victim = next((i for i, m in self._q.items() if m.kind == "telemetry"), None)
            if victim is None:
                break  # only alarms left: alarms are never dropped
            del self._q[victim]
            self.dropped_total += 1

    def peek(self, limit: int) -> list[tuple[int, OutMsg]]:
        return list(itertools.islice(self._q.items(), limit))

    def ack(self, ids: list[int]) -> None:
        for i in ids:
            self._q.pop(i, None)

    def __len__(self) -> int:
        return len(self._q)

    def close(self) -> None:
        pass

"""Admission to one upstream: a queue ordered by class priority, then arrival, under a limit.

The limit is the sum of the upstream's GPUs' caps (:class:`rackguard.agent.gate.CapRules`).
A slot is taken on the waiter's behalf when it is woken, so a woken request never has
to race for it. When the limit drops nothing in flight is cancelled: no request is
admitted until in flight is under the new limit (draining).

A class's ``reserved_share`` keeps ``floor(share × limit)`` slots for that class alone:
another class is admitted only while the slots left over cover every other class's
unused reservation.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from dataclasses import dataclass, field

from rackguard.agent.config import GatewayClass


@dataclass(eq=False, slots=True)
class _Waiter:
    seq: int
    fut: asyncio.Future[None] = field(repr=False)


class Admission:
    """A priority queue of requests in front of one upstream.

    Args:
        classes: The workload classes (their index is the class id used below).
        limit: The initial limit (the upstream's safe cap).
    """

    def __init__(self, classes: list[GatewayClass], limit: int) -> None:
        self.priority = [c.priority for c in classes]
        self.share = [c.reserved_share or 0.0 for c in classes]
        # Class ids from the highest priority down (a stable sort keeps config order among equals).
        self.order = sorted(range(len(classes)), key=lambda i: -self.priority[i])
        self.limit = limit
        self.in_flight = 0
        self.in_flight_by_class = [0] * len(classes)
        self.queues: list[deque[_Waiter]] = [deque() for _ in classes]
        self.waiting = 0
        self.max_admitted_over_limit = 0  # stays 0: an admission never exceeds the limit
        self.service_s = 0.0  # moving average of how long a request holds its slot (0: none yet)
        self._seq = 0

    def set_limit(self, limit: int) -> None:
        """A new limit: a rise admits waiters at once; a drop cancels nothing."""
        if limit != self.limit:
            self.limit = limit
            self._wake()

    def _admissible(self, c: int) -> bool:
        if self.in_flight >= self.limit:
            return False
        reserved_elsewhere = 0
        for k, share in enumerate(self.share):
            if share and k != c:
                reserved_elsewhere += max(0, math.floor(share * self.limit) - self.in_flight_by_class[k])
        return self.in_flight + reserved_elsewhere < self.limit

    def _admit(self, c: int) -> None:
        self.in_flight += 1
        self.in_flight_by_class[c] += 1
        self.max_admitted_over_limit = max(self.max_admitted_over_limit, self.in_flight - self.limit)

    def try_admit(self, c: int) -> bool:
        """Take a slot now if nobody waits and there is room (no queueing)."""
        if self.waiting == 0 and self._admissible(c):
            self._admit(c)
            return True
        return False

    async def acquire(self, c: int, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a slot for class ``c``.

        Returns:
            True with a slot taken (call :meth:`release`), False when the wait ran out.
        """
        if self.try_admit(c):
            return True
        self._seq += 1
        w = _Waiter(self._seq, asyncio.get_running_loop().create_future())
        self.queues[c].append(w)
        self.waiting += 1
        self._wake()
        try:
            await asyncio.wait_for(asyncio.shield(w.fut), timeout_s)
            return True
        except TimeoutError:
            if w.fut.done():
                return True  # admitted as the time ran out: keep it
            self._forget(c, w)
            return False
        except asyncio.CancelledError:
            if w.fut.done() and not w.fut.cancelled():
                self.release(c)  # admitted, but the client left: pass the slot on
            else:
                self._forget(c, w)
            raise

    def _forget(self, c: int, w: _Waiter) -> None:
        w.fut.cancel()
        with contextlib.suppress(ValueError):
            self.queues[c].remove(w)
            self.waiting -= 1

    def expected_wait_s(self, c: int) -> float:
        """How long a request of class ``c`` arriving now should wait: the requests queued at its
        priority or higher, plus itself, over the limit, times the average time a slot is held.
        0 while nothing has been served yet (no estimate) or when there is room now."""
        if not self.service_s or (self.waiting == 0 and self._admissible(c)):
            return 0.0
        ahead = sum(len(self.queues[k]) for k in self.order if self.priority[k] >= self.priority[c])
        return (ahead + 1) * self.service_s / max(self.limit, 1) if self.limit else float("inf")

    def served(self, held_s: float) -> None:
        """A request held its slot ``held_s`` seconds (feeds :meth:`expected_wait_s`)."""
        self.service_s = held_s if not self.service_s else 0.9 * self.service_s + 0.1 * held_s

    def release(self, c: int) -> None:
        """Free a slot taken by :meth:`acquire` or :meth:`try_admit`."""
        self.in_flight -= 1
        self.in_flight_by_class[c] -= 1
        self._wake()

    def _wake(self) -> None:
        """Admit waiters while there is room: highest priority first, then earliest arrival."""
        while self.waiting:
            best = -1
            for c in self.order:
                if best >= 0 and self.priority[c] < self.priority[best]:
                    break
                q = self.queues[c]
                if not q or not self._admissible(c):
                    continue
                if best < 0 or q[0].seq < self.queues[best][0].seq:
                    best = c
            if best < 0:
                return
            w = self.queues[best].popleft()
            self.waiting -= 1
            self._admit(best)
            w.fut.set_result(None)

    def queued(self, c: int) -> int:
        return len(self.queues[c])

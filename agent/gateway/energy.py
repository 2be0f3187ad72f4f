"""Energy per request: each upstream's GPU energy, shared among its requests by their tokens.

The agent's telemetry carries every GPU's energy counter; two messages in a row give
a window ``[t0, t1]`` and the energy the upstream's GPUs used in it. A window is shared
among the requests that overlapped it, each weighted by the tokens it produced inside
the window (its tokens spread evenly over its lifetime). A window is settled once
every request that overlapped it has finished, and a request's energy is final once
every window it overlapped is settled, so the shares of a window always add up to
its energy. A window no request produced tokens in is counted as idle energy.

Everything is bounded: at most ``MAX_WINDOWS`` windows and ``MAX_PENDING`` finished
requests wait; past that (or ``GIVE_UP_S`` without telemetry) the oldest are settled
with what is known, and a request no window covered gets no energy (None).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_WINDOWS = 3600
MAX_PENDING = 100_000
GIVE_UP_S = 60.0


@dataclass(eq=False, slots=True)
class Usage:
    """One request's life, for energy sharing (wall-clock seconds)."""

    start_s: float
    end_s: float = 0.0
    tokens: int = 0
    energy_j: float = 0.0
    covered: bool = False  # some window shared energy with it
    on_done: Callable[[Usage], None] | None = field(default=None, repr=False)


@dataclass(slots=True)
class _Window:
    t0: float
    t1: float
    energy_j: float


class EnergyLedger:
    """Shares one upstream's GPU energy among its requests."""

    def __init__(self) -> None:
        self._ids = itertools.count()
        self.open: dict[int, Usage] = {}  # in flight
        self.finished: deque[Usage] = deque()  # done, energy not final yet
        self.windows: deque[_Window] = deque()  # not settled yet
        self.settled_to_s = float("-inf")  # every window ending by then is settled
        self.gpu_energy_j = 0.0  # every window seen
        self.attributed_j = 0.0
        self.idle_j = 0.0
        self.seen_window = False

    def start(self, now_s: float) -> int:
        """A request entered the upstream; returns its handle."""
        rid = next(self._ids)
        self.open[rid] = Usage(now_s)
        return rid

    def finish(self, rid: int, now_s: float, tokens: int, on_done: Callable[[Usage], None]) -> None:
        """The request ended with ``tokens`` tokens; ``on_done`` gets its energy once final."""
        u = self.open.pop(rid)
        u.end_s, u.tokens, u.on_done = max(now_s, u.start_s), max(tokens, 0), on_done
        if not self.seen_window:
            on_done(u)  # no telemetry (yet): no energy to share
            return
        self.finished.append(u)
        while len(self.finished) > MAX_PENDING:
            self._final(self.finished.popleft())
        self._settle(now_s)

    def add_window(self, t0_s: float, t1_s: float, energy_j: float, now_s: float) -> None:
        """The upstream's GPUs used ``energy_j`` between ``t0_s`` and ``t1_s``."""
        if t1_s <= t0_s or energy_j < 0:
            return
        self.seen_window = True
        self.gpu_energy_j += energy_j
        self.windows.append(_Window(t0_s, t1_s, energy_j))
        while len(self.windows) > MAX_WINDOWS:
            self._share(self.windows.popleft())
        self._settle(now_s)

    def _settle(self, now_s: float) -> None:
        if self.windows:
            oldest_open = min((u.start_s for u in self.open.values()), default=float("inf"))
            while self.windows and self.windows[0].t1 <= oldest_open:
                self._share(self.windows.popleft())
        # Final: requests every window of which is settled (or that waited too long). They
        # finished in order, so the final ones are at the front.
        f = self.finished
        while f and (f[0].end_s <= self.settled_to_s or now_s - f[0].end_s > GIVE_UP_S):
            self._final(f.popleft())

    def _share(self, w: _Window) -> None:
        weights: list[tuple[Usage, float]] = []
        for u in self.finished:
            overlap = min(w.t1, u.end_s) - max(w.t0, u.start_s)
            if overlap > 0 and u.tokens:
                life = u.end_s - u.start_s
                weights.append((u, u.tokens * overlap / life))
        total = sum(x for _, x in weights)
        if total <= 0:
            self.idle_j += w.energy_j
        else:
            for u, x in weights:
                u.energy_j += w.energy_j * x / total
                u.covered = True
            self.attributed_j += w.energy_j
        self.settled_to_s = max(self.settled_to_s, w.t1)

    def _final(self, u: Usage) -> None:
        if u.on_done is not None:
            u.on_done(u)

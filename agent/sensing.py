"""Polling GPU backends off the event loop, with per-GPU fault isolation.

Each GPU has its own worker thread, so a call that hangs on one GPU never delays
another. A GPU whose read raises, or does not return within ``read_timeout_s``,
is marked lost with its error; the others keep reporting. A lost GPU is retried
with exponential backoff through ``backend.reopen``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from rackguard.agent import log as logmod
from rackguard.sensors.base import GpuBackend, GpuInfo, GpuLost, GpuSample

if TYPE_CHECKING:
    from rackguard.agent.config import Config

GpuStateName = Literal["ok", "lost"]


@dataclass(slots=True)
class GpuState:
    """What the agent knows about one GPU right now."""

    info: GpuInfo
    state: GpuStateName = "ok"
    error: str | None = None
    sample: GpuSample | None = None  # latest, with slow fields carried forward
    lost_since_mono: float | None = None
    retry_at_mono: float = 0.0
    retry_delay_s: float = 0.0
    busy: concurrent.futures.Future[Any] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class NvmlCallStat:
    index: int
    seconds: float
    slow: bool


class GpuPoller:
    """Reads every GPU once per ``poll()``; slow fields every ``slow_every`` polls."""

    def __init__(
        self,
        backend: GpuBackend,
        infos: list[GpuInfo],
        *,
        read_timeout_s: float,
        slow_every: int,
        retry_min_s: float,
        retry_max_s: float,
        on_call: Callable[[NvmlCallStat], None] | None = None,
    ) -> None:
        self.backend = backend
        self.gpus = [GpuState(info=i) for i in infos]
        self.read_timeout_s = read_timeout_s
        self.slow_every = max(1, slow_every)
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.on_call = on_call
        self._polls = 0
        self._pools = {
            s.info.index: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"gpu{s.info.index}")
            for s in self.gpus
        }
        self.log = logmod.get("sensing")

    def reconfigure(self, cfg: Config) -> None:
        """Reloaded ``sensors.*`` timing (backend and GPU set need a restart)."""
        s = cfg.sensors
        self.read_timeout_s = s.read_timeout_s
        self.slow_every = max(1, round(s.slow_period_s / s.poll_period_s))
        self.retry_min_s, self.retry_max_s = s.lost_retry_min_s, s.lost_retry_max_s

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    def _timed_read(self, index: int, slow: bool) -> GpuSample:
        t0 = time.perf_counter()
        try:
            return self.backend.read(index, slow=slow)
        finally:
            if self.on_call:
                self.on_call(NvmlCallStat(index, time.perf_counter() - t0, slow))

    async def poll(self) -> list[GpuState]:
        """One poll of every GPU. Never raises for a GPU's failure.

        Each GPU's call runs on its own thread (a hung GPU blocks only itself); the event
        loop is woken once, when the last call of this poll finishes or the timeout passes.
        """
        slow = self._polls % self.slow_every == 0
        self._polls += 1
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        pending: list[tuple[concurrent.futures.Future[Any], GpuState, str]] = []
        for g in self.gpus:
            if g.busy is not None and not g.busy.done():
                continue  # still stuck in a previous call
            g.busy = None
            idx = g.info.index
            cf: concurrent.futures.Future[Any]
            if g.state == "ok":
                cf = self._pools[idx].submit(self._timed_read, idx, slow or g.sample is None)
                kind = "read"
            elif now >= g.retry_at_mono:
                cf = self._pools[idx].submit(self.backend.reopen, idx)
                kind = "reopen"
            else:
                continue
            g.busy = cf
            pending.append((cf, g, kind))
        if not pending:
            return self.gpus
        all_done: asyncio.Future[None] = loop.create_future()
        left = [len(pending)]
        lock = threading.Lock()

        def one_done(_: concurrent.futures.Future[Any]) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                with contextlib.suppress(RuntimeError):  # the loop closed while a hung read finished
                    loop.call_soon_threadsafe(_set_done, all_done)

        for cf, _, _ in pending:
            cf.add_done_callback(one_done)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(all_done), self.read_timeout_s)
        for cf, g, kind in pending:
            if not cf.done():
                err = f"call timed out after {self.read_timeout_s:g} s"
                if kind == "read":
                    self._mark_lost(g, TimeoutError(err), now)
                else:
                    self._schedule_retry(g, now, err)
                continue
            exc = cf.exception()
            if exc is not None:
                if kind == "read":
                    self._mark_lost(g, exc, now)
                else:
                    self._schedule_retry(g, now, str(exc))
            elif kind == "read":
                self._merge(g, cf.result())
            else:
                self._recovered(g, cf.result())
        return self.gpus

    def _merge(self, g: GpuState, s: GpuSample) -> None:
        """Keep the sample; slow fields it did not read carry forward from the last one."""
        prev = g.sample
        if prev is not None and (
            (s.energy_j is None and prev.energy_j is not None)
            or (s.mem_temp_c is None and prev.mem_temp_c is not None)
        ):
            s = replace(
                s,
                energy_j=prev.energy_j if s.energy_j is None else s.energy_j,
                mem_temp_c=prev.mem_temp_c if s.mem_temp_c is None else s.mem_temp_c,
            )
        g.sample = s

    def _mark_lost(self, g: GpuState, exc: BaseException, now: float) -> None:
        err = str(exc) if isinstance(exc, GpuLost | TimeoutError) else f"{type(exc).__name__}: {exc}"
        g.state = "lost"
        g.error = err
        g.lost_since_mono = now
        g.retry_delay_s = self.retry_min_s
        g.retry_at_mono = now + self.retry_min_s
        self.log.error("gpu_lost", gpu=g.info.index, uuid=g.info.uuid, error=err)

    def _schedule_retry(self, g: GpuState, now: float, err: str) -> None:
        g.error = err
        g.retry_delay_s = min(self.retry_max_s, max(self.retry_min_s, g.retry_delay_s * 2))
        g.retry_at_mono = now + g.retry_delay_s

    def _recovered(self, g: GpuState, info: GpuInfo) -> None:
        lost_for = time.monotonic() - (g.lost_since_mono or time.monotonic())
        g.info = info
        g.state = "ok"
        g.error = None
        g.sample = None
        g.lost_since_mono = None
        self.log.info("gpu_recovered", gpu=info.index, uuid=info.uuid, lost_for_s=round(lost_for, 3))


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)

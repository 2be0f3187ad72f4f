"""Decision sinks: everything that acts on a decision implements :class:`DecisionSink`.

* :class:`CapPublisher`: the retained ``.../cap`` message the inference servers obey.
* :class:`PowerLimitSink`: the optional NVML power-limit writer (off the event loop,
  retried until it lands, loud in ``/healthz`` while it fails).
* :class:`HaproxySink`: the optional HAProxy actuator (``[actuators.haproxy]``): each
  server's ``maxconn`` follows its GPUs' caps, and ``safe_cap`` when the agent stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any, Protocol, get_args

from rackguard.agent import log as logmod
from rackguard.agent.config import Config, HaproxyConfig
from rackguard.agent.control_loop import ControlLoop
from rackguard.agent.haproxy import HaproxyError, HaproxyRuntime, maxconns
from rackguard.agent.messages import Cap, NodeId, dump
from rackguard.agent.metrics import Metrics
from rackguard.agent.mqtt import MqttLink, Topics
from rackguard.agent.power_limits import PowerLimitActuator, PowerLimitError
from rackguard.agent.seqstore import SeqStore
from rackguard.controllers.api import Binding, Decision, Reason
from rackguard.sensors.base import Capability, GpuBackend, GpuInfo

CAP_REASONS: tuple[str, ...] = get_args(Reason)
BINDINGS: tuple[str, ...] = get_args(Binding)


class DecisionSink(Protocol):
    """Something that acts on each decision."""

    def apply(self, decision: Decision, *, force: bool = False) -> None:
        """Act on a decision (``force``: now, even if unchanged). Never blocks the event loop."""

    def problems(self) -> list[str]:
        """What is wrong with this sink now (for ``/healthz``); empty when healthy."""
        ...

    async def close(self) -> None:
        """Finish pending work and undo what must not outlive the agent."""


class CapChangeLog:
    """``cap_changed`` log lines: a new reason or binding at once, a ramp summarised.

    While reason and binding stay the same (the cap ramping up after a fault clears,
    say), changes are folded into one line at most every ``every_s``, carrying how many
    changes it sums up and the total it started from.
    """

    def __init__(self, log: Any, every_s: float = 10.0) -> None:
        self.log = log
        self.every_s = every_s
        self._key: tuple[str, str] | None = None  # reason and binding last logged
        self._logged_mono = -math.inf
        self._pending: Decision | None = None
        self._changes = 0
        self._from_total: int | None = None

    def changed(self, d: Decision, prev_total: int | None, now_mono: float) -> None:
        if self._pending is None:
            self._from_total = prev_total
        self._pending, self._changes = d, self._changes + 1
        if (d.reason, d.binding) != self._key:
            self._emit(now_mono)
        else:
            self.flush_due(now_mono)

    def flush_due(self, now_mono: float) -> None:
        """Log the summed-up changes once ``every_s`` has passed since the last line."""
        if self._pending is not None and now_mono - self._logged_mono >= self.every_s:
            self._emit(now_mono)

    def _emit(self, now_mono: float) -> None:
        d = self._pending
        assert d is not None
        extra = {"changes": self._changes, "from_total": self._from_total} if self._changes > 1 else {}
        self.log.info("cap_changed", total=d.total, reason=d.reason, binding=d.binding, **extra)
        self._key, self._logged_mono = (d.reason, d.binding), now_mono
        self._pending, self._changes = None, 0


class CapPublisher:
    """Publishes the cap on change, on ``force``, or every ``control.cap_refresh_s``."""

    def __init__(
        self,
        cfg: Config,
        *,
        node: NodeId,
        topics: Topics,
        link: MqttLink,
        metrics: Metrics,
        control: ControlLoop,
        seqs: SeqStore,
    ) -> None:
        self.cfg = cfg.control
        self.node, self.topics, self.link, self.metrics, self.control = node, topics, link, metrics, control
        self.cap_msg: Cap | None = None
        self.seqs = seqs
        self.seq = seqs.last("cap")
        self._published_mono = -1e18
        self.log = logmod.get("cap")
        self.changes = CapChangeLog(self.log)

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg.control

    def apply(self, decision: Decision, *, force: bool = False) -> None:
        c = self.cfg
        prev = self.cap_msg
        changed = prev is None or (prev.caps, prev.reason, prev.binding) != (
            list(decision.caps),
            decision.reason,
            decision.binding,
        )
        now_mono = time.monotonic()
        if changed:
            self.changes.changed(decision, None if prev is None else prev.total, now_mono)
        else:
            self.changes.flush_due(now_mono)
        if not (changed or force or now_mono - self._published_mono >= c.cap_refresh_s):
            return
        self.seq = self.seqs.next("cap")
        now = time.time()
        self.cap_msg = Cap(
            seq=self.seq,
            t_s=now,
            valid_until_s=now + c.cap_ttl_s,
            node=self.node,
            caps=list(decision.caps),
            total=decision.total,
            reason=decision.reason,
            binding=decision.binding,
            predicted_max_temp_c=decision.predicted_max_temp_c,
            safe_cap=c.safe_cap,
            max_cap=c.max_cap,
            mpc_paused=self.control.paused,
            manual_ceiling=self.control.manual_ceiling,
        )
        self._published_mono = now_mono
        self.link.set_state(self.topics.cap, dump(self.cap_msg), expiry_s=round(c.cap_ttl_s))
        self._metrics(decision)

    def _metrics(self, decision: Decision) -> None:
        m = self.metrics
        for i, cap in enumerate(decision.caps):
            m.cap.labels(*m.gpu(i)).set(cap)
        m.cap_total.set(decision.total)
        m.cap_safe.set(self.cfg.safe_cap)
        for reason in CAP_REASONS:
            m.cap_reason.labels(reason).set(1.0 if reason == decision.reason else 0.0)
        for binding in BINDINGS:
            m.cap_binding.labels(binding).set(1.0 if binding == decision.binding else 0.0)
        m.mpc_paused.set(1.0 if self.control.paused else 0.0)
        ceiling = self.control.manual_ceiling
        m.manual_ceiling.set(-1.0 if ceiling is None else ceiling)
        lim = self.control.limits
        for kind, value in (
            ("gpu", lim.gpu_temp_max_c),
            ("memory", lim.mem_temp_max_c),
            ("slowdown", lim.slowdown_c),
        ):
            m.gpu_temp_limit_c.labels(kind).set(value)

    def problems(self) -> list[str]:
        return []

    async def close(self) -> None:
        return None


class PowerLimitSink:
    """Hands changed decisions to the power-limit actuator, one write at a time, off the loop.

    A failed write is retried every ``RETRY_S`` (and reported by :meth:`problems`) until one
    succeeds. ``close`` waits for the last write and restores the saved limits.
    """

    RETRY_S = 10.0

    @classmethod
    def create(
        cls, cfg: Config, backend: GpuBackend, infos: list[GpuInfo], metrics: Metrics, log: Any
    ) -> PowerLimitSink | None:
        """The sink, if ``[power_limits]`` is enabled and the backend can write limits (blocking: NVML)."""
        pl = cfg.power_limits
        if not pl.enabled:
            return None
        if not backend.supports(Capability.POWER_LIMIT):
            log.error("power_limits_unsupported", backend=backend.name)
            return None
        actuator = PowerLimitActuator(
            infos,
            backend,
            pl.resolved_state_file(),
            budget_w=pl.node_power_budget_w or cfg.control.node_power_budget_w,
            min_on_reasons=pl.min_on_reasons,
            min_change_w=pl.min_change_w,
            metrics=metrics,
        )
        try:
            actuator.start()
        except Exception as exc:  # never write limits we could not save first
            log.error("power_limits_disabled", error=f"{type(exc).__name__}: {exc}")
            return None
        return cls(actuator)

    def __init__(self, actuator: PowerLimitActuator) -> None:
        self.actuator = actuator
        self.error: str | None = None  # the last write failure, until one succeeds
        self._retry_mono = 0.0
        self._last: Decision | None = None
        self._pending: Decision | None = None
        self._task: asyncio.Task[None] | None = None
        self.log = logmod.get("power_limits")

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded ``control.node_power_budget_w`` applies when ``power_limits`` sets none of its own."""
        budget = cfg.power_limits.node_power_budget_w or cfg.control.node_power_budget_w
        if budget != self.actuator.budget_w:
            self.actuator.budget_w = budget
            if self._last is not None:
                self._queue(self._last)

    def apply(self, decision: Decision, *, force: bool = False) -> None:
        changed = self._last is None or (self._last.caps, self._last.reason) != (
            decision.caps,
            decision.reason,
        )
        retry = self.error is not None and time.monotonic() >= self._retry_mono
        self._last = decision
        if changed or retry:
            self._queue(decision)

    def _queue(self, decision: Decision) -> None:
        self._pending = decision
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._writer())

    async def _writer(self) -> None:
        while (d := self._pending) is not None:
            self._pending = None
            try:
                await asyncio.to_thread(self.actuator.apply, d)
            except Exception as exc:  # PowerLimitError is logged and counted by the actuator
                if not isinstance(exc, PowerLimitError):
                    self.log.exception("power_limit_actuator_failed")
                self.error = str(exc) or type(exc).__name__
                self._retry_mono = time.monotonic() + self.RETRY_S
            else:
                self.error = None
            if self.actuator.metrics is not None:
                self.actuator.metrics.power_limit_failing.set(0.0 if self.error is None else 1.0)

    def problems(self) -> list[str]:
        return [] if self.error is None else [f"power limit write failed: {self.error}"]

    async def close(self) -> None:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 2.0)
        await asyncio.to_thread(self.actuator.restore)  # errors are logged there


class HaproxySink:
    """Sets each HAProxy server's ``maxconn`` to its GPUs' caps, off the loop, on change.

    A failed write is retried every ``RETRY_S`` (and reported by :meth:`problems`).
    ``close`` writes ``safe_cap`` per GPU: with no agent there is no valid cap.
    """

    RETRY_S = 2.0

    def __init__(self, cfg: HaproxyConfig, safe_cap: int) -> None:
        self.cfg, self.safe_cap = cfg, safe_cap
        self.runtime = HaproxyRuntime(cfg.socket, cfg.timeout_s)
        self.error: str | None = None
        self.written: dict[str, int] | None = None
        self._retry_mono = 0.0
        self._pending: dict[str, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.log = logmod.get("haproxy")

    def reconfigure(self, cfg: Config) -> None:
        self.safe_cap = cfg.control.safe_cap

    def apply(self, decision: Decision, *, force: bool = False) -> None:
        want = maxconns(self.cfg, decision.caps, self.safe_cap)
        retry = self.error is not None and time.monotonic() >= self._retry_mono
        if want != self.written or retry or force:
            self._pending = want
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._writer())

    async def _writer(self) -> None:
        while (want := self._pending) is not None:
            self._pending = None
            try:
                await asyncio.to_thread(self._write, want)
            except HaproxyError as exc:
                if self.error != str(exc):
                    self.log.error("haproxy_write_failed", error=str(exc))
                self.error = str(exc)
                self._retry_mono = time.monotonic() + self.RETRY_S

    def _write(self, want: dict[str, int]) -> None:
        for server, n in want.items():
            if self.written is None or self.written.get(server) != n:
                self.runtime.set_maxconn(self.cfg.backend, server, n)
                self.written = {**(self.written or {}), server: n}
        if self.error is not None:
            self.log.info("haproxy_write_recovered")
        self.error = None
        self.log.debug("haproxy_maxconn", backend=self.cfg.backend, maxconn=want)

    def problems(self) -> list[str]:
        return [] if self.error is None else [f"haproxy maxconn write failed: {self.error}"]

    async def close(self) -> None:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 2.0)
        try:
            await asyncio.to_thread(self._write, maxconns(self.cfg, None, self.safe_cap))
        except HaproxyError as exc:
            self.log.error("haproxy_safe_cap_failed", error=str(exc))

"""The agent's asyncio lifecycle: sense → aggregate → publish, until told to stop.

One tick loop runs on a drift-free monotonic schedule (``poll_period_s``). Each
tick polls every GPU off the event loop; when a publish period has passed, it
closes the window and queues one telemetry message for the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from typing import Any

from agent import __version__
from agent import log as logmod
from agent.config import Config
from agent.messages import GpuInventory, HostTelemetry, NodeId, Status, Telemetry, Thresholds, dump
from agent.metrics import Metrics
from agent.mqtt import ClientFactory, MqttLink, Topics, aiomqtt_factory
from agent.outbox import MemoryOutbox, OutMsg
from agent.sensing import GpuPoller
from agent.telemetry import Window
from sensors.base import GpuBackend, GpuInfo

SHUTDOWN_BUDGET_S = 4.5  # SIGTERM → exit within 5 s


def make_backend(cfg: Config) -> GpuBackend:
    """The GPU backend named by ``sensors.backend``."""
    if cfg.sensors.backend == "sim":
        from sensors.sim import SimBackend

        return SimBackend(
            cfg.sim.gpus,
            offered_concurrency=cfg.sim.offered_concurrency,
            supply_temp_c=cfg.sim.supply_temp_c,
            flow_lpm=cfg.sim.flow_lpm,
            noise_c=cfg.sim.ambient_noise_c,
            seed=cfg.sim.seed,
        )
    from sensors.nvml import NvmlBackend

    return NvmlBackend(indices=cfg.sensors.gpu_indices)


def inventory(infos: list[GpuInfo]) -> list[GpuInventory]:
    return [
        GpuInventory(
            index=i.index,
            uuid=i.uuid,
            name=i.name,
            thresholds=Thresholds(
                slowdown_c=i.thresholds.slowdown_c,
                shutdown_c=i.thresholds.shutdown_c,
                gpu_max_c=i.thresholds.gpu_max_c,
                mem_max_c=i.thresholds.mem_max_c,
            ),
            power_limit_min_w=i.power_limit_min_w,
            power_limit_max_w=i.power_limit_max_w,
            power_limit_default_w=i.power_limit_default_w,
        )
        for i in infos
    ]


class Agent:
    """One node's daemon. ``run()`` returns the process exit code."""

    def __init__(
        self,
        cfg: Config,
        backend: GpuBackend | None = None,
        *,
        client_factory: ClientFactory | None = None,
        on_telemetry: Callable[[Telemetry], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.backend = backend or make_backend(cfg)
        self.node = NodeId(site=cfg.node.site, rack=cfg.node.rack, name=cfg.node.name)
        self.topics = Topics.for_node(cfg.node, cfg.mqtt.topic_prefix)
        client_id = f"rackguard-{cfg.node.site}-{cfg.node.rack}-{cfg.node.name}"
        self.link = MqttLink(
            cfg.mqtt,
            self.topics,
            client_factory=client_factory or aiomqtt_factory(cfg.mqtt, client_id),
            offline_payload=self._offline,
            on_connect=self._birth,
            outbox=MemoryOutbox(cfg.telemetry.queue_max_messages),
        )
        self.on_telemetry = on_telemetry
        self.metrics = Metrics()
        self.stop = asyncio.Event()
        self.infos: list[GpuInfo] = []
        self.poller: GpuPoller | None = None
        self.telemetry_seq = 0
        self.log = logmod.get("agent")
        self._host: Any = None

    # -- messages ----------------------------------------------------------------------
    def _offline(self, reason: str) -> bytes:
        return dump(Status(state="offline", t_s=time.time(), node=self.node, reason=reason))

    def _birth(self) -> None:
        status = Status(
            state="online",
            t_s=time.time(),
            node=self.node,
            version=__version__,
            backend=self.backend.name,
            poll_period_s=self.cfg.sensors.poll_period_s,
            publish_period_s=self.cfg.telemetry.publish_period_s,
            gpus=inventory([g.info for g in self.poller.gpus] if self.poller else self.infos),
        )
        self.link.set_state(self.topics.status, dump(status))

    async def _host_sample(self) -> HostTelemetry | None:
        if self._host is None:
            return None
        try:
            s = await asyncio.to_thread(self._host.read)
        except Exception as exc:  # host stats are best effort; never stop the node for them
            self.log.warning("host_read_failed", error=str(exc))
            return None
        return HostTelemetry.model_validate(s, from_attributes=True)

    async def _publish_window(self, window: Window) -> None:
        assert self.poller is not None
        host = await self._host_sample()
        now = time.time()
        self.telemetry_seq += 1
        msg = Telemetry(
            seq=self.telemetry_seq,
            t_s=window.end_s or now,
            window_start_s=window.start_s or now,
            window_end_s=window.end_s or now,
            node=self.node,
            gpus=window.gpu_messages(self.poller.gpus),
            host=host,
        )
        self.link.enqueue(OutMsg(self.topics.telemetry, dump(msg), kind="telemetry"))
        self._update_metrics()
        if self.on_telemetry:
            self.on_telemetry(msg)

    def _update_metrics(self) -> None:
        assert self.poller is not None
        m = self.metrics
        for g in self.poller.gpus:
            label = str(g.info.index)
            m.gpu_lost.labels(label).set(1.0 if g.state == "lost" else 0.0)
            s = g.sample
            if s is None or g.state != "ok":
                continue
            for gauge, value in (
                (m.gpu_power_w, s.power_w),
                (m.gpu_temp_c, s.gpu_temp_c),
                (m.gpu_mem_temp_c, s.mem_temp_c),
                (m.gpu_energy_j, s.energy_j),
            ):
                if value is not None:
                    gauge.labels(label).set(value)
        m.telemetry_published.inc()
        m.mqtt_connected.set(1.0 if self.link.connected else 0.0)
        m.mqtt_queue_depth.set(len(self.link.outbox))

    # -- lifecycle ---------------------------------------------------------------------
    def request_stop(self, reason: str = "signal") -> None:
        if not self.stop.is_set():
            self.log.info("stopping", reason=reason)
            self.stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop, sig.name)
        from sensors.base import SensorError

        try:
            self.infos = await asyncio.to_thread(self.backend.open)
        except SensorError as exc:
            self.log.error("backend_open_failed", backend=self.backend.name, error=str(exc))
            return 1
        try:
            from sensors.host import HostSensor

            self._host = HostSensor()
        except Exception as exc:
            self.log.warning("host_sensor_unavailable", error=str(exc))
        s = self.cfg.sensors
        self.poller = GpuPoller(
            self.backend,
            self.infos,
            read_timeout_s=s.read_timeout_s,
            slow_every=max(1, round(s.slow_period_s / s.poll_period_s)),
            retry_min_s=s.lost_retry_min_s,
            retry_max_s=s.lost_retry_max_s,
            on_call=lambda c: self.metrics.nvml_call_s.labels("slow" if c.slow else "fast").observe(
                c.seconds
            ),
        )
        self.log.info(
            "started",
            version=__version__,
            backend=self.backend.name,
            gpus=len(self.infos),
            topic=self.topics.base,
            broker=f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}",
        )
        link_task = asyncio.create_task(self.link.run(self.stop))
        try:
            await self._tick_loop()
        finally:
            try:
                await asyncio.wait_for(link_task, SHUTDOWN_BUDGET_S)
            except TimeoutError:
                self.log.warning("shutdown_flush_timeout", queued=len(self.link.outbox))
            self.poller.close()
            await asyncio.to_thread(self.backend.close)
            self.log.info("stopped")
        return 0

    async def _tick_loop(self) -> None:
        assert self.poller is not None
        period = self.cfg.sensors.poll_period_s
        publish_every = self.cfg.telemetry.publish_period_s
        start = time.monotonic()
        next_tick = start
        next_publish = start + publish_every
        window = Window()
        while not self.stop.is_set():
            now = time.monotonic()
            if next_tick > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), next_tick - now)
                if self.stop.is_set():
                    break
            late = time.monotonic() - next_tick
            self.metrics.tick_lateness_s.observe(max(0.0, late))
            gpus = await self.poller.poll()
            window.add(gpus)
            now = time.monotonic()
            if now >= next_publish:
                await self._publish_window(window)
                window = Window()
                next_publish += publish_every * max(1, int((now - next_publish) // publish_every) + 1)
            next_tick += period
            if time.monotonic() - next_tick > period:  # overran: skip missed ticks, keep the phase
                next_tick += period * int((time.monotonic() - next_tick) // period)

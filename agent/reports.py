"""What the agent says about itself: birth, telemetry windows, energy per token, metrics, status line."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rackguard.agent import __version__
from rackguard.agent import log as logmod
from rackguard.agent.config import Config
from rackguard.agent.coolant_monitor import CoolantMonitor
from rackguard.agent.energy import EnergyMeter
from rackguard.agent.gate_reports import GateTracker
from rackguard.agent.messages import (
    EnergyTelemetry,
    GpuInventory,
    HostTelemetry,
    NodeId,
    Status,
    Telemetry,
    Thresholds,
    dump,
)
from rackguard.agent.metrics import Metrics
from rackguard.agent.mqtt import MqttLink, Topics
from rackguard.agent.outbox import OutMsg
from rackguard.agent.sensing import GpuState
from rackguard.agent.snapshot import NodeSnapshot
from rackguard.agent.telemetry import Window
from rackguard.sensors.base import GpuInfo


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


class Reporter:
    """Builds and queues the node's birth, telemetry and energy messages; keeps the gauges current.

    Args:
        cfg: The config (periods for the birth message; replaced by ``reconfigure``).
        node: The node's identity.
        topics: The node's topics.
        link: The MQTT link (retained state and the outbox).
        metrics: The Prometheus registry.
        coolant: The coolant monitor (derived coolant values).
        gates: The gate tracker (tokens and requests per window).
        energy: The energy-per-token meter.
        backend_name: The GPU backend's name, for the birth message.
        host: A host sensor with a blocking ``read()``, or None.
        incarnation: This run's incarnation, carried by the birth and the will.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        node: NodeId,
        topics: Topics,
        link: MqttLink,
        metrics: Metrics,
        coolant: CoolantMonitor,
        gates: GateTracker,
        energy: EnergyMeter,
        backend_name: str,
        host: Any = None,
        incarnation: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.node, self.topics, self.link, self.metrics = node, topics, link, metrics
        self.coolant, self.gates, self.energy = coolant, gates, energy
        self.backend_name = backend_name
        self.host = host
        self.incarnation = incarnation
        self.gpus: list[GpuState] = []
        self.telemetry_seq = link.outbox.last_seq("telemetry")  # continues across restarts
        self.birth_uuids: tuple[str, ...] = ()
        self._dropped_seen = link.outbox.dropped_total
        self.log = logmod.get("reports")

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg

    # -- retained state ------------------------------------------------------------------
    def offline_payload(self, reason: str) -> bytes:
        return dump(
            Status(
                state="offline", t_s=time.time(), node=self.node, reason=reason, incarnation=self.incarnation
            )
        )

    def birth(self, infos: list[GpuInfo] | None = None) -> None:
        """Publish the retained ``online`` status with the GPU inventory."""
        infos = infos if infos is not None else [g.info for g in self.gpus]
        self.birth_uuids = tuple(i.uuid for i in infos)
        status = Status(
            state="online",
            t_s=time.time(),
            node=self.node,
            incarnation=self.incarnation,
            version=__version__,
            backend=self.backend_name,
            poll_period_s=self.cfg.sensors.poll_period_s,
            publish_period_s=self.cfg.telemetry.publish_period_s,
            gpus=inventory(infos),
        )
        self.link.set_state(self.topics.status, dump(status))

    def rebirth_if_changed(self) -> None:
        """A GPU not identified at start (or replaced) now is: publish the new inventory."""
        if tuple(g.info.uuid for g in self.gpus) != self.birth_uuids:
            self.birth()

    # -- telemetry ---------------------------------------------------------------------
    async def _host_sample(self) -> HostTelemetry | None:
        if self.host is None:
            return None
        try:
            s = await asyncio.to_thread(self.host.read)
        except Exception as exc:  # host stats are best effort; never stop the node for them
            self.log.warning("host_read_failed", error=str(exc))
            return None
        return HostTelemetry.model_validate(s, from_attributes=True)

    async def publish_window(self, window: Window, snap: NodeSnapshot) -> Telemetry:
        """Close a telemetry window and queue it."""
        host = await self._host_sample()
        now = time.time()
        self.telemetry_seq += 1
        msg = Telemetry(
            seq=self.telemetry_seq,
            t_s=window.end_s or now,
            window_start_s=window.start_s or now,
            window_end_s=window.end_s or now,
            node=self.node,
            gpus=window.gpu_messages(self.gpus),
            host=host,
            dropped_total=self.link.outbox.dropped_total,
            coolant=None if snap.coolant is None else self.coolant.telemetry(snap.coolant),
            energy=self._energy_window(),
        )
        self.link.enqueue(OutMsg(self.topics.telemetry, dump(msg), kind="telemetry", seq=self.telemetry_seq))
        self.update_metrics()
        return msg

    def _energy_window(self) -> EnergyTelemetry:
        """Close the energy-per-token window: GPU energy counter deltas over gate-reported tokens."""
        energy_j = {
            g.info.index: g.sample.energy_j if g.sample is not None and g.state == "ok" else None
            for g in self.gpus
        }
        tokens, requests = self.gates.take_window()
        w = self.energy.window(energy_j, tokens, requests)
        for gauge, value in (
            (self.metrics.energy_per_token_j, w.energy_per_token_j),
            (self.metrics.facility_energy_per_token_j, w.facility_energy_per_token_j),
        ):
            if value is not None:
                gauge.set(value)
        self.gates.update_metrics()

        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 6)

        return EnergyTelemetry(
            gpu_energy_j=r(w.gpu_energy_j),
            gpus_counted=w.gpus_counted,
            tokens=w.tokens,
            requests=w.requests,
            energy_per_token_j=r(w.energy_per_token_j),
            facility_energy_per_token_j=r(w.facility_energy_per_token_j),
            pue=w.pue,
            gates=len(self.gates.fresh()),
        )

    def update_metrics(self) -> None:
        m = self.metrics
        for g in self.gpus:
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
        self.link_metrics()
        dropped = self.link.outbox.dropped_total
        if dropped > self._dropped_seen:
            m.mqtt_dropped.inc(dropped - self._dropped_seen)
        self._dropped_seen = dropped

    def link_metrics(self) -> None:
        self.metrics.mqtt_connected.set(1.0 if self.link.connected else 0.0)
        self.metrics.mqtt_queue_depth.set(len(self.link.outbox))

    def status_line(self) -> str:
        """One line for ``systemctl status`` (sd_notify STATUS=)."""
        ok = sum(1 for g in self.gpus if g.state == "ok")
        mqtt = "connected" if self.link.connected else "disconnected"
        return (
            f"{ok}/{len(self.gpus)} GPUs ok, MQTT {mqtt}, {len(self.link.outbox)} queued, "
            f"seq {self.telemetry_seq}"
        )

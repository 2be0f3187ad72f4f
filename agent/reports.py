"""What the agent says about itself: birth, telemetry windows, energy per token, metrics, status line."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from rackguard.agent import __version__
from rackguard.agent import log as logmod
from rackguard.agent.config import Config
from rackguard.agent.coolant_monitor import CoolantMonitor
from rackguard.agent.energy import EnergyMeter
from rackguard.agent.gate_reports import GateTracker
from rackguard.agent.messages import (
    Cap,
    EnergyTelemetry,
    GpuInventory,
    HostTelemetry,
    NodeId,
    Status,
    Telemetry,
    ThermalModelInfo,
    Thresholds,
    dump,
)
from rackguard.agent.metrics import Metrics
from rackguard.agent.mqtt import MqttLink, Topics
from rackguard.agent.outbox import OutMsg
from rackguard.agent.sensing import GpuState
from rackguard.agent.seqstore import SeqStore
from rackguard.agent.snapshot import NodeSnapshot
from rackguard.agent.telemetry import Window
from rackguard.sensors.base import GpuInfo
from rackguard.sensors.coolant import CoolantSnapshot


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
        seqs: SeqStore,
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
        # The durable outbox holds telemetry's exact seq (written with each message); the seq
        # store only matters when the outbox lost it (then the jump tells consumers of the loss).
        self.seqs = seqs
        self.telemetry_seq = link.outbox.last_seq("telemetry") or seqs.last("telemetry")
        self.birth_uuids: tuple[str, ...] = ()
        self.model_info: Callable[[], dict[str, Any]] | None = None  # the control loop's, once it runs
        self.birth_model: tuple[str, dict[str, float]] | None = None
        self._dropped_seen = link.outbox.dropped_total
        self._energy_seen: dict[int, float] = {}
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
        model = None
        if self.model_info is not None:
            info = self.model_info()
            model = ThermalModelInfo(**{k: info[k] for k in ("source", "params", "rmse_10s_ahead_c")})
            self.birth_model = (model.source, model.params)
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
            thermal_model=model,
        )
        self.link.set_state(self.topics.status, dump(status))

    def rebirth_if_changed(self) -> None:
        """A GPU not identified at start (or replaced) now is: publish the new inventory."""
        model = self.model_info() if self.model_info is not None else None
        changed_model = model is not None and (model["source"], model["params"]) != self.birth_model
        if tuple(g.info.uuid for g in self.gpus) != self.birth_uuids or changed_model:
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
        self.seqs.reserve("telemetry", self.telemetry_seq)
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
        self.update_metrics(snap.coolant)
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

    def update_metrics(self, coolant: CoolantSnapshot | None = None) -> None:
        """Set the gauges from the GPUs' last samples and the tick's coolant snapshot."""
        m = self.metrics
        for g in self.gpus:
            m.set_gpu_uuid(g.info.index, g.info.uuid)
            labels = m.gpu(g.info.index)
            m.gpu_lost.labels(*labels).set(1.0 if g.state == "lost" else 0.0)
            s = g.sample
            if s is None or g.state != "ok":
                continue
            for gauge, value in (
                (m.gpu_power_w, s.power_w),
                (m.gpu_temp_c, s.gpu_temp_c),
                (m.gpu_mem_temp_c, s.mem_temp_c),
                (m.gpu_util, None if s.util_pct is None else s.util_pct / 100.0),
            ):
                if value is not None:
                    gauge.labels(*labels).set(value)
            if s.energy_j is not None:
                before = self._energy_seen.get(g.info.index)
                if before is not None:  # a counter that went backwards was reset: its value is the delta
                    m.gpu_energy_j.labels(*labels).inc(
                        s.energy_j - before if s.energy_j >= before else s.energy_j
                    )
                else:
                    m.gpu_energy_j.labels(*labels).inc(0)
                self._energy_seen[g.info.index] = s.energy_j
        if coolant is not None:
            self._coolant_metrics(coolant)
        m.telemetry_published.inc()
        self.link_metrics()
        dropped = self.link.outbox.dropped_total
        if dropped > self._dropped_seen:
            m.mqtt_dropped.inc(dropped - self._dropped_seen)
        self._dropped_seen = dropped

    def _coolant_metrics(self, c: CoolantSnapshot) -> None:
        """Fresh coolant values (a stale or unknown one is removed, not left at its last value)."""
        m = self.metrics
        lps = 1.0 / 60.0
        for gauge, value in (
            (m.coolant_supply_c, c.supply_temp_c),
            (m.coolant_return_c, c.return_temp_c),
            (m.coolant_flow, None if c.flow_lpm is None else c.flow_lpm * lps),
            (m.coolant_flow_required, None if c.flow_required_lpm is None else c.flow_required_lpm * lps),
            (m.coolant_flow_margin, c.flow_margin),
            (m.coolant_heat_removed_w, c.heat_removed_w),
            (m.coolant_heat_capture, c.heat_capture_ratio),
            (m.coolant_diff_pressure, None if c.diff_pressure_kpa is None else c.diff_pressure_kpa * 1000.0),
        ):
            gauge.set(float("nan") if value is None else value)
        self.coolant.update_metrics()

    def link_metrics(self) -> None:
        m, link = self.metrics, self.link
        m.mqtt_connected.set(1.0 if link.connected else 0.0)
        m.mqtt_queue_depth.set(len(link.outbox))
        m.mqtt_safety_link_connected.set(1.0 if link.priority_connected else 0.0)
        m.advance(m.mqtt_publish_refused, link.refused_total)
        for lane, n in link.inbox.dropped_total.items():
            m.advance(m.mqtt_inbox_dropped, n, lane)
        box = link.outbox
        m.outbox_durable.set(1.0 if box.durable else 0.0)
        m.advance(m.outbox_faults, box.faults_total)

    def status_line(self, cap: Cap | None = None) -> str:
        """One line for ``systemctl status`` (sd_notify STATUS=): GPUs, the cap and why, MQTT."""
        ok = sum(1 for g in self.gpus if g.state == "ok")
        mqtt = "connected" if self.link.connected else "disconnected"
        if cap is None:
            cap_text = "no cap yet"
        else:
            cap_text = f"cap {cap.total} ({cap.reason}, binding {cap.binding})"
            if cap.reason in ("stale", "gpu_lost", "thermal") and max(cap.caps, default=0) <= cap.safe_cap:
                cap_text = f"cap {cap.total} at safe_cap ({cap.reason})"
        line = (
            f"{ok}/{len(self.gpus)} GPUs ok, {cap_text}, MQTT {mqtt}, {len(self.link.outbox)} queued, "
            f"seq {self.telemetry_seq}"
        )
        if self.model_info is not None:
            info = self.model_info()
            errs = [e for e in info["rmse_10s_ahead_c"] if e is not None]
            line += f", model {info['source']}" + (f" (10 s error ≤ {max(errs):.1f} °C)" if errs else "")
        return line

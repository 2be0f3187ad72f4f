"""Prometheus metrics, one registry per agent (so tests and fleets stay isolated).

Names follow Prometheus' conventions: base units (``_watts``, ``_celsius``, ``_joules``,
``_seconds``, ``_pascals``, ``_liters_per_second``), ratios from 0 to 1, counters end in
``_total``. Per-GPU series carry ``gpu`` (the index) and ``uuid``, the label names
dcgm-exporter uses, so the two join. ``promtool check metrics`` is clean (tested).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

GPU = ["gpu", "uuid"]
LEAK_STATES = ("ok", "warning", "critical")


class Metrics:
    """Every metric the agent exports on ``GET /metrics``."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._uuids: dict[int, str] = {}
        # -- GPUs (last sample of each, per publish window) ---------------------------------
        self.gpu_power_w = Gauge("rackguard_gpu_power_watts", "GPU power draw, last sample", GPU, registry=r)
        self.gpu_temp_c = Gauge(
            "rackguard_gpu_temperature_celsius", "GPU die temperature, last sample", GPU, registry=r
        )
        self.gpu_mem_temp_c = Gauge(
            "rackguard_gpu_memory_temperature_celsius", "GPU HBM temperature, last sample", GPU, registry=r
        )
        self.gpu_util = Gauge("rackguard_gpu_utilization_ratio", "GPU utilisation (0-1)", GPU, registry=r)
        self.gpu_energy_j = Counter(
            "rackguard_gpu_energy_joules",
            "GPU energy since the agent started (NVML counter)",
            GPU,
            registry=r,
        )
        self.gpu_lost = Gauge("rackguard_gpu_lost", "1 while the GPU is lost", GPU, registry=r)
        self.gpu_temp_limit_c = Gauge(
            "rackguard_gpu_temperature_limit_celsius",
            "Temperature limits the controller keeps under (kind: gpu, memory, slowdown)",
            ["kind"],
            registry=r,
        )
        self.nvml_call_s = Histogram(
            "rackguard_nvml_call_seconds",
            "Latency of one GPU read",
            ["kind"],
            buckets=(1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
            registry=r,
        )
        self.tick_lateness_s = Histogram(
            "rackguard_tick_lateness_seconds",
            "How late each control tick started",
            buckets=(1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2, 0.1, 1.0),
            registry=r,
        )
        # -- coolant -------------------------------------------------------------------------
        self.sensor_rejected = Counter(
            "rackguard_sensor_rejected", "Rejected sensor payloads", ["sensor", "reason"], registry=r
        )
        self.coolant_supply_c = Gauge(
            "rackguard_coolant_supply_temperature_celsius", "Coolant supply temperature (fresh)", registry=r
        )
        self.coolant_return_c = Gauge(
            "rackguard_coolant_return_temperature_celsius", "Coolant return temperature (fresh)", registry=r
        )
        self.coolant_flow = Gauge(
            "rackguard_coolant_flow_liters_per_second", "Coolant flow through the node (fresh)", registry=r
        )
        self.coolant_flow_required = Gauge(
            "rackguard_coolant_flow_required_liters_per_second",
            "Flow that carries the GPUs' power at the design supply-return rise",
            registry=r,
        )
        self.coolant_flow_margin = Gauge(
            "rackguard_coolant_flow_margin_ratio",
            "Measured flow / required flow (< 1: too little)",
            registry=r,
        )
        self.coolant_heat_removed_w = Gauge(
            "rackguard_coolant_heat_removed_watts",
            "Heat the coolant carries away: flow*rho*cp*dT",
            registry=r,
        )
        self.coolant_heat_capture = Gauge(
            "rackguard_coolant_heat_capture_ratio", "Heat removed / electrical GPU power", registry=r
        )
        self.coolant_diff_pressure = Gauge(
            "rackguard_coolant_diff_pressure_pascals", "Coolant differential pressure (fresh)", registry=r
        )
        self.coolant_sensor_stale = Gauge(
            "rackguard_coolant_sensor_stale",
            "1 while the sensor has no valid reading within its max_age_s",
            ["sensor"],
            registry=r,
        )
        self.coolant_sensor_age_s = Gauge(
            "rackguard_coolant_sensor_age_seconds",
            "Age of the sensor's latest valid reading",
            ["sensor"],
            registry=r,
        )
        self.leak_state = Gauge(
            "rackguard_coolant_leak_detector_state",
            "1 for what the leak detector reads now (state: ok, warning, critical)",
            ["sensor", "state"],
            registry=r,
        )
        self.leak_latched = Gauge(
            "rackguard_coolant_leak_latched",
            "1 while the detector's leak is latched (cleared by an OK reading, and an ack if required)",
            ["sensor"],
            registry=r,
        )
        for g in (
            self.coolant_supply_c,
            self.coolant_return_c,
            self.coolant_flow,
            self.coolant_flow_required,
            self.coolant_flow_margin,
            self.coolant_heat_removed_w,
            self.coolant_heat_capture,
            self.coolant_diff_pressure,
        ):
            g.set(float("nan"))  # unknown until the first fresh reading (or with no sensors declared)
        # -- MQTT ----------------------------------------------------------------------------
        self.mqtt_connected = Gauge("rackguard_mqtt_connected", "1 while connected to the broker", registry=r)
        self.mqtt_queue_depth = Gauge("rackguard_mqtt_queue_depth", "Messages waiting for PUBACK", registry=r)
        self.mqtt_dropped = Counter(
            "rackguard_mqtt_dropped", "Messages dropped from a full outbox", registry=r
        )
        self.telemetry_published = Counter(
            "rackguard_telemetry_windows", "Telemetry windows queued", registry=r
        )
        # -- the cap, operator commands, gates, energy per token, power limits ---------------
        self.cap = Gauge(
            "rackguard_cap_requests",
            "Published concurrency cap (requests in flight) per GPU",
            GPU,
            registry=r,
        )
        self.cap_total = Gauge("rackguard_cap_node_requests", "Sum of the published per-GPU caps", registry=r)
        self.cap_safe = Gauge(
            "rackguard_cap_safe_requests",
            "control.safe_cap: the per-GPU cap while something is wrong",
            registry=r,
        )
        self.cap_reason = Gauge(
            "rackguard_cap_reason",
            "1 for the reason of the published cap, 0 otherwise",
            ["reason"],
            registry=r,
        )
        self.cap_binding = Gauge(
            "rackguard_cap_binding",
            "1 for the constraint that binds the published cap, 0 otherwise",
            ["binding"],
            registry=r,
        )
        self.mpc_paused = Gauge("rackguard_mpc_paused", "1 while an operator paused the MPC", registry=r)
        self.manual_ceiling = Gauge(
            "rackguard_manual_ceiling_requests", "Operator's per-GPU cap ceiling (-1 when none)", registry=r
        )
        self.commands = Counter(
            "rackguard_commands", "Operator commands by result", ["command", "result"], registry=r
        )
        self.gate_in_flight = Gauge(
            "rackguard_gate_in_flight_requests",
            "Requests in flight reported by each fresh gate",
            ["gate"],
            registry=r,
        )
        self.gate_reports_rejected = Counter(
            "rackguard_gate_reports_rejected", "Invalid gate reports", registry=r
        )
        self.tokens = Counter("rackguard_tokens", "Tokens reported by the gates", registry=r)
        self.class_requests = Counter(
            "rackguard_class_requests",
            "Requests per workload class and outcome, from gateways' reports (ok, slo_met, shed, spilled, error)",
            ["cls", "outcome"],
            registry=r,
        )
        self.class_goodput_tokens = Counter(
            "rackguard_class_goodput_tokens",
            "Tokens of SLO-met requests per class (gateways)",
            ["cls"],
            registry=r,
        )
        self.class_energy = Counter(
            "rackguard_class_energy_joules", "GPU energy attributed per class (gateways)", ["cls"], registry=r
        )
        self.energy_per_token_j = Gauge(
            "rackguard_energy_per_token_joules", "GPU energy per token over the last window", registry=r
        )
        self.facility_energy_per_token_j = Gauge(
            "rackguard_facility_energy_per_token_joules",
            "GPU energy x PUE per token, last window",
            registry=r,
        )
        self.power_limit_w = Gauge(
            "rackguard_power_limit_set_watts", "Power limit written by the actuator", ["gpu"], registry=r
        )
        self.power_limit_write_errors = Counter(
            "rackguard_power_limit_write_errors", "Failed power-limit writes", registry=r
        )
        self.power_limit_failing = Gauge(
            "rackguard_power_limit_write_failing", "1 while the last power-limit write failed", registry=r
        )

        # Faults that degrade the agent without stopping it (also in /healthz "degraded").
        self.outbox_durable = Gauge(
            "rackguard_outbox_durable", "1 while queued messages are stored on disk", registry=r
        )
        self.outbox_faults = Counter(
            "rackguard_outbox_faults", "Outbox storage faults (open, write, read, delete)", registry=r
        )
        self.mqtt_publish_refused = Counter(
            "rackguard_mqtt_publish_refused", "Publishes the broker refused (kept queued)", registry=r
        )
        self.mqtt_inbox_dropped = Counter(
            "rackguard_mqtt_inbox_dropped",
            "Incoming messages pushed out of a full inbox lane (oldest of their topic)",
            ["lane"],
            registry=r,
        )
        self.mqtt_safety_link_connected = Gauge(
            "rackguard_mqtt_safety_link_connected",
            "1 while the leak detectors' own broker connection is up",
            registry=r,
        )
        self.degraded = Gauge("rackguard_degraded", "1 while /healthz reports degraded", registry=r)
        # The rack's split (agent/rack.py).
        self.rack_share_w = Gauge("rackguard_rack_share_watts", "This node's share of the rack", registry=r)
        self.rack_capacity_w = Gauge(
            "rackguard_rack_capacity_watts", "The rack's capacity as this node sees it", registry=r
        )
        self.rack_fallback = Gauge(
            "rackguard_rack_fallback", "1 while at the fallback share (broker or rack data lost)", registry=r
        )
        self.rack_backstop_scale = Gauge(
            "rackguard_rack_backstop_scale", "Multiplicative backstop on the share (1: none)", registry=r
        )
        self.rack_claims_rejected = Counter(
            "rackguard_rack_claims_rejected", "Rejected rack claims", ["reason"], registry=r
        )
        self.rack_wills_ignored = Counter(
            "rackguard_rack_wills_ignored",
            "Peers' wills (status offline) of an incarnation older than their latest claim: already restarted",
            registry=r,
        )
        self.rack_peer_status = Gauge(
            "rackguard_rack_peer_status",
            "1 for each peer's status as this node sees it (fresh, stale, dead, absent), else 0",
            ["peer", "status"],
            registry=r,
        )
        self.rack_peer_claim_age_s = Gauge(
            "rackguard_rack_peer_claim_age_seconds",
            "Since each peer's latest claim arrived (by this node's monotonic clock, never the sender's)",
            ["peer"],
            registry=r,
        )
        self._totals: dict[tuple[int, tuple[str, ...]], float] = {}

    def gpu(self, index: int) -> tuple[str, str]:
        """The ``gpu`` and ``uuid`` label values of a GPU."""
        return str(index), self._uuids.get(index, "")

    def set_gpu_uuid(self, index: int, uuid: str) -> None:
        """Record a GPU's UUID; a changed one (identified late, replaced) drops the old series."""
        old = self._uuids.get(index)
        if old == uuid:
            return
        self._uuids[index] = uuid
        if old is None:
            return
        for m in (
            self.gpu_power_w,
            self.gpu_temp_c,
            self.gpu_mem_temp_c,
            self.gpu_util,
            self.gpu_energy_j,
            self.gpu_lost,
            self.cap,
        ):
            try:
                m.remove(str(index), old)
            except KeyError:
                pass

    def advance(self, counter: Counter, total: float, *labels: str) -> None:
        """Bring a counter up to a total kept elsewhere (it never goes down)."""
        key = (id(counter), labels)
        last = self._totals.get(key, 0.0)
        if total > last:
            (counter.labels(*labels) if labels else counter).inc(total - last)
            self._totals[key] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)

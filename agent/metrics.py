"""Prometheus metrics, one registry per agent (so tests and fleets stay isolated)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """Every metric the agent exports on ``GET /metrics``."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.gpu_power_w = Gauge("rackguard_gpu_power_w", "GPU power, last sample", ["gpu"], registry=r)
        self.gpu_temp_c = Gauge(
            "rackguard_gpu_temp_c", "GPU die temperature, last sample", ["gpu"], registry=r
        )
        self.gpu_mem_temp_c = Gauge("rackguard_gpu_mem_temp_c", "GPU HBM temperature", ["gpu"], registry=r)
        self.gpu_energy_j = Gauge("rackguard_gpu_energy_j", "GPU energy counter", ["gpu"], registry=r)
        self.gpu_lost = Gauge("rackguard_gpu_lost", "1 when the GPU is lost", ["gpu"], registry=r)
        self.sensor_rejected = Counter(
            "rackguard_sensor_rejected", "Rejected sensor payloads", ["sensor", "reason"], registry=r
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
        self.mqtt_connected = Gauge("rackguard_mqtt_connected", "1 while connected to the broker", registry=r)
        self.mqtt_queue_depth = Gauge("rackguard_mqtt_queue_depth", "Messages waiting for PUBACK", registry=r)
        self.mqtt_dropped = Counter(
            "rackguard_mqtt_dropped", "Messages dropped from a full outbox", registry=r
        )
        self.telemetry_published = Counter(
            "rackguard_telemetry_windows", "Telemetry windows queued", registry=r
        )
        # Actuation: the published cap, operator commands, gates, energy per token, power limits.
        self.cap = Gauge(
            "rackguard_cap", "Published concurrency cap (requests in flight)", ["gpu"], registry=r
        )
        self.cap_total = Gauge("rackguard_cap_total", "Sum of the published per-GPU caps", registry=r)
        self.cap_reason = Gauge(
            "rackguard_cap_reason",
            "1 for the reason of the published cap, 0 otherwise",
            ["reason"],
            registry=r,
        )
        self.mpc_paused = Gauge("rackguard_mpc_paused", "1 while an operator paused the MPC", registry=r)
        self.manual_ceiling = Gauge(
            "rackguard_manual_ceiling", "Operator's cap ceiling (-1 when none)", registry=r
        )
        self.commands = Counter(
            "rackguard_commands", "Operator commands by result", ["command", "result"], registry=r
        )
        self.gate_in_flight = Gauge(
            "rackguard_gate_in_flight", "Requests in flight reported by each fresh gate", ["gate"], registry=r
        )
        self.gate_reports_rejected = Counter(
            "rackguard_gate_reports_rejected", "Invalid gate reports", registry=r
        )
        self.tokens = Counter("rackguard_tokens", "Tokens reported by the gates", registry=r)
        self.energy_per_token_j = Gauge(
            "rackguard_energy_per_token_j", "GPU energy per token over the last window", registry=r
        )
        self.facility_energy_per_token_j = Gauge(
            "rackguard_facility_energy_per_token_j", "GPU energy x PUE per token, last window", registry=r
        )
        self.power_limit_w = Gauge(
            "rackguard_power_limit_set_w", "Power limit written by the actuator", ["gpu"], registry=r
        )
        self.power_limit_write_errors = Counter(
            "rackguard_power_limit_write_errors", "Failed power-limit writes", registry=r
        )

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

    def render(self) -> bytes:
        return generate_latest(self.registry)

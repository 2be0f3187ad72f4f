"""The gateway's Prometheus metrics (its own registry, served on the gateway's ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1)
_ENERGY_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000)


class GatewayMetrics:
    """Per class: outcomes, times, tokens, energy, carbon, water, FLOPs, SLO and goodput."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        p = "rackguard_gateway_"
        self.requests = Counter(
            p + "requests",
            "Requests by class and outcome (ok, shed, spilled, error)",
            ["cls", "outcome"],
            registry=r,
        )
        self.fallback = Counter(
            p + "fallback_requests", "Requests sent to the fallback upstream", ["cls"], registry=r
        )
        self.queue_wait = Histogram(
            p + "queue_wait_seconds",
            "Time waiting for admission",
            ["cls"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Arrival to first token",
            ["cls"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            p + "latency_seconds", "Arrival to the last byte", ["cls"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            p + "time_per_output_token_seconds",
            "(latency - time to first token) / (completion tokens - 1)",
            ["cls"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(p + "tokens", "Tokens from usage", ["cls", "kind"], registry=r)
        self.energy = Histogram(
            p + "request_energy_joules",
            "GPU energy per request",
            ["cls"],
            buckets=_ENERGY_BUCKETS,
            registry=r,
        )
        self.carbon = Counter(p + "carbon_grams", "Grid carbon of the requests' energy", ["cls"], registry=r)
        self.water = Counter(p + "water_liters", "Site water of the requests' energy", ["cls"], registry=r)
        self.flops = Counter(p + "flops", "Estimated FLOPs: 2 × parameters × tokens", ["cls"], registry=r)
        self.slo_met = Counter(
            p + "slo_met_requests", "Ok requests within the class's SLOs", ["cls"], registry=r
        )
        self.goodput_tokens = Counter(
            p + "goodput_tokens", "Completion tokens of requests within the class's SLOs", ["cls"], registry=r
        )
        self.queued = Gauge(p + "queued_requests", "Requests waiting for admission", ["cls"], registry=r)
        self.in_flight = Gauge(
            p + "in_flight_requests", "Requests in flight per upstream", ["upstream"], registry=r
        )
        self.limit = Gauge(
            p + "limit_requests",
            "Admission limit per upstream (sum of its GPUs' caps)",
            ["upstream"],
            registry=r,
        )
        self.limit_safe = Gauge(
            p + "limit_safe",
            "1 while the upstream's limit is safe_cap (no valid cap)",
            ["upstream"],
            registry=r,
        )
        self.gpu_energy = Counter(
            p + "gpu_energy_joules", "Upstream GPUs' energy seen in telemetry", ["upstream"], registry=r
        )
        self.idle_energy = Counter(
            p + "idle_energy_joules",
            "Upstream GPU energy in windows without tokens",
            ["upstream"],
            registry=r,
        )
        self.mqtt_connected = Gauge(p + "mqtt_connected", "1 while connected to the broker", registry=r)
        self.bad_requests = Counter(p + "bad_requests", "Requests refused as malformed (400/413)", registry=r)

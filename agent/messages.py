"""Pydantic models of every message rackguard publishes.

``rackguard schema`` prints their JSON Schemas. Payloads are JSON objects with a
``schema`` tag, a per-stream ``seq`` and ``t_s`` (wall-clock seconds when the
data was sampled, not when it was published).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rackguard.controllers.api import Binding


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stat(_Msg):
    """Mean, minimum and maximum over the publish window."""

    mean: float
    min: float
    max: float


class Thresholds(_Msg):
    slowdown_c: float | None
    shutdown_c: float | None
    gpu_max_c: float | None
    mem_max_c: float | None


class GpuInventory(_Msg):
    index: int
    uuid: str
    name: str
    thresholds: Thresholds
    power_limit_min_w: float | None
    power_limit_max_w: float | None
    power_limit_default_w: float | None


class NodeId(_Msg):
    site: str
    rack: str
    name: str


class ThermalModelInfo(_Msg):
    """The thermal model the MPC runs on, and its rolling 10 s-ahead die error per GPU."""

    source: str = Field(description="model file path, or 'built-in'")
    params: dict[str, float]
    rmse_10s_ahead_c: list[float | None] = Field(description="per GPU; None before 10 s of data")


class Status(_Msg):
    """Retained on ``.../status``: the birth message (online) or the last will (offline)."""

    schema_: Literal["rackguard.status/1"] = Field("rackguard.status/1", alias="schema")
    state: Literal["online", "offline"]
    t_s: float = Field(
        description="online: when the agent (re)connected and sent its birth; offline as the last will: when "
        "the agent connected and handed the will to the broker (the broker sends it later, unchanged); "
        "offline on shutdown: when the agent stopped"
    )
    node: NodeId
    incarnation: int | None = Field(
        None,
        description="grows on every start of the agent (persisted in the state directory); the birth and "
        "the last will of one run carry the same number",
    )
    version: str | None = None
    backend: str | None = None
    reason: str | None = None
    poll_period_s: float | None = None
    publish_period_s: float | None = None
    gpus: list[GpuInventory] = []
    thermal_model: ThermalModelInfo | None = None


class GpuTelemetry(_Msg):
    index: int
    uuid: str
    state: Literal["ok", "lost"]
    error: str | None = None
    samples: int = Field(description="samples in this window")
    t_s: float | None = Field(None, description="time of the last sample in the window")
    power_w: Stat | None = None
    gpu_temp_c: Stat | None = None
    mem_temp_c: Stat | None = None
    sm_clock_mhz: Stat | None = None
    util_pct: Stat | None = None
    energy_j: float | None = Field(None, description="monotonic energy counter at the last sample")
    power_limit_w: float | None = None
    clock_events: list[str] = Field([], description="clock-event reasons seen in the window")


class HostTelemetry(_Msg):
    t_s: float
    cpu_pct: float | None = None
    load1: float | None = None
    load5: float | None = None
    load15: float | None = None
    mem_used_pct: float | None = None
    mem_available_mb: float | None = None
    cpu_temp_c: float | None = None
    agent_cpu_pct: float | None = None
    agent_rss_mb: float | None = None


class CoolantSensorTelemetry(_Msg):
    """One declared coolant sensor: its latest valid reading, age and state."""

    id: str
    kind: str
    state: Literal["ok", "stale"] = Field(description="stale: no valid reading within max_age_s (or never)")
    age_s: float | None = Field(description="age of the latest valid reading; null if none yet")
    t_s: float | None = Field(description="sample time of the latest valid reading")
    values: dict[str, float] = Field(description="latest valid values, canonical unit-suffixed names")
    leak: Literal["ok", "warning", "critical"] | None = Field(
        None, description="detector reading (leak only)"
    )
    leak_latched: Literal["ok", "warning", "critical"] | None = Field(None, description="latch (leak only)")
    rejected: int = Field(description="payloads rejected since start")


class CoolantTelemetry(_Msg):
    """The coolant loop: fresh values only (null when stale or unknown), derived physics, leaks."""

    supply_temp_c: float | None
    return_temp_c: float | None
    flow_lpm: float | None
    diff_pressure_kpa: float | None
    stale: bool = Field(description="a declared sensor has no valid reading within its max_age_s")
    leak: Literal["ok", "warning", "critical"] = Field(description="worst leak state, latched or current")
    leak_latched: bool
    gpu_power_w: float | None = Field(description="electrical GPU power used for the derived values")
    heat_removed_w: float | None = Field(description="flow·ρ·cp·(T_return − T_supply)")
    flow_required_lpm: float | None = Field(description="gpu_power_w / (ρ·cp·ΔT_design)")
    flow_margin: float | None = Field(description="flow_lpm / flow_required_lpm")
    heat_capture_ratio: float | None = Field(description="heat_removed_w / gpu_power_w")
    rejected_undeclared: int = Field(description="messages on the sensor filters but no declared topic")
    sensors: list[CoolantSensorTelemetry]


class EnergyTelemetry(_Msg):
    """Energy per token over the publish window (GPU energy counter deltas / gate-reported tokens)."""

    gpu_energy_j: float | None = Field(
        description="GPU energy in the window; null if no GPU had two readings"
    )
    gpus_counted: int = Field(
        description="GPUs whose energy counter contributed (lost/unread ones are skipped)"
    )
    tokens: int = Field(description="tokens the gates reported completed in the window")
    requests: int = Field(description="requests the gates reported completed in the window")
    energy_per_token_j: float | None = Field(description="gpu_energy_j / tokens; null without tokens")
    facility_energy_per_token_j: float | None = Field(description="energy_per_token_j × pue")
    pue: float
    gates: int = Field(description="gates with a fresh report")


class Telemetry(_Msg):
    """One message per node per publish period on ``.../telemetry``."""

    schema_: Literal["rackguard.telemetry/1"] = Field("rackguard.telemetry/1", alias="schema")
    seq: int
    t_s: float = Field(description="time of the newest sample in the window")
    window_start_s: float
    window_end_s: float
    node: NodeId
    historical: bool = Field(False, description="true when replayed after an outage")
    dropped_total: int = Field(
        0, description="messages this node's outbox ever dropped when full (oldest telemetry first)"
    )
    gpus: list[GpuTelemetry]
    host: HostTelemetry | None = None
    coolant: CoolantTelemetry | None = Field(None, description="absent when no coolant sensors are declared")
    energy: EnergyTelemetry | None = Field(None, description="energy per token over this window")


class Cap(_Msg):
    """Retained on ``.../cap`` with an MQTT 5 message expiry: the concurrency cap to obey."""

    schema_: Literal["rackguard.cap/1"] = Field("rackguard.cap/1", alias="schema")
    seq: int
    t_s: float = Field(description="time of the observation the decision was made from")
    valid_until_s: float = Field(description="obey until then; afterwards fall back to safe_cap")
    node: NodeId
    caps: list[int] = Field(description="requests in flight allowed per GPU, by GPU index")
    total: int = Field(description="sum of caps: requests in flight allowed on the node")
    reason: Literal["mpc", "leak", "stale", "thermal", "gpu_lost", "manual"]
    binding: Binding
    predicted_max_temp_c: float | None = None
    safe_cap: int
    max_cap: int
    mpc_paused: bool = False
    manual_ceiling: int | None = None


# Bounds on a rack claim: a claim outside them is rejected and counted (agent/rack.py).
CLAIM_MAX_BYTES = 1024
CLAIM_MAX_CLASSES = 8


class ClassDemand(_Msg):
    cls: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")
    prio: int = Field(ge=0, le=100, description="higher is served first")
    demand_w: int = Field(ge=0, description="watts this class would use on the node")


class Claim(_Msg):
    """Retained on ``.../claim`` every control period: the node's part in the rack's split (agent/rack.py)."""

    schema_: Literal["rackguard.claim/1"] = Field("rackguard.claim/1", alias="schema")
    node: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    inc: int = Field(ge=0, le=2**53, description="incarnation: grows on every start (as the status's)")
    seq: int = Field(ge=0, le=2**53)
    t_s: float = Field(allow_inf_nan=False, description="sender's clock; receivers age claims by their own")
    heat_w: int = Field(ge=0, description="heat the node puts into the coolant now")
    power_w: int = Field(ge=0, description="the node's GPU power now")
    floor_w: int = Field(ge=0)
    demand: list[ClassDemand] = Field(max_length=CLAIM_MAX_CLASSES, description="per workload class")
    cap_total: int = Field(ge=0, description="the concurrency cap in force")
    share_w: int = Field(ge=0, description="the share in force")
    next_w: int = Field(ge=0, description="the share it will raise to next period (= share_w: none)")
    view: str = Field(max_length=16, description="hash of its view of the rack")
    cfg: str = Field(max_length=16, description="hash of its rack capacity config")
    capacity_w: int = Field(ge=0, description="the rack's capacity as it sees it now")
    budget_w: int = Field(ge=0, description="its configured power budget (0: none)")
    degraded_w: int = Field(ge=0, description="its configured degraded capacity")
    fallback: bool = Field(description="running at its fallback share (rack data stale)")


class Alarm(_Msg):
    """Retained on ``.../alarm/<sensor>`` (QoS 1): the detector's state, re-published on every connect."""

    schema_: Literal["rackguard.alarm/1"] = Field("rackguard.alarm/1", alias="schema")
    t_s: float
    node: NodeId
    alarm: Literal["coolant_leak"]
    sensor: str
    state: Literal["ok", "warning", "critical"] = Field(description="what the sensor reads now")
    latched: Literal["ok", "warning", "critical"] = Field(description="the latched state (ok = cleared)")
    ack_required: bool = Field(description="the latch clears only after an OK reading and an operator ack")


# Bounds on what a gate may claim: far above any real server, small enough that arithmetic on
# them (sums, floats, rates) can never overflow. A report outside them is rejected and counted.
GATE_MAX_IN_FLIGHT = 1_000_000
GATE_MAX_COUNTER = 2**53  # exact in a float


GATE_MAX_CLASSES = 16
_CLASS_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
GATE_MAX_ENERGY_J = 1e18  # ~30 GW for a year: far above any node


class GateClassCounters(_Msg):
    """One workload class's cumulative counters in a gateway's report (since it started)."""

    completed_total: int = Field(ge=0, le=GATE_MAX_COUNTER, description="requests answered ok")
    slo_met_total: int = Field(ge=0, le=GATE_MAX_COUNTER, description="of those, within the class's SLOs")
    shed_total: int = Field(ge=0, le=GATE_MAX_COUNTER, description="refused with 429")
    spilled_total: int = Field(ge=0, le=GATE_MAX_COUNTER, description="sent to the fallback upstream")
    error_total: int = Field(ge=0, le=GATE_MAX_COUNTER, description="failed (upstream error, disconnect)")
    tokens_total: int = Field(ge=0, le=GATE_MAX_COUNTER, description="completion tokens of ok requests")
    goodput_tokens_total: int = Field(ge=0, le=GATE_MAX_COUNTER, description="tokens of SLO-met requests")
    energy_j_total: float = Field(
        ge=0, le=GATE_MAX_ENERGY_J, allow_inf_nan=False, description="GPU energy attributed to its requests"
    )


class GateReport(_Msg):
    """Published by each inference server's gate (agent/gate.py) on ``.../gate/<gate_id>`` about every 1 s."""

    schema_: Literal["rackguard.gate/1"] = Field("rackguard.gate/1", alias="schema")
    gate_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    gpu: int | None = Field(
        ge=0,
        le=1024,
        description="the GPU the gate serves, as its position in the cap's caps list; null = the whole node",
    )
    t_s: float = Field(allow_inf_nan=False)
    in_flight: int = Field(ge=0, le=GATE_MAX_IN_FLIGHT, description="requests inside the gate now")
    limit: int = Field(ge=0, le=GATE_MAX_IN_FLIGHT, description="the gate's current admission limit")
    source: Literal["mqtt", "http", "safe"] = Field("mqtt", description="where the limit came from")
    completed_total: int = Field(
        ge=0, le=GATE_MAX_COUNTER, description="requests completed since the gate started"
    )
    tokens_total: int = Field(ge=0, le=GATE_MAX_COUNTER, description="tokens reported since the gate started")
    gpus: list[int] | None = Field(
        None,
        max_length=1024,
        description="a gate over several GPUs (a gateway's upstream): its in-flight is spread over them",
    )
    classes: dict[str, GateClassCounters] | None = Field(
        None,
        max_length=GATE_MAX_CLASSES,
        description="per workload class (a gateway); absent from a plain gate",
    )

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(not 0 <= g <= 1024 for g in v)):
            raise ValueError("gpus must be 1 to 1024 GPU indices in 0..1024")
        return v

    @field_validator("classes")
    @classmethod
    def _class_names(cls, v: dict[str, GateClassCounters] | None) -> dict[str, GateClassCounters] | None:
        if v is not None and any(not _CLASS_NAME.fullmatch(k) for k in v):
            raise ValueError("class names must be 1-64 of A-Z a-z 0-9 _ . -")
        return v


class CommandAck(_Msg):
    """Published (QoS 1, not retained) on ``.../cmd/ack`` for every message on ``.../cmd``."""

    schema_: Literal["rackguard.cmd_ack/1"] = Field("rackguard.cmd_ack/1", alias="schema")
    t_s: float
    node: NodeId
    id: str | None = Field(description="the command's id (null if the payload had none)")
    command: str | None
    accepted: bool
    reason: str = Field(description="'ok', or why the command was rejected")
    cap_total: int | None = Field(None, description="the node's cap right after the command")


def dump(msg: BaseModel) -> bytes:
    return msg.model_dump_json(by_alias=True, exclude_none=False).encode()


MESSAGES: dict[str, type[BaseModel]] = {
    "status": Status,
    "telemetry": Telemetry,
    "cap": Cap,
    "alarm/<sensor>": Alarm,
    "gate/<gate_id>": GateReport,
    "cmd/ack": CommandAck,
    "claim": Claim,
}


SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schema_id(name: str) -> str:
    """The ``$id`` of a topic's schema, e.g. ``urn:rackguard:schema:cmd/ack``."""
    return "urn:rackguard:schema:" + name.replace("<", "").replace(">", "")


def schemas() -> dict[str, Any]:
    """JSON Schema of every message on a node's topics (published, and ``cmd`` taken in), by topic suffix.

    Each carries ``$schema`` (draft 2020-12, what pydantic generates) and an ``$id``.
    """
    from rackguard.agent.operator_commands import cmd_schema  # operator_commands needs the config

    out: dict[str, Any] = {name: model.model_json_schema(by_alias=True) for name, model in MESSAGES.items()}
    out["cmd"] = cmd_schema()
    return {
        name: {
            "$schema": SCHEMA_DIALECT,
            "$id": schema_id(name),
            **{k: v for k, v in s.items() if k[0] != "$"},
        }
        | ({"$defs": s["$defs"]} if "$defs" in s else {})
        for name, s in out.items()
    }

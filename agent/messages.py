"""Pydantic models of every message rackguard publishes.

``rackguard schema`` prints their JSON Schemas. Payloads are JSON objects with a
``schema`` tag, a per-stream ``seq`` and ``t_s`` (wall-clock seconds when the
data was sampled, not when it was published).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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


class Status(_Msg):
    """Retained on ``.../status``: the birth message (online) or the last will (offline)."""

    schema_: Literal["rackguard.status/1"] = Field("rackguard.status/1", alias="schema")
    state: Literal["online", "offline"]
    t_s: float
    node: NodeId
    version: str | None = None
    backend: str | None = None
    reason: str | None = None
    poll_period_s: float | None = None
    publish_period_s: float | None = None
    gpus: list[GpuInventory] = []


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


class Telemetry(_Msg):
    """One message per node per publish period on ``.../telemetry``."""

    schema_: Literal["rackguard.telemetry/1"] = Field("rackguard.telemetry/1", alias="schema")
    seq: int
    t_s: float = Field(description="time of the newest sample in the window")
    window_start_s: float
    window_end_s: float
    node: NodeId
    historical: bool = Field(False, description="true when replayed after an outage")
    gpus: list[GpuTelemetry]
    host: HostTelemetry | None = None


def dump(msg: BaseModel) -> bytes:
    return msg.model_dump_json(by_alias=True, exclude_none=False).encode()


MESSAGES: dict[str, type[BaseModel]] = {"status": Status, "telemetry": Telemetry}


def schemas() -> dict[str, Any]:
    """JSON Schema of every published message, keyed by topic suffix."""
    return {name: model.model_json_schema(by_alias=True) for name, model in MESSAGES.items()}

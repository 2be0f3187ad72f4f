"""Coolant, CDU and leak sensors: declarations, payload parsing, derived heat physics.

Pure: no MQTT here. The agent (``agent/coolant_monitor.py``) hands every payload that
arrives on a sensor's topic to :func:`parse`, which returns either a
:class:`Reading` (every value finite, in range, in canonical units) or a
:class:`Rejected` with a stable ``reason``. Nothing a payload contains can make
:func:`parse` raise.

Payload formats (``format``):

* ``plain``: the payload is the value as text (``31.5``; a leak detector sends
  ``OK``/``Warning``/``Critical``/``Unavailable``/``Absent`` or ``true``/``false``).
* ``json``: a JSON object; ``field`` is a dotted path to the value.
* ``redfish``: Redfish-shaped JSON. CoolantConnector-style
  ``SupplyTemperatureCelsius``, ``ReturnTemperatureCelsius``,
  ``FlowLitersPerMinute``, ``DeltaPressurekPa`` (a number or an excerpt
  ``{"Reading": number}``); LeakDetector-style ``DetectorState``.

Canonical value names carry their units: ``supply_temp_c``, ``return_temp_c``,
``flow_lpm``, ``diff_pressure_kpa``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from rackguard.physics import heat_w

MAX_PAYLOAD_BYTES: Final = 64 * 1024

Quantity = Literal["supply_temp_c", "return_temp_c", "flow_lpm", "diff_pressure_kpa"]
QUANTITIES: Final[tuple[Quantity, ...]] = ("supply_temp_c", "return_temp_c", "flow_lpm", "diff_pressure_kpa")
LeakState = Literal["ok", "warning", "critical"]
LEAK_SEVERITY: Final[dict[str, int]] = {"ok": 0, "warning": 1, "critical": 2}

# Rejection reasons (label values of rackguard_sensor_rejected_total).
Reason = Literal[
    "too_large",
    "malformed",
    "wrong_type",
    "not_finite",
    "out_of_range",
    "missing_field",
    "ts_future",
    "ts_too_old",
    "unavailable",
    "undeclared_topic",
]

REDFISH_KEYS: Final[dict[Quantity, str]] = {
    "supply_temp_c": "SupplyTemperatureCelsius",
    "return_temp_c": "ReturnTemperatureCelsius",
    "flow_lpm": "FlowLitersPerMinute",
    "diff_pressure_kpa": "DeltaPressurekPa",
}
_DETECTOR_STATES: Final[dict[str, LeakState | None]] = {
    "OK": "ok",
    "Warning": "warning",
    "Critical": "critical",
    "Unavailable": None,
    "Absent": None,
}
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_PATH = r"^[A-Za-z0-9_@:-]+(\.[A-Za-z0-9_@:-]+)*$"

# Unit conversions to the canonical unit: value_canonical = value * scale + offset.
_TEMP_UNITS: Final = {"c": (1.0, 0.0), "k": (1.0, -273.15), "f": (5.0 / 9.0, -32.0 * 5.0 / 9.0)}
_FLOW_UNITS: Final = {"lpm": (1.0, 0.0), "m3_per_h": (1000.0 / 60.0, 0.0), "gpm": (3.785411784, 0.0)}
_PRESSURE_UNITS: Final = {"kpa": (1.0, 0.0), "bar": (100.0, 0.0), "psi": (6.894757293168, 0.0)}


# -- declarations ------------------------------------------------------------------------
def _ordered(r: tuple[float, float]) -> tuple[float, float]:
    lo, hi = r
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError("must be [low, high] with low < high, both finite")
    return r


Range = Annotated[tuple[float, float], AfterValidator(_ordered)]
SensorId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
Topic = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^+#\x00]+$")]
JsonPath = Annotated[str, Field(min_length=1, max_length=256, pattern=_PATH)]


class _Decl(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: SensorId
    topic: Topic = Field(description="exact MQTT topic (no wildcards)")
    max_age_s: float = Field(
        default=10.0, gt=0, le=3600, description="stale after this long without a valid reading"
    )
    timestamp_field: JsonPath | None = Field(
        default=None,
        description="dotted path to the sample time (epoch seconds or ISO 8601 with zone); json/redfish",
    )


class _Single(_Decl):
    format: Literal["plain", "json", "redfish"] = "json"
    field: JsonPath | None = Field(default=None, description="dotted path to the value (format json)")

    @model_validator(mode="after")
    def _format_fields(self) -> _Single:
        if self.format == "json" and self.field is None:
            raise ValueError("format 'json' needs field")
        if self.format != "json" and self.field is not None:
            raise ValueError(f"field applies only to format 'json', not {self.format!r}")
        if self.format == "plain" and self.timestamp_field is not None:
            raise ValueError("timestamp_field needs format 'json' or 'redfish'")
        return self


class TempSensor(_Single):
    """A coolant supply or return temperature probe."""

    kind: Literal["coolant_supply_temp", "coolant_return_temp"]
    unit: Literal["c", "k", "f"] = "c"
    valid_temp_c: Range = (5.0, 70.0)

    @model_validator(mode="after")
    def _redfish_unit(self) -> TempSensor:
        if self.format == "redfish" and self.unit != "c":
            raise ValueError("redfish temperatures are in Celsius: unit must be 'c'")
        return self

    @property
    def quantity(self) -> Quantity:
        return "supply_temp_c" if self.kind == "coolant_supply_temp" else "return_temp_c"


class FlowSensor(_Single):
    """Coolant flow through this node's cold plates."""

    kind: Literal["flow"]
    unit: Literal["lpm", "m3_per_h", "gpm"] = "lpm"
    valid_flow_lpm: Range = (0.0, 1000.0)

    @model_validator(mode="after")
    def _redfish_unit(self) -> FlowSensor:
        if self.format == "redfish" and self.unit != "lpm":
            raise ValueError("redfish flow is in L/min: unit must be 'lpm'")
        return self

    @property
    def quantity(self) -> Quantity:
        return "flow_lpm"


class PressureSensor(_Single):
    """Differential pressure across the node's manifold or the CDU."""

    kind: Literal["diff_pressure"]
    unit: Literal["kpa", "bar", "psi"] = "kpa"
    valid_diff_pressure_kpa: Range = (-50.0, 1000.0)

    @model_validator(mode="after")
    def _redfish_unit(self) -> PressureSensor:
        if self.format == "redfish" and self.unit != "kpa":
            raise ValueError("redfish pressure is in kPa: unit must be 'kpa'")
        return self

    @property
    def quantity(self) -> Quantity:
        return "diff_pressure_kpa"


class CduSensor(_Decl):
    """A CDU reporting several values in one message (canonical units)."""

    kind: Literal["cdu"]
    format: Literal["json", "redfish"] = "redfish"
    values: tuple[Quantity, ...] = Field(
        default=QUANTITIES, min_length=1, description="values every message must carry"
    )
    fields: dict[Quantity, JsonPath] = Field(
        default_factory=dict, description="dotted path per value (format json; default: the value's name)"
    )
    valid_temp_c: Range = (5.0, 70.0)
    valid_flow_lpm: Range = (0.0, 1000.0)
    valid_diff_pressure_kpa: Range = (-50.0, 1000.0)

    @model_validator(mode="after")
    def _checks(self) -> CduSensor:
        if len(set(self.values)) != len(self.values):
            raise ValueError("values must not repeat")
        if self.format == "redfish" and self.fields:
            raise ValueError("fields applies only to format 'json'")
        return self

    def path(self, q: Quantity) -> str:
        if self.format == "redfish":
            return REDFISH_KEYS[q]
        return self.fields.get(q, q)


class LeakSensor(_Decl):
    """A leak detector: Redfish ``DetectorState``, a state string, or a boolean."""

    kind: Literal["leak"]
    format: Literal["plain", "json", "redfish"] = "redfish"
    field: JsonPath | None = Field(default=None, description="dotted path to the state (format json)")
    true_state: Literal["warning", "critical"] = Field(
        default="critical", description="what a boolean true (leak detected) means"
    )

    @model_validator(mode="after")
    def _format_fields(self) -> LeakSensor:
        if self.format == "json" and self.field is None:
            raise ValueError("format 'json' needs field")
        if self.format != "json" and self.field is not None:
            raise ValueError(f"field applies only to format 'json', not {self.format!r}")
        if self.format == "plain" and self.timestamp_field is not None:
            raise ValueError("timestamp_field needs format 'json' or 'redfish'")
        return self


CoolantSensor = Annotated[
    TempSensor | FlowSensor | PressureSensor | CduSensor | LeakSensor, Field(discriminator="kind")
]
ValueSensor = TempSensor | FlowSensor | PressureSensor


def quantities(sensor: CoolantSensor) -> tuple[Quantity, ...]:
    """The canonical values a sensor provides (none for a leak detector)."""
    if isinstance(sensor, CduSensor):
        return sensor.values
    if isinstance(sensor, LeakSensor):
        return ()
    return (sensor.quantity,)


# -- parse results -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Reading:
    """A fully validated reading.

    Attributes:
        sensor_id: The declaring sensor.
        t_s: Wall-clock sample time (the payload's timestamp, else receipt time).
        values: Canonical values, finite and in range (empty for a leak detector).
        leak: The detector's state (leak detectors only).
    """

    sensor_id: str
    t_s: float
    values: Mapping[str, float] = field(default_factory=dict)
    leak: LeakState | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A payload that was not fully trustworthy. ``reason`` is a stable label."""

    sensor_id: str
    reason: Reason
    detail: str


class _Reject(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = detail[:200]


class _NotFinite(ValueError):
    pass


def _no_constants(name: str) -> Any:
    raise _NotFinite(name)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _load_json(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    except _NotFinite as exc:
        raise _Reject("not_finite", f"JSON constant {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise _Reject("malformed", f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _Reject("wrong_type", f"JSON {type(doc).__name__}, expected an object")
    return doc


def _lookup(doc: Mapping[str, Any], path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise _Reject("missing_field", f"no {path!r}")
        node = node[part]
    return node


def _finite(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _Reject("wrong_type", f"{what}: {type(v).__name__}, expected a number")
    try:
        x = float(v)
    except OverflowError:
        raise _Reject("not_finite", f"{what}: integer too large") from None
    if not math.isfinite(x):
        raise _Reject("not_finite", f"{what}: {x}")
    return x


def _plain_number(text: str, what: str) -> float:
    s = text.strip()
    if not _NUMBER.fullmatch(s):
        low = s.lower().lstrip("+-")
        if low in ("nan", "inf", "infinity"):
            raise _Reject("not_finite", f"{what}: {s[:20]!r}")
        raise _Reject("wrong_type", f"{what}: {s[:40]!r} is not a number")
    x = float(s)
    if not math.isfinite(x):
        raise _Reject("not_finite", f"{what}: {s[:40]!r}")
    return x


def _in_range(x: float, rng: tuple[float, float], what: str) -> float:
    lo, hi = rng
    if not lo <= x <= hi:
        raise _Reject("out_of_range", f"{what}={x:.6g} outside [{lo:g}, {hi:g}]")
    return x


def _convert(x: float, unit: str, table: Mapping[str, tuple[float, float]]) -> float:
    scale, offset = table[unit]
    return x * scale + offset


def _timestamp(doc: Mapping[str, Any], sensor: CoolantSensor, now_s: float, max_future_s: float) -> float:
    if sensor.timestamp_field is None:
        return now_s
    raw = _lookup(doc, sensor.timestamp_field)
    if isinstance(raw, str):
        try:
            dt = datetime.fromisoformat(raw)
        except ValueError:
            raise _Reject("wrong_type", f"timestamp {raw[:40]!r} is not ISO 8601") from None
        if dt.tzinfo is None:
            raise _Reject("wrong_type", f"timestamp {raw[:40]!r} has no time zone")
        t_s = dt.timestamp()
    else:
        t_s = _finite(raw, "timestamp")
    if t_s > now_s + max_future_s:
        raise _Reject("ts_future", f"timestamp {t_s - now_s:.3g} s in the future")
    if t_s < now_s - sensor.max_age_s:
        raise _Reject("ts_too_old", f"timestamp {now_s - t_s:.3g} s old")
    return min(t_s, now_s)


def _redfish_reading(doc: Mapping[str, Any], key: str) -> float:
    v = _lookup(doc, key)
    if isinstance(v, dict):  # a Redfish SensorExcerpt: {"Reading": 31.5, ...}
        if "Reading" not in v:
            raise _Reject("missing_field", f"no {key}.Reading")
        v = v["Reading"]
    if v is None:
        raise _Reject("unavailable", f"{key} is null")
    return _finite(v, key)


def _value(sensor: ValueSensor, payload: str | None, doc: Mapping[str, Any] | None) -> float:
    q = sensor.quantity
    if sensor.format == "plain":
        assert payload is not None
        x = _plain_number(payload, q)
    elif sensor.format == "json":
        assert doc is not None and sensor.field is not None
        x = _finite(_lookup(doc, sensor.field), sensor.field)
    else:
        assert doc is not None
        x = _redfish_reading(doc, REDFISH_KEYS[q])
    if isinstance(sensor, TempSensor):
        return _in_range(_convert(x, sensor.unit, _TEMP_UNITS), sensor.valid_temp_c, q)
    if isinstance(sensor, FlowSensor):
        return _in_range(_convert(x, sensor.unit, _FLOW_UNITS), sensor.valid_flow_lpm, q)
    return _in_range(_convert(x, sensor.unit, _PRESSURE_UNITS), sensor.valid_diff_pressure_kpa, q)


def _cdu_range(sensor: CduSensor, q: Quantity) -> tuple[float, float]:
    if q in ("supply_temp_c", "return_temp_c"):
        return sensor.valid_temp_c
    return sensor.valid_flow_lpm if q == "flow_lpm" else sensor.valid_diff_pressure_kpa


def _leak_state(sensor: LeakSensor, v: Any) -> LeakState:
    if isinstance(v, bool):
        return sensor.true_state if v else "ok"
    if isinstance(v, str):
        s = v.strip()
        if s in _DETECTOR_STATES:
            state = _DETECTOR_STATES[s]
            if state is None:
                raise _Reject("unavailable", f"detector state {s}")
            return state
        if sensor.format == "plain" and s.lower() in ("true", "false", "1", "0"):
            return sensor.true_state if s.lower() in ("true", "1") else "ok"
        raise _Reject("wrong_type", f"unknown detector state {s[:40]!r}")
    raise _Reject("wrong_type", f"detector state: {type(v).__name__}")


def _parse(sensor: CoolantSensor, payload: bytes, now_s: float, max_future_s: float) -> Reading:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise _Reject("too_large", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise _Reject("malformed", "not UTF-8") from None
    if sensor.format == "plain":
        if isinstance(sensor, LeakSensor):
            return Reading(sensor.id, now_s, {}, _leak_state(sensor, text))
        assert not isinstance(sensor, CduSensor)
        return Reading(sensor.id, now_s, {sensor.quantity: _value(sensor, text, None)})
    doc = _load_json(text)
    t_s = _timestamp(doc, sensor, now_s, max_future_s)
    if isinstance(sensor, LeakSensor):
        path = sensor.field if sensor.format == "json" and sensor.field else "DetectorState"
        return Reading(sensor.id, t_s, {}, _leak_state(sensor, _lookup(doc, path)))
    if isinstance(sensor, CduSensor):
        values: dict[str, float] = {}
        for q in sensor.values:
            path = sensor.path(q)
            x = (
                _redfish_reading(doc, path)
                if sensor.format == "redfish"
                else _finite(_lookup(doc, path), path)
            )
            values[q] = _in_range(x, _cdu_range(sensor, q), q)
        return Reading(sensor.id, t_s, values)
    return Reading(sensor.id, t_s, {sensor.quantity: _value(sensor, None, doc)})


def parse(
    sensor: CoolantSensor, payload: bytes, *, now_s: float, max_future_s: float = 5.0
) -> Reading | Rejected:
    """Validate one payload from ``sensor``'s topic. Never raises.

    Args:
        sensor: The sensor's declaration.
        payload: The raw MQTT payload.
        now_s: Wall-clock time of receipt.
        max_future_s: How far a payload timestamp may lie ahead of ``now_s`` (clock skew).

    Returns:
        A :class:`Reading` whose values are finite, in range and in canonical
        units, or a :class:`Rejected` naming why not.
    """
    try:
        return _parse(sensor, payload, now_s, max_future_s)
    except _Reject as r:
        return Rejected(sensor.id, r.reason, r.detail)
    except Exception as exc:  # defence in depth: a parser bug must not become a crash
        return Rejected(sensor.id, "malformed", f"{type(exc).__name__}: {exc}"[:200])


# -- derived physics (rackguard.physics) --------------------------------------------------


def heat_removed_w(
    flow_lpm: float,
    supply_temp_c: float,
    return_temp_c: float,
    *,
    cp_j_per_kg_k: float,
    density_kg_per_l: float,
) -> float:
    """Heat the coolant carries away: ṁ·cp·(T_return − T_supply)."""
    return heat_w(
        flow_lpm,
        return_temp_c - supply_temp_c,
        cp_j_per_kg_k=cp_j_per_kg_k,
        density_kg_per_l=density_kg_per_l,
    )


@dataclass(frozen=True, slots=True)
class CoolantSnapshot:
    """The coolant loop as the controller sees it: fresh values only.

    Attributes:
        t_s: Wall-clock time of the snapshot.
        supply_temp_c: Freshest valid supply temperature; None if none is fresh.
        return_temp_c: Freshest valid return temperature; None if none is fresh.
        flow_lpm: Freshest valid flow through this node; None if none is fresh.
        diff_pressure_kpa: Freshest valid differential pressure; None if none is fresh.
        stale: Some declared sensor has had no valid reading for its ``max_age_s``.
        stale_sensors: Ids of those sensors.
        leak: Worst latched or current leak state over all detectors.
        leak_sensors: Ids of detectors whose leak latch is set.
        gpu_power_w: Electrical GPU power the derived values used (None = unknown).
        heat_removed_w: ṁ·cp·(T_return − T_supply), or None.
        flow_required_lpm: P_gpu / (ρ·cp·ΔT_design), or None.
        flow_margin: flow_lpm / flow_required_lpm, or None.
        heat_capture_ratio: heat_removed_w / gpu_power_w, or None.
    """

    t_s: float
    supply_temp_c: float | None = None
    return_temp_c: float | None = None
    flow_lpm: float | None = None
    diff_pressure_kpa: float | None = None
    stale: bool = False
    stale_sensors: tuple[str, ...] = ()
    leak: LeakState = "ok"
    leak_sensors: tuple[str, ...] = ()
    gpu_power_w: float | None = None
    heat_removed_w: float | None = None
    flow_required_lpm: float | None = None
    flow_margin: float | None = None
    heat_capture_ratio: float | None = None

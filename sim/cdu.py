"""A simulated CDU: a coolant-loop model, a scripted fault schedule, and payload encoding.

Pure: ``rackguard sim-cdu`` (agent/commands/sim_cdu.py) does the MQTT. The loop
is first order: the pump's flow and the supply temperature follow their targets
with time constants; the return temperature is supply + P / (ṁ·cp), lagged by
the cold plates' transit; the differential pressure scales with flow².

Scenario TOML (times in seconds from start)::

    duration_s = 60
    [[events]]
    at_s = 10
    kind = "pump_failure"      # flow steps down to flow_fraction of nominal
    flow_fraction = 0.3
    [[events]]
    at_s = 20
    kind = "supply_ramp"       # supply temperature ramps linearly to to_c over over_s
    to_c = 45.0
    over_s = 30.0
    [[events]]
    at_s = 30
    kind = "leak"              # a leak detector reads state from then on
    sensor = "leak-tray"
    state = "Critical"
    [[events]]
    at_s = 40
    kind = "silent"            # a sensor stops publishing for for_s (forever if omitted)
    sensor = "cdu"
    for_s = 10.0
    [[events]]
    at_s = 50
    kind = "garbage"           # a sensor sends garbage for for_s
    sensor = "cdu"
    for_s = 5.0
"""

from __future__ import annotations

import json
import math
import random
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rackguard.physics import WATER_CP_J_PER_KG_K, WATER_DENSITY_KG_PER_L, heat_w
from rackguard.sensors.coolant import (
    REDFISH_KEYS,
    CduSensor,
    CoolantSensor,
    LeakSensor,
    PressureSensor,
    Quantity,
    TempSensor,
    quantities,
)

_DETECTOR = {"ok": "OK", "warning": "Warning", "critical": "Critical"}


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at_s: float = Field(ge=0)


class PumpFailure(_Event):
    kind: Literal["pump_failure"]
    flow_fraction: float = Field(
        default=0.3, ge=0, le=1, description="flow afterwards, as a fraction of nominal"
    )


class PumpRestore(_Event):
    kind: Literal["pump_restore"]


class SupplyRamp(_Event):
    kind: Literal["supply_ramp"]
    to_c: float = Field(ge=0, le=95)
    over_s: float = Field(default=30.0, ge=0)


class Leak(_Event):
    kind: Literal["leak"]
    sensor: str
    state: Literal["OK", "Warning", "Critical"] = "Critical"


class Silent(_Event):
    kind: Literal["silent"]
    sensor: str
    for_s: float | None = Field(default=None, gt=0, description="omitted: silent for good")


class Garbage(_Event):
    kind: Literal["garbage"]
    sensor: str
    for_s: float = Field(default=5.0, gt=0)


Event = Annotated[
    PumpFailure | PumpRestore | SupplyRamp | Leak | Silent | Garbage, Field(discriminator="kind")
]


class Scenario(BaseModel):
    """A fault schedule for the simulated CDU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    duration_s: float | None = Field(
        default=None, gt=0, description="stop after this long (omitted: run until killed)"
    )
    events: list[Event] = Field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Scenario:
        with open(path, "rb") as f:
            return cls.model_validate(tomllib.load(f))


@dataclass(slots=True)
class LoopParams:
    """The coolant loop through one node (water by default)."""

    nominal_flow_lpm: float = 12.0
    supply_temp_c: float = 32.0
    nominal_dp_kpa: float = 80.0
    cp_j_per_kg_k: float = WATER_CP_J_PER_KG_K
    density_kg_per_l: float = WATER_DENSITY_KG_PER_L
    tau_flow_s: float = 2.0  # pump spin-down / spin-up
    tau_return_s: float = 3.0  # transit and mixing before the return probe
    max_return_temp_c: float = 95.0  # stagnant coolant boils off the model's physics past this


@dataclass(slots=True)
class CoolantLoop:
    """The loop's state; ``step`` integrates it under a heat load."""

    p: LoopParams = field(default_factory=LoopParams)
    t_s: float = 0.0
    flow_lpm: float = 0.0
    supply_temp_c: float = 0.0
    return_temp_c: float = 0.0
    flow_target_lpm: float = 0.0
    ramp: tuple[float, float, float, float] | None = None  # (t0, from_c, to_c, over_s)

    def __post_init__(self) -> None:
        self.flow_lpm = self.flow_target_lpm = self.p.nominal_flow_lpm
        self.supply_temp_c = self.return_temp_c = self.p.supply_temp_c

    @property
    def diff_pressure_kpa(self) -> float:
        return self.p.nominal_dp_kpa * (self.flow_lpm / self.p.nominal_flow_lpm) ** 2

    def return_target_c(self, load_w: float) -> float:
        per_k_w = heat_w(
            max(self.flow_lpm, 1e-3),
            1.0,
            cp_j_per_kg_k=self.p.cp_j_per_kg_k,
            density_kg_per_l=self.p.density_kg_per_l,
        )
        return min(self.p.max_return_temp_c, self.supply_temp_c + max(0.0, load_w) / per_k_w)

    def step(self, dt_s: float, heat_w: float) -> None:
        """Advance ``dt_s`` seconds with ``heat_w`` going into the coolant."""
        self.t_s += dt_s
        self.flow_lpm += (self.flow_target_lpm - self.flow_lpm) * (1 - math.exp(-dt_s / self.p.tau_flow_s))
        if self.ramp is not None:
            t0, from_c, to_c, over_s = self.ramp
            frac = 1.0 if over_s <= 0 else min(1.0, (self.t_s - t0) / over_s)
            self.supply_temp_c = from_c + (to_c - from_c) * frac
        target = self.return_target_c(heat_w)
        self.return_temp_c += (target - self.return_temp_c) * (1 - math.exp(-dt_s / self.p.tau_return_s))

    def values(self) -> dict[Quantity, float]:
        return {
            "supply_temp_c": self.supply_temp_c,
            "return_temp_c": self.return_temp_c,
            "flow_lpm": self.flow_lpm,
            "diff_pressure_kpa": self.diff_pressure_kpa,
        }


class SimCdu:
    """The loop plus the scenario: which sensor says what, at each step.

    Args:
        sensors: The declared coolant sensors (from the agent's config).
        scenario: The fault schedule.
        params: The loop's parameters.
        seed: Noise seed (probe noise ±0.05 °C, flow ±0.5 %).
    """

    def __init__(
        self,
        sensors: list[CoolantSensor],
        scenario: Scenario,
        params: LoopParams | None = None,
        seed: int = 0,
    ) -> None:
        self.sensors = sensors
        self.loop = CoolantLoop(params or LoopParams())
        self.pending = sorted(scenario.events, key=lambda e: e.at_s)
        self.leaks: dict[str, str] = {s.id: "ok" for s in sensors if isinstance(s, LeakSensor)}
        self.silent_until: dict[str, float] = {}
        self.garbage_until: dict[str, float] = {}
        self.rng = random.Random(seed)
        self.fired: list[Event] = []

    def step(self, dt_s: float, heat_w: float) -> list[Event]:
        """Advance the loop; returns the events that fired in this step."""
        now = self.loop.t_s + dt_s
        fired = []
        while self.pending and self.pending[0].at_s <= now:
            ev = self.pending.pop(0)
            self._apply(ev, now)
            fired.append(ev)
        self.loop.step(dt_s, heat_w)
        self.fired += fired
        return fired

    def _apply(self, ev: Event, now: float) -> None:
        lp = self.loop
        if isinstance(ev, PumpFailure):
            lp.flow_target_lpm = lp.p.nominal_flow_lpm * ev.flow_fraction
        elif isinstance(ev, PumpRestore):
            lp.flow_target_lpm = lp.p.nominal_flow_lpm
        elif isinstance(ev, SupplyRamp):
            lp.ramp = (now, lp.supply_temp_c, ev.to_c, ev.over_s)
        elif isinstance(ev, Leak):
            self.leaks[ev.sensor] = ev.state.lower()
        elif isinstance(ev, Silent):
            self.silent_until[ev.sensor] = math.inf if ev.for_s is None else now + ev.for_s
        else:
            self.garbage_until[ev.sensor] = now + ev.for_s

    def payloads(self, now_wall_s: float) -> list[tuple[str, bytes]]:
        """What every non-silent sensor publishes now: ``(topic, payload)``."""
        t = self.loop.t_s
        out = []
        values = self.loop.values()
        for s in self.sensors:
            if self.silent_until.get(s.id, -1.0) > t:
                continue
            if self.garbage_until.get(s.id, -1.0) > t:
                out.append((s.topic, self._garbage()))
                continue
            if isinstance(s, LeakSensor):
                out.append((s.topic, encode_leak(s, self.leaks[s.id], now_wall_s)))
                continue
            noisy = {q: self._noise(q, values[q]) for q in quantities(s)}
            out.append((s.topic, encode_values(s, noisy, now_wall_s)))
        return out

    def _noise(self, q: str, v: float) -> float:
        if q.endswith("temp_c"):
            return round(v + self.rng.gauss(0, 0.05), 2)
        return round(v * (1 + self.rng.gauss(0, 0.005)), 3)

    def _garbage(self) -> bytes:
        return self.rng.choice(
            [b"NaN", b'{"FlowLitersPerMinute": "lots"}', b"\xff\xfe\x00", b"{", b"-1e999", b"[]", b"98.6"]
        )


def _nest(path: str, value: Any, doc: dict[str, Any]) -> None:
    *parents, leaf = path.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


_TEMP_FROM_C = {"c": lambda c: c, "k": lambda c: c + 273.15, "f": lambda c: c * 9 / 5 + 32}
_FLOW_FROM_LPM = {"lpm": 1.0, "m3_per_h": 60.0 / 1000.0, "gpm": 1 / 3.785411784}
_KPA_TO = {"kpa": 1.0, "bar": 0.01, "psi": 1 / 6.894757293168}


def _in_unit(s: CoolantSensor, v: float) -> float:
    if isinstance(s, TempSensor):
        return _TEMP_FROM_C[s.unit](v)
    if isinstance(s, PressureSensor):
        return v * _KPA_TO[s.unit]
    if isinstance(s, CduSensor | LeakSensor):
        return v
    return v * _FLOW_FROM_LPM[s.unit]


def encode_values(s: CoolantSensor, values: Mapping[Quantity, float], now_wall_s: float) -> bytes:
    """Encode canonical values the way sensor ``s`` is declared to send them."""
    assert not isinstance(s, LeakSensor)
    if s.format == "plain":
        (v,) = values.values()
        return f"{_in_unit(s, v):.4f}".encode()
    doc: dict[str, Any] = {}
    for q, v in values.items():
        if s.format == "redfish":
            doc[REDFISH_KEYS[q]] = {"Reading": _in_unit(s, v)}
        elif isinstance(s, CduSensor):
            _nest(s.path(q), v, doc)
        else:
            assert s.field is not None
            _nest(s.field, _in_unit(s, v), doc)
    if s.timestamp_field:
        _nest(s.timestamp_field, round(now_wall_s, 3), doc)
    return json.dumps(doc).encode()


def encode_leak(s: LeakSensor, state: str, now_wall_s: float) -> bytes:
    """Encode a leak detector's state (``ok``/``warning``/``critical``) as ``s`` sends it."""
    if s.format == "plain":
        return _DETECTOR[state].encode()
    doc: dict[str, Any] = {}
    if s.format == "redfish":
        doc["DetectorState"] = _DETECTOR[state]
    else:
        assert s.field is not None
        _nest(s.field, state != "ok", doc)
    if s.timestamp_field:
        _nest(s.timestamp_field, round(now_wall_s, 3), doc)
    return json.dumps(doc).encode()

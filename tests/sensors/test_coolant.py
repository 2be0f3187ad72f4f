"""sensors/coolant.py: payload formats, every rejection reason, unit conversion, heat physics."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from pydantic import TypeAdapter

from rackguard.physics import flow_required_lpm
from rackguard.sensors.coolant import (
    MAX_PAYLOAD_BYTES,
    CoolantSensor,
    Reading,
    Rejected,
    heat_removed_w,
    parse,
)

NOW_S = 1_700_000_000.0
_ADAPTER: TypeAdapter[CoolantSensor] = TypeAdapter(CoolantSensor)


def decl(**kw: Any) -> CoolantSensor:
    kw.setdefault("id", "s")
    kw.setdefault("topic", "bms/s")
    return _ADAPTER.validate_python(kw)


def ok(sensor: CoolantSensor, payload: bytes | str) -> Reading:
    r = parse(sensor, payload.encode() if isinstance(payload, str) else payload, now_s=NOW_S)
    assert isinstance(r, Reading), r
    return r


def rejected(sensor: CoolantSensor, payload: bytes | str) -> str:
    r = parse(sensor, payload.encode() if isinstance(payload, str) else payload, now_s=NOW_S)
    assert isinstance(r, Rejected), r
    return r.reason


SUPPLY_PLAIN = decl(kind="coolant_supply_temp", format="plain")
SUPPLY_JSON = decl(kind="coolant_supply_temp", field="data.temp", timestamp_field="ts")
FLOW_REDFISH = decl(kind="flow", format="redfish")
CDU = decl(kind="cdu")
LEAK = decl(kind="leak")


def test_plain_number() -> None:
    assert ok(SUPPLY_PLAIN, " 31.5\n").values == {"supply_temp_c": 31.5}
    assert ok(SUPPLY_PLAIN, "3.2e1").values == {"supply_temp_c": 32.0}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("nan", "not_finite"),
        ("-Infinity", "not_finite"),
        ("1e999", "not_finite"),
        ("1_0", "wrong_type"),
        ("0x20", "wrong_type"),
        ("", "wrong_type"),
        ("31.5 C", "wrong_type"),
        ("89.6", "out_of_range"),  # 32 °C sent in Fahrenheit to a Celsius sensor
        ("-3", "out_of_range"),
        (b"\xff\xfe", "malformed"),
        (b"1" * (MAX_PAYLOAD_BYTES + 1), "too_large"),
    ],
)
def test_plain_rejections(payload: bytes | str, reason: str) -> None:
    assert rejected(SUPPLY_PLAIN, payload) == reason


def test_json_path_and_timestamp() -> None:
    r = ok(SUPPLY_JSON, json.dumps({"data": {"temp": 33}, "ts": NOW_S - 1}))
    assert r.values == {"supply_temp_c": 33.0} and r.t_s == NOW_S - 1
    iso = "2023-11-14T22:13:19+00:00"  # NOW_S - 1
    assert ok(SUPPLY_JSON, json.dumps({"data": {"temp": 33}, "ts": iso})).t_s == NOW_S - 1


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ('{"data": {"temp": NaN}, "ts": 1700000000}', "not_finite"),
        ('{"data": {"temp": 1e400}, "ts": 1700000000}', "not_finite"),
        ('{"data": {"temp": "33"}, "ts": 1700000000}', "wrong_type"),
        ('{"data": {"temp": true}, "ts": 1700000000}', "wrong_type"),
        ('{"data": {"temp": null}, "ts": 1700000000}', "wrong_type"),
        ('{"data": {}, "ts": 1700000000}', "missing_field"),
        ('{"data": {"temp": 33}}', "missing_field"),
        ('{"data": {"temp": 33}, "ts": 1700000100}', "ts_future"),
        ('{"data": {"temp": 33}, "ts": 1699999000}', "ts_too_old"),
        ('{"data": {"temp": 33}, "ts": 1700000000000}', "ts_future"),  # milliseconds
        ('{"data": {"temp": 33}, "ts": "2023-11-14T22:13:19"}', "wrong_type"),  # no zone
        ('{"data": {"temp": 33}, "ts": "yesterday"}', "wrong_type"),
        ('{"data": {"temp": 33}, "data": {"temp": 34}, "ts": 1700000000}', "malformed"),
        ('{"data": {"temp": 33}', "malformed"),
        ("[33]", "wrong_type"),
        ("33", "wrong_type"),
        ("[" * 100_00, "malformed"),
        ('{"data": {"temp": ' + "9" * 5000 + '}, "ts": 1700000000}', "malformed"),
    ],
)
def test_json_rejections(doc: str, reason: str) -> None:
    assert rejected(SUPPLY_JSON, doc) == reason


def test_redfish_coolant_connector() -> None:
    assert ok(FLOW_REDFISH, '{"FlowLitersPerMinute": {"Reading": 11.5}}').values == {"flow_lpm": 11.5}
    assert ok(FLOW_REDFISH, '{"FlowLitersPerMinute": 11.5}').values == {"flow_lpm": 11.5}
    assert rejected(FLOW_REDFISH, '{"FlowLitersPerMinute": {"Reading": null}}') == "unavailable"
    assert rejected(FLOW_REDFISH, '{"FlowLitersPerMinute": {"DataSourceUri": "x"}}') == "missing_field"
    assert rejected(FLOW_REDFISH, '{"FlowLitersPerMinute": -1}') == "out_of_range"


def test_cdu_all_or_nothing() -> None:
    doc = {
        "SupplyTemperatureCelsius": {"Reading": 32.0},
        "ReturnTemperatureCelsius": {"Reading": 42.0},
        "FlowLitersPerMinute": {"Reading": 12.0},
        "DeltaPressurekPa": {"Reading": 80.0},
    }
    r = ok(CDU, json.dumps(doc))
    assert r.values == {
        "supply_temp_c": 32.0,
        "return_temp_c": 42.0,
        "flow_lpm": 12.0,
        "diff_pressure_kpa": 80.0,
    }
    doc["ReturnTemperatureCelsius"] = {"Reading": 107.6}  # Fahrenheit: the whole message goes
    assert rejected(CDU, json.dumps(doc)) == "out_of_range"
    del doc["ReturnTemperatureCelsius"]
    assert rejected(CDU, json.dumps(doc)) == "missing_field"
    cdu_json = decl(kind="cdu", format="json", values=["flow_lpm"], fields={"flow_lpm": "pump.flow"})
    assert ok(cdu_json, '{"pump": {"flow": 9}}').values == {"flow_lpm": 9.0}


def test_unit_conversion() -> None:
    f = decl(kind="coolant_return_temp", format="plain", unit="f")
    assert ok(f, "107.6").values["return_temp_c"] == pytest.approx(42.0)
    bar = decl(kind="diff_pressure", format="plain", unit="bar")
    assert ok(bar, "0.8").values["diff_pressure_kpa"] == pytest.approx(80.0)
    gpm = decl(kind="flow", format="plain", unit="gpm")
    assert ok(gpm, "3").values["flow_lpm"] == pytest.approx(11.356, abs=1e-3)


@pytest.mark.parametrize(
    ("sensor", "payload", "state"),
    [
        (LEAK, '{"DetectorState": "OK"}', "ok"),
        (LEAK, '{"DetectorState": "Warning"}', "warning"),
        (LEAK, '{"DetectorState": "Critical", "Name": "tray 3"}', "critical"),
        (decl(kind="leak", format="plain"), "Critical", "critical"),
        (decl(kind="leak", format="plain"), "false", "ok"),
        (decl(kind="leak", format="json", field="leak"), '{"leak": true}', "critical"),
        (decl(kind="leak", format="json", field="leak", true_state="warning"), '{"leak": true}', "warning"),
    ],
)
def test_leak_states(sensor: CoolantSensor, payload: str, state: str) -> None:
    assert ok(sensor, payload).leak == state


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ('{"DetectorState": "Unavailable"}', "unavailable"),
        ('{"DetectorState": "Absent"}', "unavailable"),
        ('{"DetectorState": "critical"}', "wrong_type"),
        ('{"DetectorState": 2}', "wrong_type"),
        ('{"State": "OK"}', "missing_field"),
    ],
)
def test_leak_rejections(payload: str, reason: str) -> None:
    assert rejected(LEAK, payload) == reason


def test_declaration_errors() -> None:
    from pydantic import ValidationError

    for bad in (
        {"kind": "coolant_supply_temp", "format": "json"},  # no field
        {"kind": "coolant_supply_temp", "format": "plain", "field": "x"},
        {"kind": "coolant_supply_temp", "format": "redfish", "unit": "f"},
        {"kind": "flow", "format": "plain", "valid_flow_lpm": [10, 1]},
        {"kind": "flow", "format": "plain", "topic": "bms/+/flow"},
        {"kind": "leak", "extra": 1},
    ):
        with pytest.raises(ValidationError):
            decl(**bad)


def test_heat_physics() -> None:
    # 12 L/min of water warming 10 K carries ~8.35 kW.
    q = heat_removed_w(12.0, 32.0, 42.0, cp_j_per_kg_k=4186.0, density_kg_per_l=0.997)
    assert q == pytest.approx(12 / 60 * 0.997 * 4186 * 10)
    need = flow_required_lpm(q, design_delta_t_c=10.0, cp_j_per_kg_k=4186.0, density_kg_per_l=0.997)
    assert need == pytest.approx(12.0)
    assert math.isclose(
        flow_required_lpm(5600.0, design_delta_t_c=10.0, cp_j_per_kg_k=3500.0, density_kg_per_l=1.04),
        5600 / (1.04 * 3500 * 10) * 60,
    )

"""sim/cdu.py: loop physics, the fault schedule, and payloads that the real parser accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from rackguard.agent import config as configmod
from rackguard.sensors.coolant import Reading, Rejected, parse
from rackguard.sim.cdu import CoolantLoop, Scenario, SimCdu

REPO = Path(__file__).resolve().parents[2]
NOW_S = 1_700_000_000.0


def sim_sensors() -> list:  # type: ignore[type-arg]
    return list(configmod.load(REPO / "examples/sim.toml", environ={}).coolant.sensors)


def run(cdu: SimCdu, seconds: float, heat_w: float = 5000.0, dt_s: float = 0.1) -> None:
    for _ in range(round(seconds / dt_s)):
        cdu.step(dt_s, heat_w)


def test_steady_state_heat_balance() -> None:
    loop = CoolantLoop()
    for _ in range(600):
        loop.step(0.1, 5000.0)
    rise_c = 5000.0 / (12.0 / 60 * 0.997 * 4186)
    assert loop.return_temp_c - loop.supply_temp_c == pytest.approx(rise_c, rel=1e-3)
    assert loop.diff_pressure_kpa == pytest.approx(80.0)


def test_scenario_events_over_time() -> None:
    scen = Scenario.model_validate(
        {
            "events": [
                {"at_s": 1, "kind": "pump_failure", "flow_fraction": 0.25},
                {"at_s": 2, "kind": "supply_ramp", "to_c": 45.0, "over_s": 10},
                {"at_s": 3, "kind": "leak", "sensor": "leak-tray", "state": "Critical"},
                {"at_s": 4, "kind": "silent", "sensor": "cdu", "for_s": 2},
                {"at_s": 4, "kind": "garbage", "sensor": "supply-probe", "for_s": 2},
            ]
        }
    )
    sensors = sim_sensors()
    by_topic = {s.topic: s for s in sensors}
    cdu = SimCdu(sensors, scen)
    run(cdu, 5.0)
    assert cdu.loop.flow_lpm < 5.0 and cdu.loop.diff_pressure_kpa < 15.0
    assert 32.0 < cdu.loop.supply_temp_c < 45.0
    out = dict(cdu.payloads(NOW_S))
    assert by_topic.keys() - out.keys() == {"bms/demo/r1/cdu"}  # silent
    leak = parse(by_topic["bms/demo/r1/sim-node-1/leak"], out["bms/demo/r1/sim-node-1/leak"], now_s=NOW_S)
    assert isinstance(leak, Reading) and leak.leak == "critical"
    garbage = parse(
        by_topic["bms/demo/r1/sim-node-1/supply_temp"], out["bms/demo/r1/sim-node-1/supply_temp"], now_s=NOW_S
    )
    assert isinstance(garbage, Rejected)
    run(cdu, 10.0)
    assert cdu.loop.supply_temp_c == pytest.approx(45.0)
    out = dict(cdu.payloads(NOW_S))
    assert by_topic.keys() == out.keys()
    for topic, payload in out.items():
        r = parse(by_topic[topic], payload, now_s=NOW_S)
        assert isinstance(r, Reading), r
    flow = parse(by_topic["bms/demo/r1/cdu"], out["bms/demo/r1/cdu"], now_s=NOW_S)
    assert isinstance(flow, Reading) and flow.values["flow_lpm"] == pytest.approx(3.0, rel=0.05)


@pytest.mark.parametrize("name", ["cdu-pump-failure", "cdu-supply-ramp", "cdu-leak", "cdu-sensor-faults"])
def test_example_scenarios_load(name: str) -> None:
    scen = Scenario.load(REPO / "examples" / f"{name}.toml")
    ids = {s.id for s in sim_sensors()}
    assert scen.events and all(getattr(e, "sensor", "cdu") in ids for e in scen.events)

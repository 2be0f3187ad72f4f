"""Energy per token: hand calculations, counter resets, and gate-report deltas."""

from __future__ import annotations

import json

import pytest

from rackguard.agent.config import ConfigError, validate
from rackguard.agent.energy import EnergyMeter
from rackguard.agent.gate_reports import GateTracker


def report(gate_id: str, *, gpu: int | None, in_flight: int, completed: int, tokens: int) -> bytes:
    return json.dumps(
        {
            "schema": "rackguard.gate/1",
            "gate_id": gate_id,
            "gpu": gpu,
            "t_s": 1.0,
            "in_flight": in_flight,
            "limit": 8,
            "source": "mqtt",
            "completed_total": completed,
            "tokens_total": tokens,
        }
    ).encode()


def test_energy_per_token_matches_hand_calculation() -> None:
    meter = EnergyMeter(pue=1.25)
    first = meter.window({0: 1_000.0, 1: 5_000.0}, tokens=999)  # baseline only
    assert first.gpu_energy_j is None and first.energy_per_token_j is None
    # GPU 0 used 700 J and GPU 1 used 500 J in the window; the gates reported 2,400 tokens.
    w = meter.window({0: 1_700.0, 1: 5_500.0}, tokens=2_400, requests=30)
    assert w.gpu_energy_j == pytest.approx(1_200.0)
    assert w.gpus_counted == 2 and w.tokens == 2_400 and w.requests == 30
    assert w.energy_per_token_j == pytest.approx(1_200.0 / 2_400)  # 0.5 J/token
    assert w.facility_energy_per_token_j == pytest.approx(1_200.0 * 1.25 / 2_400)  # 0.625 J/token


def test_counter_reset_and_unread_gpu() -> None:
    meter = EnergyMeter(pue=1.2)
    meter.window({0: 10_000.0, 1: 20_000.0}, tokens=0)
    # GPU 0's counter reset (driver reload): 300 J since the reset. GPU 1 unread this window.
    w = meter.window({0: 300.0, 1: None}, tokens=100)
    assert w.gpu_energy_j == pytest.approx(300.0) and w.gpus_counted == 1
    assert w.energy_per_token_j == pytest.approx(3.0)
    assert w.facility_energy_per_token_j == pytest.approx(3.6)
    # GPU 1's energy lands in the next window it is read in.
    w = meter.window({0: 400.0, 1: 20_250.0}, tokens=0)
    assert w.gpu_energy_j == pytest.approx(350.0) and w.energy_per_token_j is None


def test_pue_validated() -> None:
    assert validate({}).energy.pue == 1.2
    with pytest.raises(ConfigError) as e:
        validate({"energy": {"pue": 0.9}})
    assert e.value.errors[0][0] == "energy.pue"
    with pytest.raises(ValueError):
        EnergyMeter(pue=0.5)


def test_gate_tracker_deltas_resets_and_freshness() -> None:
    now = [100.0]
    t = GateTracker(3.0, monotonic=lambda: now[0])
    topic = "rackguard/s/r/n/gate/"
    t.handle(topic + "a", report("a", gpu=0, in_flight=5, completed=1_000, tokens=64_000))  # baseline
    t.handle(topic + "b", report("b", gpu=None, in_flight=4, completed=0, tokens=0))
    assert t.take_window() == (0, 0)
    t.handle(topic + "a", report("a", gpu=0, in_flight=6, completed=1_010, tokens=64_640))
    t.handle(topic + "b", report("b", gpu=None, in_flight=2, completed=3, tokens=30))
    assert t.take_window() == (670, 13)
    # Gate a restarted: its counters start again from zero.
    t.handle(topic + "a", report("a", gpu=0, in_flight=1, completed=2, tokens=128))
    assert t.take_window() == (128, 2)
    # In flight per GPU: gate a on GPU 0, gate b spread over both.
    assert t.in_flight(2) == [2.0, 1.0]
    now[0] += 3.5  # both stale
    assert t.in_flight(2) == [None, None]
    # Invalid reports are rejected and counted, never raise.
    assert t.handle(topic + "x", b"{not json") is None
    assert t.handle(topic + "other", report("a", gpu=0, in_flight=1, completed=0, tokens=0)) is None
    bad = json.loads(report("c", gpu=0, in_flight=1, completed=0, tokens=0)) | {"extra": 1}
    assert t.handle(topic + "c", json.dumps(bad).encode()) is None
    assert t.rejected_total == 3


@pytest.mark.parametrize(
    "field,value",
    [
        ("in_flight", 10**400),  # once raised OverflowError in in_flight() and stopped the agent
        ("in_flight", 1_000_001),
        ("tokens_total", 2**53 + 1),
        ("completed_total", 10**30),
        ("limit", 10**12),
        ("gpu", 10**9),
    ],
)
def test_gate_report_numbers_are_bounded(field: str, value: int) -> None:
    t = GateTracker(3.0, monotonic=lambda: 100.0)
    doc = json.loads(report("p", gpu=0, in_flight=1, completed=0, tokens=0)) | {field: value}
    assert t.handle("rackguard/s/r/n/gate/p", json.dumps(doc).encode()) is None
    assert t.rejected_total == 1
    assert t.in_flight(8) == [None] * 8  # nothing from it reaches the controller


def test_gate_report_time_must_be_finite() -> None:
    t = GateTracker(3.0, monotonic=lambda: 100.0)
    good = report("p", gpu=0, in_flight=1, completed=0, tokens=0)
    assert b'"t_s": 1.0' in good
    assert t.handle("rackguard/s/r/n/gate/p", good.replace(b'"t_s": 1.0', b'"t_s": 1e999')) is None
    assert t.rejected_total == 1
    assert t.handle("rackguard/s/r/n/gate/p", good) is not None

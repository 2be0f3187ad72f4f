"""The agent reads gateways' per-class counters (goodput, SLO attainment, energy), bounded and old-format-safe."""

from __future__ import annotations

import json
from typing import Any

from rackguard.agent.gate_reports import MAX_CLASSES, GateTracker
from rackguard.agent.metrics import Metrics


def report(gate_id: str, completed: int, classes: dict[str, Any] | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "schema": "rackguard.gate/1",
        "gate_id": gate_id,
        "gpu": None,
        "t_s": 1.0,
        "in_flight": 4,
        "limit": 8,
        "source": "mqtt",
        "completed_total": completed,
        "tokens_total": completed * 10,
        **extra,
    }
    if classes is not None:
        body["classes"] = classes
    return json.dumps(body).encode()


def counters(ok: int, met: int, energy_j: float, shed: int = 0) -> dict[str, Any]:
    return {
        "completed_total": ok,
        "slo_met_total": met,
        "shed_total": shed,
        "spilled_total": 0,
        "error_total": 0,
        "tokens_total": ok * 10,
        "goodput_tokens_total": met * 10,
        "energy_j_total": energy_j,
    }


def test_per_class_deltas_goodput_and_attainment() -> None:
    m = Metrics()
    t = GateTracker(3.0, metrics=m)
    topic = "rackguard/s/r/n/gate/gw-v"
    assert t.handle(topic, report("gw-v", 10, {"hi": counters(10, 9, 50.0)}, gpus=[0, 1])) is not None
    t.handle(topic, report("gw-v", 30, {"hi": counters(30, 25, 150.0, shed=3)}, gpus=[0, 1]))
    assert t.slo_attainment("hi") == 16 / 20  # the first report is the baseline
    assert m.class_goodput_tokens.labels("hi")._value.get() == 160
    assert m.class_energy.labels("hi")._value.get() == 100.0
    assert m.class_requests.labels("hi", "shed")._value.get() == 3
    assert t.in_flight(3) == [2.0, 2.0, None]  # spread over the upstream's GPUs only
    # An old-format gate report (no gpus, no classes) still parses.
    assert t.handle("rackguard/s/r/n/gate/old", report("old", 1)) is not None


def test_bad_class_payloads_rejected_and_names_bounded() -> None:
    t = GateTracker(3.0)
    topic = "rackguard/s/r/n/gate/gw"
    bad = [
        {"bad name!": counters(1, 1, 1.0)},
        {"c": dict(counters(1, 1, 1.0), energy_j_total=float("1e30"))},
        {f"c{i}": counters(1, 1, 1.0) for i in range(17)},  # more classes than a report may carry
    ]
    for classes in bad:
        assert t.handle(topic, report("gw", 1, classes)) is None
    assert t.handle(topic, report("gw", 1, {}, gpus=[])) is None
    assert t.rejected_total == 4
    for i in range(MAX_CLASSES // 16 + 2):
        names = {f"g{i}c{j}": counters(1, 1, 1.0) for j in range(16)}
        t.handle(f"rackguard/s/r/n/gate/g{i}", report(f"g{i}", 1, names))
        t.handle(f"rackguard/s/r/n/gate/g{i}", report(f"g{i}", 2, names))
    assert len(t.class_names) == MAX_CLASSES


class CountingDict(dict):  # type: ignore[type-arg]
    """A dict that counts every walk over it."""

    walks = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        CountingDict.walks += 1
        return super().__iter__()

    def items(self):  # type: ignore[no-untyped-def]
        CountingDict.walks += 1
        return super().items()

    def values(self):  # type: ignore[no-untyped-def]
        CountingDict.walks += 1
        return super().values()

    def keys(self):  # type: ignore[no-untyped-def]
        CountingDict.walks += 1
        return super().keys()


def test_a_report_costs_the_same_with_1000_gates_and_the_table_is_bounded() -> None:
    """#17: each report is O(1): handling one never walks the table of gates (it once did, via fresh())."""
    from rackguard.agent.gate_reports import MAX_GATES

    metrics = Metrics()
    tracker = GateTracker(5.0, metrics=metrics, monotonic=lambda: 10.0)
    tracker.gates = CountingDict()
    for i in range(1000):
        assert tracker.handle(f"x/gate/g{i}", report(f"g{i}", i)) is not None
    CountingDict.walks = 0
    for n in range(5000):
        tracker.handle("x/gate/g7", report("g7", 10 + n))
    assert CountingDict.walks == 0
    assert tracker.window_requests == 5000 + 10 - 7 - 1
    # The table is bounded: one gate past MAX_GATES is rejected and counted, known gates still report.
    for i in range(1000, MAX_GATES):
        tracker.handle(f"x/gate/g{i}", report(f"g{i}", 0))
    before = tracker.rejected_total
    assert tracker.handle("x/gate/one-more", report("one-more", 0)) is None
    assert tracker.rejected_total == before + 1 and len(tracker.gates) == MAX_GATES
    assert tracker.handle("x/gate/g3", report("g3", 99)) is not None

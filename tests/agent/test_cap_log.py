"""``cap_changed`` lines: a new reason or binding at once, a steady ramp at most one line per 10 s."""

from __future__ import annotations

from typing import Any

from rackguard.agent.actuators import CapChangeLog
from rackguard.controllers.api import Decision


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[float, dict[str, Any]]] = []
        self.now = 0.0

    def info(self, event: str, **kw: Any) -> None:
        assert event == "cap_changed"
        self.lines.append((self.now, kw))


def d(cap: int, reason: str = "mpc", binding: str = "none") -> Decision:
    return Decision(caps=(cap, cap), reason=reason, binding=binding)  # type: ignore[arg-type]


def test_ramp_is_summarised_and_reason_changes_are_logged_at_once() -> None:
    log = Log()
    c = CapChangeLog(log)
    prev = 8
    c.changed(d(8, "stale", "safety"), None, 0.0)
    # The fault clears: the cap ramps 8 -> 256 by 32 a second, one change per 1 s control step.
    for t in range(1, 31):
        log.now = float(t)
        cap = min(256, 8 + 32 * t)
        if cap != prev:
            c.changed(d(cap), prev * 2, float(t))
            prev = cap
        else:
            c.flush_due(float(t))
    times = [t for t, _ in log.lines]
    assert times == [0.0, 1.0, 11.0]  # stale at once, mpc at once, then the rest summed up
    last = log.lines[-1][1]
    assert last["total"] == 512 and last["changes"] == 7 and last["from_total"] == 2 * 8 + 2 * 32 * 1
    # A change long after the last line goes out at once; so does a leak 0.5 s later.
    log.now = 31.0
    c.changed(d(200), 512, 31.0)
    log.now = 31.5
    c.changed(d(0, "leak", "safety"), 400, 31.5)
    assert [t for t, _ in log.lines][-2:] == [31.0, 31.5] and log.lines[-1][1]["reason"] == "leak"
    assert "changes" not in log.lines[-1][1]
    gaps = [
        b - a for (a, x), (b, y) in zip(log.lines, log.lines[1:], strict=False) if x["reason"] == y["reason"]
    ]
    assert all(g >= 10.0 for g in gaps), log.lines

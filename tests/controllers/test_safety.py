"""Safety layer: precedence, ceilings, rate-limited rise; it always wins over any controller."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from rackguard.controllers.api import CoolantObs, Decision, GpuObs, Limits, Observation
from rackguard.controllers.safety import SafetyLayer

LIM = Limits()


def obs(
    t_s: float = 0.0,
    *,
    temps: tuple[float | None, ...] = (60.0, 60.0),
    lost: tuple[bool, ...] = (False, False),
    leak: str = "ok",
    stale: bool = False,
    mem: float | None = 60.0,
) -> Observation:
    gpus = tuple(GpuObs(t, mem, 400.0, 10.0, lost=lo) for t, lo in zip(temps, lost, strict=True))
    return Observation(t_s, gpus, CoolantObs(30.0, 10.0, stale=stale, leak=leak))  # type: ignore[arg-type]


def warmed(layer: SafetyLayer, caps: tuple[int, ...] = (200, 200)) -> float:
    """Let the rise limit reach ``caps``; returns the time reached."""
    t = 0.0
    for _ in range(20):
        layer.apply(obs(t), Decision(caps, "mpc", "none"))
        t += 1.0
    return t


def test_leak_critical_gives_zero_and_wins_over_everything() -> None:
    layer = SafetyLayer(LIM)
    t = warmed(layer)
    o = obs(t, temps=(88.0, None), lost=(False, True), leak="critical", stale=True)
    d = layer.apply(o, Decision((200, 200), "mpc", "none"), manual_ceiling=3)
    assert d.caps == (0, 0) and d.reason == "leak" and d.binding == "safety"


def test_leak_warning_gives_leak_cap() -> None:
    layer = SafetyLayer(LIM)
    t = warmed(layer)
    d = layer.apply(obs(t, leak="warning", temps=(88.0, 60.0)), Decision((200, 200), "mpc", "none"))
    assert d.caps == (LIM.leak_cap,) * 2 and d.reason == "leak"


def test_thermal_lost_stale_give_safe_cap_with_reason() -> None:
    trip = LIM.slowdown_c - LIM.margin_c
    cases = [
        (obs(20.0, temps=(trip, 50.0)), "thermal"),
        (obs(20.0, mem=LIM.mem_temp_max_c), "thermal"),
        (obs(20.0, temps=(60.0, None), lost=(False, True)), "gpu_lost"),
        (obs(20.0, stale=True), "stale"),
    ]
    for o, reason in cases:
        layer = SafetyLayer(LIM)
        warmed(layer)
        d = layer.apply(o, Decision((200, 200), "mpc", "none"), manual_ceiling=100)
        assert d.caps == (LIM.safe_cap,) * 2, reason
        assert d.reason == reason


def test_every_mpc_target_sits_below_its_safety_trip() -> None:
    """Hysteresis: an HBM (or die) reading at the MPC's target does not trip safety."""
    layer = SafetyLayer(LIM)
    t = warmed(layer)
    at_targets = obs(
        t, temps=(LIM.gpu_temp_max_c - LIM.margin_c, 50.0), mem=LIM.mem_temp_max_c - LIM.margin_c
    )
    d = layer.apply(at_targets, Decision((200, 200), "mpc", "none"))
    assert d.reason == "mpc" and d.caps == (200, 200)
    assert layer.ceiling(obs(t, mem=LIM.mem_temp_max_c - 0.5))[0] is None
    assert layer.ceiling(obs(t, mem=LIM.mem_temp_max_c))[1] == "thermal"


def test_just_below_trip_is_not_thermal() -> None:
    layer = SafetyLayer(LIM)
    t = warmed(layer)
    d = layer.apply(
        obs(t, temps=(LIM.slowdown_c - LIM.margin_c - 0.1, 50.0)), Decision((200, 200), "mpc", "none")
    )
    assert d.reason == "mpc" and d.caps == (200, 200)


def test_manual_ceiling_only_lowers() -> None:
    layer = SafetyLayer(LIM)
    t = warmed(layer)
    low = layer.apply(obs(t), Decision((200, 50), "mpc", "gpu_temp"), manual_ceiling=100)
    assert low.caps == (100, 50) and low.reason == "manual" and low.binding == "manual"
    high = layer.apply(obs(t + 10.0), Decision((200, 50), "mpc", "gpu_temp"), manual_ceiling=1000)
    assert high.caps == (200, 50) and high.reason == "mpc"


def test_drop_is_immediate_rise_is_rate_limited() -> None:
    layer = SafetyLayer(LIM)
    t = warmed(layer, (100, 100))
    assert layer.apply(obs(t), Decision((10, 10), "mpc", "none")).caps == (10, 10)
    caps = []
    for k in range(1, 6):
        caps.append(layer.apply(obs(t + 0.5 * k), Decision((256, 256), "mpc", "none")).caps[0])
    # 32 per second, applied at 0.5 s intervals: +16 each call, fractions carried over.
    assert caps == [26, 42, 58, 74, 90]


def test_rise_after_leak_clears_is_rate_limited() -> None:
    layer = SafetyLayer(LIM)
    t = warmed(layer)
    layer.apply(obs(t, leak="critical"), Decision((200, 200), "mpc", "none"))
    d = layer.apply(obs(t + 1.0), Decision((200, 200), "mpc", "none"))
    assert d.caps == (32, 32) and d.reason == "mpc"


def test_leak_between_ticks_is_cheap_and_needs_no_controller() -> None:
    layer = SafetyLayer(LIM)
    t = warmed(layer)
    last = Decision((200, 200), "mpc", "none")
    o = obs(t + 0.01, leak="critical")
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        d = layer.apply(o, last)
    per_call_s = (time.perf_counter() - start) / n
    assert d.caps == (0, 0)
    assert per_call_s < 1e-3  # generous: a sanity bound, not a benchmark


gpu_st = st.builds(
    GpuObs,
    gpu_temp_c=st.one_of(st.none(), st.floats(0, 120)),
    mem_temp_c=st.one_of(st.none(), st.floats(0, 120)),
    power_w=st.one_of(st.none(), st.floats(0, 800)),
    concurrency=st.floats(0, 300),
    lost=st.booleans(),
)
coolant_st = st.builds(
    CoolantObs,
    supply_temp_c=st.one_of(st.none(), st.floats(10, 60)),
    flow_lpm=st.one_of(st.none(), st.floats(0, 30)),
    stale=st.booleans(),
    leak=st.sampled_from(["ok", "warning", "critical"]),
)


@settings(max_examples=200, deadline=None)
@given(
    gpus=st.lists(gpu_st, min_size=1, max_size=8),
    coolant=coolant_st,
    proposed=st.lists(st.integers(0, 1000), min_size=8, max_size=8),
    manual=st.one_of(st.none(), st.integers(0, 300)),
    prev=st.integers(0, 256),
    dt_s=st.floats(0, 10),
)
def test_no_proposal_exceeds_what_safety_allows(
    gpus: list[GpuObs], coolant: CoolantObs, proposed: list[int], manual: int | None, prev: int, dt_s: float
) -> None:
    layer = SafetyLayer(LIM)
    n = len(gpus)
    layer.apply(Observation(0.0, tuple(gpus), CoolantObs()), Decision((prev,) * n, "mpc", "none"))
    # The first call starts from safe_cap; lift to prev if allowed so the rise limit is exercised.
    o = Observation(dt_s, tuple(gpus), coolant)
    d = layer.apply(o, Decision(tuple(proposed[:n]), "mpc", "none"), manual_ceiling=manual)
    ceiling, why = layer.ceiling(o, manual)
    start = min(prev, LIM.safe_cap) if prev > LIM.safe_cap else prev
    rate_ceiling = max(start, LIM.safe_cap) + LIM.cap_rise_per_s * dt_s
    for cap, want in zip(d.caps, proposed, strict=False):
        assert 0 <= cap <= want
        assert cap <= rate_ceiling
        if ceiling is not None:
            assert cap <= ceiling
    if coolant.leak != "ok":
        assert d.reason == "leak"
    elif why in ("thermal", "gpu_lost", "stale"):
        assert d.reason == why


def test_nothing_leaves_above_max_cap_even_after_limits_change() -> None:
    layer = SafetyLayer(LIM)
    t = warmed(layer, (256, 256))
    assert layer.apply(obs(t), Decision((256, 256), "mpc", "none")).caps == (256, 256)
    layer.limits = Limits(max_cap=16)
    assert layer.apply(obs(t + 1), Decision((999, 256), "mpc", "none")).caps == (16, 16)

"""The rack allocation: never over capacity, safe under partitions, deaf to other nodes' demands."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from rackguard.controllers.rack import (
    Allocation,
    ClassDemand,
    Member,
    PeerInput,
    RackInputs,
    allocate,
    capacity_w,
    fallback_shares,
    next_share,
)

NAMES = [f"n{i}" for i in range(10)]


@st.composite
def racks(draw: st.DrawFn) -> RackInputs:
    n = draw(st.integers(1, 8))
    members = tuple(Member(NAMES[i], draw(st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.0]))) for i in range(n))
    cap = draw(st.integers(0, 60_000))
    degraded = draw(st.integers(0, 60_000))
    peers: dict[str, PeerInput] = {}
    for m in members:
        status = draw(st.sampled_from(["fresh", "fresh", "stale", "dead", "absent"]))
        if status == "absent":
            continue
        demands = tuple(
            ClassDemand(f"c{k}", draw(st.integers(0, 3)), draw(st.integers(0, 20_000)))
            for k in range(draw(st.integers(0, 3)))
        )
        peers[m.node] = PeerInput(status, draw(st.integers(0, 5_000)), demands, draw(st.integers(0, 20_000)))
    return RackInputs(cap, degraded, members, peers)


@settings(max_examples=400, deadline=None)
@given(racks())
def test_never_over_capacity_and_deterministic(inputs: RackInputs) -> None:
    a = allocate(inputs)
    assert set(a.shares) == {m.node for m in inputs.members}
    assert list(a.shares) == sorted(a.shares)
    assert all(isinstance(v, int) and v >= 0 for v in a.shares.values())
    assert a.total_w <= inputs.capacity_w
    # Same inputs in any member order: the same result and hash.
    b = allocate(replace(inputs, members=tuple(reversed(inputs.members))))
    assert (a.shares, a.view_hash) == (b.shares, b.view_hash)


@settings(max_examples=400, deadline=None)
@given(racks(), st.data())
def test_more_demand_from_one_node_never_raises_another(inputs: RackInputs, data: st.DataObject) -> None:
    """A claim (bad or not) can only take from others: it never raises another node's share."""
    fresh = [n for n, p in inputs.peers.items() if p.status == "fresh"]
    if not fresh:
        return
    j = data.draw(st.sampled_from(fresh))
    p = inputs.peers[j]
    bigger = PeerInput(
        "fresh",
        data.draw(st.integers(p.floor_w, 100_000)),
        (*p.demands, ClassDemand("x", data.draw(st.integers(0, 3)), data.draw(st.integers(0, 100_000)))),
    )
    before = allocate(inputs).shares
    after = allocate(replace(inputs, peers={**inputs.peers, j: bigger})).shares
    for node in before:
        if node != j:
            assert after[node] <= before[node], (node, before, after)


@settings(max_examples=400, deadline=None)
@given(racks(), st.data())
def test_any_mix_of_partitioned_and_connected_nodes_stays_within_degraded_capacity(
    inputs: RackInputs, data: st.DataObject
) -> None:
    """Capacity at its degraded value: the partitioned run at ≤ their fallback, the connected
    (fresh to each other) see them dead (their will, or timed out) and split the rest."""
    degraded = inputs.degraded_capacity_w
    members = inputs.members
    cut = data.draw(st.sets(st.sampled_from([m.node for m in members])))
    fb = fallback_shares(members, degraded)
    connected_view = replace(
        inputs,
        capacity_w=degraded,
        peers={
            m.node: PeerInput("dead") if m.node in cut else replace(p, status="fresh")
            for m in members
            for p in [inputs.peers.get(m.node, PeerInput("fresh"))]
        },
    )
    a = allocate(connected_view)
    connected = {n: s for n, s in a.shares.items() if n not in cut}
    # A partitioned node runs at the smaller of its last share and its fallback share.
    partitioned = {n: min(data.draw(st.integers(0, 50_000)), fb[n]) for n in cut}
    assert sum(connected.values()) + sum(partitioned.values()) <= degraded


@settings(max_examples=300, deadline=None)
@given(racks())
def test_reservations_come_first(inputs: RackInputs) -> None:
    a = allocate(inputs)
    fb = fallback_shares(inputs.members, inputs.degraded_capacity_w)
    want = 0
    for m in sorted(inputs.members, key=lambda m: m.node):
        p = inputs.peers.get(m.node)
        if p is None or p.status in ("dead", "absent"):
            want += fb[m.node]
        elif p.status == "stale":
            want += p.held_w
    assert a.reserved_w == min(want, inputs.capacity_w)


def _rack(
    demands: dict[str, int], cap: int = 12_000, degraded: int = 4_000, floor: int = 200, **weights: float
) -> Allocation:
    members = tuple(Member(n, weights.get(n, 1.0)) for n in sorted(demands))
    peers = {n: PeerInput("fresh", floor, (ClassDemand("default", 0, d),)) for n, d in demands.items()}
    return allocate(RackInputs(cap, degraded, members, peers))


def test_water_filling_gives_the_light_nodes_their_demand_and_the_rest_to_the_heavy() -> None:
    a = _rack({"a": 500, "b": 500, "c": 10_000, "d": 10_000})
    assert a.shares["a"] == 500 and a.shares["b"] == 500
    assert a.shares["c"] == a.shares["d"] == 5_500


def test_weights_split_the_contended_part() -> None:
    a = _rack({"a": 10_000, "b": 10_000}, cap=9_000, floor=0, b=2.0)
    assert (a.shares["a"], a.shares["b"]) == (3_000, 6_000)


def test_capacity_no_one_demands_stays_unallocated() -> None:
    a = _rack({"a": 1_000, "b": 1_000}, cap=10_000)
    assert a.shares == {"a": 1_000, "b": 1_000}


def test_higher_priority_class_first() -> None:
    members = (Member("a"), Member("b"))
    peers = {
        "a": PeerInput("fresh", 0, (ClassDemand("batch", 0, 8_000),)),
        "b": PeerInput("fresh", 0, (ClassDemand("interactive", 5, 3_000), ClassDemand("batch", 0, 8_000))),
    }
    a = allocate(RackInputs(6_000, 0, members, peers))
    assert a.shares == {"a": 1_500, "b": 4_500}  # b's interactive 3 kW first, then batch max-min fair


def test_stale_peer_keeps_its_share_dead_and_absent_get_their_fallback() -> None:
    members = tuple(Member(n) for n in ("a", "b", "c", "d"))
    peers = {
        "a": PeerInput("fresh", 0, (ClassDemand("d", 0, 20_000),)),
        "b": PeerInput("stale", held_w=3_000),
        "c": PeerInput("dead"),
    }
    a = allocate(RackInputs(12_000, 4_000, members, peers))
    assert a.shares == {"a": 7_000, "b": 3_000, "c": 1_000, "d": 1_000}
    assert a.reserved_w == 5_000


def test_floors_scale_down_when_the_room_is_short() -> None:
    members = (Member("a"), Member("b"))
    peers = {n: PeerInput("fresh", 1_000, (ClassDemand("d", 0, 5_000),)) for n in ("a", "b")}
    a = allocate(RackInputs(1_000, 4_000, members, peers))
    assert a.shares == {"a": 500, "b": 500}


def test_capacity_is_the_smaller_of_budget_and_coolant() -> None:
    assert capacity_w(12_000.7, None) == 12_000
    assert capacity_w(12_000, 10_680.9) == 10_680
    assert capacity_w(12_000, float("nan")) == 12_000 or capacity_w(12_000, float("nan")) == 0


def test_next_share_lowers_at_once_and_raises_only_when_announced_or_agreed() -> None:
    assert (
        next_share(in_force_w=5_000, target_w=3_000, announced_w=None, agree=False, headroom_w=9_000) == 3_000
    )
    # A rise not announced and not agreed waits a period.
    assert (
        next_share(in_force_w=3_000, target_w=5_000, announced_w=None, agree=False, headroom_w=9_000) == 3_000
    )
    assert (
        next_share(in_force_w=3_000, target_w=5_000, announced_w=5_000, agree=False, headroom_w=9_000)
        == 5_000
    )
    assert (
        next_share(in_force_w=3_000, target_w=5_000, announced_w=None, agree=True, headroom_w=9_000) == 5_000
    )
    # A rise never goes past what the peers left; it never lowers below the share in force either.
    assert (
        next_share(in_force_w=3_000, target_w=5_000, announced_w=5_000, agree=True, headroom_w=4_000) == 4_000
    )
    assert (
        next_share(in_force_w=3_000, target_w=5_000, announced_w=5_000, agree=True, headroom_w=2_000) == 3_000
    )


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 20_000),
    st.integers(0, 20_000),
    st.one_of(st.none(), st.integers(0, 20_000)),
    st.booleans(),
    st.integers(-5_000, 20_000),
)
def test_next_share_never_exceeds_headroom_or_a_raise_past_the_target(
    in_force: int, target: int, announced: int | None, agree: bool, headroom: int
) -> None:
    s = next_share(
        in_force_w=in_force, target_w=target, announced_w=announced, agree=agree, headroom_w=headroom
    )
    assert 0 <= s <= max(in_force, target)
    if target <= in_force:
        assert s == target  # lower at once
    else:
        assert s <= max(in_force, headroom)  # a rise stays within what the peers left
        if not agree and (announced is None or announced <= in_force):
            assert s == in_force  # an unannounced rise waits a period

"""One rack, one budget: the deterministic split of the rack's capacity among its nodes.

Every node of a rack runs :func:`allocate` on the same inputs (the members, the capacity,
the peers' claims) and gets the same integer result, so the rack needs no leader:

1. The capacity is the smaller of the rack's power budget and its coolant capacity.
2. Peers we cannot count on are reserved first: a stale peer keeps its last share (``held_w``)
   until its claim times out; a dead or absent member gets its fallback share, its weight's
   part of ``degraded_capacity_w`` (a node that loses the broker runs at no more than that).
3. The rest goes to the fresh nodes: floors first, then demand water-filled by class
   priority (highest first), max-min fair by weight within a class, then what no one demands,
   by weight. Amounts are whole watts, rounded down, so the shares never sum above the capacity.

:func:`next_share` is the node's own step on top: lower at once, raise only into headroom
the peers have left and only once the rise was announced or the views agree.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

PeerStatus = Literal["fresh", "stale", "dead", "absent"]


@dataclass(frozen=True, slots=True)
class Member:
    """An expected member of the rack.

    Attributes:
        node: The node's name (its topic segment).
        weight: Its weight in the max-min fair split and in the fallback share (> 0).
    """

    node: str
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class ClassDemand:
    """What a node would draw for one workload class.

    Attributes:
        cls: The class's name.
        priority: Higher priorities are served first.
        demand_w: Watts the class would use on this node.
    """

    cls: str
    priority: int
    demand_w: int


@dataclass(frozen=True, slots=True)
class PeerInput:
    """One member as the allocation sees it.

    Attributes:
        status: ``fresh`` (a valid claim within its lifetime), ``stale`` (its last claim is
            older than that but not yet timed out), ``dead`` (its will, or timed out) or
            ``absent`` (never heard from).
        floor_w: Fresh: the least it needs.
        demands: Fresh: demand per class.
        held_w: Stale: the share it may still be running at (its last in force or announced).
    """

    status: PeerStatus
    floor_w: int = 0
    demands: tuple[ClassDemand, ...] = ()
    held_w: int = 0


@dataclass(frozen=True, slots=True)
class RackInputs:
    """Everything the allocation depends on (nodes' inputs must agree to agree on the result).

    Attributes:
        capacity_w: The rack's capacity now (see :func:`capacity_w`).
        degraded_capacity_w: Capacity that survives one pump lost at the warmest allowed supply.
        members: The expected members.
        peers: By node name; a member missing here is ``absent``.
    """

    capacity_w: int
    degraded_capacity_w: int
    members: tuple[Member, ...]
    peers: Mapping[str, PeerInput] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Allocation:
    """The split of the rack.

    Attributes:
        capacity_w: The capacity split.
        reserved_w: Held for stale, dead and absent members.
        shares: Node → share, every member, sorted by node name.
        view_hash: Hash of the inputs (nodes that agree on it computed the same shares).
    """

    capacity_w: int
    reserved_w: int
    shares: dict[str, int]
    view_hash: str

    @property
    def total_w(self) -> int:
        """Sum of the shares (reservations included)."""
        return sum(self.shares.values())


def capacity_w(power_budget_w: float, coolant_capacity_w: float | None) -> int:
    """The rack's capacity: the smaller of its power budget and its coolant capacity, whole watts down.

    Args:
        power_budget_w: The rack's power budget.
        coolant_capacity_w: What the CDU carries now, or None when unknown (then the budget).
    """
    cap = power_budget_w if coolant_capacity_w is None else min(power_budget_w, coolant_capacity_w)
    return max(0, math.floor(cap)) if math.isfinite(cap) else 0


def fallback_shares(members: Sequence[Member], degraded_capacity_w: float) -> dict[str, int]:
    """Each member's weight's part of the degraded capacity, whole watts down."""
    total = sum(m.weight for m in members)
    if total <= 0:
        return {m.node: 0 for m in members}
    return {m.node: max(0, math.floor(degraded_capacity_w * m.weight / total)) for m in members}


def view_hash(inputs: RackInputs) -> str:
    """A short hash of the inputs, canonical (sorted by node)."""
    members = sorted(inputs.members, key=lambda m: m.node)
    doc = [
        inputs.capacity_w,
        inputs.degraded_capacity_w,
        [[m.node, m.weight] for m in members],
        [
            [
                m.node,
                p.status,
                p.floor_w,
                p.held_w,
                sorted([d.cls, d.priority, d.demand_w] for d in p.demands),
            ]
            for m in members
            if (p := inputs.peers.get(m.node)) is not None
        ],
    ]
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()[:12]


def _fill(base: list[float], room_each: list[float], weights: list[float], room: float) -> list[float]:
    """Weighted water-filling of increments: ``base + min(room_each, λ·w)``, largest λ that fits ``room``."""

    def at(lam: float) -> list[float]:
        return [b + min(r, lam * w) for b, r, w in zip(base, room_each, weights, strict=True)]

    if sum(base) + sum(room_each) <= room:
        return [b + r for b, r in zip(base, room_each, strict=True)]
    lo, hi = 0.0, 1.0
    while sum(at(hi)) <= room and hi < 1e12:
        hi *= 2.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(at(mid)) <= room:
            lo = mid
        else:
            hi = mid
    return at(lo)


def allocate(inputs: RackInputs) -> Allocation:
    """Split the rack's capacity (deterministic; see the module docstring).

    Args:
        inputs: The members, capacity and peers.

    Returns:
        Every member's share in whole watts, never summing above ``inputs.capacity_w``.
    """
    cap = max(0, int(inputs.capacity_w))
    members = sorted(inputs.members, key=lambda m: m.node)
    fallback = fallback_shares(members, inputs.degraded_capacity_w)
    shares: dict[str, int] = {}
    fresh: list[tuple[Member, PeerInput]] = []
    reserved = 0
    for m in members:
        p = inputs.peers.get(m.node, PeerInput("absent"))
        if p.status == "fresh":
            fresh.append((m, p))
            continue
        want = max(0, p.held_w) if p.status == "stale" else fallback[m.node]
        give = min(want, cap - reserved)
        shares[m.node] = give
        reserved += give
    room = float(cap - reserved)
    if fresh:
        weights = [max(m.weight, 1e-9) for m, _ in fresh]
        floors = [float(min(max(p.floor_w, 0), fallback[m.node])) for m, p in fresh]
        if sum(floors) > room:
            scale = room / sum(floors)
            x = [f * scale for f in floors]
        else:
            x = floors
            cum = [0.0] * len(fresh)
            for prio in sorted({d.priority for _, p in fresh for d in p.demands}, reverse=True):
                for i, (_, p) in enumerate(fresh):
                    cum[i] += sum(max(d.demand_w, 0) for d in p.demands if d.priority == prio)
                x = _fill(x, [max(0.0, c - v) for c, v in zip(cum, x, strict=True)], weights, room)
        for (m, _), v in zip(fresh, x, strict=True):
            shares[m.node] = max(0, math.floor(v + 1e-9))
        over = sum(shares[m.node] for m, _ in fresh) - int(room)
        for m, _ in reversed(fresh):  # float rounding can never push the sum over the room
            if over <= 0:
                break
            cut = min(over, shares[m.node])
            shares[m.node] -= cut
            over -= cut
    return Allocation(
        capacity_w=cap,
        reserved_w=reserved,
        shares=dict(sorted(shares.items())),
        view_hash=view_hash(inputs),
    )


def next_share(
    *,
    in_force_w: int,
    target_w: int,
    announced_w: int | None,
    agree: bool,
    headroom_w: int,
) -> int:
    """The node's share for the next period: lower at once, raise carefully.

    Args:
        in_force_w: The share in force now.
        target_w: This period's allocation for the node.
        announced_w: The rise the node's previous claim announced (``next_w``), or None.
        agree: Every fresh peer's claim carries the same view hash as ours.
        headroom_w: Capacity less what every peer holds or announced (a rise never goes past it).

    Returns:
        The share to put in force now (whole watts).
    """
    target_w = max(0, target_w)
    if target_w <= in_force_w:
        return target_w
    if agree:
        limit = target_w
    elif announced_w is not None and announced_w > in_force_w:
        limit = min(target_w, announced_w)
    else:
        return in_force_w
    return max(in_force_w, min(limit, headroom_w))

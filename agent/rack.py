"""One rack, one budget, no leader: claims over MQTT and this node's share.

Every control period the node publishes a retained claim on ``<prefix>/<site>/<rack>/<node>/claim``
(:class:`~rackguard.agent.messages.Claim`) and reads its peers' claims and statuses. From the
same inputs every node computes the same split (:func:`rackguard.controllers.rack.allocate`);
its share becomes its MPC's power budget and its limit on heat into the coolant.

* **Peers.** A claim is fresh for ``claim_lifetime_s`` after it *arrives* (the sender's clock is
  never trusted: a node whose clock is 1 h off is aged like any other); then stale (its last
  share is held) until ``dead_after_s``; then dead (its fallback share is held). A retained copy
  delivered on (re)subscribe is old news: stale from the start. The peer's ``status`` offline
  (its will, or its goodbye) with the incarnation of its latest claim, or a newer one, makes it
  stale at once (its servers may still be draining, or it is only cut off) and dead
  ``dead_after_s`` later; a will older than the latest claim is ignored (the node already restarted).
  MQTT gives one will per connection, and ours is on ``status``: that is the claim's will.
* **Bad claims** (malformed, too large, not a member, an old incarnation, an absurd demand) are
  rejected, counted in ``rackguard_rack_claims_rejected_total{reason}``, logged at most once a
  minute per reason, and change nothing: the peer keeps its last valid claim, which ages.
* **Seen from outside.** ``rackguard_rack_peer_status{peer,status}`` (1 for each peer's current
  status), ``rackguard_rack_peer_claim_age_seconds{peer}`` (by arrival) and
  ``rackguard_rack_wills_ignored_total`` (wills of an incarnation older than the latest claim).
* **Lower at once, raise carefully** (:func:`~rackguard.controllers.rack.next_share`).
* **Fallback.** Disconnected from the broker, or with stale rack data (the CDU's readings), the
  node falls at once to the smaller of its share and its fallback share (its weight's part of
  ``degraded_capacity_w``). Peers hold at least that for every member they do not hear from.
* **Backstop.** While the CDU removes more heat than it can carry (return above
  ``return_limit_c``), the share is cut by ``backstop_factor`` every period; it recovers by the
  same factor per period once the return is back within the limit.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from rackguard.agent import inbox
from rackguard.agent import log as logmod
from rackguard.agent.config import Config, RackConfig
from rackguard.agent.messages import CLAIM_MAX_BYTES, Claim, ClassDemand, dump
from rackguard.agent.metrics import Metrics
from rackguard.agent.mqtt import MqttLink
from rackguard.agent.snapshot import NodeSnapshot
from rackguard.controllers.api import Decision, NodeShare
from rackguard.controllers.rack import (
    ClassDemand as RackDemand,
)
from rackguard.controllers.rack import (
    Member,
    PeerInput,
    RackInputs,
    allocate,
    capacity_w,
    fallback_shares,
    next_share,
)
from rackguard.physics import heat_w

LOG_EVERY_S = 60.0
DEFAULT_CLASS = "default"  # one workload class until the gateway says which request is which
CAPACITY_HOLD_S = 5.0
PEER_STATUSES = ("fresh", "stale", "dead", "absent")
REJECT_REASONS = ("malformed", "too_large", "not_member", "old_incarnation", "absurd", "replayed")


@dataclass(slots=True)
class Peer:
    """What this node knows of one member."""

    claim: Claim | None = None
    recv_mono: float = -math.inf
    inc: int = -1  # the newest incarnation seen in a claim
    dead_inc: int = -1  # the newest incarnation a status offline (a will) ended
    dead_mono: float = -math.inf  # when that will arrived


def config_hash(rc: RackConfig) -> str:
    """Hash of what decides the rack's capacity (members, budget, limits)."""
    doc = [
        sorted((m.name, m.weight) for m in rc.members),
        rc.power_budget_w,
        rc.return_limit_c,
        rc.degraded_capacity_w,
    ]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:8]


def _ceil_to(value: float, step: int) -> int:
    return int(math.ceil(max(0.0, value) / step) * step)


class RackCoordinator:
    """This node's side of the rack's split.

    Args:
        cfg: The config (``[rack]`` non-empty: ``members`` lists this node).
        link: The MQTT link (claims out, claims and statuses in).
        metrics: The Prometheus registry.
        incarnation: This run's incarnation.
        node_max_w: The most the node's GPUs can draw (caps an honest demand).
        rack_base: ``<prefix>/<site>/<rack>``.
        clock: Monotonic seconds (tests).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        link: MqttLink,
        metrics: Metrics,
        incarnation: int,
        node_max_w: float,
        rack_base: str,
        clock: Any = time.monotonic,
    ) -> None:
        self.rc = cfg.rack
        self.coolant_cfg = cfg.coolant
        self.me = cfg.node.name
        self.link = link
        self.metrics = metrics
        self.inc = incarnation
        self.node_max_w = min(node_max_w, self.rc.max_node_power_w)
        self.rack_base = rack_base
        self.claim_topic = f"{rack_base}/{self.me}/claim"
        self.clock = clock
        self.members = tuple(Member(m.name, m.weight) for m in self.rc.members)
        self.names = {m.node for m in self.members}
        self.fallback_w = fallback_shares(self.members, self.rc.degraded_capacity_w)
        self.peers: dict[str, Peer] = {m.node: Peer() for m in self.members if m.node != self.me}
        self.cfg_hash = config_hash(self.rc)
        self.seq = 0
        self.in_force_w = self.fallback_w[self.me]  # a node starts at its fallback share
        self.next_w: int | None = None  # the rise the last claim announced
        self.backstop_scale = 1.0
        self.share: NodeShare | None = self._node_share(self.in_force_w, None, None)
        self.share_w = self.in_force_w
        self.fallback = True
        self.capacity_w = 0
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.wills_ignored = 0
        self.disagreeing: set[str] = set()
        self._logged: dict[str, float] = {}
        self._coolant_seen: deque[tuple[float, float]] = deque()
        self.log = logmod.get("rack")
        link.subscribe_retained(f"{rack_base}/+/claim", self.on_claim, inbox.SENSOR)
        link.subscribe_retained(f"{rack_base}/+/status", self.on_status, inbox.SENSOR)

    # -- what arrives ------------------------------------------------------------------
    def _reject(self, reason: str, node: str, detail: str = "") -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.metrics.rack_claims_rejected.labels(reason).inc()
        now = self.clock()
        if now - self._logged.get(reason, -math.inf) >= LOG_EVERY_S:
            self._logged[reason] = now
            self.log.warning(
                "rack_claim_rejected",
                reason=reason,
                node=node[:64],
                detail=detail[:200],
                total=self.rejected[reason],
            )

    def on_claim(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """A peer's claim (never raises: a bad one is counted and ignored)."""
        node = topic.rsplit("/", 2)[-2]
        if node == self.me or not payload:
            return  # our own echo; a cleared retained claim
        if node not in self.names:
            self._reject("not_member", node)
            return
        if len(payload) > CLAIM_MAX_BYTES:
            self._reject("too_large", node, f"{len(payload)} bytes")
            return
        try:
            claim = Claim.model_validate_json(payload)
        except ValidationError as exc:
            self._reject("malformed", node, str(exc.errors()[0].get("msg", "")))
            return
        if claim.node != node:
            self._reject("malformed", node, f"claim for {claim.node} on {node}'s topic")
            return
        lim = self.rc.max_node_power_w
        demand = sum(d.demand_w for d in claim.demand)
        if max(demand, claim.floor_w, claim.share_w, claim.next_w, claim.heat_w, claim.power_w) > lim:
            self._reject("absurd", node, f"more than max_node_power_w {lim:.0f} W")
            return
        peer = self.peers[node]
        if claim.inc < peer.inc or claim.inc <= peer.dead_inc:
            if not retained:
                self._reject("old_incarnation", node, f"incarnation {claim.inc}")
            return
        if claim.inc == peer.inc and peer.claim is not None and claim.seq <= peer.claim.seq:
            if not retained:
                self._reject("replayed", node, f"seq {claim.seq}")
            return
        peer.claim, peer.inc = claim, claim.inc
        # A retained copy may be any age: it counts as stale (its share held) until a live one comes.
        peer.recv_mono = self.clock() - (self.rc.claim_lifetime_s + 1e-3 if retained else 0.0)
        if claim.cfg != self.cfg_hash and node not in self.disagreeing:
            self.disagreeing.add(node)
            self.log.warning(
                "rack_config_disagrees",
                node=node,
                theirs=claim.cfg,
                ours=self.cfg_hash,
                using="the most conservative",
            )

    def on_status(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """A peer's birth or will: an ``offline`` of its latest incarnation makes it dead at once."""
        node = topic.rsplit("/", 2)[-2]
        if node == self.me or node not in self.names or not payload:
            return
        try:
            doc = json.loads(payload)
            state, inc = doc["state"], doc.get("incarnation")
        except (ValueError, KeyError, TypeError):
            return
        if state != "offline" or not isinstance(inc, int) or isinstance(inc, bool):
            return
        peer = self.peers[node]
        if inc < peer.inc:
            self.wills_ignored += 1  # a will older than the latest claim: the node already restarted
            self.metrics.rack_wills_ignored.inc()
            return
        if inc > peer.dead_inc:
            peer.dead_inc, peer.dead_mono = inc, self.clock()

    # -- the step ------------------------------------------------------------------------
    def _status(self, peer: Peer, now: float) -> str:
        if peer.claim is None:
            return "dead" if peer.dead_inc >= 0 else "absent"
        if peer.claim.inc <= peer.dead_inc:
            # Its will: no longer counted on, but its servers may still be draining (or it is cut
            # off, not dead), so its last share is held for dead_after_s.
            return "stale" if now - peer.dead_mono <= self.rc.dead_after_s else "dead"
        age = now - peer.recv_mono
        if age <= self.rc.claim_lifetime_s:
            return "fresh"
        return "stale" if age <= self.rc.dead_after_s else "dead"

    def _peer_metrics(self, statuses: dict[str, str], now: float) -> None:
        for n, st in statuses.items():
            for s in PEER_STATUSES:
                self.metrics.rack_peer_status.labels(n, s).set(1 if s == st else 0)
            recv = self.peers[n].recv_mono
            if math.isfinite(recv):
                self.metrics.rack_peer_claim_age_s.labels(n).set(round(now - recv, 3))

    def coolant_capacity_w(self, snap: NodeSnapshot) -> tuple[float | None, bool]:
        """(What the CDU carries now, whether that is known); (None, True) when no coolant limit applies."""
        if self.rc.return_limit_c is None:
            return None, True
        c = snap.coolant
        if c is None or c.stale or c.flow_lpm is None or c.supply_temp_c is None:
            return None, False
        q = heat_w(
            c.flow_lpm,
            max(0.0, self.rc.return_limit_c - c.supply_temp_c),
            cp_j_per_kg_k=self.coolant_cfg.cp_j_per_kg_k,
            density_kg_per_l=self.coolant_cfg.density_kg_per_l,
        )
        return q, True

    def _demand_w(self, snap: NodeSnapshot, decision: Decision | None) -> int:
        """What the node would use: all it can while its servers fill their caps (unless its own
        temperatures are what limits it), else what it uses now and a margin to grow."""
        power = snap.gpu_power_w or 0.0
        in_flight = sum(g.in_flight or 0.0 for g in snap.gpus)
        full = decision is not None and decision.total > 0 and in_flight >= 0.9 * decision.total
        thermal = decision is not None and decision.binding in ("gpu_temp", "mem_temp")
        if full and not thermal:
            return _ceil_to(self.node_max_w, 50)
        return min(_ceil_to(self.node_max_w, 50), _ceil_to(power * 1.05 + 50.0, 50))

    def _node_share(self, share_w: int, budget_w: float | None, coolant_w: float | None) -> NodeShare:
        """The share as the MPC's two limits; the one the capacity comes from binds (named in the cap)."""
        cap = min(budget_w or math.inf, coolant_w if coolant_w is not None else math.inf)
        if not math.isfinite(cap) or cap <= 0:
            return NodeShare(power_w=float(share_w), coolant_heat_w=float(share_w))
        power = share_w * (budget_w / cap) if budget_w is not None else math.inf
        heat = share_w * (coolant_w / cap) if coolant_w is not None else math.inf
        return NodeShare(power_w=power, coolant_heat_w=heat)

    def step(self, snap: NodeSnapshot, decision: Decision | None) -> NodeShare:
        """Compute this period's share from the freshest claims, publish our claim, return the share."""
        now = self.clock()
        rc = self.rc
        statuses = {n: self._status(p, now) for n, p in self.peers.items()}
        self._peer_metrics(statuses, now)
        fresh = {n: p.claim for n, p in self.peers.items() if statuses[n] == "fresh" and p.claim is not None}
        # Disagreeing configs: everyone uses the most conservative values.
        budget = rc.power_budget_w
        degraded = rc.degraded_capacity_w
        for fc in fresh.values():
            if fc.budget_w > 0:
                budget = fc.budget_w if budget is None else min(budget, fc.budget_w)
            degraded = min(degraded, fc.degraded_w)
        fallback = fallback_shares(self.members, degraded)
        coolant_w, known = self.coolant_capacity_w(snap)
        if coolant_w is not None:
            # Readings jitter: the capacity drops at once but rises only once it has held for
            # CAPACITY_HOLD_S, so the nodes' views agree and the shares do not flutter.
            self._coolant_seen.append((now, coolant_w))
            while self._coolant_seen and now - self._coolant_seen[0][0] > CAPACITY_HOLD_S:
                self._coolant_seen.popleft()
            coolant_w = math.floor(min(q for _, q in self._coolant_seen) / 50.0) * 50.0
        cap = capacity_w(budget if budget is not None else math.inf, coolant_w)
        self.capacity_w = cap
        stale = not self.link.connected or not known
        demand = self._demand_w(snap, decision)
        floor = min(int(rc.floor_w), fallback[self.me])
        target = self.in_force_w
        view = ""
        if stale:
            self.in_force_w = min(self.in_force_w, fallback[self.me])
            target = self.in_force_w
            self.next_w = None
        elif rc.split == "static":  # no coordination: the weight's part of the capacity
            weight = sum(m.weight for m in self.members if m.node == self.me)
            target = self.in_force_w = math.floor(cap * weight / sum(m.weight for m in self.members))
            self.next_w = None
        else:
            peers: dict[str, PeerInput] = {
                self.me: PeerInput("fresh", floor, (RackDemand(DEFAULT_CLASS, 0, demand),))
            }
            headroom = cap
            for n, p in self.peers.items():
                st = statuses[n]
                c = p.claim
                if st == "fresh" and c is not None:
                    peers[n] = PeerInput(
                        "fresh", c.floor_w, tuple(RackDemand(d.cls, d.prio, d.demand_w) for d in c.demand)
                    )
                    headroom -= max(c.share_w, c.next_w)
                elif st == "stale" and c is not None:
                    peers[n] = PeerInput("stale", held_w=max(c.share_w, c.next_w))
                    headroom -= max(c.share_w, c.next_w)
                else:
                    peers[n] = PeerInput("dead" if st == "dead" else "absent")
                    headroom -= fallback[n]
            alloc = allocate(RackInputs(cap, int(degraded), self.members, peers))
            view = alloc.view_hash
            target = alloc.shares[self.me]
            agree = bool(fresh) and all(c.view == view for c in fresh.values())
            self.in_force_w = next_share(
                in_force_w=self.in_force_w,
                target_w=target,
                announced_w=self.next_w,
                agree=agree or not self.peers,
                headroom_w=headroom,
            )
            self.next_w = target if target > self.in_force_w else None
        # Backstop without messages: the CDU itself says it removes more than it can carry.
        loop = snap.coolant
        over = (
            coolant_w is not None
            and loop is not None
            and rc.return_limit_c is not None
            and loop.return_temp_c is not None
            and loop.return_temp_c > rc.return_limit_c
        )
        self.backstop_scale = (
            self.backstop_scale * rc.backstop_factor
            if over
            else min(1.0, self.backstop_scale / rc.backstop_factor)
        )
        self.share_w = math.floor(self.in_force_w * self.backstop_scale)
        self.fallback = stale
        self.share = self._node_share(self.share_w, budget, coolant_w)
        self._publish(snap, decision, demand, floor, view, budget, degraded)
        m = self.metrics
        m.rack_share_w.set(self.share_w)
        m.rack_capacity_w.set(cap)
        m.rack_fallback.set(1 if stale else 0)
        m.rack_backstop_scale.set(self.backstop_scale)
        return self.share

    def _publish(
        self,
        snap: NodeSnapshot,
        decision: Decision | None,
        demand: int,
        floor: int,
        view: str,
        budget: float | None,
        degraded: float,
    ) -> None:
        self.seq += 1
        power = int(min(snap.gpu_power_w or 0.0, self.rc.max_node_power_w))
        claim = Claim(
            node=self.me,
            inc=self.inc,
            seq=self.seq,
            t_s=round(snap.t_s, 3),
            heat_w=power,  # heat into the coolant: the GPUs' electrical power (capture ratio ≈ 1)
            power_w=power,
            floor_w=floor,
            demand=[ClassDemand(cls=DEFAULT_CLASS, prio=0, demand_w=demand)],
            cap_total=decision.total if decision is not None else 0,
            share_w=self.share_w,
            next_w=max(self.share_w, self.next_w or 0),
            view=view,
            cfg=self.cfg_hash,
            capacity_w=self.capacity_w,
            budget_w=int(budget or 0),
            degraded_w=int(degraded),
            fallback=self.fallback,
        )
        self.link.set_state(self.claim_topic, dump(claim), expiry_s=max(1, math.ceil(self.rc.dead_after_s)))

    def reconfigure(self, cfg: Config) -> None:
        """``[rack]`` needs a restart; nothing to apply live."""

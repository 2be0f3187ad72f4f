"""The node's side of the rack: claims validated and counted, wills matched by incarnation, fallback, backstop."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from rackguard.agent import config as configmod
from rackguard.agent.incarnation import next_incarnation, path_for
from rackguard.agent.messages import Claim, ClassDemand, dump
from rackguard.agent.metrics import Metrics
from rackguard.agent.mqtt import MqttLink, Topics
from rackguard.agent.rack import RackCoordinator, config_hash
from rackguard.agent.snapshot import GpuSnapshot, NodeSnapshot
from rackguard.controllers.api import Decision
from rackguard.sensors.base import GpuSample
from rackguard.sensors.coolant import CoolantSnapshot
from rackguard.sim.rack import RackSpec, rack_config

SPEC = RackSpec(nodes=3, site="s", rack="r", power_budget_w=6000.0, degraded_capacity_w=3000.0, floor_w=0.0)
BASE = "rackguard/s/r"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(index: int = 0) -> tuple[RackCoordinator, Clock]:
    cfg = configmod.validate(rack_config(SPEC, index, offered_concurrency=256.0))
    link = MqttLink(
        cfg.mqtt,
        Topics.for_node(cfg.node),
        client_factory=lambda will: None,  # type: ignore[arg-type,return-value]
        offline_payload=lambda reason: b"",
    )
    link.connected = True  # never run: the handlers and the step are called directly
    clock = Clock()
    rack = RackCoordinator(
        cfg, link=link, metrics=Metrics(), incarnation=7, node_max_w=2800.0, rack_base=BASE, clock=clock
    )
    return rack, clock


def snap(
    power_w: float = 1000.0, *, flow_lpm: float = 36.0, return_c: float = 33.0, stale: bool = False
) -> NodeSnapshot:
    sample = GpuSample(index=0, t_s=time.time(), power_w=power_w, gpu_temp_c=50.0)
    coolant = CoolantSnapshot(
        t_s=time.time(),
        supply_temp_c=32.0,
        return_temp_c=return_c,
        flow_lpm=flow_lpm,
        stale=stale,
        heat_removed_w=1000.0,
    )
    return NodeSnapshot(
        t_s=time.time(),
        mono_s=time.monotonic(),
        gpus=(GpuSnapshot(index=0, uuid="u", state="ok", sample=sample, in_flight=None),),
        coolant=coolant,
    )


def claim(node: str = "n1", *, inc: int = 3, seq: int = 1, demand_w: int = 2800, **kw: Any) -> bytes:
    rc = configmod.validate(rack_config(SPEC, 1, offered_concurrency=1.0)).rack
    body = Claim(
        node=node,
        inc=inc,
        seq=seq,
        t_s=kw.pop("t_s", time.time()),
        heat_w=kw.pop("heat_w", 1000),
        power_w=1000,
        floor_w=0,
        demand=[ClassDemand(cls="default", prio=0, demand_w=demand_w)],
        cap_total=32,
        share_w=kw.pop("share_w", 2000),
        next_w=kw.pop("next_w", 2000),
        view="",
        cfg=config_hash(rc),
        capacity_w=6000,
        budget_w=6000,
        degraded_w=3000,
        fallback=False,
    )
    return dump(body)


def settle(rack: RackCoordinator, clock: Clock, s: NodeSnapshot, periods: int = 4) -> int:
    decision = Decision(caps=(8,), reason="mpc", binding="rack_power")
    for _ in range(periods):
        rack.step(s, decision)
        clock.t += 1.0
    return rack.share_w


def test_a_node_starts_at_its_fallback_share_and_claims_within_bounds() -> None:
    rack, _clock = make()
    assert rack.share_w == 1000  # 3000 W degraded over 3 members
    rack.step(snap(), None)
    topic, msg = rack.claim_topic, rack.link._states[rack.claim_topic]
    assert topic == f"{BASE}/n0/claim" and msg.retain and msg.qos == 1
    assert len(msg.payload) <= 500
    body = json.loads(msg.payload)
    assert body["inc"] == 7 and body["node"] == "n0" and body["schema"] == "rackguard.claim/1"


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (f"{BASE}/n1/claim", b"{not json", "malformed"),
        (f"{BASE}/n1/claim", claim("n2"), "malformed"),  # a claim for n2 on n1's topic
        (f"{BASE}/stranger/claim", claim("stranger"), "not_member"),
        (f"{BASE}/n1/claim", claim(inc=2, seq=99), "old_incarnation"),
        (f"{BASE}/n1/claim", claim(demand_w=10**9), "absurd"),
        (f"{BASE}/n1/claim", claim(share_w=10**8, next_w=10**8), "absurd"),
        (f"{BASE}/n1/claim", b"{" + b" " * 2000 + b"}", "too_large"),
        (f"{BASE}/n1/claim", claim(seq=1), "replayed"),
    ],
    ids=["not_json", "wrong_topic", "stranger", "old_inc", "demand", "share", "too_large", "replayed"],
)
def test_a_bad_claim_is_rejected_counted_and_never_raises_another_share(
    topic: str, payload: bytes, reason: str
) -> None:
    rack, clock = make()
    rack.on_claim(f"{BASE}/n1/claim", claim(demand_w=500), False)
    rack.on_claim(f"{BASE}/n2/claim", claim("n2", demand_w=500), False)
    before = settle(rack, clock, snap(power_w=2500))
    peer_before = rack.peers["n1"].claim
    for _ in range(3):
        rack.on_claim(topic, payload, False)
    assert rack.rejected[reason] == 3
    assert rack.metrics.rack_claims_rejected.labels(reason)._value.get() == 3
    assert rack.peers["n1"].claim is peer_before  # the last valid claim stands
    rack.on_claim(f"{BASE}/n1/claim", claim(seq=2, demand_w=500), False)  # the peer goes on
    rack.on_claim(f"{BASE}/n2/claim", claim("n2", seq=2, demand_w=500), False)
    assert settle(rack, clock, snap(power_w=2500)) == before


def test_a_will_older_than_the_latest_claim_is_ignored_and_a_current_one_kills() -> None:
    rack, clock = make()
    rack.on_claim(f"{BASE}/n1/claim", claim(inc=5), False)
    rack.on_status(f"{BASE}/n1/status", json.dumps({"state": "offline", "incarnation": 4}).encode(), False)
    assert rack._status(rack.peers["n1"], clock.t) == "fresh" and rack.wills_ignored == 1
    assert rack.metrics.rack_wills_ignored._value.get() == 1
    rack.on_status(f"{BASE}/n1/status", json.dumps({"state": "offline", "incarnation": 5}).encode(), False)
    # No longer counted on; its last share is held while its servers drain, then its fallback.
    assert rack._status(rack.peers["n1"], clock.t) == "stale"
    clock.t += rack.rc.dead_after_s + 0.1
    assert rack._status(rack.peers["n1"], clock.t) == "dead"
    # Its retained claim of that incarnation, redelivered, does not bring it back.
    rack.on_claim(f"{BASE}/n1/claim", claim(inc=5, seq=9), True)
    assert rack._status(rack.peers["n1"], clock.t) == "dead"
    rack.on_claim(f"{BASE}/n1/claim", claim(inc=6, seq=1), False)  # restarted
    assert rack._status(rack.peers["n1"], clock.t) == "fresh"


def test_claims_age_by_arrival_so_a_clock_an_hour_off_changes_nothing() -> None:
    rack, clock = make()
    rack.on_claim(f"{BASE}/n1/claim", claim(t_s=time.time() - 3600), False)
    rack.on_claim(f"{BASE}/n2/claim", claim("n2", t_s=time.time() + 3600), False)
    assert all(rack._status(p, clock.t) == "fresh" for p in rack.peers.values())
    rack.step(snap(), None)  # what the node's /metrics says of its peers
    status = rack.metrics.rack_peer_status
    assert [status.labels(n, "fresh")._value.get() for n in ("n1", "n2")] == [1, 1]
    assert [status.labels(n, "stale")._value.get() for n in ("n1", "n2")] == [0, 0]
    assert [rack.metrics.rack_peer_claim_age_s.labels(n)._value.get() for n in ("n1", "n2")] == [0, 0]
    clock.t += rack.rc.claim_lifetime_s + 0.1
    assert all(rack._status(p, clock.t) == "stale" for p in rack.peers.values())
    clock.t += rack.rc.dead_after_s
    assert all(rack._status(p, clock.t) == "dead" for p in rack.peers.values())


def test_a_retained_claim_is_old_news_its_share_is_held() -> None:
    rack, clock = make()
    rack.on_claim(f"{BASE}/n1/claim", claim(share_w=4000, next_w=4000), True)
    assert rack._status(rack.peers["n1"], clock.t) == "stale"
    rack.on_claim(f"{BASE}/n2/claim", claim("n2", demand_w=500), False)
    share = settle(rack, clock, snap(power_w=2500), periods=2)
    assert share <= 6000 - 4000 - 500


def test_broker_loss_or_stale_rack_data_falls_to_the_fallback_share_at_once() -> None:
    rack, clock = make()
    for n in ("n1", "n2"):
        rack.on_claim(f"{BASE}/{n}/claim", claim(n, demand_w=300, share_w=300, next_w=300), False)
    high = settle(rack, clock, snap(power_w=2700))
    assert high > rack.fallback_w["n0"]
    rack.link.connected = False
    rack.step(snap(power_w=2700), None)
    assert rack.share_w == rack.fallback_w["n0"] and rack.fallback
    rack.link.connected = True
    rack.step(snap(power_w=2700, stale=True), None)
    assert rack.share_w == rack.fallback_w["n0"]


def test_the_backstop_cuts_multiplicatively_while_the_cdu_is_over_and_recovers() -> None:
    rack, clock = make()
    for n in ("n1", "n2"):
        rack.on_claim(f"{BASE}/{n}/claim", claim(n, demand_w=300, share_w=300, next_w=300), False)
    base = settle(rack, clock, snap(power_w=2700))
    shares = []
    for _ in range(3):
        for n in ("n1", "n2"):  # keep the peers fresh
            rack.on_claim(f"{BASE}/{n}/claim", claim(n, seq=int(clock.t), demand_w=300), False)
        rack.step(snap(power_w=2700, return_c=36.5), None)
        clock.t += 1
        shares.append(rack.share_w)
    f = rack.rc.backstop_factor
    assert shares == [int(base * f), int(base * f * f), int(base * f * f * f)] or shares[-1] < base * f**2 + 2


def test_incarnation_grows_on_every_start_and_persists(tmp_path: Path) -> None:
    path = path_for(configmod.validate({}), {"STATE_DIRECTORY": str(tmp_path)})
    assert path == tmp_path / "incarnation"
    assert [next_incarnation(path) for _ in range(3)] == [1, 2, 3]
    assert path.read_text().strip() == "3"


async def test_birth_and_will_carry_the_same_incarnation(
    tmp_path: Path, broker: Any, subscriber: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import os
    import signal
    import subprocess
    import sys

    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    cfg = rack_config(SPEC, 0, offered_concurrency=8.0, port=broker.port)
    (tmp_path / "n0.json").write_text(json.dumps(cfg))
    sub = subscriber(broker, f"{BASE}/n0/status")
    env = {**os.environ, "STATE_DIRECTORY": str(tmp_path)}
    incs = []
    for _ in range(2):
        p = subprocess.Popen(
            [sys.executable, "-m", "rackguard.bench.rack", "worker", str(tmp_path / "n0.json")], env=env
        )
        online = await asyncio.to_thread(
            sub.wait_for, lambda m: m.json()["state"] == "online", 30, len(incs) + 1
        )
        p.send_signal(signal.SIGKILL)  # the broker sends the will
        p.wait()
        will = await asyncio.to_thread(
            sub.wait_for, lambda m: m.json()["state"] == "offline", 30, len(incs) + 1
        )
        birth_inc, will_inc = online[-1].json()["incarnation"], will[-1].json()["incarnation"]
        assert birth_inc == will_inc
        incs.append(birth_inc)
    assert incs[1] == incs[0] + 1


def test_after_a_will_the_peers_share_stays_held_until_dead_after() -> None:
    rack, clock = make()
    rack.on_claim(f"{BASE}/n1/claim", claim(share_w=3000, next_w=3000), False)
    rack.on_claim(f"{BASE}/n2/claim", claim("n2", demand_w=300, share_w=300, next_w=300), False)
    rack.on_status(f"{BASE}/n1/status", json.dumps({"state": "offline", "incarnation": 3}).encode(), False)
    for _ in range(5):
        rack.on_claim(f"{BASE}/n2/claim", claim("n2", seq=int(clock.t), demand_w=300, share_w=300), False)
        rack.step(snap(power_w=2700), Decision(caps=(8,), reason="mpc", binding="rack_power"))
        clock.t += 1.0
    assert rack.share_w <= 6000 - 3000 - 300  # n1's last share is held while its servers drain
    clock.t += rack.rc.dead_after_s
    for _ in range(3):
        rack.on_claim(f"{BASE}/n2/claim", claim("n2", seq=int(clock.t), demand_w=300, share_w=300), False)
        rack.step(snap(power_w=2700), Decision(caps=(8,), reason="mpc", binding="rack_power"))
        clock.t += 1.0
    assert rack.share_w > 6000 - 3000 - 300  # then only its fallback share is
    assert rack.share_w <= 6000 - rack.fallback_w["n1"] - 300

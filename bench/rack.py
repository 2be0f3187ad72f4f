"""``rackguard bench rack``: one rack, one budget, four ways of sharing it.

One scenario on a simulated rack (:mod:`rackguard.sim.rack`): ``--nodes`` agents, each its own
process (``python -m rackguard.bench.rack worker CONFIG.json``: the agent and its simulated node,
as ``rackguard run --sim`` runs them) against a real mosquitto, and the rack's simulated CDU
(:func:`rackguard.agent.commands.sim_cdu.run` in rack mode, heated by the plants' true power).

Timeline (:class:`Timeline`, seconds; ``--quick`` scales it by 0.4): the first half of the nodes
are busy (256 requests offered per GPU) and the rest nearly idle (2); the last node joins late;
the CDU's pump fails to 40 % flow and is later restored; node 1 is SIGKILLed (and restarted 37 s
later); node 0 is cut off from the broker for 30 s (a black-holing proxy: nothing passes, nothing
is closed). A killed node's simulated GPUs die with it (a node crash).

Arms: ``independent`` (no ``[rack]``: today's behaviour, every node sees the whole flow),
``static`` (``rack.split = "static"``: each node its weight's part), ``coordinated`` (claims) run
the scenario; ``oracle`` is computed: a central allocator that sees every node's true demand and
the true capacity at once, with no controller margin (an upper bound).

Truth comes from the simulation, never from what the agents say: every simulated node appends its
plants' true power and completed work to a file (``RACKGUARD_SIM_TRUTH``), and the CDU's flow,
supply and return are logged at every step. Coolant overcommit is the CDU removing more heat than
its capacity (return above ``return_limit_c``); power overcommit is the rack's true GPU power
above the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rackguard.agent.mosquitto import Mosquitto, free_port
from rackguard.physics import heat_w
from rackguard.sim.rack import RackSpec, rack_config

ARMS = ("independent", "static", "coordinated")
HEAVY_OFFERED = 256.0
LIGHT_OFFERED = 2.0
GRID_S = 0.5


@dataclass(frozen=True, slots=True)
class Timeline:
    """When things happen, seconds from the start."""

    warm: float = 15.0  # the uneven-load window starts
    join: float = 35.0  # the last node joins (the uneven window ends)
    fail: float = 45.0  # pump to 40 % flow
    restore: float = 70.0
    kill: float = 75.0  # node 1 SIGKILLed
    restart: float = 112.0
    cut: float = 80.0  # node 0 cut off from the broker
    cut_end: float = 110.0
    end: float = 125.0
    outage: float = math.inf  # the broker stopped (drill)
    outage_end: float = math.inf

    def scaled(self, k: float) -> Timeline:
        return Timeline(**{f: getattr(self, f) * k for f in self.__dataclass_fields__})


# The broker-outage drill: no other event, the broker down for 30 s.
BROKER_DRILL = Timeline(
    warm=10,
    join=15,
    fail=math.inf,
    restore=math.inf,
    kill=math.inf,
    restart=math.inf,
    cut=math.inf,
    cut_end=math.inf,
    end=75,
    outage=30,
    outage_end=60,
)


@dataclass
class RackOptions:
    nodes: int = 8
    gpus: int = 4
    arms: tuple[str, ...] = ARMS
    quick: bool = False
    drill: str | None = None  # "broker": the coordinated arm with the broker down 30 s, nothing else
    progress: Callable[[str], None] = field(default=lambda s: None)


def spec_for(opts: RackOptions) -> RackSpec:
    n = opts.nodes
    return RackSpec(
        nodes=n,
        gpus=opts.gpus,
        site="bench",
        rack="r1",
        power_budget_w=1500.0 * n * opts.gpus / 4,
        degraded_capacity_w=750.0 * n * opts.gpus / 4,
        floor_w=300.0 * opts.gpus / 4,
    )


def offered(spec: RackSpec, i: int) -> float:
    return HEAVY_OFFERED if i < spec.nodes // 2 else LIGHT_OFFERED


# -- the worker process ------------------------------------------------------------------
def worker(config_json: str) -> int:
    """One node: the agent and its simulated GPUs and servers, as ``rackguard run --sim``."""
    from rackguard.agent import config as configmod
    from rackguard.agent import log as logmod
    from rackguard.agent.daemon import Agent
    from rackguard.agent.mqtt import aiomqtt_factory
    from rackguard.sim.node import from_config, run_beside

    cfg = configmod.validate(json.loads(Path(config_json).read_text()))
    logmod.configure(cfg.log.level, cfg.log.format)
    backend, servers = from_config(cfg)
    factory = aiomqtt_factory(cfg.mqtt, f"rackguard-sim-{cfg.node.name}")
    return asyncio.run(run_beside(Agent(cfg, backend).run(), servers, factory))


# -- a proxy that can cut a node off ------------------------------------------------------
class BlackHoleProxy:
    """TCP proxy to the broker; while ``cut``, nothing passes either way and nothing is closed."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.cut = False
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", self.port)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await r.read(65536):
                if not self.cut:
                    w.write(data)
                    await w.drain()
        with contextlib.suppress(Exception):
            w.close()

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            br, bw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            w.close()
            return
        self.writers += [w, bw]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(self._pipe(r, bw), self._pipe(br, w))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            w.close()
        await asyncio.sleep(0.1)  # let the pipes see their ends


# -- recording claims and caps -------------------------------------------------------------
class ClaimRecorder:
    """Every claim and cap of the rack, with its arrival wall time."""

    def __init__(self, host: str, port: int, base: str) -> None:
        import paho.mqtt.client as mqtt

        self.claims: list[tuple[float, str, dict[str, Any], int]] = []  # (wall, node, body, bytes)
        self.caps: list[tuple[float, str, int, str]] = []  # (wall, node, total, reason)
        self.online: set[str] = set()
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        ok = threading.Event()
        topics = [(f"{base}/+/claim", 1), (f"{base}/+/cap", 1), (f"{base}/+/status", 1)]
        self.client.on_connect = lambda c, *a: c.subscribe(topics)
        self.client.on_subscribe = lambda *a: ok.set()
        self.client.on_message = self._on
        self.client.connect(host, port)
        self.client.loop_start()
        ok.wait(10)

    def _on(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.retain or not msg.payload:
            return
        now = time.time()
        node = msg.topic.rsplit("/", 2)[-2]
        with contextlib.suppress(ValueError, KeyError):
            body = json.loads(msg.payload)
            with self.lock:
                if msg.topic.endswith("/status"):
                    if body.get("state") == "online":
                        self.online.add(node)
                elif msg.topic.endswith("/claim"):
                    self.claims.append((now, node, body, len(msg.payload)))
                else:
                    self.caps.append((now, node, int(body["total"]), str(body["reason"])))

    def close(self) -> None:
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()


# -- truth ----------------------------------------------------------------------------------
def read_truth(path: Path) -> np.ndarray:
    """(wall, power_w, completed, tokens) rows; a restarted node's counters continue from 0."""
    if not path.exists():
        return np.zeros((0, 4))
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:
            with contextlib.suppress(ValueError):
                rows.append([float(x) for x in parts])
    return np.asarray(rows) if rows else np.zeros((0, 4))


def last_power_w(path: Path, now: float, max_age_s: float = 2.0) -> float:
    """The node's latest true power (0 when it is not running)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 200))
            lines = f.read().decode(errors="replace").strip().splitlines()
        t, p, *_ = lines[-1].split()
        return float(p) if now - float(t) <= max_age_s else 0.0
    except (OSError, ValueError, IndexError):
        return 0.0


def _power_on_grid(rows: np.ndarray, grid: np.ndarray, max_age_s: float = 2.0) -> np.ndarray:
    if len(rows) == 0:
        return np.zeros_like(grid)
    idx = np.searchsorted(rows[:, 0], grid, side="right") - 1
    ok = (idx >= 0) & (grid - rows[np.maximum(idx, 0), 0] <= max_age_s)
    return np.where(ok, rows[np.maximum(idx, 0), 1], 0.0)


def _served_on_grid(rows: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Requests completed in each grid interval (counter resets on restart are increments from 0)."""
    if len(rows) < 2:
        return np.zeros(len(grid) - 1)
    inc = np.diff(rows[:, 2])
    inc = np.where(inc < 0, rows[1:, 2], inc)
    cum = np.concatenate([[0.0], np.cumsum(inc)])
    at = np.interp(grid, rows[:, 0], cum)
    return np.diff(at)


# -- one arm --------------------------------------------------------------------------------
@dataclass
class ArmRun:
    t0: float
    truth: dict[str, Path]
    cdu_log: list[tuple[float, float, float, float]]  # (wall, flow, supply, return)
    events: dict[str, float]  # name -> wall time
    recorder: ClaimRecorder
    nodes: list[str]


async def run_arm(
    arm: str,
    spec: RackSpec,
    tl: Timeline,
    workdir: Path,
    progress: Callable[[str], None],
    extra_events: list[dict[str, Any]] | None = None,
) -> ArmRun:
    """Run the scenario once with every node configured for ``arm`` (``extra_events``: more CDU events)."""
    from rackguard.agent import config as configmod
    from rackguard.agent.commands import sim_cdu
    from rackguard.sim.cdu import Scenario

    broker = Mosquitto(free_port(), workdir / "mosquitto", nodelay=True)
    broker.start()
    proxy = BlackHoleProxy(broker.port)
    await proxy.start()
    names = spec.names()
    cut_node, kill_node, late_node = 0, 1 % spec.nodes, spec.nodes - 1
    cfg_paths: dict[str, Path] = {}
    truth: dict[str, Path] = {}
    for i, name in enumerate(names):
        extra: dict[str, Any] = {"control": {"period_s": 1.0}}
        if arm == "static":
            extra["rack"] = {"split": "static"}
        cfg = rack_config(
            spec,
            i,
            offered_concurrency=offered(spec, i),
            port=proxy.port if i == cut_node else broker.port,
            coordinated=arm != "independent",
            extra=extra,
        )
        configmod.validate(cfg)
        cfg_paths[name] = workdir / f"{name}.json"
        cfg_paths[name].write_text(json.dumps(cfg))
        truth[name] = workdir / f"truth-{name}.txt"
    env_base = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}

    def start(name: str) -> subprocess.Popen[bytes]:
        env = dict(
            env_base, STATE_DIRECTORY=str(workdir / f"state-{name}"), RACKGUARD_SIM_TRUTH=str(truth[name])
        )
        log = (workdir / f"{name}.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "rackguard.bench.rack", "worker", str(cfg_paths[name])],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    recorder = ClaimRecorder("127.0.0.1", broker.port, f"rackguard/{spec.site}/{spec.rack}")
    cdu_cfg = configmod.validate(rack_config(spec, 0, offered_concurrency=0, port=broker.port))
    cdu_log: list[tuple[float, float, float, float]] = []
    events: dict[str, float] = {}
    scenario = Scenario.model_validate(
        {
            "events": [
                *(
                    [
                        {"at_s": tl.fail, "kind": "pump_failure", "flow_fraction": 0.4},
                        {"at_s": tl.restore, "kind": "pump_restore"},
                    ]
                    if tl.fail < tl.end
                    else []
                ),
                *(extra_events or []),
            ]
        }
    )

    def heat() -> float:
        now = time.time()
        return sum(last_power_w(p, now) for p in truth.values())

    def on_step(cdu: Any) -> None:
        lp = cdu.loop
        cdu_log.append((time.time(), lp.flow_lpm, lp.supply_temp_c, lp.return_temp_c))
        for ev in cdu.fired:
            events.setdefault(ev.kind, time.time())

    procs: dict[str, subprocess.Popen[bytes]] = {}
    stop = asyncio.Event()
    try:
        for name in names:
            if name != names[late_node]:
                procs[name] = start(name)
        # The timeline starts once every first node runs (their births), not when they were spawned.
        deadline = time.time() + 120
        while time.time() < deadline and len(recorder.online - {names[late_node]}) < spec.nodes - 1:
            await asyncio.sleep(0.2)
        t0 = time.time()
        cdu = asyncio.create_task(
            sim_cdu.run(
                cdu_cfg,
                scenario,
                0.5,
                None,
                None,
                stop=stop,
                heat_source=heat,
                on_step=on_step,
                tau_flow_s=0.3,
            )
        )
        plan = sorted(
            [
                (tl.join, "join", lambda: procs.__setitem__(names[late_node], start(names[late_node]))),
                (tl.kill, "kill", lambda: procs[names[kill_node]].send_signal(signal.SIGKILL)),
                (tl.restart, "restart", lambda: procs.__setitem__(names[kill_node], start(names[kill_node]))),
                (tl.cut, "cut", lambda: setattr(proxy, "cut", True)),
                (tl.cut_end, "cut_end", lambda: setattr(proxy, "cut", False)),
                (tl.outage, "outage", broker.stop),
                (tl.outage_end, "outage_end", broker.start),
            ],
            key=lambda p: p[0],
        )
        plan = [p for p in plan if p[0] < tl.end]
        for at, name, action in plan:
            await asyncio.sleep(max(0.0, t0 + at - time.time()))
            action()
            events[name] = time.time()
            progress(f"rack {arm}: {name} at {time.time() - t0:.0f} s")
        await asyncio.sleep(max(0.0, t0 + tl.end - time.time()))
        events["end"] = time.time()
        stop.set()
        await cdu
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        recorder.close()
        await proxy.close()
        broker.stop()
    return ArmRun(t0, truth, cdu_log, events, recorder, names)


# -- metrics -----------------------------------------------------------------------------
def capacity_from(spec: RackSpec, flow_lpm: np.ndarray, supply_c: np.ndarray) -> np.ndarray:
    return np.asarray(heat_w(1.0, 1.0)) * flow_lpm * np.maximum(spec.return_limit_c - supply_c, 0.0)


def arm_metrics(spec: RackSpec, tl: Timeline, run: ArmRun) -> dict[str, Any]:
    grid = np.arange(run.t0 + tl.warm, run.events["end"], GRID_S)
    truth = {n: read_truth(p) for n, p in run.truth.items()}
    power = np.sum([_power_on_grid(truth[n], grid) for n in run.nodes], axis=0)
    over_p = np.maximum(np.asarray(power) - spec.power_budget_w, 0.0)
    cdu = np.asarray(run.cdu_log)
    idx = np.clip(np.searchsorted(cdu[:, 0], grid, side="right") - 1, 0, len(cdu) - 1)
    flow, _supply, ret = cdu[idx, 1], cdu[idx, 2], cdu[idx, 3]
    per_k = heat_w(1.0, 1.0) * flow  # W per K of rise
    over_c = np.maximum((ret - spec.return_limit_c) * per_k, 0.0)
    served = np.sum([_served_on_grid(truth[n], grid) for n in run.nodes], axis=0)
    over_any = ((over_p > 0) | (over_c > 0))[:-1]
    uneven = (grid[:-1] >= run.t0 + tl.warm) & (grid[:-1] < run.t0 + tl.join)
    duration = grid[-1] - grid[0]
    return {
        "overcommit_coolant_s": round(float(np.sum(over_c > 0) * GRID_S), 1),
        "overcommit_coolant_j": round(float(np.sum(over_c) * GRID_S), 1),
        "overcommit_power_s": round(float(np.sum(over_p > 0) * GRID_S), 1),
        "overcommit_power_j": round(float(np.sum(over_p) * GRID_S), 1),
        "peak_overshoot_w": round(float(max(over_p.max(initial=0.0), over_c.max(initial=0.0))), 1),
        "served": round(float(np.sum(served)), 1),
        "goodput": round(float(np.sum(np.where(over_any, 0.0, served)) / duration), 2),
        "served_uneven": round(float(np.sum(served[uneven])), 1),
        "max_rack_power_w": round(float(np.max(power)), 1),
    }


def oracle_metrics(spec: RackSpec, tl: Timeline, run: ArmRun) -> dict[str, Any]:
    """Central and instant: the true capacity, every node's true demand, no controller margin."""
    from rackguard.controllers.rack import ClassDemand, Member, PeerInput, RackInputs, allocate
    from rackguard.sim.node import DEFAULT_CURVE

    timing_base, timing_per = 0.8, 0.0535
    grid = np.arange(run.t0 + tl.warm, run.events["end"], GRID_S)
    cdu = np.asarray(run.cdu_log)
    idx = np.clip(np.searchsorted(cdu[:, 0], grid, side="right") - 1, 0, len(cdu) - 1)
    cap = np.minimum(
        spec.power_budget_w, heat_w(1.0, 1.0) * cdu[idx, 1] * (spec.return_limit_c - cdu[idx, 2])
    )
    curve = DEFAULT_CURVE
    names = run.nodes
    late, killed = names[-1], names[1 % len(names)]

    def power_per_gpu(c: float) -> float:
        return curve.idle_w + curve.span_w * (1 - math.exp(-c / curve.sat_concurrency))

    def conc_at(p: float) -> float:
        frac = min(max((p - curve.idle_w) / curve.span_w, 0.0), 1 - 1e-9)
        return -curve.sat_concurrency * math.log(1 - frac)

    served = np.zeros(len(grid) - 1)
    uneven = np.zeros(len(grid) - 1, dtype=bool)
    for k, t in enumerate(grid[:-1]):
        rel = t - run.t0
        alive = [
            (i, n)
            for i, n in enumerate(names)
            if not (n == late and rel < tl.join) and not (n == killed and tl.kill <= rel < tl.restart)
        ]
        members = tuple(Member(n) for _, n in alive)
        peers = {
            n: PeerInput("fresh", 0, (ClassDemand("d", 0, int(spec.gpus * power_per_gpu(offered(spec, i)))),))
            for i, n in alive
        }
        alloc = allocate(RackInputs(int(cap[k]), 0, members, peers))
        for i, n in alive:
            c = min(conc_at(alloc.shares[n] / spec.gpus), offered(spec, i))
            served[k] += spec.gpus * c / (timing_base + timing_per * c) * GRID_S
        uneven[k] = tl.warm <= rel < tl.join
    duration = grid[-1] - grid[0]
    return {
        "overcommit_coolant_s": 0.0,
        "overcommit_coolant_j": 0.0,
        "overcommit_power_s": 0.0,
        "overcommit_power_j": 0.0,
        "peak_overshoot_w": 0.0,
        "served": round(float(np.sum(served)), 1),
        "goodput": round(float(np.sum(served) / duration), 2),
        "served_uneven": round(float(np.sum(served[uneven])), 1),
    }


def coordination_metrics(spec: RackSpec, tl: Timeline, run: ArmRun, period_s: float = 1.0) -> dict[str, Any]:
    """Reaction to the flow drop, the killed node's stranded share, cap changes, claim traffic."""
    from rackguard.controllers.rack import Member, fallback_shares

    claims = sorted(run.recorder.claims, key=lambda c: c[0])
    ev = run.events
    t_fail = ev.get("pump_failure", run.t0 + tl.fail)
    cdu = np.asarray(run.cdu_log)
    after = cdu[(cdu[:, 0] >= t_fail + 3.0) & (cdu[:, 0] < run.t0 + tl.restore)]
    new_cap = (
        min(
            spec.power_budget_w,
            float(np.min(heat_w(1.0, 1.0) * after[:, 1] * (spec.return_limit_c - after[:, 2]))),
        )
        if len(after)
        else 0.0
    )
    # The drop as the CDU reports it: its first reading within 2 % of the new capacity (the pump
    # spins down over ~1 s first); the reaction runs from there to each node's claim at the new share.
    seen = cdu[
        (cdu[:, 0] >= t_fail)
        & (heat_w(1.0, 1.0) * cdu[:, 1] * (spec.return_limit_c - cdu[:, 2]) <= new_cap * 1.02)
    ]
    t_seen = float(seen[0, 0]) if len(seen) else t_fail
    reactions, from_event = [], []
    for n in run.nodes:
        hit = next(
            (
                t
                for t, node, b, _ in claims
                if node == n and t >= t_fail and b.get("capacity_w", 1e12) <= new_cap * 1.02
            ),
            None,
        )
        if hit is not None and hit < run.t0 + tl.restore:
            reactions.append(max(0.0, hit - t_seen))
            from_event.append(hit - t_fail)
    # The killed node: what its peers leave unused while it is dead, and how fast they take the rest.
    t_kill, t_restart = ev.get("kill", math.inf), ev.get("restart", math.inf)
    killed = run.nodes[1 % len(run.nodes)]
    fb = fallback_shares(tuple(Member(n) for n in run.nodes), spec.degraded_capacity_w)[killed]
    latest: dict[str, dict[str, Any]] = {}
    goal = None  # the peers' shares before the kill plus what the killed node held beyond its fallback
    stranded = []
    reclaim_s = None
    for t, node, b, _ in claims:
        if t >= t_kill and goal is None:
            others = sum(c["share_w"] for m, c in latest.items() if m != killed)
            goal = others + 0.9 * max(0, latest.get(killed, {}).get("share_w", 0) - fb)
        latest[node] = b
        if t < t_kill:
            continue
        if t >= t_restart:
            break
        live = sum(c["share_w"] for m, c in latest.items() if m != killed)
        capacity = max(c.get("capacity_w", 0) for c in latest.values())
        if t >= t_kill + 3.0:
            stranded.append(capacity - live)
        if reclaim_s is None and goal is not None and live >= goal:
            reclaim_s = t - t_kill
    span_min = (ev["end"] - run.t0 - tl.warm) / 60.0
    caps_by_node: dict[str, list[int]] = {}
    for t, node, total, _ in sorted(run.recorder.caps):
        if t >= run.t0 + tl.warm:
            caps_by_node.setdefault(node, []).append(total)
    changes = [sum(a != b for a, b in itertools.pairwise(v)) for v in caps_by_node.values()]
    window = [c for c in claims if c[0] >= run.t0 + tl.warm]
    # Claims per node per control period, by their sample times (arrival times jitter).
    by_node: dict[tuple[str, int], list[float]] = {}
    for _, node, b, _ in window:
        by_node.setdefault((node, int(b["inc"])), []).append(float(b["t_s"]))
    intervals = [y - x for ts in by_node.values() for x, y in itertools.pairwise(sorted(set(ts)))]
    rates = [len(ts) / max(1.0, (max(ts) - min(ts)) / period_s + 1) for ts in by_node.values() if ts]
    return {
        "reaction_p99_s": round(float(np.percentile(reactions, 99)), 2) if reactions else None,
        "reaction_nodes": len(reactions),
        "reaction_from_pump_event_p99_s": round(float(np.percentile(from_event, 99)), 2)
        if from_event
        else None,
        "stranded_w_after_kill": round(float(np.mean(stranded)), 1) if stranded else None,
        "reclaim_s": round(reclaim_s, 2) if reclaim_s is not None else None,
        "cap_changes_per_min": round(float(np.mean(changes)) / span_min, 2) if changes else 0.0,
        "claim_bytes_per_node_s": round(sum(c[3] for c in window) / spec.nodes / (span_min * 60), 1),
        "claim_bytes_max": max((c[3] for c in window), default=0),
        "claims_per_node_period": round(max(rates, default=0.0), 3),
        "claim_interval_min_s": round(min(intervals, default=0.0), 3),
    }


async def _bench(opts: RackOptions) -> dict[str, Any]:
    from rackguard.agent import log as logmod

    logmod.configure("error", "json")  # stdout is the figures
    spec = spec_for(opts)
    tl = Timeline().scaled(0.4) if opts.quick else Timeline()
    if opts.drill == "broker":
        tl = BROKER_DRILL.scaled(0.5) if opts.quick else BROKER_DRILL
        opts.arms = ("coordinated",)
    arms: dict[str, Any] = {}
    coord: dict[str, Any] = {}
    last_run: ArmRun | None = None
    for arm in opts.arms:
        with tempfile.TemporaryDirectory(prefix=f"rackguard-rack-{arm}-") as d:
            run = await run_arm(arm, spec, tl, Path(d), opts.progress)
            arms[arm] = arm_metrics(spec, tl, run)
            if arm == "coordinated":
                coord = coordination_metrics(spec, tl, run)
            last_run = run
    if last_run is not None and opts.drill is None:
        arms["oracle"] = oracle_metrics(spec, tl, last_run)
    out: dict[str, Any] = {
        "nodes": opts.nodes,
        "gpus_per_node": opts.gpus,
        "power_budget_w": spec.power_budget_w,
        "timeline_s": {k: v for k in tl.__dataclass_fields__ if math.isfinite(v := getattr(tl, k))},
        "arms": arms,
        "reaction_p99_s": coord.get("reaction_p99_s"),
        "stranded_w_after_kill": coord.get("stranded_w_after_kill"),
        "reclaim_s": coord.get("reclaim_s"),
        "cap_changes_per_min": coord.get("cap_changes_per_min"),
        "claim_bytes_per_node_s": coord.get("claim_bytes_per_node_s"),
        "coordinated_detail": coord,
    }
    if "coordinated" in arms and "static" in arms and arms["static"]["served_uneven"]:
        out["coordinated_vs_static_uneven"] = round(
            arms["coordinated"]["served_uneven"] / arms["static"]["served_uneven"], 3
        )
    if "coordinated" in arms and "oracle" in arms and arms["oracle"]["served"]:
        out["coordinated_vs_oracle"] = round(arms["coordinated"]["served"] / arms["oracle"]["served"], 3)
    return out


def run_rack_bench(opts: RackOptions) -> dict[str, Any]:
    return asyncio.run(_bench(opts))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        sys.exit(worker(sys.argv[2]))
    print("usage: python -m rackguard.bench.rack worker CONFIG.json", file=sys.stderr)
    sys.exit(64)

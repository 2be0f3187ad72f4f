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

Drills (``--drill``, the coordinated arm only, with no other event unless said): ``broker``, the
broker down for 30 s; ``clock``, two nodes' wall clocks an hour off (+3600 s and −3600 s, their
worker processes' ``time.time``; monotonic time is right) through a pump failure; ``late-will``, a
node SIGKILLed while its path to the broker is black-holed and restarted at once, so that the will
of its old connection comes after its new incarnation's claims (its old connection is on a second
broker bridged to the rack's, which only its keepalive ends; with one broker and the same client
id, the broker ends the old connection and sends its will before the new one is even accepted).

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

    @classmethod
    def only(cls, **events: float) -> Timeline:
        """A timeline of just these events: every other one never happens."""
        return cls(**{f: events.get(f, math.inf) for f in cls.__dataclass_fields__})

    def scaled(self, k: float) -> Timeline:
        return Timeline(**{f: getattr(self, f) * k for f in self.__dataclass_fields__})


# The broker-outage drill: no other event, the broker down for 30 s.
BROKER_DRILL = Timeline.only(warm=10, join=15, end=75, outage=30, outage_end=60)

# The clock drill: two nodes' clocks an hour off, through a pump failure (the shares must move).
CLOCK_DRILL = Timeline.only(warm=10, join=15, fail=30, restore=45, end=60)

# The late-will drill: node 1's path black-holed, then it is SIGKILLed and restarted at once.
LATE_WILL_DRILL = Timeline.only(warm=10, join=15, cut=25, kill=25.5, restart=26, end=60)
CLOCK_SKEW_S = 3600.0
DRILLS = ("broker", "clock", "late-will")


@dataclass(frozen=True)
class DrillSetup:
    """How a drill sets the rack up (node indices).

    Attributes:
        clock_offsets_s: Node → how far its wall clock is off (its worker's ``time.time``).
        proxied: The node that reaches the broker through the black-hole proxy.
        edge_broker: The proxy leads to a second broker, bridged to the rack's (the proxied node's
            old connection outlives it there until its keepalive ends); a restart connects to the
            rack's broker directly.
        scrape_s: Scrape every node's ``/metrics`` this often (and once at the end); None: never.
    """

    clock_offsets_s: dict[int, float] = field(default_factory=dict)
    proxied: int = 0
    edge_broker: bool = False
    scrape_s: float | None = None


def drill_setup(drill: str | None, nodes: int) -> DrillSetup:
    if drill == "clock":
        # The last busy node ahead, the first nearly idle one behind.
        return DrillSetup({nodes // 2 - 1: CLOCK_SKEW_S, nodes // 2: -CLOCK_SKEW_S}, scrape_s=2.0)
    if drill == "late-will":
        return DrillSetup(proxied=1 % nodes, edge_broker=True, scrape_s=2.0)
    return DrillSetup()


@dataclass
class RackOptions:
    nodes: int = 8
    gpus: int = 4
    arms: tuple[str, ...] = ARMS
    quick: bool = False
    drill: str | None = None  # one of DRILLS: the coordinated arm only, the drill's timeline
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
def skew_wall_clock(offset_s: float) -> Callable[[], float]:
    """Set this process's wall clock ``offset_s`` off, as a node whose clock is wrong has it.

    ``time.time`` and ``time.time_ns`` are offset; ``time.monotonic`` is not (a wrong clock does
    not change how fast time passes). Call it before the agent's modules are imported: some take
    ``time.time`` as a default argument. Returns the true wall clock.
    """
    real, real_ns = time.time, time.time_ns
    if offset_s:
        offset_ns = round(offset_s * 1e9)
        time.time = lambda: real() + offset_s
        time.time_ns = lambda: real_ns() + offset_ns
    return real


def worker(config_json: str, clock_offset_s: float = 0.0) -> int:
    """One node: the agent and its simulated GPUs and servers, as ``rackguard run --sim``.

    ``clock_offset_s``: the node's wall clock is this far off (set before the agent is imported);
    the simulation's truth keeps the true time.
    """
    true_clock = skew_wall_clock(clock_offset_s)
    from rackguard.agent import config as configmod
    from rackguard.agent import log as logmod
    from rackguard.agent.daemon import Agent
    from rackguard.agent.mqtt import aiomqtt_factory
    from rackguard.sim.node import from_config, run_beside

    cfg = configmod.validate(json.loads(Path(config_json).read_text()))
    logmod.configure(cfg.log.level, cfg.log.format)
    backend, servers = from_config(cfg)
    servers.truth_clock = true_clock
    factory = aiomqtt_factory(cfg.mqtt, f"rackguard-sim-{cfg.node.name}")
    return asyncio.run(run_beside(Agent(cfg, backend).run(), servers, factory))


# -- a proxy that can cut a node off ------------------------------------------------------
class BlackHoleProxy:
    """TCP proxy to the broker; while ``cut``, nothing passes either way and nothing is closed.

    Not even a close: a side that ends while cut (its process killed) leaves the other side open
    (half-open, as a lost path leaves it) until the cut ends or the other side closes.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.cut = False
        self.closing = False
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
        while self.cut and not self.closing and not w.is_closing():
            await asyncio.sleep(0.1)
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
        self.closing = True
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            w.close()
        await asyncio.sleep(0.1)  # let the pipes see their ends


def bridge_conf(rack_port: int) -> str:
    """A second broker's bridge to the rack's: everything both ways."""
    return "\n".join(
        [
            "connection rack",
            f"address 127.0.0.1:{rack_port}",
            "topic # both 1",
            "cleansession true",
            "try_private true",
            "bridge_protocol_version mqttv50",  # message expiry (retained claims) passes the bridge
            "notifications false",
            "restart_timeout 1",
        ]
    )


def wait_bridged(edge_port: int, rack_port: int, timeout_s: float = 15.0) -> None:
    """Until a message published on the edge broker reaches the rack's (RuntimeError if it never does)."""
    import paho.mqtt.client as mqtt

    got = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    subscribed = threading.Event()
    sub.on_connect = lambda c, *a: c.subscribe("rackguard-bench/bridge", 1)
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_message = lambda *a: got.set()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.connect("127.0.0.1", rack_port)
    sub.loop_start()
    pub.connect("127.0.0.1", edge_port)
    pub.loop_start()
    try:
        subscribed.wait(timeout_s)
        deadline = time.monotonic() + timeout_s
        while not got.is_set() and time.monotonic() < deadline:
            pub.publish("rackguard-bench/bridge", b"1", qos=1)
            got.wait(0.5)
        if not got.is_set():
            raise RuntimeError("the edge broker's bridge to the rack's broker did not come up")
    finally:
        for c in (sub, pub):
            c.loop_stop()
            with contextlib.suppress(Exception):
                c.disconnect()


# -- recording claims and caps -------------------------------------------------------------
class ClaimRecorder:
    """Every claim and cap of the rack, with its arrival wall time."""

    def __init__(self, host: str, port: int, base: str) -> None:
        import paho.mqtt.client as mqtt

        self.claims: list[tuple[float, str, dict[str, Any], int]] = []  # (wall, node, body, bytes)
        self.caps: list[tuple[float, str, int, str]] = []  # (wall, node, total, reason)
        self.online: set[str] = set()
        self.statuses: list[tuple[float, str, str, int | None]] = []  # (wall, node, state, incarnation)
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
                    inc = body.get("incarnation")
                    self.statuses.append(
                        (now, node, str(body.get("state")), inc if isinstance(inc, int) else None)
                    )
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


# -- what the agents say of their peers ----------------------------------------------------
Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample name, labels) -> value


def scrape_rack_metrics(port: int, timeout_s: float = 2.0) -> Scrape | None:
    """A node's ``rackguard_rack_*`` samples from its ``/metrics`` (None when it does not answer)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return None
    out: Scrape = {}
    for fam in text_string_to_metric_families(text):
        for sm in fam.samples:
            if sm.name.startswith("rackguard_rack_") and not sm.name.endswith("_created"):
                out[(sm.name, tuple(sorted(sm.labels.items())))] = float(sm.value)
    return out


def peer_status(scrape: Scrape, peer: str) -> str | None:
    """``peer``'s status in one node's scrape (None when it has none)."""
    for (name, labels), v in scrape.items():
        d = dict(labels)
        if name == "rackguard_rack_peer_status" and d.get("peer") == peer and v == 1:
            return d.get("status")
    return None


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
    setup: DrillSetup = field(default_factory=DrillSetup)
    scrapes: list[tuple[float, str, Scrape]] = field(default_factory=list)  # (wall, node, samples)


async def run_arm(
    arm: str,
    spec: RackSpec,
    tl: Timeline,
    workdir: Path,
    progress: Callable[[str], None],
    extra_events: list[dict[str, Any]] | None = None,
    setup: DrillSetup | None = None,
) -> ArmRun:
    """Run the scenario once with every node configured for ``arm`` (``extra_events``: more CDU events;
    ``setup``: a drill's changes to the rack)."""
    from rackguard.agent import config as configmod
    from rackguard.agent.commands import sim_cdu
    from rackguard.sim.cdu import Scenario

    setup = setup or DrillSetup()
    broker = Mosquitto(free_port(), workdir / "mosquitto", nodelay=True)
    broker.start()
    edge: Mosquitto | None = None
    if setup.edge_broker:
        edge = Mosquitto(free_port(), workdir / "edge", nodelay=True, extra_conf=bridge_conf(broker.port))
        edge.start()
        await asyncio.to_thread(wait_bridged, edge.port, broker.port)
    proxy = BlackHoleProxy(edge.port if edge is not None else broker.port)
    await proxy.start()
    names = spec.names()
    cut_node, kill_node, late_node = setup.proxied, 1 % spec.nodes, spec.nodes - 1
    cfg_paths: dict[str, Path] = {}
    restart_paths: dict[str, Path] = {}  # a restarted node connects to the rack's broker directly
    http_ports: dict[str, int] = {}
    truth: dict[str, Path] = {}
    for i, name in enumerate(names):
        extra: dict[str, Any] = {"control": {"period_s": 1.0}}
        if arm == "static":
            extra["rack"] = {"split": "static"}
        if setup.scrape_s is not None:
            http_ports[name] = free_port()
            extra["http"] = {"port": http_ports[name]}
        for paths, port in (
            (cfg_paths, proxy.port if i == cut_node else broker.port),
            (restart_paths, broker.port),
        ):
            cfg = rack_config(
                spec,
                i,
                offered_concurrency=offered(spec, i),
                port=port,
                coordinated=arm != "independent",
                extra=extra,
            )
            configmod.validate(cfg)
            paths[name] = workdir / f"{name}{'' if paths is cfg_paths else '-restart'}.json"
            paths[name].write_text(json.dumps(cfg))
        truth[name] = workdir / f"truth-{name}.txt"
    env_base = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}

    def start(name: str, restart: bool = False) -> subprocess.Popen[bytes]:
        env = dict(
            env_base, STATE_DIRECTORY=str(workdir / f"state-{name}"), RACKGUARD_SIM_TRUTH=str(truth[name])
        )
        log = (workdir / f"{name}.log").open("ab")
        cmd = [sys.executable, "-m", "rackguard.bench.rack", "worker"]
        cmd.append(str((restart_paths if restart else cfg_paths)[name]))
        offset = setup.clock_offsets_s.get(names.index(name), 0.0)
        if offset:
            cmd += ["--clock-offset-s", str(offset)]
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    scrapes: list[tuple[float, str, Scrape]] = []

    async def scrape_all() -> None:
        got = await asyncio.gather(*(asyncio.to_thread(scrape_rack_metrics, p) for p in http_ports.values()))
        now = time.time()
        scrapes.extend((now, n, sc) for n, sc in zip(http_ports, got, strict=True) if sc is not None)

    async def scraper() -> None:
        assert setup.scrape_s is not None
        while True:
            await asyncio.sleep(setup.scrape_s)
            await scrape_all()

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
    scraping: asyncio.Task[None] | None = None
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
                (
                    tl.restart,
                    "restart",
                    lambda: procs.__setitem__(names[kill_node], start(names[kill_node], restart=True)),
                ),
                (tl.cut, "cut", lambda: setattr(proxy, "cut", True)),
                (tl.cut_end, "cut_end", lambda: setattr(proxy, "cut", False)),
                (tl.outage, "outage", broker.stop),
                (tl.outage_end, "outage_end", broker.start),
            ],
            key=lambda p: p[0],
        )
        plan = [p for p in plan if p[0] < tl.end]
        if setup.scrape_s is not None:
            scraping = asyncio.create_task(scraper())
        for at, name, action in plan:
            await asyncio.sleep(max(0.0, t0 + at - time.time()))
            action()
            events[name] = time.time()
            progress(f"rack {arm}: {name} at {time.time() - t0:.0f} s")
        await asyncio.sleep(max(0.0, t0 + tl.end - time.time()))
        events["end"] = time.time()
        if scraping is not None:
            scraping.cancel()
            await scrape_all()  # what every node says at the end
        stop.set()
        await cdu
    finally:
        if scraping is not None:
            scraping.cancel()
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
        if edge is not None:
            edge.stop()
    return ArmRun(t0, truth, cdu_log, events, recorder, names, setup, scrapes)


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


def _seen_by_peers(run: ArmRun, node: str, since: float, until: float = math.inf) -> dict[str, Any]:
    """How the other nodes' ``/metrics`` saw ``node`` between ``since`` and ``until``."""
    statuses: dict[str, int] = {}
    ages: list[float] = []
    for t, who, sc in run.scrapes:
        if who == node or not since <= t < until:
            continue
        st = peer_status(sc, node)
        if st is not None:
            statuses[st] = statuses.get(st, 0) + 1
        age = sc.get(("rackguard_rack_peer_claim_age_seconds", (("peer", node),)))
        if age is not None:
            ages.append(age)
    total = sum(statuses.values())
    return {
        "samples": total,
        "statuses": dict(sorted(statuses.items())),
        "fresh_fraction": round(statuses.get("fresh", 0) / total, 4) if total else None,
        "claim_age_max_s": round(max(ages), 2) if ages else None,
        "claim_age_p50_s": round(float(np.percentile(ages, 50)), 2) if ages else None,
    }


def clock_drill_metrics(spec: RackSpec, tl: Timeline, run: ArmRun) -> dict[str, Any]:
    """The skewed nodes: their claims' ``t_s`` against arrival, how their peers saw them, their shares.

    From 5 s after the late node joined (every member up), to the end.
    """
    since = run.t0 + tl.join + 5.0
    window = [c for c in run.recorder.claims if c[0] >= since]

    def mean_share(nodes: list[str]) -> float | None:
        v = [b["share_w"] for _, n, b, _ in window if n in nodes]
        return round(float(np.mean(v)), 1) if v else None

    out: dict[str, Any] = {}
    skewed = {run.nodes[i]: off for i, off in run.setup.clock_offsets_s.items()}
    for node, off in skewed.items():
        i = run.nodes.index(node)
        same_load = [
            n for j, n in enumerate(run.nodes) if n not in skewed and offered(spec, j) == offered(spec, i)
        ]
        lag = [b["t_s"] - t for t, n, b, _ in window if n == node]
        out[node] = {
            "clock_offset_s": off,
            "claims": len(lag),
            "claim_t_s_minus_arrival_p50_s": round(float(np.median(lag)), 2) if lag else None,
            "seen_by_peers": _seen_by_peers(run, node, since),
            "mean_share_w": mean_share([node]),
            "mean_share_w_same_load_unskewed": mean_share(same_load),
            "its_view_of_peers": _its_view(run, node, since),
        }
    others = [n for n in run.nodes if n not in skewed]
    out["unskewed_seen_by_peers"] = {
        "fresh_fraction": _merge_fresh([_seen_by_peers(run, n, since) for n in others])
    }
    out["mean_share_w_by_node"] = {n: mean_share([n]) for n in run.nodes}
    return out


def _its_view(run: ArmRun, node: str, since: float) -> dict[str, Any]:
    """How ``node``'s own ``/metrics`` saw its peers."""
    statuses: dict[str, int] = {}
    for t, who, sc in run.scrapes:
        if who != node or t < since:
            continue
        for peer in run.nodes:
            if peer != node and (st := peer_status(sc, peer)) is not None:
                statuses[st] = statuses.get(st, 0) + 1
    return dict(sorted(statuses.items()))


def _merge_fresh(seen: list[dict[str, Any]]) -> float | None:
    total = sum(s["samples"] for s in seen)
    fresh = sum(s["statuses"].get("fresh", 0) for s in seen)
    return round(fresh / total, 4) if total else None


def late_will_metrics(spec: RackSpec, tl: Timeline, run: ArmRun) -> dict[str, Any]:
    """From the rack broker's recording: the restarted node's old will against its new claims; the peers' counts."""
    node = run.nodes[run.setup.proxied]
    t_kill, t_restart = run.events.get("kill", math.inf), run.events.get("restart", math.inf)
    claims = [(t, b) for t, n, b, _ in run.recorder.claims if n == node]
    old_incs = {int(b["inc"]) for t, b in claims if t < t_kill}
    new_incs = {int(b["inc"]) for t, b in claims if t >= t_restart} - old_incs
    inc_old = max(old_incs) if old_incs else None
    inc_new = min(new_incs) if new_incs else None
    first_new_claim = min((t for t, b in claims if b["inc"] == inc_new), default=None)
    births = [(t, inc) for t, n, st, inc in run.recorder.statuses if n == node and st == "online"]
    new_birth = min((t for t, inc in births if inc == inc_new), default=None)
    wills = [  # (the goodbye at the end is not a will)
        (t, inc)
        for t, n, st, inc in run.recorder.statuses
        if n == node and st == "offline" and t < run.events["end"]
    ]
    old_will = min((t for t, inc in wills if inc == inc_old), default=None)
    peers = [n for n in run.nodes if n != node]
    final: dict[str, float] = {}
    for _t, who, sc in run.scrapes:  # the latest scrape of each peer
        if who in peers:
            final[who] = sc.get(("rackguard_rack_wills_ignored_total", ()), 0.0)

    def rel(t: float | None) -> float | None:
        return round(t - run.t0, 2) if t is not None else None

    return {
        "node": node,
        "incarnation_old": inc_old,
        "incarnation_new": inc_new,
        "kill_at_s": rel(t_kill if math.isfinite(t_kill) else None),
        "restart_at_s": rel(t_restart if math.isfinite(t_restart) else None),
        "new_birth_at_s": rel(new_birth),
        "first_new_claim_at_s": rel(first_new_claim),
        "old_will_at_s": rel(old_will),
        "wills_recorded": [(rel(t), inc) for t, inc in wills],
        "old_will_after_new_claim_s": round(old_will - first_new_claim, 2)
        if old_will is not None and first_new_claim is not None
        else None,
        "old_claims_after_restart": sum(1 for t, b in claims if t >= t_restart and b["inc"] == inc_old),
        "wills_ignored_by_peer": dict(sorted(final.items())),
        "peers_that_ignored_it": sum(1 for v in final.values() if v >= 1),
        "seen_by_peers_after_old_will": _seen_by_peers(run, node, old_will + 0.5)
        if old_will is not None
        else None,
    }


async def _bench(opts: RackOptions) -> dict[str, Any]:
    from rackguard.agent import log as logmod

    logmod.configure("error", "json")  # stdout is the figures
    spec = spec_for(opts)
    tl = Timeline().scaled(0.4) if opts.quick else Timeline()
    if opts.drill == "broker":
        tl = BROKER_DRILL.scaled(0.5) if opts.quick else BROKER_DRILL
    elif opts.drill == "clock":
        tl = CLOCK_DRILL.scaled(0.5) if opts.quick else CLOCK_DRILL
    elif opts.drill == "late-will":
        tl = LATE_WILL_DRILL  # not scaled: the old will comes when the edge broker's keepalive ends
    elif opts.drill is not None:
        raise ValueError(f"unknown drill {opts.drill!r} (one of {', '.join(DRILLS)})")
    if opts.drill is not None:
        opts.arms = ("coordinated",)
    setup = drill_setup(opts.drill, opts.nodes)
    drill: dict[str, Any] = {}
    arms: dict[str, Any] = {}
    coord: dict[str, Any] = {}
    last_run: ArmRun | None = None
    for arm in opts.arms:
        with tempfile.TemporaryDirectory(prefix=f"rackguard-rack-{arm}-") as d:
            run = await run_arm(arm, spec, tl, Path(d), opts.progress, setup=setup)
            arms[arm] = arm_metrics(spec, tl, run)
            if arm == "coordinated":
                coord = coordination_metrics(spec, tl, run)
            if opts.drill == "clock":
                drill = clock_drill_metrics(spec, tl, run)
            elif opts.drill == "late-will":
                drill = late_will_metrics(spec, tl, run)
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
    if opts.drill is not None:
        out["drill"] = {"name": opts.drill, **drill}
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
    argv = sys.argv[1:]
    if len(argv) == 2 and argv[0] == "worker":
        sys.exit(worker(argv[1]))
    if len(argv) == 4 and argv[0] == "worker" and argv[2] == "--clock-offset-s":
        sys.exit(worker(argv[1], float(argv[3])))
    print("usage: python -m rackguard.bench.rack worker CONFIG.json [--clock-offset-s S]", file=sys.stderr)
    sys.exit(64)

"""A simulated node on the far side of a real node's interfaces.

* :class:`SimBackend` is read by the agent like NVML: a :class:`~rackguard.sensors.base.GpuBackend`
  over the benchmark's :class:`~rackguard.sim.plant.Plant` (same thermal model, power curve,
  request drain and coolant coupling), advanced in real time.
* :class:`SimServers` are the node's inference servers. Like a server with the gate
  (``rackguard.agent.gate``) they obey the retained ``.../cap`` over MQTT (``caps[gpu]``
  until ``valid_until_s``; ``safe_cap`` before the first cap, after expiry, and while the
  agent's status is ``offline``) and report their load on ``.../gate/sim-gpu<N>``. A real
  gate reporting for a GPU takes over that GPU's offered load. They also read the rack's
  coolant sensors, which is how the simulated GPUs feel the simulated CDU's water.

The agent cannot tell this node from a real one: it reads GPUs, publishes the cap and
counts gate reports, as it does on hardware.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from rackguard.agent import log as logmod
from rackguard.agent.config import Config
from rackguard.agent.gate import Gate
from rackguard.agent.messages import GateReport, dump
from rackguard.agent.mqtt import ClientFactory, ClientLike, Topics, no_local
from rackguard.controllers.power import PowerCurve, RequestTiming
from rackguard.controllers.thermal import DEFAULT_PARAMS
from rackguard.sensors.base import GpuBackend, GpuInfo, GpuLost, GpuSample, GpuThresholds
from rackguard.sensors.coolant import CoolantSensor, Reading, parse
from rackguard.sim.plant import Plant, PlantConfig

H100_THRESHOLDS = GpuThresholds(slowdown_c=89.0, shutdown_c=95.0, gpu_max_c=87.0, mem_max_c=95.0)
# An H100 SXM serving LLM decode: 70 W idle, 700 W at saturation (63 % of the span at 24 in flight).
DEFAULT_CURVE = PowerCurve(idle_w=70.0, span_w=630.0, sat_concurrency=24.0)
POWER_LIMIT_MIN_W = 200.0
MAX_CATCH_UP_S = 600.0  # a reader that stalls longer skips the rest (the plant does not replay hours)


def plant_config(gpus: int, *, temp_noise_c: float = 0.3) -> PlantConfig:
    """The demo node's plant: the trace-fitted thermal model, an H100 decode power curve."""
    return PlantConfig(n_gpus=gpus, thermal=DEFAULT_PARAMS, power=DEFAULT_CURVE, temp_noise_c=temp_noise_c)


class SimBackend(GpuBackend):
    """N simulated GPUs behind the GpuBackend interface, on the benchmark plant.

    The plant advances in its own substeps (0.1 s) up to ``clock()`` whenever something
    reads or changes it. Caps start unlimited: until someone obeys a cap, the GPUs serve
    what is offered.

    Args:
        gpus: Number of GPUs.
        config: The plant (default: :func:`plant_config`).
        offered_concurrency: Requests the clients want in flight per GPU.
        supply_temp_c: Coolant supply temperature.
        flow_lpm: Coolant flow through the node's cold plates.
        seed: Noise seed.
        clock: Monotonic seconds (tests pass their own).
    """

    name = "sim"

    def __init__(
        self,
        gpus: int = 8,
        *,
        config: PlantConfig | None = None,
        offered_concurrency: float = 256.0,
        supply_temp_c: float = 32.0,
        flow_lpm: float = 12.0,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or plant_config(gpus)
        if self.config.n_gpus != gpus:
            self.config = replace(self.config, n_gpus=gpus)
        self.plant = Plant(self.config, supply_temp_c, seed=seed)
        self.plant.flow_lpm = flow_lpm
        self.clock = clock
        self._lock = threading.Lock()
        self._t = clock()
        self.caps = np.full(gpus, math.inf)
        self.offered = np.full(gpus, max(0.0, offered_concurrency))
        self._lost: dict[int, tuple[str, float]] = {}
        # Sensor noise per GPU: each GPU is read from its own thread, so each has its own generator.
        self._noise = [random.Random(seed * 1000 + i) for i in range(gpus)]
        self._view = self._make_view()

    def _make_view(self) -> _View:
        p = self.plant
        return _View(
            power_w=p.power_w.tolist(),
            die_c=p.die_c().tolist(),
            mem_c=p.mem_c().tolist(),
            served=p.served.tolist(),
            energy_j=p.energy_j.tolist(),
        )

    def _now_view(self) -> _View:
        """The plant's state now: advanced (under the lock) only when a substep is due."""
        if self.clock() - self._t >= self.config.substep_s - 1e-9:
            with self._lock:
                self._advance()
        return self._view

    # -- the far side: load, caps, water, faults ---------------------------------------
    def set_offered(self, concurrency: float | list[float]) -> None:
        """Requests the clients want in flight (per GPU, or one value for all)."""
        with self._lock:
            self._advance()
            self.offered[:] = np.maximum(np.asarray(concurrency, dtype=float), 0.0)

    def set_caps(self, caps: list[float] | tuple[float, ...]) -> None:
        """The servers' admission limits per GPU (``math.inf``: none)."""
        with self._lock:
            self._advance()
            self.caps[:] = np.asarray(caps, dtype=float)

    def set_coolant(self, *, supply_temp_c: float | None = None, flow_lpm: float | None = None) -> None:
        """The water reaching the cold plates (from the simulated CDU's readings)."""
        with self._lock:
            self._advance()
            if supply_temp_c is not None:
                self.plant.supply_c = supply_temp_c
            if flow_lpm is not None:
                self.plant.flow_lpm = max(1e-3, flow_lpm)

    def lose_gpu(self, index: int, error: str = "GPU is lost", *, hang_s: float = 0.0) -> None:
        """Fault drill: reads of this GPU raise GpuLost (after hanging ``hang_s``)."""
        self._lost[index] = (error, hang_s)

    def restore_gpu(self, index: int) -> None:
        self._lost.pop(index, None)

    # -- truth (tests, the simulated servers) --------------------------------------------
    def served(self, index: int) -> float:
        """Requests in flight on a GPU now."""
        return self._now_view().served[index]

    def die_temp_c(self, index: int) -> float:
        """The true (unrounded) die temperature."""
        return self._now_view().die_c[index]

    def total_power_w(self) -> float:
        return sum(self._now_view().power_w)

    def _advance(self) -> None:
        """Run the plant up to now in whole substeps (caller holds the lock)."""
        now = self.clock()
        sub = self.config.substep_s
        n = int((now - self._t) / sub + 1e-9)
        if n <= 0:
            return
        if n * sub > MAX_CATCH_UP_S:
            n = round(MAX_CATCH_UP_S / sub)
            self._t = now - n * sub
        p = self.plant
        p.advance(n * sub, self.caps, self.offered, p.supply_c, p.flow_lpm)
        self._t += n * sub
        self._view = self._make_view()

    # -- GpuBackend ----------------------------------------------------------------------
    def open(self) -> list[GpuInfo]:
        return [self._info(i) for i in range(self.config.n_gpus)]

    def _info(self, index: int) -> GpuInfo:
        p_max = self.config.power.idle_w + self.config.power.span_w
        return GpuInfo(
            index=index,
            uuid=f"GPU-5140-0000-0000-0000-{index:012d}",
            name="Simulated H100 80GB HBM3",
            thresholds=H100_THRESHOLDS,
            power_limit_min_w=POWER_LIMIT_MIN_W,
            power_limit_max_w=p_max,
            power_limit_default_w=p_max,
        )

    def reopen(self, index: int) -> GpuInfo:
        if index in self._lost:
            raise GpuLost(f"gpu {index}: {self._lost[index][0]}")
        return self._info(index)

    def read(self, index: int, *, slow: bool) -> GpuSample:
        if (lost := self._lost.get(index)) is not None:
            if lost[1]:
                time.sleep(lost[1])
            raise GpuLost(f"gpu {index}: {lost[0]}")
        v = self._now_view()
        rng, sd = self._noise[index], self.config.temp_noise_c
        power_w, served, energy_j = v.power_w[index], v.served[index], v.energy_j[index]
        die_c = v.die_c[index] + rng.gauss(0.0, sd)
        mem_c = v.mem_c[index] + rng.gauss(0.0, sd)
        p_max = self.config.power.idle_w + self.config.power.span_w
        events: tuple[str, ...] = ()
        if power_w >= 0.98 * p_max:
            events = ("sw_power_cap",)
        elif served <= 0:
            events = ("gpu_idle",)
        return GpuSample(
            index=index,
            t_s=time.time(),
            power_w=round(power_w, 3),
            gpu_temp_c=float(round(die_c)),  # NVML reports whole degrees
            sm_clock_mhz=1980.0 if served > 0 else 345.0,
            util_pct=round(100.0 * served / (served + 1.0), 1),
            power_limit_w=p_max,
            clock_events=events,
            energy_j=round(energy_j, 3) if slow else None,
            mem_temp_c=float(round(mem_c)) if slow else None,
        )


@dataclass(frozen=True, slots=True)
class _View:
    """The plant's per-GPU state after a substep (plain floats, replaced whole: reads need no lock)."""

    power_w: list[float]
    die_c: list[float]
    mem_c: list[float]
    served: list[float]
    energy_j: list[float]


@dataclass(slots=True)
class _Counters:
    """One simulated server's completed requests and tokens (fractional between reports)."""

    completed: float = 0.0
    tokens: float = 0.0
    external_in_flight: int | None = None  # a real gate reported for this GPU
    external_mono_s: float = -math.inf


class _QuietLog:
    """The simulated gates' log lines at debug: a limit change on every GPU is not news."""

    def __init__(self) -> None:
        self._log = logmod.get("sim")

    def __getattr__(self, name: str) -> Any:
        return self._log.debug


@dataclass
class SimServers:
    """The simulated node's inference servers: obey the cap, report load, feel the water.

    Each GPU's server runs the real gate's admission state machine
    (:class:`~rackguard.agent.gate.Gate`: ``handle_cap``, ``handle_status``, ``refresh``), so it
    obeys ``caps[gpu]`` until ``valid_until_s`` or the MQTT 5 expiry, drops to ``safe_cap`` when
    the agent goes ``offline`` (and waits for a new cap), and keeps a valid cap across a broker
    outage, exactly as a gated server does. Its requests are the plant's: admitted up to the
    limit, drained (never killed) after a cut.

    Args:
        backend: The simulated GPUs they run on.
        node_topic: The agent's topic root ``<prefix>/<site>/<rack>/<node>``.
        safe_cap: The limit while there is no valid cap (as a gate's ``safe_cap``).
        offered_concurrency: Requests the clients want in flight per GPU.
        coolant_sensors: The rack's declared coolant sensors; supply and flow readings cool the GPUs.
        coolant_subscribe: Topic filters to subscribe to for them.
        tokens_per_request: New tokens per request (energy per token).
        report_period_s: How often each server publishes its gate report.
        external_max_age_s: A real gate's report stays in charge of its GPU's load this long.
    """

    backend: SimBackend
    node_topic: str
    safe_cap: int = 8
    offered_concurrency: float = 256.0
    coolant_sensors: list[CoolantSensor] = field(default_factory=list)
    coolant_subscribe: list[str] = field(default_factory=list)
    tokens_per_request: int = 128
    report_period_s: float = 1.0
    external_max_age_s: float = 3.0
    flow_fraction: float = 1.0  # in a rack the CDU's flow is the rack's; this node's plates get this part
    truth_path: str | None = None  # append the plant's true power and work here (benchmarks)
    # The truth's timestamps: the true wall clock, even where a drill sets the node's clock off.
    truth_clock: Callable[[], float] | None = None
    tick_s: float = (
        0.25  # expiry is re-checked this often (the gate: 0.1 s); a cap or status applies on arrival
    )

    def __post_init__(self) -> None:
        n = self.backend.config.n_gpus
        self.gates = [
            Gate(node_topic=self.node_topic, safe_cap=self.safe_cap, gpu=i, gate_id=f"sim-gpu{i}")
            for i in range(n)
        ]
        for g in self.gates:
            g.log = _QuietLog()
        self.counters = [_Counters() for _ in range(n)]
        self.log = logmod.get("sim")
        self._timing: RequestTiming = self.backend.config.requests
        self._applied: tuple[list[float], list[float]] = ([], [])

    # -- what arrives ------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, expiry_s: float | None = None) -> None:
        """One MQTT message. Never raises: anything malformed is ignored (the agent counts its own)."""
        base = self.node_topic
        try:
            if topic == f"{base}/cap":
                for g in self.gates:
                    g.handle_cap(payload, "mqtt", expiry_s)
                self.apply()  # a server obeys a new cap at once (a leak cap must not wait a tick)
            elif topic == f"{base}/status":
                for g in self.gates:
                    g.handle_status(payload)
                self.apply()
            elif topic.startswith(f"{base}/gate/"):
                if topic.rpartition("/")[2].startswith("sim-"):
                    return  # our own report
                report = GateReport.model_validate_json(payload)
                # A gate over several GPUs (a gateway's upstream) loads each with its share.
                gpus = report.gpus or ([] if report.gpu is None else [report.gpu])
                for index in gpus:
                    if index < len(self.counters):
                        c = self.counters[index]
                        c.external_in_flight = round(report.in_flight / len(gpus))
                        c.external_mono_s = time.monotonic()
            else:
                self._coolant(topic, payload)
        except Exception as exc:  # a bad message must not stop the simulated servers
            self.log.debug("sim_ignored", topic=topic, error=str(exc)[:200])

    def _coolant(self, topic: str, payload: bytes) -> None:
        for sensor in self.coolant_sensors:
            if sensor.topic != topic:
                continue
            r = parse(sensor, payload, now_s=time.time(), max_future_s=3600.0)
            if isinstance(r, Reading):
                v = r.values
                flow = v.get("flow_lpm")
                self.backend.set_coolant(
                    supply_temp_c=v.get("supply_temp_c"),
                    flow_lpm=None if flow is None else flow * self.flow_fraction,
                )

    # -- what the servers do ----------------------------------------------------------
    def _external(self, i: int, now_mono: float) -> int | None:
        c = self.counters[i]
        fresh = c.external_in_flight is not None and now_mono - c.external_mono_s <= self.external_max_age_s
        return c.external_in_flight if fresh else None

    def apply(self) -> None:
        """Hand the GPUs the servers' limits and offered load (only what changed)."""
        now_mono = time.monotonic()
        offered = []
        for i in range(len(self.gates)):
            ext = self._external(i, now_mono)
            offered.append(self.offered_concurrency if ext is None else float(ext))
        caps = [float(g.limit) for g in self.gates]
        if offered != self._applied[0]:
            self.backend.set_offered(offered)
        if caps != self._applied[1]:
            self.backend.set_caps(caps)
        self._applied = (offered, caps)

    def step(self, dt_s: float) -> None:
        """Re-check expiry, apply limits and load, count completed requests."""
        for g in self.gates:
            g.refresh()
        self.apply()
        served = np.asarray([self.backend.served(i) for i in range(len(self.gates))])
        done = (served / self._timing.duration_s(served) * dt_s).tolist()
        for c, d in zip(self.counters, done, strict=True):
            c.completed += d
            c.tokens += d * self.tokens_per_request
        if self.truth_path is not None:
            self._write_truth()

    def _write_truth(self) -> None:
        """One line per step: wall time, true GPU power, requests and tokens completed (all GPUs)."""
        completed = sum(c.completed for c in self.counters)
        tokens = sum(c.tokens for c in self.counters)
        now = (self.truth_clock or time.time)()
        line = f"{now:.3f} {self.backend.total_power_w():.1f} {completed:.2f} {tokens:.1f}\n"
        with contextlib.suppress(OSError), open(str(self.truth_path), "a") as f:
            f.write(line)

    def reports(self) -> list[tuple[str, bytes]]:
        """Gate reports for the GPUs no real gate is in charge of."""
        out = []
        now_mono, now = time.monotonic(), time.time()
        for i, (g, c) in enumerate(zip(self.gates, self.counters, strict=True)):
            if self._external(i, now_mono) is not None:
                continue
            report = GateReport(
                gate_id=g.gate_id,
                gpu=i,
                t_s=now,
                in_flight=round(self.backend.served(i)),
                limit=g.limit,
                source=g.source,
                completed_total=int(c.completed),
                tokens_total=int(c.tokens),
            )
            out.append((g.report_topic, dump(report)))
        return out

    async def run(self, factory: ClientFactory, stop: asyncio.Event) -> None:
        """Connect, subscribe, and serve until ``stop``; reconnect after a broker fault.

        While disconnected the servers keep serving under the limits they have (a valid cap
        stays valid until it expires), as a gate does: they step on their own clock, whatever
        the connection does (a publish stuck on a dead link does not stop the work).
        """
        ticker = asyncio.create_task(self._tick(stop))
        try:
            await self._connected(factory, stop)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker

    async def _tick(self, stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.tick_s)
            now = time.monotonic()
            self.step(now - last)
            last = now

    async def _connected(self, factory: ClientFactory, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with factory(None) as client:
                    for topic in (
                        f"{self.node_topic}/cap",
                        f"{self.node_topic}/status",
                        *self.coolant_subscribe,
                    ):
                        await client.subscribe(topic, qos=1)
                    # Real gates' reports, without our own echoed back.
                    await client.subscribe(f"{self.node_topic}/gate/+", options=no_local())
                    tasks = {
                        asyncio.create_task(self._read(client)),
                        asyncio.create_task(self._serve(client, stop)),
                    }
                    try:
                        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for t in tasks:
                            t.cancel()
                        await asyncio.gather(*tasks, return_exceptions=True)
                    for t in done:
                        if not t.cancelled() and (exc := t.exception()) is not None:
                            raise exc
            except Exception as exc:  # broker gone: serve on, retry
                self.log.debug("sim_servers_disconnected", error=str(exc)[:200])
            if not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def _read(self, client: ClientLike) -> None:
        async for m in client.messages:
            props = getattr(m, "properties", None)
            expiry = getattr(props, "MessageExpiryInterval", None) if props is not None else None
            self.handle(str(m.topic), bytes(m.payload or b""), None if expiry is None else float(expiry))

    async def _serve(self, client: ClientLike, stop: asyncio.Event) -> None:
        next_report = time.monotonic() + self.report_period_s
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_report:
                next_report = now + self.report_period_s
                for topic, payload in self.reports():
                    await client.publish(topic, payload, qos=0, retain=False, timeout=5.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.tick_s)


def from_config(
    cfg: Config, *, seed: int | None = None, servers_in_charge: bool = True
) -> tuple[SimBackend, SimServers]:
    """The simulated node a config describes (``[sim]``), with servers on the agent's topics.

    With ``servers_in_charge`` (the servers will run) the GPUs are held at ``safe_cap`` from
    the start, as a gated server holds them before its first cap; otherwise they serve all
    that is offered until someone sets caps.
    """
    sc = cfg.sim
    backend = SimBackend(
        sc.gpus,
        config=plant_config(sc.gpus, temp_noise_c=sc.ambient_noise_c),
        offered_concurrency=sc.offered_concurrency,
        supply_temp_c=sc.supply_temp_c,
        flow_lpm=sc.flow_lpm,
        seed=sc.seed if seed is None else seed,
    )
    servers = SimServers(
        backend,
        Topics.for_node(cfg.node, cfg.mqtt.topic_prefix).base,
        safe_cap=cfg.control.safe_cap,
        offered_concurrency=sc.offered_concurrency,
        coolant_sensors=list(cfg.coolant.sensors),
        coolant_subscribe=list(
            dict.fromkeys([*cfg.coolant.subscribe, *(s.topic for s in cfg.coolant.sensors)])
        ),
        external_max_age_s=cfg.gate.report_max_age_s,
        flow_fraction=cfg.rack.flow_fraction(cfg.node.name),
        truth_path=os.environ.get("RACKGUARD_SIM_TRUTH") or None,
    )
    if servers_in_charge:
        backend.caps[:] = float(servers.safe_cap)
    return backend, servers


async def run_beside(agent_run: Awaitable[int], servers: SimServers, factory: ClientFactory) -> int:
    """Run the simulated servers while the agent runs; returns the agent's exit code."""
    stop = asyncio.Event()
    task = asyncio.create_task(servers.run(factory, stop))
    try:
        return await agent_run
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5.0)

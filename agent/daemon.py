"""The agent's asyncio lifecycle: sense → aggregate → publish, until told to stop.

One tick loop runs on a drift-free monotonic schedule (``poll_period_s``). Each
tick polls every GPU off the event loop; when a publish period has passed, it
closes the window and queues one telemetry message for the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from rackguard.agent import __version__
from rackguard.agent import log as logmod
from rackguard.agent.config import Config, ConfigError
from rackguard.agent.control import ControlLoop, limits_from
from rackguard.agent.coolant import CoolantMonitor, LeakEvent
from rackguard.agent.energy import EnergyMeter
from rackguard.agent.gates import GateTracker
from rackguard.agent.http import METRICS_CONTENT_TYPE, HttpServer, json_response
from rackguard.agent.messages import (
    Cap,
    CommandAck,
    EnergyTelemetry,
    GpuInventory,
    HostTelemetry,
    NodeId,
    Status,
    Telemetry,
    Thresholds,
    dump,
)
from rackguard.agent.metrics import Metrics
from rackguard.agent.mqtt import ClientFactory, MqttLink, Topics, aiomqtt_factory
from rackguard.agent.notify import Notifier
from rackguard.agent.operator_commands import COMMAND_NAMES, Actions, CommandProcessor
from rackguard.agent.outbox import OutMsg, open_outbox
from rackguard.agent.power_limits import PowerLimitActuator, PowerLimitError
from rackguard.agent.sensing import GpuPoller
from rackguard.agent.telemetry import Window
from rackguard.controllers.api import CoolantObs, Decision, GpuObs, Observation
from rackguard.sensors.base import GpuBackend, GpuInfo
from rackguard.sensors.coolant import Reading
from rackguard.sensors.sim import SimBackend

SHUTDOWN_BUDGET_S = 4.5  # SIGTERM → exit within 5 s

# Config keys SIGHUP cannot apply to a running agent (they need a restart); everything
# else is swapped in live (log, periods, timeouts, outbox bound and replay rate).
RESTART_KEYS = (
    "node",
    "mqtt",
    "http",
    "sim",
    "outbox.path",
    "outbox.synchronous",
    "sensors.backend",
    "sensors.gpu_indices",
    "power_limits",
    "coolant",
)


def split_reload(
    old: Config, new: Config, restart_keys: tuple[str, ...] = RESTART_KEYS
) -> tuple[Config, list[str]]:
    """The part of ``new`` that can apply live (``old`` kept for restart keys) and the keys kept."""
    o, n = old.model_dump(), new.model_dump()
    kept = []
    for key in restart_keys:
        section, _, field = key.partition(".")
        src, dst = (o[section], n[section]) if field else (o, n)
        name = field or section
        if src[name] != dst[name]:
            kept.append(key)
            dst[name] = src[name]
    return (Config.model_validate(n) if kept else new), kept


def make_backend(cfg: Config) -> GpuBackend:
    """The GPU backend named by ``sensors.backend``."""
    if cfg.sensors.backend == "sim":
        from rackguard.sensors.sim import SimBackend

        return SimBackend(
            cfg.sim.gpus,
            offered_concurrency=cfg.sim.offered_concurrency,
            supply_temp_c=cfg.sim.supply_temp_c,
            flow_lpm=cfg.sim.flow_lpm,
            noise_c=cfg.sim.ambient_noise_c,
            seed=cfg.sim.seed,
        )
    from rackguard.sensors.nvml import NvmlBackend

    return NvmlBackend(indices=cfg.sensors.gpu_indices)


def inventory(infos: list[GpuInfo]) -> list[GpuInventory]:
    return [
        GpuInventory(
            index=i.index,
            uuid=i.uuid,
            name=i.name,
            thresholds=Thresholds(
                slowdown_c=i.thresholds.slowdown_c,
                shutdown_c=i.thresholds.shutdown_c,
                gpu_max_c=i.thresholds.gpu_max_c,
                mem_max_c=i.thresholds.mem_max_c,
            ),
            power_limit_min_w=i.power_limit_min_w,
            power_limit_max_w=i.power_limit_max_w,
            power_limit_default_w=i.power_limit_default_w,
        )
        for i in infos
    ]


class Agent:
    """One node's daemon. ``run()`` returns the process exit code."""

    POWER_RETRY_S = 10.0  # a failed power-limit write is retried this often (and /healthz is 503)

    def __init__(
        self,
        cfg: Config,
        backend: GpuBackend | None = None,
        *,
        client_factory: ClientFactory | None = None,
        on_telemetry: Callable[[Telemetry], None] | None = None,
        reload_config: Callable[[], Config] | None = None,
        on_leak: Callable[[LeakEvent], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.reload_config = reload_config  # SIGHUP: re-read and validate the config
        self.backend = backend or make_backend(cfg)
        self.node = NodeId(site=cfg.node.site, rack=cfg.node.rack, name=cfg.node.name)
        self.topics = Topics.for_node(cfg.node, cfg.mqtt.topic_prefix)
        client_id = f"rackguard-{cfg.node.site}-{cfg.node.rack}-{cfg.node.name}"
        self.link = MqttLink(
            cfg.mqtt,
            self.topics,
            client_factory=client_factory or aiomqtt_factory(cfg.mqtt, client_id),
            offline_payload=self._offline,
            on_connect=self._birth,
            outbox=open_outbox(
                cfg.outbox.resolved_path(), cfg.outbox.max_messages, synchronous=cfg.outbox.synchronous
            ),
            replay_rate_msgs_s=cfg.outbox.replay_rate_msgs_s,
        )
        self.notifier = Notifier()
        self.on_telemetry = on_telemetry
        self.metrics = Metrics()
        self.stop = asyncio.Event()
        self.infos: list[GpuInfo] = []
        self._birth_uuids: tuple[str, ...] = ()
        self.poller: GpuPoller | None = None
        self.telemetry_seq = self.link.outbox.last_seq("telemetry")  # continues across restarts
        self._dropped_seen = self.link.outbox.dropped_total
        self.cap_seq = 0
        self.http: HttpServer | None = None
        self.last_poll_mono: float | None = None
        self.control: ControlLoop | None = None
        self.cap_msg: Cap | None = None
        self._cap_published_mono = -1e18
        self.log = logmod.get("agent")
        self._host: Any = None
        self.on_leak = on_leak  # an extra leak hook (tests, benchmarks)
        self.leak_events: deque[LeakEvent] = deque(maxlen=256)
        # Raw scheduling lateness (bounded, cheap) for exact percentiles: GET /debug/timings.
        self.ticks_total = 0
        self.tick_late_s: deque[float] = deque(maxlen=16_384)
        self.control_late_s: deque[float] = deque(maxlen=16_384)
        self.coolant = CoolantMonitor(
            cfg.coolant,
            node=self.node,
            metrics=self.metrics,
            publish=self.link.enqueue,
            alarm_topic=self.topics.alarm,
            on_leak=self._on_leak,
            on_reading=self._on_coolant_reading,
        )
        self.coolant.attach(self.link)
        # Actuation: gate reports from the inference servers, energy per token, operator commands.
        self.gates = GateTracker(cfg.gate.report_max_age_s, metrics=self.metrics)
        self.link.subscribe(f"{self.topics.base}/gate/+", self._on_gate_report)
        self.energy = EnergyMeter(cfg.energy.pue)
        self.commands = CommandProcessor(
            cfg.commands,
            Actions(
                max_cap=cfg.control.max_cap,
                set_manual_ceiling=self._set_manual_ceiling,
                set_mpc_paused=self._set_mpc_paused,
                rebirth=self._birth,
                react=lambda: self.react().total,
                ack_leak=self.coolant.acknowledge,
            ),
        )
        if cfg.commands.enabled:
            self.link.subscribe(self.topics.cmd, self._on_command)
        self.power: PowerLimitActuator | None = None  # the optional power-limit actuator (run() builds it)
        self.power_error: str | None = None  # the last power-limit write failure, until one succeeds
        self._power_retry_mono = 0.0
        self._power_pending: Decision | None = None
        self._power_task: asyncio.Task[None] | None = None

    # -- messages ----------------------------------------------------------------------
    def _offline(self, reason: str) -> bytes:
        return dump(Status(state="offline", t_s=time.time(), node=self.node, reason=reason))

    def _birth(self) -> None:
        infos = [g.info for g in self.poller.gpus] if self.poller else self.infos
        self._birth_uuids = tuple(i.uuid for i in infos)
        status = Status(
            state="online",
            t_s=time.time(),
            node=self.node,
            version=__version__,
            backend=self.backend.name,
            poll_period_s=self.cfg.sensors.poll_period_s,
            publish_period_s=self.cfg.telemetry.publish_period_s,
            gpus=inventory(infos),
        )
        self.link.set_state(self.topics.status, dump(status))

    async def _host_sample(self) -> HostTelemetry | None:
        if self._host is None:
            return None
        try:
            s = await asyncio.to_thread(self._host.read)
        except Exception as exc:  # host stats are best effort; never stop the node for them
            self.log.warning("host_read_failed", error=str(exc))
            return None
        return HostTelemetry.model_validate(s, from_attributes=True)

    async def _publish_window(self, window: Window) -> None:
        assert self.poller is not None
        host = await self._host_sample()
        now = time.time()
        self.telemetry_seq += 1
        msg = Telemetry(
            seq=self.telemetry_seq,
            t_s=window.end_s or now,
            window_start_s=window.start_s or now,
            window_end_s=window.end_s or now,
            node=self.node,
            gpus=window.gpu_messages(self.poller.gpus),
            host=host,
            dropped_total=self.link.outbox.dropped_total,
            coolant=self.coolant.telemetry(self.gpu_power_w()) if self.coolant.sensors else None,
            energy=self._energy_window(),
        )
        self.link.enqueue(OutMsg(self.topics.telemetry, dump(msg), kind="telemetry", seq=self.telemetry_seq))
        self._update_metrics()
        if self.on_telemetry:
            self.on_telemetry(msg)

    def _energy_window(self) -> EnergyTelemetry:
        """Close the energy-per-token window: GPU energy counter deltas over gate-reported tokens."""
        assert self.poller is not None
        energy_j = {
            g.info.index: g.sample.energy_j if g.sample is not None and g.state == "ok" else None
            for g in self.poller.gpus
        }
        tokens, requests = self.gates.take_window()
        w = self.energy.window(energy_j, tokens, requests)
        for gauge, value in (
            (self.metrics.energy_per_token_j, w.energy_per_token_j),
            (self.metrics.facility_energy_per_token_j, w.facility_energy_per_token_j),
        ):
            if value is not None:
                gauge.set(value)
        self.gates.update_metrics()

        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 6)

        return EnergyTelemetry(
            gpu_energy_j=r(w.gpu_energy_j),
            gpus_counted=w.gpus_counted,
            tokens=w.tokens,
            requests=w.requests,
            energy_per_token_j=r(w.energy_per_token_j),
            facility_energy_per_token_j=r(w.facility_energy_per_token_j),
            pue=w.pue,
            gates=len(self.gates.fresh()),
        )

    def _update_metrics(self) -> None:
        assert self.poller is not None
        m = self.metrics
        for g in self.poller.gpus:
            label = str(g.info.index)
            m.gpu_lost.labels(label).set(1.0 if g.state == "lost" else 0.0)
            s = g.sample
            if s is None or g.state != "ok":
                continue
            for gauge, value in (
                (m.gpu_power_w, s.power_w),
                (m.gpu_temp_c, s.gpu_temp_c),
                (m.gpu_mem_temp_c, s.mem_temp_c),
                (m.gpu_energy_j, s.energy_j),
            ):
                if value is not None:
                    gauge.labels(label).set(value)
        m.telemetry_published.inc()
        m.mqtt_connected.set(1.0 if self.link.connected else 0.0)
        m.mqtt_queue_depth.set(len(self.link.outbox))
        dropped = self.link.outbox.dropped_total
        if dropped > self._dropped_seen:
            m.mqtt_dropped.inc(dropped - self._dropped_seen)
        self._dropped_seen = dropped

    # -- coolant ----------------------------------------------------------------------
    def _on_leak(self, event: LeakEvent) -> None:
        """The safety hook: runs inside the MQTT handler the moment a leak is parsed."""
        self.leak_events.append(event)
        self.log.warning("leak_event", sensor=event.sensor_id, state=event.state, latched=event.latched)
        if self.control is not None and self.poller is not None:
            self.react()  # the safety cap goes out now, not at the next tick
        if self.on_leak is not None:
            self.on_leak(event)

    def _on_coolant_reading(self, reading: Reading) -> None:
        """The simulated GPUs are cooled by what the coolant sensors read."""
        if isinstance(self.backend, SimBackend):
            v = reading.values
            if "supply_temp_c" in v or "flow_lpm" in v:
                self.backend.set_coolant(supply_temp_c=v.get("supply_temp_c"), flow_lpm=v.get("flow_lpm"))

    def gpu_power_w(self) -> float | None:
        """Electrical power of the node's GPUs (last samples), or None if any GPU is unknown."""
        assert self.poller is not None
        powers = [g.sample.power_w if g.sample and g.state == "ok" else None for g in self.poller.gpus]
        if not powers or any(p is None for p in powers):
            return None
        return float(sum(p for p in powers if p is not None))

    # -- control ----------------------------------------------------------------------
    def coolant_obs(self) -> CoolantObs:
        """The coolant loop as the controllers see it (no sensors declared: unknown, not stale)."""
        if not self.coolant.sensors:
            return CoolantObs()
        s = self.coolant.snapshot(self.gpu_power_w())
        return CoolantObs(supply_temp_c=s.supply_temp_c, flow_lpm=s.flow_lpm, stale=s.stale, leak=s.leak)

    # -- gates and operator commands -----------------------------------------------------
    def _on_gate_report(self, topic: str, payload: bytes) -> None:
        """The MQTT handler for ``.../gate/+``: track it; the simulated GPUs follow the real load."""
        if self.gates.handle(topic, payload) is not None:
            self._sync_offered()

    def _sync_offered(self) -> None:
        """Simulator only: each GPU's offered load = gate-reported in flight (else the config's)."""
        if not isinstance(self.backend, SimBackend) or not self.infos:
            return
        default = self.cfg.sim.offered_concurrency
        reported = self.gates.in_flight(len(self.infos))
        self.backend.set_offered([default if v is None else v for v in reported])

    def _on_command(self, topic: str, payload: bytes) -> None:
        """The MQTT handler for ``.../cmd``: validate, act, answer on ``.../cmd/ack``."""
        out = self.commands.handle(payload)
        name = out.command if out.command in COMMAND_NAMES else "invalid"  # bounded label values
        self.metrics.commands.labels(name, "accepted" if out.accepted else "rejected").inc()
        ack = CommandAck(
            t_s=time.time(),
            node=self.node,
            id=out.id,
            command=out.command,
            accepted=out.accepted,
            reason=out.reason,
            cap_total=out.cap_total,
        )
        # kind="alarm": never dropped from the outbox; QoS 1, not retained.
        self.link.enqueue(OutMsg(self.topics.cmd_ack, dump(ack), kind="alarm", qos=1))

    def _set_manual_ceiling(self, ceiling: int | None) -> None:
        assert self.control is not None
        self.control.manual_ceiling = ceiling

    def _set_mpc_paused(self, paused: bool) -> None:
        assert self.control is not None
        self.control.paused = paused

    def concurrency(self, index: int) -> float:
        """Requests in flight on a GPU: fresh gate reports, else the simulator's served load, else the cap."""
        reported = self.gates.in_flight(len(self.infos))
        if index < len(reported) and (v := reported[index]) is not None:
            return v
        served = getattr(self.backend, "served", None)
        if served is not None:
            return float(served(index))
        d = self.control.decision if self.control else None
        return float(d.caps[index]) if d else 0.0

    def observation(self) -> Observation:
        """One frozen snapshot of every sensor for the controllers."""
        assert self.poller is not None
        gpus = []
        for g in self.poller.gpus:
            s = g.sample if g.state == "ok" else None
            gpus.append(
                GpuObs(
                    gpu_temp_c=s.gpu_temp_c if s else None,
                    mem_temp_c=s.mem_temp_c if s else None,
                    power_w=s.power_w if s else None,
                    concurrency=self.concurrency(g.info.index),
                    lost=g.state == "lost",
                )
            )
        return Observation(t_s=time.monotonic(), gpus=tuple(gpus), coolant=self.coolant_obs())

    def control_step(self) -> Decision:
        assert self.control is not None
        self._sync_offered()  # gates that went silent fall back to the configured load
        obs = self.observation()
        try:
            decision = self.control.step(obs)
        except Exception:  # a controller bug must never leave the old cap standing
            self.log.exception("control_step_failed")
            self.control.proposed = None
            decision = self.control.react(obs)
        self.apply(decision)
        return decision

    def react(self) -> Decision:
        """Apply the safety layer now, between ticks (a leak, an operator command)."""
        assert self.control is not None
        decision = self.control.react(self.observation())
        self.apply(decision, force=True)
        return decision

    def apply(self, decision: Decision, *, force: bool = False) -> None:
        """Publish the cap (on change, or every cap_refresh_s) and hand it to the actuators."""
        c = self.cfg.control
        prev = self.cap_msg
        changed = prev is None or (prev.caps, prev.reason, prev.binding) != (
            list(decision.caps),
            decision.reason,
            decision.binding,
        )
        set_caps = getattr(self.backend, "set_caps", None)
        if set_caps is not None:
            set_caps(decision.caps)  # the simulated inference servers obey at once
        now_mono = time.monotonic()
        if self.power is not None and (
            changed or (self.power_error is not None and now_mono >= self._power_retry_mono)
        ):
            self._actuate_power(decision)
        if not (changed or force or now_mono - self._cap_published_mono >= c.cap_refresh_s):
            return
        if changed:
            self.log.info(
                "cap_changed", total=decision.total, reason=decision.reason, binding=decision.binding
            )
        self.cap_seq += 1
        now = time.time()
        assert self.control is not None
        self.cap_msg = Cap(
            seq=self.cap_seq,
            t_s=now,
            valid_until_s=now + c.cap_ttl_s,
            node=self.node,
            caps=list(decision.caps),
            total=decision.total,
            reason=decision.reason,
            binding=decision.binding,
            predicted_max_temp_c=decision.predicted_max_temp_c,
            safe_cap=c.safe_cap,
            max_cap=c.max_cap,
            mpc_paused=self.control.paused,
            manual_ceiling=self.control.manual_ceiling,
        )
        self._cap_published_mono = now_mono
        self.link.set_state(self.topics.cap, dump(self.cap_msg), expiry_s=round(c.cap_ttl_s))
        self._cap_metrics(decision)

    # -- power limits (optional) ---------------------------------------------------------
    def _start_power_limits(self) -> None:
        """Build the actuator if enabled and the backend can write limits (blocking: NVML reads)."""
        pl = self.cfg.power_limits
        if not pl.enabled:
            return
        if not (hasattr(self.backend, "set_power_limit_w") and hasattr(self.backend, "get_power_limit_w")):
            self.log.error("power_limits_unsupported", backend=self.backend.name)
            return
        actuator = PowerLimitActuator(
            self.infos,
            self.backend,  # checked above: it has get/set_power_limit_w
            pl.resolved_state_file(),
            budget_w=pl.node_power_budget_w or self.cfg.control.node_power_budget_w,
            min_on_reasons=pl.min_on_reasons,
            min_change_w=pl.min_change_w,
            metrics=self.metrics,
        )
        try:
            actuator.start()
        except Exception as exc:  # never write limits we could not save first
            self.log.error("power_limits_disabled", error=f"{type(exc).__name__}: {exc}")
            return
        self.power = actuator

    def _actuate_power(self, decision: Decision) -> None:
        """Hand the decision to the single power-limit writer (NVML off the event loop)."""
        self._power_pending = decision
        if self._power_task is None or self._power_task.done():
            self._power_task = asyncio.get_running_loop().create_task(self._power_writer())

    async def _power_writer(self) -> None:
        assert self.power is not None
        while (d := self._power_pending) is not None:
            self._power_pending = None
            try:
                await asyncio.to_thread(self.power.apply, d)
            except Exception as exc:  # PowerLimitError is logged and counted by the actuator
                if not isinstance(exc, PowerLimitError):
                    self.log.exception("power_limit_actuator_failed")
                self.power_error = str(exc) or type(exc).__name__
                self._power_retry_mono = time.monotonic() + self.POWER_RETRY_S
            else:
                self.power_error = None

    def _cap_metrics(self, decision: Decision) -> None:
        m = self.metrics
        for i, cap in enumerate(decision.caps):
            m.cap.labels(str(i)).set(cap)
        m.cap_total.set(decision.total)
        for reason in ("mpc", "leak", "stale", "thermal", "gpu_lost", "manual"):
            m.cap_reason.labels(reason).set(1.0 if reason == decision.reason else 0.0)
        assert self.control is not None
        m.mpc_paused.set(1.0 if self.control.paused else 0.0)
        ceiling = self.control.manual_ceiling
        m.manual_ceiling.set(-1.0 if ceiling is None else ceiling)

    # -- HTTP ---------------------------------------------------------------------------
    def health(self) -> list[str]:
        """What is wrong right now (empty when healthy)."""
        problems = []
        now = time.monotonic()
        poll_stall_s = max(2.0, 5 * self.cfg.sensors.poll_period_s)
        if self.poller is None or self.last_poll_mono is None or now - self.last_poll_mono > poll_stall_s:
            problems.append("sensing loop stalled")
        elif lost := [g.info.index for g in self.poller.gpus if g.state == "lost"]:
            problems.append(f"gpu lost: {lost}")
        if self.power_error is not None:
            problems.append(f"power limit write failed: {self.power_error}")
        control_stall_s = max(3.0, 3 * self.cfg.control.period_s)
        last = self.control.last_step_mono if self.control else None
        if last is None or now - last > control_stall_s:
            problems.append("control loop stalled")
        return problems

    def _http_routes(self) -> dict[str, Callable[[], tuple[int, str, bytes]]]:
        def metrics() -> tuple[int, str, bytes]:
            self.metrics.mqtt_queue_depth.set(len(self.link.outbox))
            self.metrics.mqtt_connected.set(1.0 if self.link.connected else 0.0)
            return 200, METRICS_CONTENT_TYPE, self.metrics.render()

        def healthz() -> tuple[int, str, bytes]:
            problems = self.health()
            return json_response(503 if problems else 200, {"ok": not problems, "problems": problems})

        def cap() -> tuple[int, str, bytes]:
            if self.cap_msg is None:
                return json_response(503, {"error": "no cap decided yet"})
            return 200, "application/json", dump(self.cap_msg)

        def timings() -> tuple[int, str, bytes]:
            steps = list(self.control.timings) if self.control else []
            return json_response(
                200,
                {
                    "ticks_total": self.ticks_total,
                    "tick_late_s": list(self.tick_late_s),
                    "control_late_s": list(self.control_late_s),
                    "steps_total": len(steps),
                    "mpc_s": [t.mpc_s for t in steps],
                    "safety_s": [t.safety_s for t in steps],
                },
            )

        return {"/metrics": metrics, "/healthz": healthz, "/v1/cap": cap, "/debug/timings": timings}

    # -- lifecycle ---------------------------------------------------------------------
    def request_stop(self, reason: str = "signal") -> None:
        if not self.stop.is_set():
            self.log.info("stopping", reason=reason)
            self.stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop, sig.name)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        from rackguard.sensors.base import SensorError

        try:
            self.infos = await asyncio.to_thread(self.backend.open)
        except SensorError as exc:
            self.log.error("backend_open_failed", backend=self.backend.name, error=str(exc))
            return 1
        try:
            from rackguard.sensors.host import HostSensor

            self._host = HostSensor()
        except Exception as exc:
            self.log.warning("host_sensor_unavailable", error=str(exc))
        s = self.cfg.sensors
        self.poller = GpuPoller(
            self.backend,
            self.infos,
            read_timeout_s=s.read_timeout_s,
            slow_every=max(1, round(s.slow_period_s / s.poll_period_s)),
            retry_min_s=s.lost_retry_min_s,
            retry_max_s=s.lost_retry_max_s,
            on_call=lambda c: self.metrics.nvml_call_s.labels("slow" if c.slow else "fast").observe(
                c.seconds
            ),
        )
        self.control = ControlLoop(
            limits_from(self.cfg.control, self.cfg.coolant, self.infos), len(self.infos)
        )
        await asyncio.to_thread(self._start_power_limits)
        self.log.info(
            "started",
            version=__version__,
            backend=self.backend.name,
            gpus=len(self.infos),
            topic=self.topics.base,
            broker=f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}",
        )
        if self.cfg.http.port:
            self.http = HttpServer(self.cfg.http.host, self.cfg.http.port, self._http_routes())
            try:
                await self.http.start()
            except OSError as exc:
                self.log.error("http_bind_failed", port=self.cfg.http.port, error=str(exc))
                return 1
        link_task = asyncio.create_task(self.link.run(self.stop))
        self.notifier.ready(self.status_line())
        try:
            await self._tick_loop()
        finally:
            self.notifier.stopping()
            try:
                await asyncio.wait_for(link_task, SHUTDOWN_BUDGET_S)
            except TimeoutError:
                self.log.warning("shutdown_flush_timeout", queued=len(self.link.outbox))
            if self.power is not None:
                if self._power_task is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._power_task, 2.0)
                await asyncio.to_thread(self.power.restore)  # errors are logged there
            self.poller.close()
            if self.http is not None:
                await self.http.close()
            await asyncio.to_thread(self.backend.close)
            self.link.outbox.close()
            self.log.info("stopped")
        return 0

    def status_line(self) -> str:
        """One line for ``systemctl status`` (sd_notify STATUS=)."""
        gpus = self.poller.gpus if self.poller else []
        ok = sum(1 for g in gpus if g.state == "ok")
        mqtt = "connected" if self.link.connected else "disconnected"
        return (
            f"{ok}/{len(gpus)} GPUs ok, MQTT {mqtt}, {len(self.link.outbox)} queued, seq {self.telemetry_seq}"
        )

    def reload(self) -> None:
        """SIGHUP: re-read the config; if valid apply what can change live, else keep running as is."""
        if self.reload_config is None:
            self.log.warning("reload_unsupported", reason="no config file to re-read")
            return
        self.notifier.reloading()
        try:
            try:
                new = self.reload_config()
            except ConfigError as exc:
                self.log.error(
                    "reload_rejected", errors=[f"{k}: {r}" for k, r in exc.errors], kept="running config"
                )
                return
            old = self.cfg
            new, kept = split_reload(old, new, RESTART_KEYS)
            if new.log != old.log:
                logmod.configure(new.log.level, new.log.format)
            if self.poller is not None:
                s = new.sensors
                self.poller.read_timeout_s = s.read_timeout_s
                self.poller.slow_every = max(1, round(s.slow_period_s / s.poll_period_s))
                self.poller.retry_min_s, self.poller.retry_max_s = s.lost_retry_min_s, s.lost_retry_max_s
            self.link.outbox.max_messages = new.outbox.max_messages
            self.link.replay.rate_per_s = new.outbox.replay_rate_msgs_s
            if self.control is not None and new.control != old.control:
                self.control.set_limits(limits_from(new.control, new.coolant, self.infos))
                self.commands.actions = dataclasses.replace(
                    self.commands.actions, max_cap=new.control.max_cap
                )
            self.cfg = new
            self.log.info("reloaded", needs_restart=kept or None)
        finally:
            self.notifier.ready(self.status_line())

    async def _tick_loop(self) -> None:
        assert self.poller is not None
        period = self.cfg.sensors.poll_period_s
        publish_every = self.cfg.telemetry.publish_period_s
        control_every = self.cfg.control.period_s
        start = time.monotonic()
        next_tick = start
        next_publish = start + publish_every
        next_control = start
        window = Window()
        while not self.stop.is_set():
            # Periods are re-read every tick so a SIGHUP reload applies them.
            period = self.cfg.sensors.poll_period_s
            publish_every = self.cfg.telemetry.publish_period_s
            control_every = self.cfg.control.period_s
            # The watchdog is fed from this loop itself: if it stalls, systemd restarts us.
            self.notifier.watchdog()
            now = time.monotonic()
            if next_tick > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), next_tick - now)
                if self.stop.is_set():
                    break
            late = time.monotonic() - next_tick
            self.ticks_total += 1
            self.tick_late_s.append(late)
            self.metrics.tick_lateness_s.observe(max(0.0, late))
            gpus = await self.poller.poll()
            self.last_poll_mono = time.monotonic()
            if tuple(g.info.uuid for g in gpus) != self._birth_uuids:
                self._birth()  # a GPU not identified at start (or replaced) now is: new inventory
            window.add(gpus)
            self.coolant.check()
            now = time.monotonic()
            if now >= next_control:
                self.control_late_s.append(now - next_control)
                self.control_step()
                next_control += control_every * max(1, int((now - next_control) // control_every) + 1)
            if now >= next_publish:
                await self._publish_window(window)
                self.notifier.status(self.status_line())
                window = Window()
                next_publish += publish_every * max(1, int((now - next_publish) // publish_every) + 1)
            next_tick += period
            if time.monotonic() - next_tick > period:  # overran: skip missed ticks, keep the phase
                next_tick += period * int((time.monotonic() - next_tick) // period)

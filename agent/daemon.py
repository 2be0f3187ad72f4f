"""The agent: wiring and the tick loop.

One tick loop runs on a drift-free monotonic schedule (``sensors.poll_period_s``):
poll every GPU off the event loop → freeze one :class:`~rackguard.agent.snapshot.NodeSnapshot`
→ when a control period has passed, MPC then safety → every decision sink (the cap, power
limits) → when a publish period has passed, the telemetry window. Reports, sinks, HTTP
routes and reload live in their own modules; this one only connects them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from rackguard.agent import __version__, backends, inbox
from rackguard.agent import log as logmod
from rackguard.agent import snapshot as snapmod
from rackguard.agent.actuators import CapPublisher, DecisionSink, HaproxySink, PowerLimitSink
from rackguard.agent.config import Config, ConfigError, split_reload
from rackguard.agent.control_loop import ControlLoop
from rackguard.agent.coolant_monitor import CoolantMonitor, LeakEvent
from rackguard.agent.energy import EnergyMeter
from rackguard.agent.gate_reports import GateTracker
from rackguard.agent.http import HttpServer
from rackguard.agent.incarnation import next_incarnation, path_for
from rackguard.agent.messages import Cap, CommandAck, NodeId, Telemetry, dump
from rackguard.agent.metrics import Metrics
from rackguard.agent.mqtt import ClientFactory, MqttLink, Topics, aiomqtt_factory
from rackguard.agent.notify import Notifier
from rackguard.agent.operator_commands import COMMAND_NAMES, Actions, CommandProcessor
from rackguard.agent.outbox import OutMsg, open_outbox
from rackguard.agent.rack import RackCoordinator
from rackguard.agent.reports import Reporter
from rackguard.agent.routes import routes
from rackguard.agent.sensing import GpuPoller
from rackguard.agent.seqstore import SeqStore
from rackguard.agent.telemetry import Window
from rackguard.controllers.api import Decision
from rackguard.sensors.base import GpuBackend, GpuInfo, SensorError

SHUTDOWN_BUDGET_S = 4.5  # SIGTERM → exit within 5 s


class Agent:
    """One node's daemon. ``run()`` returns the process exit code.

    Args:
        cfg: The validated config.
        backend: The GPU backend (default: the one ``sensors.backend`` names).
        client_factory: MQTT clients (default: aiomqtt to ``mqtt.host``).
        on_telemetry: Called with each telemetry message (tests, benchmarks).
        reload_config: SIGHUP re-reads and validates the config with this.
        on_leak: An extra leak hook (tests, benchmarks).
    """

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
        self.reload_config = reload_config
        self.backend = backend or backends.make_backend(cfg)
        self.node = NodeId(site=cfg.node.site, rack=cfg.node.rack, name=cfg.node.name)
        self.topics = Topics.for_node(cfg.node, cfg.mqtt.topic_prefix)
        self.log = logmod.get("agent")
        self.metrics = Metrics()
        self.notifier = Notifier()
        self.stop = asyncio.Event()
        self.on_telemetry = on_telemetry
        self.on_leak = on_leak
        self.leak_events: deque[LeakEvent] = deque(maxlen=256)
        self.infos: list[GpuInfo] = []
        self.poller: GpuPoller | None = None
        self.control: ControlLoop | None = None
        self.http: HttpServer | None = None
        self.last_poll_mono: float | None = None
        self.reload_kept: list[str] = []  # restart keys the last SIGHUP could not apply
        # Raw scheduling lateness (bounded, cheap) for exact percentiles: GET /debug/timings.
        self.ticks_total = 0
        self.tick_late_s: deque[float] = deque(maxlen=16_384)
        self.control_late_s: deque[float] = deque(maxlen=16_384)
        self.incarnation = next_incarnation(path_for(cfg))
        self.rack: RackCoordinator | None = None
        client_id = f"rackguard-{cfg.node.site}-{cfg.node.rack}-{cfg.node.name}"
        outbox_path = cfg.outbox.resolved_path()
        self.link = MqttLink(
            cfg.mqtt,
            self.topics,
            client_factory=client_factory or aiomqtt_factory(cfg.mqtt, client_id),
            priority_factory=client_factory or aiomqtt_factory(cfg.mqtt, f"{client_id}-safety"),
            offline_payload=lambda reason: self.reports.offline_payload(reason),
            on_connect=lambda: self.reports.birth(),
            outbox=open_outbox(outbox_path, cfg.outbox.max_messages, synchronous=cfg.outbox.synchronous),
            replay_rate_msgs_s=cfg.outbox.replay_rate_msgs_s,
        )
        # Every stream's seq continues across restarts, beside the outbox (memory only without one).
        self.seqs = SeqStore(outbox_path.with_name("seq.json") if outbox_path else None)
        box = self.link.outbox
        tele_seq = box.last_seq("telemetry")
        if box.durable and tele_seq == 0 and self.seqs.last("telemetry") > 0:
            box.lost_on_open = True  # an emptied or replaced database: its queue is gone
            self.log.error(
                "outbox_lost", path=str(outbox_path), seq_continues_above=self.seqs.last("telemetry")
            )
        self.coolant = CoolantMonitor(
            cfg.coolant,
            node=self.node,
            metrics=self.metrics,
            set_alarm=self.link.set_state,
            alarm_topic=self.topics.alarm,
            on_leak=self._on_leak,
        )
        self.coolant.attach(self.link)
        self.gates = GateTracker(cfg.gate.report_max_age_s, metrics=self.metrics)
        self.link.subscribe(f"{self.topics.base}/gate/+", self._on_gate_report)
        self.energy = EnergyMeter(cfg.energy.pue)
        self.reports = Reporter(
            cfg,
            node=self.node,
            topics=self.topics,
            link=self.link,
            metrics=self.metrics,
            coolant=self.coolant,
            gates=self.gates,
            energy=self.energy,
            backend_name=self.backend.name,
            seqs=self.seqs,
            incarnation=self.incarnation,
        )
        self.commands = CommandProcessor(
            cfg.commands,
            Actions(
                max_cap=cfg.control.max_cap,
                set_manual_ceiling=self._set_manual_ceiling,
                set_mpc_paused=self._set_mpc_paused,
                rebirth=lambda: self.reports.birth(),
                react=lambda: self.react().total,
                ack_leak=self.coolant.acknowledge,
            ),
        )
        if cfg.commands.enabled:
            self.link.subscribe(self.topics.cmd, self._on_command, inbox.SENSOR)
        self.cap: CapPublisher | None = None
        self.power: PowerLimitSink | None = None
        self.haproxy: HaproxySink | None = None
        self.sinks: list[DecisionSink] = []

    # -- views for tests and routes ------------------------------------------------------
    @property
    def flow_fraction(self) -> float:
        """The node's part of the measured flow: its weight's part of the rack's (1 outside a rack)."""
        return self.cfg.rack.flow_fraction(self.cfg.node.name)

    @property
    def cap_msg(self) -> Cap | None:
        return self.cap.cap_msg if self.cap else None

    @property
    def telemetry_seq(self) -> int:
        return self.reports.telemetry_seq

    @property
    def power_error(self) -> str | None:
        return self.power.error if self.power else None

    def status_line(self) -> str:
        return self.reports.status_line(self.cap_msg)

    # -- events between ticks -------------------------------------------------------------
    def _on_leak(self, event: LeakEvent) -> None:
        """The safety hook: runs inside the MQTT handler the moment a leak is parsed."""
        self.leak_events.append(event)
        self.log.warning("leak_event", sensor=event.sensor_id, state=event.state, latched=event.latched)
        if self.control is not None and self.poller is not None:
            self.react()  # the safety cap goes out now, not at the next tick
        if self.on_leak is not None:
            self.on_leak(event)

    def _on_gate_report(self, topic: str, payload: bytes) -> None:
        self.gates.handle(topic, payload)

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

    # -- control ----------------------------------------------------------------------
    def take_snapshot(self) -> snapmod.NodeSnapshot:
        """Freeze the GPUs, the coolant and the gates now."""
        assert self.poller is not None
        d = self.control.decision if self.control else None
        return snapmod.take(self.poller.gpus, self.coolant, self.gates, d.caps if d else None)

    def control_step(self, snap: snapmod.NodeSnapshot | None = None) -> Decision:
        """MPC then safety on a snapshot (default: one taken now), then every sink."""
        assert self.control is not None
        snap = snap or self.take_snapshot()
        share = self.rack.step(snap, self.control.decision) if self.rack is not None else None
        obs = snapmod.observation(snap, share, self.flow_fraction)
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
        share = self.rack.share if self.rack is not None else None
        decision = self.control.react(snapmod.observation(self.take_snapshot(), share, self.flow_fraction))
        self.apply(decision, force=True)
        return decision

    def apply(self, decision: Decision, *, force: bool = False) -> None:
        """Every sink gets the decision; one that fails is logged and does not stop the others."""
        for sink in self.sinks:
            try:
                sink.apply(decision, force=force)
            except Exception:
                self.log.exception("decision_sink_failed", sink=type(sink).__name__)

    def _nvml_call_metric(self) -> Callable[[Any], None]:
        fast, slow = (self.metrics.nvml_call_s.labels(kind) for kind in ("fast", "slow"))
        return lambda c: (slow if c.slow else fast).observe(c.seconds)

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
        try:
            self.infos = await asyncio.to_thread(self.backend.open)
        except SensorError as exc:
            hint = backends.OPEN_HINTS.get(self.backend.name)
            self.log.error("backend_open_failed", backend=self.backend.name, error=str(exc), hint=hint)
            return 1
        for info in self.infos:
            self.metrics.set_gpu_uuid(info.index, info.uuid)
        self.reports.host = backends.host_sensor()
        s = self.cfg.sensors
        self.poller = GpuPoller(
            self.backend,
            self.infos,
            read_timeout_s=s.read_timeout_s,
            slow_every=max(1, round(s.slow_period_s / s.poll_period_s)),
            retry_min_s=s.lost_retry_min_s,
            retry_max_s=s.lost_retry_max_s,
            on_call=self._nvml_call_metric(),
        )
        self.reports.gpus = self.poller.gpus
        self.control = ControlLoop.from_config(self.cfg, self.infos)
        self.reports.model_info = self.control.model_info
        if self.cfg.rack.members:
            self.rack = RackCoordinator(
                self.cfg,
                link=self.link,
                metrics=self.metrics,
                incarnation=self.incarnation,
                node_max_w=len(self.infos) * self.control.limits.gpu_power_max_w,
                rack_base=self.topics.base.rsplit("/", 1)[0],
            )
        self.cap = CapPublisher(
            self.cfg,
            node=self.node,
            topics=self.topics,
            link=self.link,
            metrics=self.metrics,
            control=self.control,
            seqs=self.seqs,
        )
        self.power = await asyncio.to_thread(
            PowerLimitSink.create, self.cfg, self.backend, self.infos, self.metrics, self.log
        )
        self.sinks = [self.cap] + ([self.power] if self.power else [])
        if self.cfg.actuators.haproxy is not None:
            self.haproxy = HaproxySink(self.cfg.actuators.haproxy, self.cfg.control.safe_cap)
            self.sinks.append(self.haproxy)
        self.log.info(
            "started",
            version=__version__,
            backend=self.backend.name,
            gpus=len(self.infos),
            topic=self.topics.base,
            broker=f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}",
        )
        if self.cfg.http.port:
            self.http = HttpServer(self.cfg.http.host, self.cfg.http.port, routes(self))
            try:
                await self.http.start()
            except OSError as exc:
                h = self.cfg.http
                self.log.error(
                    "http_bind_failed",
                    key="http.port",
                    error=f"cannot listen on {h.host}:{h.port}: {exc.strerror or exc}",
                    hint="another process holds http.port: set http.port to a free port, or 0 to turn HTTP off",
                )
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
            for sink in self.sinks:
                await sink.close()
            self.poller.close()
            if self.http is not None:
                await self.http.close()
            await asyncio.to_thread(self.backend.close)
            self.link.outbox.close()
            self.log.info("stopped")
        return 0

    def components(self) -> list[Any]:
        """Everything that takes a reloaded config (each has ``reconfigure(cfg)``)."""
        parts: list[Any] = [self.link, self.gates, self.energy, self.commands, self.reports]
        return parts + [
            c for c in (self.poller, self.control, self.cap, self.power, self.haproxy) if c is not None
        ]

    def reload(self) -> None:
        """SIGHUP: re-read the config; if valid apply what can change live, else keep running as is."""
        if self.reload_config is None:
            self.log.warning("reload_unsupported", reason="no config file to re-read")
            return
        self.notifier.reloading()
        try:
            try:
                new = self.reload_config()
                new, self.reload_kept = split_reload(self.cfg, new)
            except ConfigError as exc:
                self.log.error(
                    "reload_rejected", errors=[f"{k}: {r}" for k, r in exc.errors], kept="running config"
                )
                return
            except ValidationError as exc:  # a kept restart field no longer validates (e.g. a secret file)
                self.log.error("reload_rejected", errors=[str(exc)[:500]], kept="running config")
                return
            if new.log != self.cfg.log:
                logmod.configure(new.log.level, new.log.format)
            for part in self.components():
                part.reconfigure(new)
            self.cfg = new  # the tick loop reads its periods from here
            self.log.info("reloaded", needs_restart=self.reload_kept or None)
        finally:
            self.notifier.ready(self.status_line())

    async def _tick_loop(self) -> None:
        assert self.poller is not None
        start = time.monotonic()
        next_tick = start
        next_publish = start + self.cfg.telemetry.publish_period_s
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
            self.reports.rebirth_if_changed()
            window.add(gpus)
            self.coolant.check()
            now = time.monotonic()
            control_due, publish_due = now >= next_control, now >= next_publish
            if control_due or publish_due:
                snap = self.take_snapshot()  # control and telemetry of this tick see the same readings
                if control_due:
                    self.control_late_s.append(now - next_control)
                    self.control_step(snap)
                    next_control += control_every * max(1, int((now - next_control) // control_every) + 1)
                if publish_due:
                    msg = await self.reports.publish_window(window, snap)
                    if self.on_telemetry:
                        self.on_telemetry(msg)
                    self.notifier.status(self.status_line())
                    window = Window()
                    next_publish += publish_every * max(1, int((now - next_publish) // publish_every) + 1)
            next_tick += period
            if time.monotonic() - next_tick > period:  # overran: skip missed ticks, keep the phase
                next_tick += period * int((time.monotonic() - next_tick) // period)

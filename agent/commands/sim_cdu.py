"""``rackguard sim-cdu``: a simulated CDU and leak detectors publishing to the broker.

It publishes every coolant sensor declared in the config (``[[coolant.sensors]]``)
on its topic, in its declared format, from a coolant-loop model heated by the
node's GPUs (their power comes from the node's own telemetry; until the first
telemetry arrives, ``--heat-w``). ``--scenario FILE`` scripts faults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
from pydantic import ValidationError

from rackguard.agent import config as configmod
from rackguard.agent import log as logmod
from rackguard.agent.cli import EX_CONFIG
from rackguard.agent.mqtt import ClientFactory, ClientLike, Topics, aiomqtt_factory


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sim-cdu", help="simulate the rack's CDU and leak detectors over MQTT")
    p.add_argument("--config", type=Path, help="the agent's TOML config (its coolant sensors and broker)")
    p.add_argument("--scenario", type=Path, help="TOML fault schedule (see examples/cdu-*.toml)")
    p.add_argument("--period-s", type=float, default=0.5, help="publish period (default 0.5 s)")
    p.add_argument(
        "--heat-w",
        type=float,
        default=None,
        help="heat load until telemetry arrives (default: sim.gpus x 400 W)",
    )
    p.add_argument(
        "--duration-s", type=float, default=None, help="stop after this long (default: the scenario's)"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from rackguard.agent.commands.run import load_or_exit
    from rackguard.sim.cdu import Scenario

    cfg = load_or_exit(args.config)
    if isinstance(cfg, int):
        return cfg
    logmod.configure(cfg.log.level, cfg.log.format)
    scenario = Scenario()
    if args.scenario is not None:
        try:
            scenario = Scenario.load(args.scenario)
        except (OSError, ValueError) as exc:  # tomllib and pydantic errors are ValueErrors
            detail = (
                "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
                if isinstance(exc, ValidationError)
                else str(exc)
            )
            print(f"scenario error: {args.scenario}: {detail}", file=sys.stderr)
            return EX_CONFIG
    if not cfg.coolant.sensors:
        print("config error: coolant.sensors: no coolant sensors declared to simulate", file=sys.stderr)
        return EX_CONFIG
    return asyncio.run(run(cfg, scenario, args.period_s, args.heat_w, args.duration_s))


async def run(
    cfg: configmod.Config,
    scenario: object,
    period_s: float,
    heat_w: float | None,
    duration_s: float | None,
    factory: ClientFactory | None = None,
    stop: asyncio.Event | None = None,
    heat_source: Callable[[], float] | None = None,
    on_step: Callable[[Any], None] | None = None,
    tau_flow_s: float | None = None,
) -> int:
    """Publish until stopped (SIGTERM/SIGINT, or ``stop``) or the duration has passed.

    ``factory`` makes the MQTT clients (default: aiomqtt per ``cfg.mqtt``; the demo
    passes its in-process broker's). With ``[rack]`` members the CDU is the rack's: its
    nominal flow is ``sim.flow_lpm`` per member and its heat the sum of every member's
    telemetry (``heat_source`` overrides that: a benchmark reads the plants' true power).
    ``on_step`` gets the simulated CDU after every step.
    """
    from rackguard.sim.cdu import LoopParams, Scenario, SimCdu

    assert isinstance(scenario, Scenario)
    log = logmod.get("sim_cdu")
    members = max(1, len(cfg.rack.members))
    params = LoopParams(
        nominal_flow_lpm=cfg.sim.flow_lpm * members,
        supply_temp_c=cfg.sim.supply_temp_c,
        cp_j_per_kg_k=cfg.coolant.cp_j_per_kg_k,
        density_kg_per_l=cfg.coolant.density_kg_per_l,
    )
    if tau_flow_s is not None:
        params.tau_flow_s = tau_flow_s
    cdu = SimCdu(list(cfg.coolant.sensors), scenario, params, seed=cfg.sim.seed)
    state = {"heat_w": heat_w if heat_w is not None else cfg.sim.gpus * 400.0 * members}
    node_heat_w: dict[str, float] = {}
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
    duration_s = duration_s if duration_s is not None else scenario.duration_s
    telemetry_topic = Topics.for_node(cfg.node, cfg.mqtt.topic_prefix).telemetry
    # Its own availability topic, outside the agents' tree: a consumer of
    # ``rackguard/+/+/+/status`` sees only agents' status messages.
    status_topic = f"sim-cdu/{cfg.node.site}/{cfg.node.rack}/status"
    if cfg.rack.members:  # the rack's CDU: every member's heat
        telemetry_topic = f"{cfg.mqtt.topic_prefix}/{cfg.node.site}/{cfg.node.rack}/+/telemetry"
    factory = factory or aiomqtt_factory(
        cfg.mqtt, f"rackguard-sim-cdu-{cfg.node.site}-{cfg.node.rack}-{cfg.node.name}"
    )
    will = aiomqtt.Will(status_topic, b'{"state":"offline"}', qos=1, retain=True)
    log.info("sim_cdu_started", sensors=[s.id for s in cfg.coolant.sensors], events=len(scenario.events))

    async def listen(client: ClientLike) -> None:
        async for m in client.messages:
            try:
                doc = json.loads(bytes(m.payload) if isinstance(m.payload, bytes | bytearray) else b"")
                powers = [g["power_w"]["mean"] for g in doc["gpus"] if g.get("power_w")]
                if powers:
                    node_heat_w[str(m.topic)] = float(sum(powers))
                    state["heat_w"] = sum(node_heat_w.values())
            except (ValueError, KeyError, TypeError):
                continue

    start = time.monotonic()
    last = start
    while not stop.is_set():
        try:
            async with factory(will) as client:
                await client.subscribe(telemetry_topic, qos=0)
                listener = asyncio.create_task(listen(client))
                try:
                    await client.publish(status_topic, b'{"state":"online"}', qos=1, retain=True, timeout=5)
                    while not stop.is_set():
                        now = time.monotonic()
                        if duration_s is not None and now - start >= duration_s:
                            stop.set()
                            break
                        heat = heat_source() if heat_source is not None else state["heat_w"]
                        for ev in cdu.step(now - last, heat):
                            log.info("sim_cdu_event", t_s=round(cdu.loop.t_s, 2), fired=ev.model_dump())
                        last = now
                        if on_step is not None:
                            on_step(cdu)
                        for topic, payload in cdu.payloads(time.time()):
                            await client.publish(topic, payload, qos=1, retain=False, timeout=5)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), period_s)
                    await client.publish(status_topic, b'{"state":"offline"}', qos=1, retain=True, timeout=5)
                finally:
                    listener.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await listener
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            log.warning("sim_cdu_disconnected", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    log.info("sim_cdu_stopped", t_s=round(cdu.loop.t_s, 2))
    return 0

"""``rackguard demo``: a simulated node and CDU with an in-process broker; no GPU or broker needed.

It runs the real agent on the simulated backend and the simulated CDU (with a
scripted pump failure) over an in-process broker. A console consumer subscribed
to ``rackguard/#`` prints what an MQTT consumer would receive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from rackguard.agent import config as configmod
from rackguard.agent import log as logmod
from rackguard.agent.cli import EX_CONFIG

# The embedded default: a simulated 8-GPU node whose CDU and leak tray publish like a BMS gateway.
DEMO_CONFIG: dict[str, Any] = {
    "node": {"site": "demo", "rack": "r1", "name": "sim-node-1"},
    "sensors": {"backend": "sim"},
    "log": {"level": "error"},
    "http": {"port": 0},
    "coolant": {
        "subscribe": ["bms/demo/r1/#"],
        "sensors": [
            {"id": "cdu", "kind": "cdu", "topic": "bms/demo/r1/cdu", "format": "redfish", "max_age_s": 5.0},
            {
                "id": "leak-tray",
                "kind": "leak",
                "topic": "bms/demo/r1/sim-node-1/leak",
                "format": "redfish",
                "max_age_s": 10.0,
            },
        ],
    },
}
# At 20 s the CDU pump degrades to 40 % flow; at 45 s it is restored.
DEMO_SCENARIO: dict[str, Any] = {
    "events": [
        {"at_s": 20, "kind": "pump_failure", "flow_fraction": 0.4},
        {"at_s": 45, "kind": "pump_restore"},
    ]
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run a simulated node and CDU with a built-in broker; show live readings")
    p.add_argument("--config", type=Path, help="TOML config (default: the embedded simulated node)")
    p.add_argument("--scenario", type=Path, help="CDU fault scenario (default: pump failure at 20 s)")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (default: until Ctrl-C)")
    p.add_argument("--raw", action="store_true", help="print every published message as JSON")
    p.add_argument(
        "--rack", type=int, default=0, metavar="N", help="a rack of N nodes on one CDU (demo_rack.py)"
    )
    p.set_defaults(func=main)


def _fmt(v: Any, spec: str = ".1f", width: int = 6) -> str:
    return f"{v:{width}{spec}}" if isinstance(v, int | float) else f"{'-':>{width}}"


HEADER = (
    "  t_s  gpus  power_kw  die_max_c  hbm_max_c  supply_c  flow_lpm  flow_margin  cap_total  reason/binding"
)


class Console:
    """Turns published messages into console lines, as a consumer would see them."""

    def __init__(self) -> None:
        self.cap: dict[str, Any] | None = None
        self.t0: float | None = None

    def line(self, topic: str, body: dict[str, Any]) -> str | None:
        kind = topic.rsplit("/", 1)[-1]
        if "/alarm/" in topic:  # rackguard/<site>/<rack>/<node>/alarm/<sensor>
            return f"ALARM: {json.dumps(body)[:200]}"
        if kind == "cap":
            self.cap = body
            return None
        if kind == "status":
            if body.get("state") != "online":
                return f"status: {body.get('state')} ({body.get('reason') or 'no reason given'})"
            return f"status: {body.get('state')} ({len(body.get('gpus', []))} GPUs, backend {body.get('backend')})"
        if kind != "telemetry":
            return None
        gpus = body["gpus"]
        self.t0 = self.t0 if self.t0 is not None else body["t_s"]
        ok = sum(g["state"] == "ok" for g in gpus)
        power = sum(g["power_w"]["mean"] for g in gpus if g.get("power_w"))
        die = max((g["gpu_temp_c"]["max"] for g in gpus if g.get("gpu_temp_c")), default=None)
        hbm = max((g["mem_temp_c"]["max"] for g in gpus if g.get("mem_temp_c")), default=None)
        c = body.get("coolant") or {}
        cap = self.cap or {}
        why = f"{cap.get('reason', '-')}/{cap.get('binding', '-')}"
        return (
            f"{body['t_s'] - self.t0:5.0f}  {ok:>2d}/{len(gpus):<2d} {_fmt(power / 1000, '.2f', 8)}  "
            f"{_fmt(die, '.0f', 9)}  {_fmt(hbm, '.0f', 9)}  {_fmt(c.get('supply_temp_c'), '.1f', 8)}  "
            f"{_fmt(c.get('flow_lpm'), '.1f', 8)}  {_fmt(c.get('flow_margin'), '.2f', 11)}  "
            f"{_fmt(cap.get('total'), 'd', 9)}  {why}"
        )


async def _consume(client: Any, raw: bool) -> None:
    console = Console()
    print(HEADER, flush=True)
    async for m in client.messages:
        try:
            body = json.loads(m.payload)
        except ValueError:
            continue
        if not m.topic.startswith("rackguard/"):
            continue
        line = json.dumps({"topic": m.topic, "payload": body}) if raw else console.line(m.topic, body)
        if line:
            print(line, flush=True)


async def _demo(cfg: configmod.Config, scenario: Any, seconds: float, raw: bool) -> int:
    from rackguard.agent.commands import sim_cdu
    from rackguard.agent.daemon import Agent
    from rackguard.agent.localbus import LocalBroker
    from rackguard.sim.node import from_config, run_beside

    broker = LocalBroker()
    backend, servers = from_config(cfg)
    agent = Agent(cfg, backend, client_factory=broker.client)
    cdu_stop = asyncio.Event()
    async with broker.client() as consumer:
        await consumer.subscribe("rackguard/#")
        printer = asyncio.create_task(_consume(consumer, raw))
        run = asyncio.create_task(run_beside(agent.run(), servers, broker.client))
        cdu = None
        if cfg.coolant.sensors:
            cdu = asyncio.create_task(
                sim_cdu.run(cfg, scenario, 1.0, None, None, factory=broker.client, stop=cdu_stop)
            )
        if seconds:
            asyncio.get_running_loop().call_later(seconds, agent.request_stop, "demo finished")
        code = await run
        cdu_stop.set()
        if cdu is not None:
            await cdu
        await asyncio.sleep(0.05)  # let the consumer print the last messages
        printer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await printer
    return code


def main(args: argparse.Namespace) -> int:
    from rackguard.sim.cdu import Scenario

    if args.rack:
        from rackguard.agent.commands import demo_rack

        logmod.configure("error", "console")
        return asyncio.run(demo_rack.run(args.rack, args.seconds))

    try:
        if args.config is None:
            cfg = configmod.load(None, **DEMO_CONFIG)
        else:
            cfg = configmod.load(
                args.config, sensors={"backend": "sim"}, log={"level": "warning"}, http={"port": 0}
            )
        scenario = Scenario.load(args.scenario) if args.scenario else Scenario.model_validate(DEMO_SCENARIO)
    except configmod.ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EX_CONFIG
    except (OSError, ValueError) as exc:
        print(f"scenario error: {args.scenario}: {exc}", file=sys.stderr)
        return EX_CONFIG
    logmod.configure(cfg.log.level, "console" if sys.stderr.isatty() else cfg.log.format)
    print(
        f"rackguard demo: simulated {cfg.sim.gpus}-GPU node and CDU, in-process broker "
        f"(no GPU or broker needed). Topic {cfg.mqtt.topic_prefix}/{cfg.node.site}/{cfg.node.rack}/"
        f"{cfg.node.name}/#. The CDU pump fails at 20 s. Ctrl-C to stop.",
        flush=True,
    )
    return asyncio.run(_demo(cfg, scenario, args.seconds, args.raw))

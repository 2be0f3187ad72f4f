"""``rackguard demo``: a simulated node with an in-process broker; no GPU or broker needed.

It runs the real agent on the simulated backend. The transport is an in-process
broker, and a console consumer subscribed to ``rackguard/#`` prints what an
MQTT consumer would receive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from agent import config as configmod
from agent import log as logmod
from agent.cli import EX_CONFIG


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run a simulated node with a built-in broker and show live readings")
    p.add_argument("--config", type=Path, help="TOML config (default: a simulated 8-GPU node)")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (default: until Ctrl-C)")
    p.add_argument("--raw", action="store_true", help="print every published message as JSON")
    p.set_defaults(func=main)


def _fmt(v: Any, spec: str = ".1f", width: int = 6) -> str:
    return f"{v:{width}{spec}}" if isinstance(v, int | float) else f"{'-':>{width}}"


HEADER = " seq  gpus_ok  power_kw  die_max_c  hbm_max_c"


def render(topic: str, body: dict[str, Any]) -> str | None:
    """One console line for a published message (None to skip it)."""
    kind = topic.rsplit("/", 1)[-1]
    if kind == "status":
        return (
            f"status: {body.get('state')} ({len(body.get('gpus', []))} GPUs, backend {body.get('backend')})"
        )
    if kind != "telemetry":
        return f"{kind}: {json.dumps(body)[:160]}"
    gpus = body["gpus"]
    ok = sum(g["state"] == "ok" for g in gpus)
    power = sum(g["power_w"]["mean"] for g in gpus if g.get("power_w"))
    die = max((g["gpu_temp_c"]["max"] for g in gpus if g.get("gpu_temp_c")), default=None)
    hbm = max((g["mem_temp_c"]["max"] for g in gpus if g.get("mem_temp_c")), default=None)
    return f"{body['seq']:4d}  {ok:3d}/{len(gpus):<3d} {_fmt(power / 1000, '.2f', 8)}  {_fmt(die, '.0f', 9)}  {_fmt(hbm, '.0f', 9)}"


async def _consume(client: Any, raw: bool) -> None:
    print(HEADER, flush=True)
    async for m in client.messages:
        body = json.loads(m.payload)
        line = json.dumps({"topic": m.topic, "payload": body}) if raw else render(m.topic, body)
        if line:
            print(line, flush=True)


async def _demo(cfg: configmod.Config, seconds: float, raw: bool) -> int:
    from agent.daemon import Agent
    from agent.localbus import LocalBroker

    broker = LocalBroker()
    agent = Agent(cfg, client_factory=broker.client)
    async with broker.client() as consumer:
        await consumer.subscribe("rackguard/#")
        printer = asyncio.create_task(_consume(consumer, raw))
        run = asyncio.create_task(agent.run())
        if seconds:
            asyncio.get_running_loop().call_later(seconds, agent.request_stop, "demo finished")
        code = await run
        await asyncio.sleep(0.05)  # let the consumer print the last messages
        printer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await printer
    return code


def main(args: argparse.Namespace) -> int:
    try:
        cfg = configmod.load(
            args.config, sensors={"backend": "sim"}, log={"level": "warning"}, http={"port": 0}
        )
    except configmod.ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EX_CONFIG
    logmod.configure(cfg.log.level, "console" if sys.stderr.isatty() else cfg.log.format)
    print(
        f"rackguard demo: simulated {cfg.sim.gpus}-GPU node, in-process broker "
        f"(no GPU or broker needed). Topic {cfg.mqtt.topic_prefix}/{cfg.node.site}/{cfg.node.rack}/"
        f"{cfg.node.name}/#. Ctrl-C to stop.",
        flush=True,
    )
    return asyncio.run(_demo(cfg, args.seconds, args.raw))

"""``rackguard top``: a live terminal view of a node, a rack or a site, read from MQTT.

Keys: ``n``/``r``/``s`` show the node, its rack or its site; tab, ``j``/``k`` move
to the next or previous node; ``q`` quits. The broker, credentials, TLS and the node
to start on come from ``--config`` (an agent's config) and can be overridden.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import termios
import tty
from pathlib import Path

import aiomqtt

from rackguard.agent.config import Config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("top", help="live view of a node, rack or site from MQTT (keys: n r s, tab, q)")
    p.add_argument("--config", type=Path, help="an agent's TOML config (broker, credentials, node)")
    p.add_argument("--host", help="broker host (default: mqtt.host)")
    p.add_argument("--port", type=int, help="broker port (default: mqtt.port)")
    p.add_argument("--site", help="site (default: node.site of --config, else the first seen)")
    p.add_argument("--rack", help="rack (default: node.rack of --config)")
    p.add_argument("--node", help="node to start on (default: node.name of --config)")
    p.add_argument("--scope", choices=("node", "rack", "site"), default="node")
    p.add_argument("--refresh-s", type=float, default=0.5, help="redraw period (default 0.5 s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from rackguard.agent.commands.run import load_or_exit

    cfg = load_or_exit(args.config)
    if isinstance(cfg, int):
        return cfg
    mqtt = cfg.mqtt.model_copy(
        update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    )
    cfg = cfg.model_copy(update={"mqtt": mqtt})
    configured = args.config is not None
    site = args.site or (cfg.node.site if configured else None)
    rack = args.rack or (cfg.node.rack if configured else None)
    node = args.node or (cfg.node.name if configured else None)
    try:
        return asyncio.run(run(cfg, site, rack, node, args.scope, args.refresh_s))
    except KeyboardInterrupt:
        return 0


async def run(
    cfg: Config, site: str | None, rack: str | None, node: str | None, scope: str, refresh_s: float
) -> int:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    from rackguard.agent.mqtt import aiomqtt_factory
    from rackguard.agent.top import KEY_SCOPES, TopState

    state = TopState(cfg.mqtt.topic_prefix, site=site, rack=rack, node=node, scope=KEY_SCOPES[scope[0]])
    quit_ = asyncio.Event()
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None

    def on_key() -> None:
        assert fd is not None
        for ch in os.read(fd, 32).decode(errors="ignore"):
            if not state.key(ch):
                quit_.set()

    if fd is not None:
        tty.setcbreak(fd)
        loop.add_reader(fd, on_key)
    factory = aiomqtt_factory(cfg.mqtt, f"rackguard-top-{os.getpid()}")
    console = Console()
    status = "connecting to the broker ..."

    async def receive() -> None:
        nonlocal status
        while not quit_.is_set():
            try:
                async with factory(None) as client:
                    for f in state.topic_filters():
                        await client.subscribe(f, qos=0)
                    status = ""
                    async for m in client.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                        state.handle(str(m.topic), payload)
            except (aiomqtt.MqttError, OSError) as exc:
                status = f"broker {cfg.mqtt.host}:{cfg.mqtt.port} unreachable ({exc}); retrying"
                await asyncio.sleep(1.0)

    rx = asyncio.create_task(receive())
    try:
        with Live(state.render(), console=console, auto_refresh=False, screen=False) as live:
            while not quit_.is_set():
                view = state.render()
                live.update(Group(view, Text(status, style="yellow")) if status else view, refresh=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(quit_.wait(), refresh_s)
    finally:
        rx.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await rx
        if fd is not None and saved is not None:
            loop.remove_reader(fd)
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    return 0

"""``rackguard gateway``: the OpenAI-compatible admission gateway (agent/gateway/)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rackguard.agent import log as logmod
from rackguard.agent.cli import EX_CONFIG
from rackguard.agent.commands.run import load_or_exit

if TYPE_CHECKING:
    from rackguard.agent.gateway.server import Gateway


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("gateway", help="run the OpenAI-compatible admission gateway")
    p.add_argument("--config", type=Path, help="TOML config file, the agent's (its [gateway] section)")
    p.set_defaults(func=main)


async def serve(gateway: Gateway) -> int:
    """Run until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Every [gateway] key needs a restart (README reload table): SIGHUP must not kill it.
    loop.add_signal_handler(
        signal.SIGHUP, lambda: gateway.log.warning("reload_unsupported", reason="restart")
    )
    await gateway.start()
    gc.freeze()  # start-up objects (imports, config) leave the collector's scans: shorter GC pauses
    try:
        await stop.wait()
    finally:
        await gateway.close()
    return 0


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (about 1.5x the requests per CPU-second), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args.config)
    if isinstance(cfg, int):
        return cfg
    logmod.configure(cfg.log.level, cfg.log.format)
    from rackguard.agent.gateway.server import Gateway

    try:
        gateway = Gateway(cfg)
    except (OSError, ValueError) as exc:  # the API keys file: unreadable, or a bad line
        print(f"config error: gateway.api_keys_file: {exc}", file=sys.stderr)
        return EX_CONFIG
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(serve(gateway))

"""``rackguard run``: the daemon."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from rackguard.agent import config as configmod
from rackguard.agent import log as logmod
from rackguard.agent.cli import EX_CONFIG


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the agent")
    p.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    p.add_argument("--sim", action="store_true", help="use the simulated GPU backend (sensors.backend = sim)")
    p.set_defaults(func=main)


def load(path: Path | None, *, sim: bool = False) -> configmod.Config:
    """The config ``run`` starts with and re-reads on SIGHUP (raises ConfigError).

    ``check-config`` calls this same function (through :func:`load_or_exit`), so it rejects exactly
    what ``run`` would: every key, every secret and TLS file.
    """
    cfg = configmod.load(path)
    if sim:
        cfg = cfg.model_copy(update={"sensors": cfg.sensors.model_copy(update={"backend": "sim"})})
    return cfg


def load_or_exit(path: Path | None, *, sim: bool = False) -> configmod.Config | int:
    """Load the config; on error print every bad key to stderr and return 78."""
    try:
        return load(path, sim=sim)
    except configmod.ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EX_CONFIG


def main(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args.config, sim=args.sim)
    if isinstance(cfg, int):
        return cfg
    logmod.configure(cfg.log.level, cfg.log.format)
    from rackguard.agent.daemon import Agent

    def reload() -> configmod.Config:
        """SIGHUP: the same file, validated again (raises ConfigError)."""
        return load(args.config, sim=args.sim)

    if cfg.sensors.backend != "sim":
        return asyncio.run(Agent(cfg, reload_config=reload).run())
    # A simulated node: its GPUs are the agent's backend; its inference servers obey the cap over MQTT.
    from rackguard.agent.mqtt import aiomqtt_factory
    from rackguard.sim.node import from_config, run_beside

    backend, servers = from_config(cfg)
    factory = aiomqtt_factory(cfg.mqtt, f"rackguard-sim-{cfg.node.site}-{cfg.node.rack}-{cfg.node.name}")
    return asyncio.run(run_beside(Agent(cfg, backend, reload_config=reload).run(), servers, factory))

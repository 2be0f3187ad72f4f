"""The ``rackguard`` command line.

Each subcommand lives in its own module under ``agent/commands/`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (returning an
exit code). Modules are imported lazily so ``rackguard --version`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rackguard.agent import __version__

EX_CONFIG = 78

# Subcommand modules, in the order they appear in --help.
COMMANDS = (
    "run",
    "gateway",
    "haproxy_follow",
    "check_config",
    "schema",
    "demo",
    "top",
    "cmd",
    "model",
    "bench",
    "sim_cdu",
    "restore_power_limits",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rackguard", description="Keeps liquid-cooled GPU racks safe and busy."
    )
    parser.add_argument("--version", action="version", version=f"rackguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"rackguard.agent.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"rackguard.agent.commands.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""``rackguard check-config FILE``: validate a config; exit 0 or 78."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rackguard.agent.commands.run import load_or_exit


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check-config", help="validate a config file (exit 0 if valid, 78 if not)")
    p.add_argument("file", type=Path)
    p.add_argument("--print", action="store_true", help="print the effective config (secrets are only paths)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args.file)
    if isinstance(cfg, int):
        return cfg
    if args.print:
        print(json.dumps(cfg.redacted(), indent=2))
    else:
        print(f"{args.file}: ok")
    return 0

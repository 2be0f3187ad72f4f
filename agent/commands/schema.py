"""``rackguard schema``: the JSON Schema of every published message."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("schema", help="print the JSON Schema of every published message")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from rackguard.agent.messages import schemas

    print(json.dumps(schemas(), indent=2))
    return 0

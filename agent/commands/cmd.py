"""``rackguard cmd <node> <command> [args]``: send one operator command and print its ack.

``<node>`` is ``site/rack/node``, or a node name with ``--site``/``--rack`` (default:
``node.site``/``node.rack`` of ``--config``). The command gets a fresh ``id`` and the
current ``t_s``; ``--sign-key FILE`` signs it with the HMAC key in FILE (first line,
as the agent reads ``commands.hmac_secret_file``). It subscribes to ``.../cmd/ack``
first, publishes on ``.../cmd`` (QoS 1) and prints the ack as JSON. Exit 0 when the
command was accepted, 1 when rejected, 2 when no ack came within ``--timeout-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt

# CLI verb -> (agent command, argument name or None)
VERBS: dict[str, tuple[str, str | None]] = {
    "set-ceiling": ("set_manual_ceiling", "ceiling"),
    "clear-ceiling": ("clear_manual_ceiling", None),
    "pause-mpc": ("pause_mpc", None),
    "resume-mpc": ("resume_mpc", None),
    "ack-leak": ("ack_leak", "sensor"),
    "rebirth": ("rebirth", None),
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "cmd",
        help="send an operator command to a node and print the ack",
        description="Commands: set-ceiling N, clear-ceiling, pause-mpc, resume-mpc, ack-leak [SENSOR], rebirth.",
    )
    p.add_argument("node", help="site/rack/node, or a node name (with --site/--rack or --config)")
    p.add_argument("verb", choices=sorted(VERBS), help="the command")
    p.add_argument(
        "arg", nargs="?", help="set-ceiling: the per-GPU ceiling; ack-leak: the detector (default: all)"
    )
    p.add_argument("--sign-key", type=Path, help="HMAC-SHA256 key file (commands.hmac_secret_file)")
    p.add_argument("--config", type=Path, help="a TOML config for the broker, credentials, site and rack")
    p.add_argument("--host", help="broker host (default: mqtt.host)")
    p.add_argument("--port", type=int, help="broker port (default: mqtt.port)")
    p.add_argument("--site", help="site (default: node.site of --config)")
    p.add_argument("--rack", help="rack (default: node.rack of --config)")
    p.add_argument(
        "--timeout-s", type=float, default=10.0, help="how long to wait for the ack (default 10 s)"
    )
    p.set_defaults(func=main)


def build(verb: str, arg: str | None) -> dict[str, Any]:
    """The command object (without signature), with a fresh id and the current time.

    Raises:
        ValueError: a missing or malformed argument.
    """
    command, field = VERBS[verb]
    body: dict[str, Any] = {
        "command": command,
        "id": f"cli-{uuid.uuid4().hex[:16]}",
        "t_s": round(time.time(), 3),
    }
    if field == "ceiling":
        if arg is None or not arg.isdigit():
            raise ValueError("set-ceiling needs a whole number of requests per GPU, e.g. set-ceiling 16")
        body["ceiling"] = int(arg)
    elif field == "sensor":
        if arg is not None:
            body["sensor"] = arg
    elif arg is not None:
        raise ValueError(f"{verb} takes no argument (got {arg!r})")
    return body


def main(args: argparse.Namespace) -> int:
    from rackguard.agent.commands.run import load_or_exit
    from rackguard.agent.config import read_secret
    from rackguard.agent.operator_commands import signed_payload

    cfg = load_or_exit(args.config)
    if isinstance(cfg, int):
        return cfg
    mqtt = cfg.mqtt.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v})
    parts = args.node.split("/")
    if len(parts) == 3:
        site, rack, node = parts
    elif len(parts) == 1:
        site, rack, node = args.site or cfg.node.site, args.rack or cfg.node.rack, parts[0]
    else:
        print(f"error: node {args.node!r}: give site/rack/node or a node name", file=sys.stderr)
        return 2
    try:
        body = build(args.verb, args.arg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.sign_key is not None:
        try:
            secret = read_secret(args.sign_key).get_secret_value()
        except OSError as exc:
            print(f"error: --sign-key {args.sign_key}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        payload = signed_payload(body, secret)
    else:
        payload = json.dumps(body, separators=(",", ":")).encode()
    base = f"{mqtt.topic_prefix}/{site}/{rack}/{node}"
    from rackguard.agent.mqtt import aiomqtt_factory

    factory = aiomqtt_factory(mqtt, f"rackguard-cmd-{os.getpid()}")
    try:
        ack = asyncio.run(send(factory, base, payload, body["id"], args.timeout_s))
    except (aiomqtt.MqttError, OSError) as exc:
        print(f"error: broker {mqtt.host}:{mqtt.port}: {exc}", file=sys.stderr)
        return 2
    if ack is None:
        print(
            f"error: no ack on {base}/cmd/ack within {args.timeout_s:g} s "
            "(is the agent running, with commands.enabled, and may you publish to its cmd topic?)",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(ack))
    return 0 if ack.get("accepted") else 1


async def send(factory: Any, base: str, payload: bytes, cid: str, timeout_s: float) -> dict[str, Any] | None:
    """Subscribe to the acks, publish the command, return its ack (None on timeout)."""
    async with factory(None) as client:
        await client.subscribe(f"{base}/cmd/ack", qos=1)
        await client.publish(f"{base}/cmd", payload, qos=1, retain=False, timeout=timeout_s)

        async def wait() -> dict[str, Any] | None:
            async for m in client.messages:
                with contextlib.suppress(ValueError, TypeError):
                    doc = json.loads(m.payload)
                    if isinstance(doc, dict) and doc.get("id") == cid:
                        return doc
            return None

        try:
            return await asyncio.wait_for(wait(), timeout_s)
        except TimeoutError:
            return None

"""``rackguard haproxy-follow``: HAProxy's ``maxconn`` follows the cap, even when the agent dies.

The agent's ``[actuators.haproxy]`` sink sets ``maxconn`` on every decision, and
``safe_cap`` when it stops. A killed agent sets nothing; this small process, run beside
HAProxy, follows the retained cap like a gate (:class:`rackguard.agent.gate.CapRules`:
expiry, the agent's ``offline`` will) and writes ``safe_cap`` per GPU when no cap is valid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

import aiomqtt

from rackguard.agent import config as configmod
from rackguard.agent import log as logmod
from rackguard.agent.cli import EX_CONFIG
from rackguard.agent.commands.run import load_or_exit
from rackguard.agent.gate import TICK_S, CapRules, mqtt_client
from rackguard.agent.haproxy import HaproxyError, HaproxyRuntime, maxconns
from rackguard.agent.mqtt import Topics


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "haproxy-follow", help="keep HAProxy's maxconn on the cap (safe_cap if the agent dies)"
    )
    p.add_argument("--config", type=Path, help="the agent's TOML config (its [actuators.haproxy])")
    p.set_defaults(func=main)


class Follower:
    """Cap messages in, ``set maxconn`` out (only when a server's value changes)."""

    def __init__(self, cfg: configmod.Config) -> None:
        assert cfg.actuators.haproxy is not None
        self.cfg, self.hcfg = cfg, cfg.actuators.haproxy
        self.rules = CapRules(cfg.control.safe_cap)
        self.caps: list[int] | None = None
        self.runtime = HaproxyRuntime(self.hcfg.socket, self.hcfg.timeout_s)
        self.written: dict[str, int] = {}
        self.log = logmod.get("haproxy_follow")

    def take_cap(self, payload: bytes, expiry_s: float | None) -> None:
        if self.rules.take_cap(payload, "mqtt", expiry_s) is None and self.rules.cap is not None:
            self.caps = [int(c) for c in json.loads(payload)["caps"]]

    async def sync(self) -> None:
        caps = self.caps if self.rules.valid() else None
        want = maxconns(self.hcfg, caps, self.cfg.control.safe_cap)
        for server, n in want.items():
            if self.written.get(server) == n:
                continue
            try:
                await asyncio.to_thread(self.runtime.set_maxconn, self.hcfg.backend, server, n)
            except HaproxyError as exc:
                self.log.error("haproxy_write_failed", error=str(exc))
                return
            self.written[server] = n
            self.log.info("haproxy_maxconn", server=server, maxconn=n, valid_cap=caps is not None)

    async def run(self, stop: asyncio.Event) -> None:
        m = self.cfg.mqtt
        topics = Topics.for_node(self.cfg.node, m.topic_prefix)
        ticker = asyncio.create_task(self._tick(stop))
        try:
            while not stop.is_set():
                pw = m.password()
                try:
                    async with mqtt_client(
                        m.host,
                        m.port,
                        identifier=f"rackguard-haproxy-{self.cfg.node.name}",
                        keepalive_s=m.keepalive_s,
                        username=m.username,
                        password=pw.get_secret_value() if pw else None,
                        ca_file=m.tls.ca_file if m.tls else None,
                        cert_file=m.tls.cert_file if m.tls else None,
                        key_file=m.tls.key_file if m.tls else None,
                    ) as client:
                        await client.subscribe(topics.cap, qos=1)
                        await client.subscribe(topics.status, qos=1)
                        async for msg in client.messages:
                            payload = msg.payload if isinstance(msg.payload, bytes) else b""
                            if str(msg.topic) == topics.status:
                                self.rules.take_status(payload)
                            else:
                                props = msg.properties
                                expiry = getattr(props, "MessageExpiryInterval", None) if props else None
                                self.take_cap(payload, float(expiry) if expiry is not None else None)
                            await self.sync()
                except aiomqtt.MqttError as exc:
                    self.log.warning("haproxy_follow_mqtt", error=str(exc))
                    await asyncio.sleep(m.reconnect_min_s)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker

    async def _tick(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sync()  # expiry: safe_cap without any message
            await asyncio.sleep(TICK_S)


async def _serve(cfg: configmod.Config) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(Follower(cfg).run(stop))
    await stop.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return 0


def main(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args.config)
    if isinstance(cfg, int):
        return cfg
    if cfg.actuators.haproxy is None:
        print("config error: actuators.haproxy: not set", file=sys.stderr)
        return EX_CONFIG
    logmod.configure(cfg.log.level, cfg.log.format)
    return asyncio.run(_serve(cfg))

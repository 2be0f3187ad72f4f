"""Operator commands on ``.../cmd`` through a real mosquitto: rejections with reasons, effects."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from rackguard.agent import config as configmod
from rackguard.agent.config import CommandsConfig
from rackguard.agent.daemon import Agent
from rackguard.agent.operator_commands import Actions, CommandProcessor, sign, signed_payload
from rackguard.sim.node import SimBackend

SECRET = "s3cret-for-tests-32-bytes-or-more"  # commands.hmac_secret_file needs >= 32 bytes
BASE = "rackguard/t/r1/cmd-node"


def make_cfg(broker: Any, secret_file: Path) -> configmod.Config:
    return configmod.validate(
        {
            "node": {"site": "t", "rack": "r1", "name": "cmd-node"},
            "mqtt": {"host": broker.host, "port": broker.port, "keepalive_s": 5},
            "sensors": {"backend": "sim", "poll_period_s": 0.05, "slow_period_s": 0.1},
            "telemetry": {"publish_period_s": 0.5},
            "control": {"period_s": 0.2, "max_cap": 64, "safe_cap": 4},
            "http": {"port": 0},
            "sim": {"gpus": 2},
            "commands": {"hmac_secret_file": str(secret_file), "require_signature": True},
        }
    )


class Pub:
    def __init__(self, broker: Any) -> None:
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()

    def send(self, payload: bytes) -> None:
        self.c.publish(f"{BASE}/cmd", payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def cmd(command: str, cid: str, **kw: Any) -> dict[str, Any]:
    return {"command": command, "id": cid, "t_s": time.time(), **kw}


async def ack_for(sub: Any, cid: str | None, after: int = 0) -> dict[str, Any]:
    def pred(m: Any) -> bool:
        return m.topic == f"{BASE}/cmd/ack" and m.json()["id"] == cid

    hits = await asyncio.to_thread(sub.wait_for, pred, 10.0, after + 1)
    return dict(hits[after].json())


async def test_commands_rejected_with_reasons_and_valid_ones_act(broker, subscriber, tmp_path) -> None:  # type: ignore[no-untyped-def]
    secret_file = tmp_path / "cmd-hmac"
    secret_file.write_text(SECRET + "\n")
    backend = SimBackend(2)
    agent = Agent(make_cfg(broker, secret_file), backend)
    sub = subscriber(broker, f"{BASE}/#")
    task = asyncio.create_task(agent.run())
    pub = Pub(broker)
    try:
        await asyncio.to_thread(sub.wait_for, lambda m: m.topic == f"{BASE}/cap", 15.0)

        # Unsigned (signing is required).
        pub.send(json.dumps(cmd("pause_mpc", "u1")).encode())
        a = await ack_for(sub, "u1")
        assert not a["accepted"] and a["reason"].startswith("unsigned") and a["command"] == "pause_mpc"
        # Forged: signed with the wrong key.
        pub.send(signed_payload(cmd("pause_mpc", "f1"), "wrong-key"))
        a = await ack_for(sub, "f1")
        assert not a["accepted"] and a["reason"].startswith("forged")
        # Malformed: not JSON; an unknown key (e.g. trying to switch safety off); an unknown command.
        pub.send(b"\xff{nope")
        a = await ack_for(sub, None)
        assert not a["accepted"] and a["reason"].startswith("malformed")
        pub.send(signed_payload(cmd("pause_mpc", "m1", safety=False), SECRET))
        a = await ack_for(sub, "m1")
        assert not a["accepted"] and "safety: unknown key" in a["reason"]
        pub.send(signed_payload(cmd("disable_safety", "m2"), SECRET))
        a = await ack_for(sub, "m2")
        assert not a["accepted"] and a["reason"].startswith("malformed")
        # Out of bounds: a ceiling above control.max_cap.
        pub.send(signed_payload(cmd("set_manual_ceiling", "b1", ceiling=65), SECRET))
        a = await ack_for(sub, "b1")
        assert not a["accepted"] and a["reason"].startswith("out of bounds")
        # Stale timestamp (outside the ±30 s window).
        old = cmd("pause_mpc", "s1") | {"t_s": time.time() - 120}
        pub.send(signed_payload(old, SECRET))
        a = await ack_for(sub, "s1")
        assert not a["accepted"] and "stale" in a["reason"]
        assert agent.control is not None and not agent.control.paused

        # Valid: a manual ceiling lowers the cap at once (published with reason manual).
        pub.send(signed_payload(cmd("set_manual_ceiling", "ok1", ceiling=3), SECRET))
        a = await ack_for(sub, "ok1")
        assert a["accepted"] and a["reason"] == "ok" and a["cap_total"] <= 6

        def capped(m: Any) -> bool:
            if m.topic != f"{BASE}/cap":
                return False
            p = m.json()
            return bool(p["manual_ceiling"] == 3 and max(p["caps"]) <= 3)

        await asyncio.to_thread(sub.wait_for, capped, 5.0)
        # Replayed: the same signed bytes again.
        same = signed_payload(cmd("clear_manual_ceiling", "r1"), SECRET)
        pub.send(same)
        assert (await ack_for(sub, "r1"))["accepted"]
        pub.send(same)
        a = await ack_for(sub, "r1", after=1)
        assert not a["accepted"] and a["reason"].startswith("replayed")

        # Pause holds the MPC's proposal while the safety layer still acts.
        pub.send(signed_payload(cmd("pause_mpc", "p1"), SECRET))
        assert (await ack_for(sub, "p1"))["accepted"]
        held = agent.control.proposed
        await asyncio.sleep(0.6)  # three control periods
        assert agent.control.paused and agent.control.proposed is held
        backend.lose_gpu(1)
        lost = await asyncio.to_thread(
            sub.wait_for, lambda m: m.topic == f"{BASE}/cap" and m.json()["reason"] == "gpu_lost", 10.0
        )
        assert lost[0].json()["mpc_paused"] is True and max(lost[0].json()["caps"]) <= 4
        assert agent.control.proposed is held
        backend.restore_gpu(1)
        pub.send(signed_payload(cmd("resume_mpc", "p2"), SECRET))
        assert (await ack_for(sub, "p2"))["accepted"]
        assert not agent.control.paused

        # Rebirth re-publishes the birth message.
        def online(m: Any) -> bool:
            return m.topic == f"{BASE}/status" and m.json()["state"] == "online"

        births = len(await asyncio.to_thread(sub.wait_for, online, 5.0))
        pub.send(signed_payload(cmd("rebirth", "rb1"), SECRET))
        assert (await ack_for(sub, "rb1"))["accepted"]
        await asyncio.to_thread(sub.wait_for, online, 5.0, births + 1)

        # Leak acknowledgement goes to the coolant monitor (no detector declared here).
        pub.send(signed_payload(cmd("ack_leak", "l1", sensor="nope"), SECRET))
        a = await ack_for(sub, "l1")
        assert not a["accepted"] and a["reason"].startswith("unknown sensor")
        pub.send(signed_payload(cmd("ack_leak", "l2"), SECRET))
        a = await ack_for(sub, "l2")
        assert a["accepted"] and "nothing cleared" in a["reason"]

        acks = [m for m in sub.messages if m.topic == f"{BASE}/cmd/ack"]
        assert all(not m.retain for m in acks)
        assert SECRET not in b"".join(m.payload for m in acks).decode()
    finally:
        pub.close()
        agent.request_stop("test")
        assert await asyncio.wait_for(task, 10) == 0


def processor(**cfg: Any) -> tuple[CommandProcessor, list[tuple[str, Any]]]:
    calls: list[tuple[str, Any]] = []
    actions = Actions(
        max_cap=16,
        set_manual_ceiling=lambda c: calls.append(("ceiling", c)),
        set_mpc_paused=lambda p: calls.append(("paused", p)),
        rebirth=lambda: calls.append(("rebirth", None)),
        react=lambda: calls.append(("react", None)) or 7,  # type: ignore[func-returns-value]
        ack_leak=None,
    )
    return CommandProcessor(CommandsConfig(**cfg), actions, clock=lambda: 1000.0), calls


def test_processor_unsigned_mode_bounds_and_replay_window() -> None:
    p, calls = processor()
    ok = p.handle(
        json.dumps({"command": "set_manual_ceiling", "id": "a", "t_s": 1000.0, "ceiling": 2}).encode()
    )
    assert ok.accepted and ok.cap_total == 7 and calls == [("ceiling", 2), ("react", None)]
    for payload, why in [
        (b"[1, 2]", "malformed: not a JSON object"),
        (b"x" * 5000, "malformed: payload over"),
        (json.dumps({"command": "pause_mpc", "id": "b", "t_s": 1031.0}).encode(), "replayed or stale"),
        (json.dumps({"command": "pause_mpc", "id": "a", "t_s": 1000.0}).encode(), "replayed: id"),
        (
            json.dumps({"command": "pause_mpc", "id": "bad id!", "t_s": 1000.0}).encode(),
            "malformed: pause_mpc.id",
        ),
        (
            json.dumps({"command": "set_manual_ceiling", "id": "c", "t_s": 1e3, "ceiling": -1}).encode(),
            "malformed",
        ),
        (json.dumps({"command": "ack_leak", "id": "d", "t_s": 1000.0}).encode(), "unavailable"),
        (json.dumps({"signed": "{}", "sig": "0" * 64}).encode(), "unverifiable"),
    ]:
        out = p.handle(payload)
        assert not out.accepted and out.reason.startswith(why), (payload[:60], out.reason)
    assert calls == [("ceiling", 2), ("react", None)]  # nothing rejected had an effect


def test_signature_is_hmac_sha256_of_the_signed_bytes(tmp_path: Path) -> None:
    import hashlib
    import hmac

    body = b'{"command":"rebirth","id":"x","t_s":1000}'
    assert sign(body, SECRET) == hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    secret_file = tmp_path / "k"
    secret_file.write_text(SECRET)
    p, calls = processor(hmac_secret_file=secret_file, require_signature=True)
    env = {"signed": body.decode(), "sig": sign(body, SECRET).upper()}
    assert p.handle(json.dumps(env).encode()).accepted and calls == [("rebirth", None)]
    with pytest.raises(configmod.ConfigError):
        configmod.validate({"commands": {"require_signature": True}})


async def rackguard_cmd(broker: Any, *args: str) -> tuple[int, dict[str, Any] | None, str]:
    """Run ``rackguard cmd`` as an operator would; return its exit code, printed ack and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rackguard.agent.cli",
        "cmd",
        *args,
        "--host",
        broker.host,
        "--port",
        str(broker.port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode().strip()
    return proc.returncode or 0, json.loads(text) if text else None, err.decode()


async def test_rackguard_cmd_signs_sends_and_prints_the_ack(broker, subscriber, tmp_path) -> None:  # type: ignore[no-untyped-def]
    secret_file = tmp_path / "cmd-hmac"
    secret_file.write_text(SECRET + "\n")
    agent = Agent(make_cfg(broker, secret_file), SimBackend(2))
    sub = subscriber(broker, f"{BASE}/cap")
    task = asyncio.create_task(agent.run())
    try:
        await asyncio.to_thread(sub.wait_for, lambda m: True, 15.0)
        code, ack, err = await rackguard_cmd(
            broker, "t/r1/cmd-node", "set-ceiling", "3", "--sign-key", str(secret_file)
        )
        assert code == 0, err
        assert ack is not None and ack["accepted"] and ack["command"] == "set_manual_ceiling"
        assert ack["cap_total"] == 6 and ack["id"].startswith("cli-")  # 2 GPUs x 3
        cap = (await asyncio.to_thread(sub.wait_for, lambda m: m.json()["manual_ceiling"] == 3, 5.0))[
            0
        ].json()
        assert cap["caps"] == [3, 3] and cap["reason"] == "manual"

        # Unsigned, while the agent requires signatures: the ack says why, exit 1.
        code, ack, _ = await rackguard_cmd(broker, "t/r1/cmd-node", "pause-mpc")
        assert code == 1 and ack is not None and ack["reason"].startswith("unsigned")
        # A wrong key is a forgery.
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-key\n")
        code, ack, _ = await rackguard_cmd(broker, "t/r1/cmd-node", "clear-ceiling", "--sign-key", str(wrong))
        assert code == 1 and ack is not None and ack["reason"] == "forged: bad signature"
        code, ack, _ = await rackguard_cmd(
            broker, "t/r1/cmd-node", "clear-ceiling", "--sign-key", str(secret_file)
        )
        assert code == 0 and ack is not None and ack["accepted"] and agent.control is not None
        assert agent.control.manual_ceiling is None
        # A bad argument never reaches the broker; no agent there: no ack, exit 2.
        code, ack, err = await rackguard_cmd(broker, "t/r1/cmd-node", "set-ceiling", "lots")
        assert code == 2 and ack is None and "set-ceiling needs a whole number" in err
        code, ack, err = await rackguard_cmd(broker, "t/r1/nobody", "rebirth", "--timeout-s", "1")
        assert code == 2 and ack is None and "no ack on rackguard/t/r1/nobody/cmd/ack" in err
    finally:
        agent.request_stop("test")
        assert await asyncio.wait_for(task, 10) == 0

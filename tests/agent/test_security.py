"""Let no one in: TLS with a test CA, client certs, passwords, the shipped ACL, and no leaked secrets."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from rackguard.agent import config as configmod
from rackguard.agent import log as logmod
from rackguard.agent.daemon import Agent
from rackguard.agent.gate import Gate
from rackguard.agent.gateway.server import Gateway
from tests.conftest import Broker, BrokerFactory

REPO = Path(__file__).resolve().parents[2]
ACL = REPO / "systemd" / "mosquitto-acl.example"
NODE = "rackguard-site1-rackA-node07"
OTHER = "rackguard-site1-rackA-node08"
CMD = "rackguard/site1/rackA/node07/cmd"
GATE = "rackguard-gate-site1-rackA-node07"
USERS = [NODE, OTHER, "rackguard-consumer", "rackguard-operator", GATE]
NOT_AUTHORIZED = 0x87


@dataclass
class Pki:
    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA, a server cert for IP 127.0.0.1, and a client cert per user."""
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=rackguard test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ext in [("server", True), *((u, False) for u in USERS)]:
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.crt",
            *(["-extfile", "san.ext"] if ext else []),
            cwd=d,
        )
    return Pki(d)


def password_of(user: str) -> str:
    return f"pw-{user}-Zq8!s3cr3t"


@pytest.fixture
def secure_broker(broker_factory: BrokerFactory, pki: Pki, tmp_path: Path) -> Broker:
    pwfile = tmp_path / "passwd"
    for i, user in enumerate(USERS):
        flags = ["-c"] if i == 0 else []
        subprocess.run(["mosquitto_passwd", *flags, "-b", str(pwfile), user, password_of(user)], check=True)
    return broker_factory(
        "\n".join(
            [
                f"user {getpass.getuser()}",  # stay us: no privilege drop away from the tmp files
                f"cafile {pki.ca}",
                f"certfile {pki.path('server.crt')}",
                f"keyfile {pki.path('server.key')}",
                "require_certificate true",
                f"password_file {pwfile}",
                f"acl_file {ACL}",
            ]
        ),
        anonymous=False,
    )


class Client:
    """A synchronous paho MQTT 5 client over TLS; records messages and PUBACK reason codes."""

    def __init__(self, broker: Broker, pki: Pki, user: str | None, *, cert: str | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.pubacks: dict[int, int] = {}
        self.connack: Any = None
        self.done = threading.Event()
        c = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"t-{user}-{time.monotonic_ns()}",
            protocol=paho.MQTTv5,
        )
        cert = cert or user
        if cert:
            c.tls_set(
                ca_certs=str(pki.ca),
                certfile=str(pki.path(f"{cert}.crt")),
                keyfile=str(pki.path(f"{cert}.key")),
            )
        if user:
            c.username_pw_set(user, password_of(user))
        c.on_connect = self._on_connect
        c.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.__setitem__(mid, rc.value)
        c.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        c.connect(broker.host, broker.port, keepalive=10)
        c.loop_start()
        self.client = c
        assert self.done.wait(10), "no CONNACK"

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connack = rc
        self.done.set()

    @property
    def ok(self) -> bool:
        return not self.connack.is_failure

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        time.sleep(0.3)

    def publish(self, topic: str, payload: bytes = b'{"command":"pause"}') -> int:
        """Publish QoS 1; return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + 10
        while info.mid not in self.pubacks and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def node_config(broker: Broker, pki: Pki, tmp_path: Path) -> configmod.Config:
    return configmod.validate(
        {
            "node": {"site": "site1", "rack": "rackA", "name": "node07"},
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "username": NODE,
                "password_file": "mqtt-password",  # relative: from $CREDENTIALS_DIRECTORY
                "tls": {
                    "ca_file": str(pki.ca),
                    "cert_file": str(pki.path(f"{NODE}.crt")),
                    "key_file": str(pki.path(f"{NODE}.key")),
                },
                "reconnect_min_s": 0.2,
                "reconnect_max_s": 1.0,
            },
            "sensors": {"backend": "sim", "poll_period_s": 0.1},
            "sim": {"gpus": 2},
            "telemetry": {"publish_period_s": 0.2},
            "outbox": {"path": str(tmp_path / "outbox.sqlite")},
            "http": {"port": 0},
            "log": {"level": "debug", "format": "json"},
        }
    )


def test_tls_password_acl(
    secure_broker: Broker,
    pki: Pki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text(password_of(NODE) + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = node_config(secure_broker, pki, tmp_path)
    assert cfg.mqtt.password_file == creds / "mqtt-password"

    consumer = Client(secure_broker, pki, "rackguard-consumer")
    consumer.subscribe("rackguard/#")
    listener = Client(secure_broker, pki, NODE)  # the node's own subscription to its cmd topic
    listener.subscribe(CMD)
    logmod.configure("debug", "json")
    agent = Agent(cfg)

    (creds / "gate-password").write_text(password_of(GATE) + "\n")
    tls = {"ca_file": pki.ca, "cert_file": pki.path(f"{GATE}.crt"), "key_file": pki.path(f"{GATE}.key")}
    gate = Gate(
        node_topic="rackguard/site1/rackA/node07",
        safe_cap=1,
        gpu=0,
        host=secure_broker.host,
        port=secure_broker.port,
        gate_id="gate-tls",
        username=GATE,
        password=password_of(GATE),
        reconnect_s=0.2,
        **tls,
    )
    gw_cfg = configmod.validate(
        {
            **{k: v for k, v in cfg.model_dump(mode="json").items() if k in ("node", "mqtt")},
            "gateway": {
                "listen": "127.0.0.1:0",
                "upstreams": [{"name": "v", "url": "http://127.0.0.1:9", "gpus": [0, 1]}],
                "gateway_id": "gw-tls",
                "mqtt_username": GATE,
                "mqtt_password_file": "gate-password",
                "report_period_s": 0.2,
            },
        }
    )
    gw_cfg = gw_cfg.model_copy(
        update={"mqtt": gw_cfg.mqtt.model_copy(update={"tls": configmod.TlsConfig(**tls)})}
    )
    gateway = Gateway(gw_cfg)

    async def run_agent() -> None:
        task = asyncio.create_task(agent.run())
        await gate.start()
        await gateway.start()
        deadline = time.monotonic() + 20
        while not any(t.endswith("node07/telemetry") for t, _ in consumer.messages):
            assert time.monotonic() < deadline, "no telemetry over TLS"
            await asyncio.sleep(0.05)
        # The gate library and the gateway, as the gate user over TLS: they follow the cap
        # and their reports reach the agent.
        while not (
            gate.source == "mqtt"
            and gateway.upstreams[0].rules.limit()[1] == "mqtt"
            and {"gate-tls", "gw-tls-v"} <= set(agent.gates.gates)
        ):
            assert time.monotonic() < deadline, (gate.source, sorted(agent.gates.gates))
            await asyncio.sleep(0.05)
        await gateway.close()
        await gate.close()
        agent.request_stop()
        await task

    asyncio.run(run_agent())
    assert agent.link.connects >= 1

    # Refused: no credentials at all (with a valid client cert), and a wrong password.
    anonymous = Client(secure_broker, pki, None, cert=OTHER)
    assert not anonymous.ok
    anonymous.close()

    # Not authorized to write this node's cmd: another node, a consumer. The operator may.
    other, reader, operator = (
        Client(secure_broker, pki, u) for u in (OTHER, "rackguard-consumer", "rackguard-operator")
    )
    assert other.ok and reader.ok and operator.ok
    assert other.publish(CMD, b'{"evil": 1}') == NOT_AUTHORIZED
    assert reader.publish(CMD, b'{"evil": 2}') == NOT_AUTHORIZED
    assert other.publish("rackguard/site1/rackA/node07/telemetry", b'{"seq": -1}') == NOT_AUTHORIZED
    assert listener.publish(CMD, b'{"self": 4}') == NOT_AUTHORIZED  # a node never commands itself
    gate_user = Client(secure_broker, pki, GATE)  # a gate may not command the node or set its cap
    assert gate_user.publish(CMD, b'{"gate": 1}') == NOT_AUTHORIZED
    assert gate_user.publish("rackguard/site1/rackA/node07/cap", b'{"total": 999}') == NOT_AUTHORIZED
    assert gate_user.publish("rackguard/site1/rackA/node08/gate/x", b"{}") == NOT_AUTHORIZED
    assert gate_user.publish("rackguard/site1/rackA/node07/gate/x", b"{}") == 0
    gate_user.close()
    assert operator.publish(CMD, b'{"ok": 3}') == 0
    deadline = time.monotonic() + 5
    while not listener.messages and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert [p for _, p in listener.messages] == [b'{"ok": 3}']  # only the operator's command arrived
    assert not any(p == b'{"seq": -1}' for _, p in consumer.messages)
    # A node cannot read another node's commands.
    snoop = Client(secure_broker, pki, OTHER)
    snoop.subscribe(CMD)
    assert operator.publish(CMD, b'{"ok": 4}') == 0
    time.sleep(0.5)
    assert not snoop.messages
    # Rack members: each writes only its own claim and reads every member's claim.
    snoop.subscribe("rackguard/site1/rackA/+/claim")
    time.sleep(0.2)
    assert other.publish("rackguard/site1/rackA/node08/claim", b'{"own": 1}') == 0
    assert other.publish("rackguard/site1/rackA/node07/claim", b'{"forged": 1}') == NOT_AUTHORIZED
    deadline = time.monotonic() + 5
    while not snoop.messages and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for _, p in snoop.messages] == [b'{"own": 1}']
    for c in (consumer, listener, other, reader, operator, snoop):
        c.close()

    # The password is in no log line and in no message the agent published (birth included).
    out = capsys.readouterr()
    secret = password_of(NODE)
    assert secret not in out.out + out.err
    assert "mqtt_connected" in out.out
    status = [p for t, p in consumer.messages if t.endswith("/status")]
    assert status and all(secret.encode() not in p for _, p in consumer.messages)
    assert json.loads(status[0])["state"] == "online"


def test_secrets_not_in_check_config_print(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("hunter2-Zq8!-secret\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[mqtt]\nusername = "u"\npassword_file = "{pw}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
    r = subprocess.run(
        [sys.executable, "-m", "rackguard.agent.cli", "check-config", "--print", str(cfg)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "hunter2" not in r.stdout + r.stderr
    assert json.loads(r.stdout)["mqtt"]["password_file"] == str(pw)


async def test_gateway_reaches_an_https_upstream_and_refuses_an_untrusted_one(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote (fallback) endpoint over TLS: verified against the system's CAs (here ``SSL_CERT_FILE``)."""
    import ssl

    import openai

    from rackguard.agent import config as configmod
    from rackguard.agent.gateway.server import Gateway
    from rackguard.agent.mosquitto import free_port
    from rackguard.bench.fake_openai import FakeUpstream

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.path("server.crt"), pki.path("server.key"))
    up = FakeUpstream("tls", tokens=3)
    port = await up.start(ssl_context=ctx)
    cfg = configmod.validate(
        {
            "mqtt": {"port": free_port()},
            "http": {"port": 0},
            "gateway": {
                "listen": "127.0.0.1:0",
                "upstreams": [{"name": "tls", "url": f"https://127.0.0.1:{port}", "gpus": [0]}],
            },
        }
    )
    msg = [{"role": "user", "content": "hi"}]
    try:
        for trusted in (False, True):
            if trusted:
                monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
            gw = Gateway(cfg)
            await gw.start()
            c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="k", max_retries=0)
            try:
                if trusted:
                    r = await c.chat.completions.create(model="m", messages=msg)  # type: ignore[arg-type]
                    assert r.choices[0].message.content == "xxx" and up.requests == 1
                else:
                    with pytest.raises(openai.APIStatusError) as e:
                        await c.chat.completions.create(model="m", messages=msg)  # type: ignore[arg-type]
                    assert e.value.status_code == 502 and "certificate" in str(e.value).lower()
                    assert up.requests == 0
            finally:
                await c.close()
                await gw.close()
    finally:
        await up.close()

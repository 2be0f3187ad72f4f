"""Must-show: SIGHUP applies every live key to the running component and names every restart key.

Every config field declares ``live`` or ``restart`` next to its model (``RELOAD``). The tables
below give, per field, a new value and (for live fields) where the running agent holds it; a
field added without a declaration, or without a row here, fails this test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rackguard.agent import config as configmod
from rackguard.agent import log as logmod
from rackguard.agent.daemon import Agent
from rackguard.agent.localbus import LocalBroker
from rackguard.controllers.thermal import DEFAULT_PARAMS, MODEL_SCHEMA

REPO = Path(__file__).resolve().parents[2]

Getter = Callable[[Agent], Any]


def limit(name: str) -> Getter:
    return lambda a: getattr(a.control.limits, name) if a.control else None


# key → (new value, the running component's value)
LIVE: dict[str, tuple[Any, Getter]] = {
    "sensors.poll_period_s": (0.04, lambda a: a.cfg.sensors.poll_period_s),  # the tick loop reads a.cfg
    "sensors.slow_period_s": (
        0.4,
        lambda a: a.poller.slow_every * a.cfg.sensors.poll_period_s if a.poller else None,
    ),
    "sensors.read_timeout_s": (0.7, lambda a: a.poller.read_timeout_s if a.poller else None),
    "sensors.lost_retry_min_s": (2.0, lambda a: a.poller.retry_min_s if a.poller else None),
    "sensors.lost_retry_max_s": (70.0, lambda a: a.poller.retry_max_s if a.poller else None),
    "telemetry.publish_period_s": (0.08, lambda a: a.cfg.telemetry.publish_period_s),
    "outbox.max_messages": (123, lambda a: a.link.outbox.max_messages),
    "outbox.replay_rate_msgs_s": (7.0, lambda a: a.link.replay.rate_per_s),
    "control.period_s": (0.15, lambda a: a.cfg.control.period_s),
    "control.cap_ttl_s": (12.0, lambda a: a.cap.cfg.cap_ttl_s if a.cap else None),
    "control.cap_refresh_s": (2.0, lambda a: a.cap.cfg.cap_refresh_s if a.cap else None),
    "control.gpu_temp_max_c": (80.0, limit("gpu_temp_max_c")),
    "control.mem_temp_max_c": (90.0, limit("mem_temp_max_c")),
    "control.slowdown_c": (85.0, limit("slowdown_c")),
    "control.margin_c": (3.0, limit("margin_c")),
    "control.node_power_budget_w": (3000.0, limit("node_power_budget_w")),
    "control.min_cap": (2, limit("min_cap")),
    "control.max_cap": (
        100,
        lambda a: (a.control.limits.max_cap if a.control else None, a.commands.actions.max_cap),
    ),
    "control.safe_cap": (5, limit("safe_cap")),
    "control.leak_cap": (3, limit("leak_cap")),
    "control.cap_rise_per_s": (16.0, limit("cap_rise_per_s")),
    "control.thermal_model_file": ("MODEL", lambda a: Path(a.control.model.source) if a.control else None),
    "control.node_power_ramp_w_per_s": (200.0, limit("node_power_ramp_w_per_s")),
    "control.tpot_slo_s": (0.05, limit("tpot_slo_s")),
    "gate.report_max_age_s": (9.0, lambda a: a.gates.max_age_s),
    "energy.pue": (1.5, lambda a: a.energy.pue),
    "commands.hmac_secret_file": ("SECRET", lambda a: a.commands.cfg.hmac_secret_file),
    "commands.require_signature": (True, lambda a: a.commands.cfg.require_signature),
    "commands.max_skew_s": (45.0, lambda a: a.commands.cfg.max_skew_s),
    "log.level": ("warning", lambda a: logmod.current[0]),
    "log.format": ("json", lambda a: logmod.current[1]),
}
EXPECT = {"control.max_cap": (100, 100), "sensors.slow_period_s": pytest.approx(0.4)}

# key → a new, valid value (never applied while running)
RESTART: dict[str, Any] = {
    "node.site": "site2",
    "node.rack": "rack2",
    "node.name": "node2",
    "mqtt.host": "127.0.0.2",
    "mqtt.port": 1884,
    "mqtt.keepalive_s": 20,
    "mqtt.username": "u",
    "mqtt.password_file": "SECRET",
    "mqtt.client_id": "c2",
    "mqtt.topic_prefix": "rg2",
    "mqtt.tls": {"ca_file": "SECRET"},
    "mqtt.reconnect_min_s": 0.7,
    "mqtt.reconnect_max_s": 40.0,
    "mqtt.publish_timeout_s": 11.0,
    "sensors.backend": "nvml",
    "sensors.gpu_indices": [0],
    "sim.gpus": 3,
    "sim.seed": 5,
    "sim.offered_concurrency": 100.0,
    "sim.supply_temp_c": 30.0,
    "sim.flow_lpm": 10.0,
    "sim.ambient_noise_c": 0.1,
    "outbox.path": "OUTBOX",
    "outbox.synchronous": "normal",
    "http.host": "127.0.0.2",
    "http.port": 9999,
    "coolant.subscribe": ["bms/#"],
    "coolant.sensors": [{"id": "cdu", "kind": "cdu", "topic": "bms/cdu", "format": "redfish"}],
    "coolant.cp_j_per_kg_k": 4000.0,
    "coolant.density_kg_per_l": 1.0,
    "coolant.design_delta_t_c": 8.0,
    "coolant.max_future_s": 6.0,
    "coolant.leak_clear": "auto",
    "commands.enabled": False,
    "power_limits.enabled": True,
    "power_limits.state_file": "OUTBOX",
    "power_limits.node_power_budget_w": 1000.0,
    "power_limits.min_on_reasons": ["leak"],
    "power_limits.min_change_w": 6.0,
    # rackguard gateway reads these at start; the agent does not use them.
    "energy.grid_carbon_g_per_kwh": 300.0,
    "energy.grid_carbon_topic": "grid/carbon",
    "energy.wue_l_per_kwh": 1.5,
    "gateway.listen": "127.0.0.1:8001",
    "gateway.upstreams": [{"name": "v", "url": "http://127.0.0.1:8000", "gpus": [0]}],
    "gateway.classes": [{"name": "c", "priority": 1, "max_queue_s": 5.0}],
    "gateway.class_header": "x-class",
    "gateway.default_class": "c",
    "gateway.api_keys_file": "SECRET",
    "gateway.fallback": {"url": "http://127.0.0.1:9000"},
    "gateway.safe_cap": 3,
    "gateway.max_queue": 50,
    "gateway.max_body_bytes": 4096,
    "gateway.body_timeout_s": 5.0,
    "gateway.connect_timeout_s": 2.0,
    "gateway.upstream_timeout_s": 60.0,
    "gateway.write_timeout_s": 10.0,
    "gateway.model_params": {"m": 8e9},
    "gateway.gateway_id": "gw2",
    "gateway.cap_url": "http://127.0.0.1:9108/v1/cap",
    "gateway.report_period_s": 2.0,
    "gateway.mqtt_username": "gate",
    "gateway.mqtt_password_file": "SECRET",
    "actuators.haproxy": {
        "socket": "/run/haproxy.sock",
        "backend": "b",
        "servers": [{"name": "s", "gpus": [0]}],
    },
    "rack.members": [{"name": "node2"}, {"name": "peer", "weight": 2.0}],
    "rack.power_budget_w": 9000.0,
    "rack.return_limit_c": 45.0,
    "rack.degraded_capacity_w": 4000.0,
    "rack.floor_w": 100.0,
    "rack.max_node_power_w": 9000.0,
    "rack.claim_lifetime_s": 4.0,
    "rack.dead_after_s": 40.0,
    "rack.backstop_factor": 0.7,
    "rack.split": "static",
}

BASE: dict[str, Any] = {
    "node": {"name": "reload"},
    "sensors": {"backend": "sim", "poll_period_s": 0.05, "slow_period_s": 0.1},
    "telemetry": {"publish_period_s": 0.1},
    "control": {"period_s": 0.1},
    "http": {"port": 0},
    "sim": {"gpus": 2},
    "log": {"level": "info", "format": "console"},
}


def with_values(values: dict[str, Any], tmp: Path) -> dict[str, Any]:
    secret = tmp / "secret"
    secret.write_text("s3cret-s3cret-s3cret-s3cret-s3cret\n")  # an HMAC key needs >= 32 bytes
    model = tmp / "model.json"
    params = DEFAULT_PARAMS.scaled(1.2).as_dict()
    model.write_text(json.dumps({"schema": MODEL_SCHEMA, "params": params}))
    data: dict[str, Any] = {k: dict(v) for k, v in BASE.items()}
    for key, value in values.items():
        section, field = key.split(".")
        v = (
            {"SECRET": str(secret), "OUTBOX": str(tmp / "x.sqlite"), "MODEL": str(model)}.get(value, value)
            if isinstance(value, str)
            else value
        )
        if isinstance(v, dict) and v.get("ca_file") == "SECRET":
            v = {"ca_file": str(REPO / "tests" / "data" / "tls" / "ca.crt")}
        data.setdefault(section, {})[field] = v
    return data


@pytest.fixture(autouse=True)
def _reset_logging() -> Any:
    yield
    logmod.configure("info", "console")


def test_every_field_is_declared_and_covered() -> None:
    assert configmod.undeclared_reload_fields() == []
    modes = configmod.Config().reload_modes()
    assert {k for k, m in modes.items() if m == "live"} == set(LIVE)
    assert {k for k, m in modes.items() if m == "restart"} == set(RESTART)


def test_an_undeclared_field_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    reload = dict(configmod.EnergyConfig.RELOAD)
    del reload["pue"]
    monkeypatch.setattr(configmod.EnergyConfig, "RELOAD", reload)
    assert configmod.undeclared_reload_fields() == ["energy.pue"]


async def reload_with(tmp_path: Path, values: dict[str, Any]) -> Agent:
    """Start an agent, SIGHUP it with ``values`` applied to its config, return it once reloaded."""
    current = configmod.validate(BASE)
    agent = Agent(current, client_factory=LocalBroker().client, reload_config=lambda: current)
    task = asyncio.create_task(agent.run())
    try:
        for _ in range(300):
            if agent.cap_msg is not None:
                break
            await asyncio.sleep(0.02)
        assert agent.cap_msg is not None
        current = configmod.validate(with_values(values, tmp_path))
        seen = agent.cfg
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):
            if agent.cfg is not seen:
                break
            await asyncio.sleep(0.01)
        assert agent.cfg is not seen, "SIGHUP did not reload"
        await asyncio.sleep(0.3)  # a few ticks on the new config
        return agent
    finally:
        agent.request_stop("test")
        assert await asyncio.wait_for(task, 10) == 0


async def test_sighup_applies_every_live_key(tmp_path: Path) -> None:
    before = configmod.validate(BASE)
    agent = await reload_with(tmp_path, {k: v for k, (v, _) in LIVE.items()})
    assert agent.reload_kept == []
    for key, (value, getter) in LIVE.items():
        want = EXPECT.get(key, value)
        if value == "SECRET":
            want = tmp_path / "secret"
        if value == "MODEL":
            want = tmp_path / "model.json"
        got = getter(agent)
        assert got == want, f"{key}: running value {got!r}, want {want!r}"
        section, field = key.split(".")
        assert getattr(getattr(before, section), field) != getattr(getattr(agent.cfg, section), field), key


async def test_sighup_names_every_restart_key_and_keeps_its_value(tmp_path: Path) -> None:
    before = configmod.validate(BASE)
    agent = await reload_with(tmp_path, RESTART)
    assert sorted(agent.reload_kept) == sorted(RESTART)
    for key in RESTART:
        section, field = key.split(".")
        assert getattr(getattr(agent.cfg, section), field) == getattr(getattr(before, section), field), key
    assert agent.topics.base == "rackguard/site/rack/reload"


def test_readme_reload_table_matches_the_code() -> None:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = text.split("<!-- reload-table -->")[1].split("<!-- /reload-table -->")[0]
    documented: dict[str, str] = {}
    for row in table.strip().splitlines()[2:]:
        section, live, restart = (c.strip() for c in row.strip("|").split("|"))
        for mode, cell in (("live", live), ("restart", restart)):
            for name in cell.replace("`", "").split(","):
                if name.strip() not in ("", "–"):
                    documented[f"{section.strip('`')}.{name.strip()}"] = mode
    assert documented == configmod.Config().reload_modes()


async def test_sighup_periods_change_what_the_tick_loop_does(tmp_path: Path) -> None:
    """Not only the config object: the running loop ticks, controls and publishes at the new periods."""
    current = configmod.validate(BASE)  # poll 0.05 s, control 0.1 s, publish 0.1 s
    published: list[float] = []
    agent = Agent(
        current,
        client_factory=LocalBroker().client,
        reload_config=lambda: current,
        on_telemetry=lambda t: published.append(time.monotonic()),
    )
    task = asyncio.create_task(agent.run())

    async def rates(seconds: float) -> tuple[float, float, float]:
        assert agent.control is not None
        t0, ticks0, steps0, pubs0 = (
            time.monotonic(),
            agent.ticks_total,
            len(agent.control.timings),
            len(published),
        )
        await asyncio.sleep(seconds)
        dt = time.monotonic() - t0
        steps = len(agent.control.timings) - steps0
        return (agent.ticks_total - ticks0) / dt, steps / dt, (len(published) - pubs0) / dt

    try:
        while agent.control is None or agent.cap_msg is None:
            await asyncio.sleep(0.02)
        tick_hz, control_hz, publish_hz = await rates(1.5)
        assert tick_hz > 14 and control_hz > 7 and publish_hz > 7, (tick_hz, control_hz, publish_hz)
        current = configmod.validate(
            with_values(
                {
                    "sensors.poll_period_s": 0.25,
                    "sensors.slow_period_s": 0.5,
                    "control.period_s": 0.5,
                    "telemetry.publish_period_s": 0.5,
                },
                tmp_path,
            )
        )
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.6)
        tick_hz, control_hz, publish_hz = await rates(3.0)
        assert 3.0 <= tick_hz <= 5.0 and 1.3 <= control_hz <= 2.7 and 1.3 <= publish_hz <= 2.7, (
            tick_hz,
            control_hz,
            publish_hz,
        )
    finally:
        agent.request_stop("test")
        assert await asyncio.wait_for(task, 10) == 0

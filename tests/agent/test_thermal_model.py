"""Must-show: the daemon runs on a fitted model file (MPC, /v1/model, status, SIGHUP, exit 78)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from rackguard.agent import config as configmod
from rackguard.agent.commands import check_config, model
from rackguard.agent.control_loop import ControlLoop, ThermalModel
from rackguard.agent.daemon import Agent
from rackguard.agent.localbus import LocalBroker
from rackguard.agent.mosquitto import free_port
from rackguard.controllers.api import CoolantObs, GpuObs, Limits, Observation
from rackguard.controllers.ident import AheadError
from rackguard.controllers.thermal import DEFAULT_PARAMS, MODEL_SCHEMA, ThermalParams, params_from_model
from rackguard.controllers.thermal import simulate_rise as simulate
from tests.agent.test_http import get

DATA = Path(__file__).resolve().parents[1] / "data"


def fit_model_file(tmp: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, dict[str, object]]:
    """``rackguard model fit h100_llm_decode.csv --out FILE --json``: the file is what --json prints."""
    out = tmp / "node-model.json"
    parser = argparse.ArgumentParser(prog="rackguard")
    model.register(parser.add_subparsers())
    args = parser.parse_args(["model", "fit", str(DATA / "h100_llm_decode.csv"), "--out", str(out), "--json"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    return out, printed


def base_cfg(model_file: Path | None) -> dict[str, object]:
    control: dict[str, object] = {"period_s": 0.1}
    if model_file is not None:
        control["thermal_model_file"] = str(model_file)
    return {
        "node": {"name": "fitted"},
        "sensors": {"backend": "sim", "poll_period_s": 0.05, "slow_period_s": 0.1},
        "telemetry": {"publish_period_s": 0.2},
        "control": control,
        "http": {"port": free_port()},
        "sim": {"gpus": 2},
    }


async def test_daemon_loads_the_fitted_model_and_reports_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, doc = fit_model_file(tmp_path, capsys)
    fitted = params_from_model(doc)
    assert fitted != DEFAULT_PARAMS
    current = configmod.validate(base_cfg(path))
    broker = LocalBroker()
    agent = Agent(current, client_factory=broker.client, reload_config=lambda: current)
    task = asyncio.create_task(agent.run())
    try:
        for _ in range(300):
            if agent.cap_msg is not None and agent.http is not None and agent.http.port:
                break
            await asyncio.sleep(0.02)
        assert agent.control is not None and agent.http is not None
        # The MPC and the online identification run on the fitted parameters.
        assert agent.control.mpc.model == fitted
        assert agent.control.ahead.params == fitted
        status, body = await get(agent.http.port, "/v1/model")
        info = json.loads(body)
        assert status == 200 and info["source"] == str(path)
        assert params_from_model({"schema": MODEL_SCHEMA, "params": info["params"]}) == fitted
        assert info["fit"]["rmse_10s_c"] == doc["rmse_10s_c"] and len(info["rmse_10s_ahead_c"]) == 2
        assert str(path) in agent.status_line()
        for _ in range(100):  # the retained status (birth) names the model too
            if (raw := broker.retained.get(agent.topics.status)) and b"thermal_model" in raw:
                break
            await asyncio.sleep(0.02)
        birth = json.loads(broker.retained[agent.topics.status])
        assert birth["thermal_model"]["source"] == str(path)

        # SIGHUP with a new file: the MPC restarts its thermal identification from it, the
        # learned power curves stay, and the status is published again.
        hotter = DEFAULT_PARAMS.scaled(1.4)
        path2 = tmp_path / "hotter.json"
        path2.write_text(json.dumps({"schema": MODEL_SCHEMA, "params": hotter.as_dict()}))
        power_model = agent.control.mpc.power_model
        current = configmod.validate(base_cfg(path2))
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):
            if agent.control.mpc.model == hotter:
                break
            await asyncio.sleep(0.02)
        assert agent.control.mpc.model == hotter and agent.control.mpc.power_model is power_model
        for _ in range(100):
            birth = json.loads(broker.retained[agent.topics.status])
            if birth["thermal_model"]["source"] == str(path2):
                break
            await asyncio.sleep(0.05)
        assert birth["thermal_model"]["source"] == str(path2)
    finally:
        agent.request_stop("test")
        assert await asyncio.wait_for(task, 10) == 0


def _obs(t_s: float, temp_c: float, power_w: float) -> Observation:
    gpu = GpuObs(gpu_temp_c=temp_c, mem_temp_c=temp_c + 2.0, power_w=power_w, concurrency=32.0)
    return Observation(t_s=t_s, gpus=(gpu,), coolant=CoolantObs(supply_temp_c=30.0, flow_lpm=12.0))


def _limits() -> Limits:
    return Limits(
        gpu_temp_max_c=75.0,
        mem_temp_max_c=85.0,
        slowdown_c=80.0,
        margin_c=2.0,
        node_power_budget_w=None,
        design_delta_t_c=10.0,
        coolant_cp_j_per_kg_k=4180.0,
        coolant_density_kg_per_l=1.0,
        min_cap=1,
        max_cap=256,
        safe_cap=8,
        leak_cap=4,
        cap_rise_per_s=32.0,
        gpu_power_max_w=700.0,
    )


def test_the_mpcs_decisions_follow_the_model_it_runs_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same observations, different model: a plant modelled hotter per watt gets lower caps."""
    path, _ = fit_model_file(tmp_path, capsys)
    fitted = ThermalModel.from_config(configmod.validate(base_cfg(path)).control)
    hot = ThermalModel(fitted.params.scaled(2.0), "hot")
    loops = {m.source: ControlLoop(_limits(), 1, m) for m in (fitted, hot)}
    caps: dict[str, list[int]] = {k: [] for k in loops}
    for k in range(40):
        obs = _obs(float(k), 55.0 + 0.1 * k, 400.0)
        for name, loop in loops.items():
            caps[name].append(loop.step(obs).caps[0])
    assert loops[str(path)].mpc.model == fitted.params
    assert all(h <= f for h, f in zip(caps["hot"], caps[str(path)], strict=True))
    assert sum(caps["hot"]) < sum(caps[str(path)])


def test_a_bad_model_file_exits_78_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "missing.json": None,
        "not-json.json": "{",
        "wrong-schema.json": json.dumps({"schema": "x/1", "params": DEFAULT_PARAMS.as_dict()}),
        "bad-value.json": json.dumps(
            {"schema": MODEL_SCHEMA, "params": {**DEFAULT_PARAMS.as_dict(), "tau_plate_s": -3.0}}
        ),
    }
    for name, content in cases.items():
        model_file = tmp_path / name
        if content is not None:
            model_file.write_text(content)
        cfg = tmp_path / "rackguard.toml"
        cfg.write_text(f'[control]\nthermal_model_file = "{model_file}"\n')
        assert check_config.main(argparse.Namespace(file=cfg, print=False)) == 78
        err = capsys.readouterr().err
        assert "control.thermal_model_file" in err and name in err, err


def test_a_relative_model_file_is_the_config_files_neighbour(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    model_file, _ = fit_model_file(etc, capsys)
    cfg = etc / "rackguard.toml"
    cfg.write_text(f'[control]\nthermal_model_file = "{model_file.name}"\n')
    monkeypatch.chdir(tmp_path)  # systemd runs the daemon from /, not from the config's folder
    loaded = configmod.load(cfg)
    assert loaded.control.thermal_model_file == model_file
    assert check_config.main(argparse.Namespace(file=cfg, print=False)) == 0


def test_ahead_error_is_small_for_the_true_model_and_large_for_a_wrong_one() -> None:
    true = ThermalParams(0.025, 0.15, 0.022, 12.0)
    t = np.arange(0.0, 120.0, 1.0)
    power = 150.0 + 400.0 * ((t // 20) % 2)
    # NVML's reading averages the last second: the heat over (t[k-1], t[k]] is power[k].
    heat = np.append(power[1:], power[-1])
    temp = np.round(30.0 + simulate(true, t, heat, np.array(true.steady_rise_k(150.0)))[:, 0])
    errors = {}
    for name, params in (("true", true), ("wrong", true.scaled(1.6))):
        ahead = AheadError(params, 2)
        for k in range(len(t)):
            ahead.update(float(t[k]), np.array([power[k], np.nan]), np.array([temp[k], 40.0]), None)
        rmse = ahead.rmse_c()
        assert rmse[1] is None and ahead.samples()[1] == 0  # no power read: no prediction
        assert rmse[0] is not None and ahead.samples()[0] == 60  # the window
        errors[name] = rmse[0]
    assert errors["true"] < 0.6  # whole-degree readings
    assert errors["wrong"] > 2.0 * errors["true"] + 1.0

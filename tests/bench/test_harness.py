"""The scenario harness and ``rackguard bench controllers`` (shipped scenarios, parse errors, CLI)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest

from rackguard.bench.harness import (
    SCENARIO_DIR,
    TRACE_COLUMNS,
    ScenarioError,
    leak_state,
    load_scenario,
    observe,
    parse_scenario,
    run,
    scenario_files,
)
from rackguard.controllers.thermal import DEFAULT_PARAMS
from rackguard.sim.plant import Plant


def test_scenarios_ship_with_the_package() -> None:
    assert len(scenario_files()) >= 6
    assert (SCENARIO_DIR / "leak_mid_run.toml").is_file()


def test_scenario_parse_errors() -> None:
    with pytest.raises(ScenarioError):
        parse_scenario("name = [")
    with pytest.raises(ScenarioError):
        parse_scenario("[coolant]\nleaks = [[1.0, 'flood']]\n")
    with pytest.raises(ScenarioError):
        parse_scenario("[plant]\nbogus_k = 1.0\n")


def test_leak_scenario_all_controllers_cap_quickly() -> None:
    scn = parse_scenario((SCENARIO_DIR / "leak_mid_run.toml").read_text()).with_duration(380.0)
    for name in ("mpc", "pid", "threshold", "oracle"):
        res = run(scn, name)
        assert res.leak_to_cap_s is not None and res.leak_to_cap_s <= scn.leak_delay_s + 1e-9
        assert res.reasons.get("leak", 0) > 0


def _bench(argv: list[str]) -> int:
    from rackguard.agent.commands import bench

    parser = argparse.ArgumentParser(prog="rackguard")
    bench.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_bench_controllers_json(capsys: pytest.CaptureFixture[str]) -> None:
    files = [SCENARIO_DIR / "steady_full_load.toml", SCENARIO_DIR / "leak_mid_run.toml"]
    argv = ["bench", "controllers", "--json", "--duration-s", "320"]
    for f in files:
        argv += ["--scenario", str(f)]
    assert _bench(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # progress goes to stderr, so stdout stays JSON
    assert re.findall(r"\[(\d)/2\] (\w+) \.\.\. \d+\.\d s", captured.err) == [
        ("1", "steady_full_load"),
        ("2", "leak_mid_run"),
    ]
    assert [s["name"] for s in out["scenarios"]] == ["steady_full_load", "leak_mid_run"]
    for s in out["scenarios"]:
        assert set(s["controllers"]) == {"mpc", "pid", "threshold"}
        for m in s["controllers"].values():
            for key in (
                "served",
                "oracle_ratio",
                "seconds_over_limit",
                "max_temp_c",
                "cap_changes",
                "leak_to_cap_s",
            ):
                assert key in m
    assert out["scenarios"][1]["controllers"]["mpc"]["leak_to_cap_s"] is not None
    assert out["scenarios"][0]["controllers"]["mpc"]["leak_to_cap_s"] is None
    for s in out["scenarios"]:
        # Per controller and the references: seconds over each limit, goodput, smoothness.
        for m in [s["oracle"], s["causal"], *s["controllers"].values()]:
            assert set(m["seconds_over"]) == {"die", "hbm", "node_power", "coolant_heat"}
            for key in (
                "goodput_tokens_per_s",
                "cap_reversals_per_min",
                "max_power_drop_w",
                "power_tv_w_per_min",
            ):
                assert m[key] >= 0
        assert 0 < s["controllers"]["mpc"]["oracle_ratio"] <= 1.1
        # The ceiling bounds every controller's goodput, the references' too.
        for m in [s["oracle"], s["causal"], *s["controllers"].values()]:
            assert m["goodput"] <= s["ceiling_goodput"] + 1
    assert out["summary"]["goodput"]["oracle"] > 0 and out["summary"]["mpc_vs_pid"] is not None
    summary = out["summary"]
    # Not told the SLO, the baselines run past its concurrency on a cool node: less goodput.
    for s in out["scenarios"]:
        assert set(s["without_slo"]) == {"pid", "threshold"}
    assert summary["mpc_vs_pid_without_slo"] > summary["mpc_vs_pid"]
    assert summary["ceiling_vs_pid"] == pytest.approx(
        summary["ceiling_goodput"] / summary["goodput"]["pid"], rel=1e-3
    )


def test_bench_controllers_seed_changes_the_noise_draw_reproducibly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def served(*extra: str) -> float:
        argv = ["bench", "controllers", "--json", "--duration-s", "60"]
        argv += ["--scenario", str(SCENARIO_DIR / "steady_full_load.toml"), *extra]
        assert _bench(argv) == 0
        out = json.loads(capsys.readouterr().out)
        return float(out["scenarios"][0]["controllers"]["pid"]["served"])

    shipped, seeded = served(), served("--seed", "101")
    assert seeded != shipped
    assert served("--seed", "101") == seeded


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib installed")
def test_bench_plot_without_matplotlib_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _bench(["bench", "controllers", "--plot", str(tmp_path)]) != 0
    assert "matplotlib" in capsys.readouterr().err


def test_schedules_points_periodic_random_sum() -> None:
    scn = parse_scenario(
        """
duration_s = 120
[load]
sum = [32, { random = { seed = 3, every_s = 10, low = 0, high = 100, kind = "bursts", burst_prob = 0.5 } }]
[coolant]
flow_lpm = { periodic = { shape = "sine", period_s = 60, low = 4.8, high = 12.0, start_s = 10 } }
supply_c = { points = [[0, 30], [100, 40]], step = true }
"""
    )
    assert scn.flow_lpm.at(5.0) == 12.0 and scn.flow_lpm.at(10.0) == pytest.approx(12.0)
    assert scn.flow_lpm.at(40.0) == pytest.approx(4.8) and scn.flow_lpm.at(70.0) == pytest.approx(12.0)
    assert scn.supply_c.at(99.0) == 30.0 and scn.supply_c.at(100.0) == 40.0
    loads = {scn.load.at(t) for t in range(0, 120, 5)}
    assert loads == {32.0, 132.0}  # seeded bursts over a base
    same = parse_scenario(
        '[load]\nrandom = { seed = 3, every_s = 10, low = 0, high = 100, kind = "bursts", burst_prob = 0.5 }\n'
    )
    assert [same.load.at(t) + 32 for t in range(0, 120, 5)] == [scn.load.at(t) for t in range(0, 120, 5)]
    with pytest.raises(ScenarioError):
        parse_scenario("[coolant]\nflow_lpm = { periodic = { period_s = 0, low = 1, high = 2 } }\n")
    with pytest.raises(ScenarioError):
        parse_scenario("[coolant]\nflow_lpm = { points = [[0, 1]], random = { seed = 1 } }\n")


def test_load_from_csv_and_plant_from_a_model_fit_file(tmp_path: Path) -> None:
    (tmp_path / "load.csv").write_text("t_s,concurrency\n0,10\n100,200\n")
    params = DEFAULT_PARAMS.as_dict() | {"r_plate_coolant_k_per_w": 0.03}
    (tmp_path / "fit.json").write_text(
        json.dumps({"trace": "x.csv", "params": params, "rmse_open_loop_c": 1.0})
    )
    (tmp_path / "s.toml").write_text('[plant]\nmodel_fit = "fit.json"\n[load]\ncsv = "load.csv"\n')
    scn = load_scenario(tmp_path / "s.toml")
    assert scn.load.at(50.0) == pytest.approx(105.0)
    assert scn.plant.thermal.r_plate_coolant_k_per_w == 0.03 and scn.controller_model == scn.plant.thermal
    (tmp_path / "bad.toml").write_text('[load]\ncsv = "missing.csv"\n')
    with pytest.raises(ScenarioError, match=r"missing\.csv"):
        load_scenario(tmp_path / "bad.toml")


def test_leak_latches_until_an_ack_while_the_detector_reads_ok() -> None:
    scn = parse_scenario(
        '[coolant]\nleaks = [[100.0, "warning"], [150.0, "ok"]]\nleak_clear = "ack"\nleak_acks = [120.0, 170.0]\n'
    )
    assert leak_state(scn, 99.0) == "ok"
    assert leak_state(scn, 130.0) == "warning"  # the ack at 120 s came while it still leaked
    assert leak_state(scn, 160.0) == "warning"  # the detector reads ok, not yet acked
    assert leak_state(scn, 171.0) == "ok"
    auto = parse_scenario('[coolant]\nleaks = [[100.0, "warning"], [150.0, "ok"]]\n')
    assert leak_state(auto, 160.0) == "ok"


def test_silent_coolant_holds_its_last_reading_until_max_age_then_is_stale() -> None:
    scn = parse_scenario(
        "[coolant]\nsupply_c = [[0, 30], [10, 30], [11, 40]]\nstale = [[5.0, 20.0]]\nmax_age_s = 3.0\n"
    )
    plant = Plant(scn.plant, 30.0)
    held = observe(scn, plant, 4.0, None).coolant
    o = observe(scn, plant, 7.0, held)
    assert not o.coolant.stale and o.coolant.supply_temp_c == held.supply_temp_c
    assert observe(scn, plant, 8.0, held).coolant.stale
    plant.supply_c = 40.0
    back = observe(scn, plant, 20.0, held).coolant
    assert not back.stale and back.supply_temp_c == 40.0


def test_share_schedule_drives_the_observation_and_the_limit() -> None:
    scn = parse_scenario(
        "duration_s = 60\n[share]\npower_w = [[0, 5000], [30, 2000]]\ncoolant_heat_w = 9000\n"
        "[load]\npoints = 256\n"
    )
    assert scn.share_at(10.0).power_w == 5000.0 and scn.share_at(30.0).power_w == 2000.0  # type: ignore[union-attr]
    res = run(scn, "mpc")
    assert res.trace[40]["node_power_limit_w"] == 2000.0
    assert res.trace[40]["binding"] == "rack_power"


def test_bench_controllers_trace_writes_one_csv_per_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "controllers", "--json", "--duration-s", "20", "--trace", str(tmp_path)]
    argv += ["--scenario", str(SCENARIO_DIR / "budget_cut.toml")]
    assert _bench(argv) == 0
    capsys.readouterr()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"budget_cut.{c}.csv" for c in ("causal", "mpc", "oracle", "pid", "threshold")]
    rows = (tmp_path / "budget_cut.mpc.csv").read_text().splitlines()
    assert rows[0].split(",") == list(TRACE_COLUMNS) and len(rows) == 21

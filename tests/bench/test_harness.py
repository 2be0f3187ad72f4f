"""The scenario harness and ``rackguard bench controllers`` (shipped scenarios, parse errors, CLI)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest

from rackguard.bench.harness import SCENARIO_DIR, ScenarioError, parse_scenario, run, scenario_files


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

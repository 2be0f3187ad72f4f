"""Thermal model: offline fit on the real H100 traces, discretisation, trace parsing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rackguard.controllers.thermal import (
    DEFAULT_PARAMS,
    TraceError,
    discretize,
    fit_trace,
    parse_trace_csv,
    rmse_ahead,
    simulate_rise,
)

TRACES = ("h100_matmul_burst.csv", "h100_llm_decode.csv")


@pytest.mark.parametrize("name", TRACES)
def test_fit_open_loop_rmse_within_bound(shared_data: Path, name: str) -> None:
    res = fit_trace(parse_trace_csv((shared_data / name).read_text()))
    assert res.rmse_open_loop_c <= 1.5
    assert res.rmse_10s_c < 2.5
    # Physically sensible: total rise per watt near the measured ~0.048 K/W.
    assert 0.03 <= res.params.r_total_k_per_w <= 0.07


def test_fit_estimates_hot_initial_state(shared_data: Path) -> None:
    """The matmul trace starts at 58 °C under load: the fit must start the die hot."""
    trace = parse_trace_csv((shared_data / "h100_matmul_burst.csv").read_text())
    res = fit_trace(trace)
    assert res.x0_k[0] > 10.0  # die well above supply at t=0
    assert abs(res.supply_c + res.x0_k[0] - trace.gpu_temp_c[0]) < 5.0


def test_llm_fit_includes_hbm(shared_data: Path) -> None:
    res = fit_trace(parse_trace_csv((shared_data / "h100_llm_decode.csv").read_text()))
    assert res.rmse_mem_open_loop_c is not None and res.rmse_mem_open_loop_c <= 2.0


def test_fit_recovers_known_parameters() -> None:
    """Synthetic trace from known parameters: the fit finds them back."""
    true = DEFAULT_PARAMS.scaled(1.3)
    t = np.arange(0.0, 120.0, 0.1)
    power = np.where((t > 10) & (t < 60), 650.0, 100.0) + np.where((t > 80) & (t < 95), 300.0, 0.0)
    x0 = np.array(true.steady_rise_k(100.0))
    die = 30.0 + simulate_rise(true, t, power, x0)[:, 0]
    csv = "t_s,power_w,gpu_temp_c\n" + "\n".join(
        f"{a},{b},{c}" for a, b, c in zip(t, power, die, strict=True)
    )
    res = fit_trace(parse_trace_csv(csv))
    assert res.rmse_open_loop_c < 0.2
    assert res.params.r_total_k_per_w == pytest.approx(true.r_total_k_per_w, rel=0.05)


def test_discretize_matches_substeps() -> None:
    """Exact ZOH: one 1 s step equals ten 0.1 s steps."""
    ad1, bd1 = discretize(DEFAULT_PARAMS, 1.0, 8.0)
    ad01, bd01 = discretize(DEFAULT_PARAMS, 0.1, 8.0)
    x = np.array([20.0, 10.0, 12.0])
    y = x.copy()
    for _ in range(10):
        y = ad01 @ y + bd01 * 500.0
    np.testing.assert_allclose(ad1 @ x + bd1 * 500.0, y, rtol=1e-9)


def test_lower_flow_runs_hotter() -> None:
    hot = DEFAULT_PARAMS.steady_rise_k(700.0, flow_lpm=6.0)[0]
    nominal = DEFAULT_PARAMS.steady_rise_k(700.0, flow_lpm=12.0)[0]
    assert hot > nominal * 1.1


def test_rmse_ahead_is_zero_for_a_perfect_model() -> None:
    t = np.arange(0.0, 30.0, 0.5)
    y = np.sin(t)
    assert rmse_ahead(t, y, y + 5.0, horizon_s=10.0) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("t_s,power_w\n1,2\n", "missing column"),
        ("t_s,power_w,gpu_temp_c\n" + "".join(f"{i},100,30\n" for i in range(5)), "usable rows"),
        ("t_s,power_w,gpu_temp_c\n" + "".join(f"{-i},100,30\n" for i in range(30)), "increase"),
    ],
)
def test_parse_rejects_bad_traces(text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_trace_csv(text)


def _cli(argv: list[str]) -> int:
    import argparse

    from rackguard.agent.commands import model

    parser = argparse.ArgumentParser(prog="rackguard")
    model.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_cli_fit_json(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["model", "fit", str(shared_data / "h100_matmul_burst.csv"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rmse_open_loop_c"] <= 1.5
    assert "r_die_plate_k_per_w" in out["params"] and "rmse_10s_c" in out


@pytest.mark.parametrize("content", [None, "t_s,power_w\n1,2\n", "t_s,power_w,gpu_temp_c\n1,2,3\n"])
def test_cli_fit_bad_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    path = tmp_path / "trace.csv"
    if content is not None:
        path.write_text(content)
    assert _cli(["model", "fit", str(path)]) == 2
    err = capsys.readouterr().err
    assert "rackguard model fit" in err and "Traceback" not in err


@pytest.mark.parametrize("flow_lpm", [None, 0.3, 12.0, 40.0])
@pytest.mark.parametrize("dt_s", [0.001, 0.1, 1.0, 7.3, 60.0])
@pytest.mark.parametrize("scale", [0.5, 1.0, 1.35])
def test_numpy_expm_matches_scipy(flow_lpm: float | None, dt_s: float, scale: float) -> None:
    """The daemon's numpy expm gives scipy's discretisation (ZOH block matrix, 4×4)."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    from rackguard.controllers.thermal import N_STATES, continuous_matrices, expm

    params = DEFAULT_PARAMS.scaled(scale)
    for tau_die_s in (params.tau_die_s, 2.0):
        a, b = continuous_matrices(params.__class__(**{**params.as_dict(), "tau_die_s": tau_die_s}), flow_lpm)
        m = np.zeros((N_STATES + 1, N_STATES + 1))
        m[:N_STATES, :N_STATES] = a
        m[:N_STATES, N_STATES] = b
        ours, ref = expm(m * dt_s), scipy_linalg.expm(m * dt_s)
        np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)
        # 3×3 too, and a non-triangular, oscillatory one.
        np.testing.assert_allclose(expm(a * dt_s), scipy_linalg.expm(a * dt_s), rtol=1e-10, atol=1e-10)
    rot = np.array([[0.0, -3.0, 0.1], [3.0, 0.0, 0.0], [0.2, 0.0, -1.0]]) * dt_s
    np.testing.assert_allclose(expm(rot), scipy_linalg.expm(rot), rtol=1e-10, atol=1e-10)


def test_daemon_does_not_load_scipy() -> None:
    """Importing the controllers the agent uses (and the agent) leaves scipy unloaded (RSS)."""
    import subprocess
    import sys

    code = "import rackguard.agent.daemon, rackguard.controllers.mpc, rackguard.bench.harness, sys; print('scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""Thermal model: robust trace loading, calibration on the real H100 traces, cross-validation,
identifiability errors, the model file, and the discretisation the controllers use."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rackguard.controllers.thermal import (
    DEFAULT_PARAMS,
    MODEL_SCHEMA,
    ThermalParams,
    discretize,
    params_from_model,
    simulate_rise,
)
from rackguard.controllers.thermal_fit import (
    BOUNDS_S,
    FitResult,
    Trace,
    TraceError,
    cauer_to_foster,
    deconvolve_boxcar,
    fit_trace,
    fit_traces,
    foster_to_cauer,
    parse_trace_csv,
    validate,
)

DATA = Path(__file__).resolve().parents[1] / "data"
TRACES = ("h100_llm_decode.csv", "h100_matmul_burst.csv")


@functools.cache
def load(name: str) -> Trace:
    return parse_trace_csv((DATA / name).read_text())


@functools.cache
def clean_fit(name: str) -> FitResult:
    return fit_trace(load(name))


# --- the shared traces ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRACES)
def test_shared_traces_fit_with_no_time_constant_at_a_bound(name: str) -> None:
    res = clean_fit(name)
    assert res.rmse_open_loop_c <= 1.0
    assert 0.03 <= res.params.r_total_k_per_w <= 0.07  # the ~0.048 K/W step measured on the H100
    assert not [w for w in res.warnings if "bound" in w or ("poorly" in w and "tau" in w)], res.warnings
    for key, value in res.time_constants_s.items():
        lo, hi = BOUNDS_S[key]
        assert lo < value < hi, key
        if key.startswith("tau"):
            ci_lo, ci_hi = res.intervals[key]
            assert ci_lo < value < ci_hi and ci_lo > lo, key  # identified, not just inside


def test_llm_trace_fits_hbm_too() -> None:
    res = clean_fit("h100_llm_decode.csv")
    assert res.rmse_mem_open_loop_c is not None and res.rmse_mem_open_loop_c <= 1.2
    assert "tau_mem_s" in res.time_constants_s


def test_matmul_trace_starts_hot() -> None:
    """The matmul trace starts at 58 °C under load: the fit starts the die well above supply."""
    res = clean_fit("h100_matmul_burst.csv")
    assert res.x0_k[0] > 10.0
    assert abs(res.supply_c + res.x0_k[0] - 58.0) < 3.0


def test_cross_validation_between_the_shared_traces() -> None:
    """Each trace's fit predicts the other (supply and initial state are the only refits).

    matmul → llm meets 1 °C. llm → matmul does not (≈1.5 °C, BENCHMARKS.md says why: the
    matmul run's plate settles in ~4 s, the llm run's in ~14 s); the bound keeps it there.
    """
    llm, mm = "h100_llm_decode.csv", "h100_matmul_burst.csv"
    on_llm = validate(clean_fit(mm).params, load(llm), hbm=False)  # matmul has no HBM column
    on_mm = validate(clean_fit(llm).params, load(mm))
    assert on_llm.rmse_open_loop_c <= 1.0
    assert on_llm.rmse_mem_open_loop_c is None and on_mm.rmse_mem_open_loop_c is None
    assert any("HBM parameters are the built-in ones" in w for w in clean_fit(mm).warnings)
    assert on_mm.rmse_open_loop_c <= 1.6
    # A validation is never better than the trace's own fit.
    assert on_llm.rmse_open_loop_c >= clean_fit(llm).rmse_open_loop_c - 1e-6
    assert on_mm.rmse_open_loop_c >= clean_fit(mm).rmse_open_loop_c - 1e-6


def test_both_traces_fit_together_within_1_c_each() -> None:
    """One model for both traces: each keeps its supply and initial state, each weighs the same.

    Fitted by sample count instead, the 1,816-row llm trace drowns the 280-row matmul one
    (matmul 1.23 °C); fitted on one trace alone, the other is 0.96 / 1.51 °C away.
    """
    llm, mm = load("h100_llm_decode.csv"), load("h100_matmul_burst.csv")
    res = fit_traces([llm, mm])
    on_llm, on_mm = validate(res.params, llm), validate(res.params, mm)
    assert on_llm.rmse_open_loop_c <= 1.0 and on_mm.rmse_open_loop_c <= 1.0
    assert on_llm.rmse_mem_open_loop_c is not None and on_llm.rmse_mem_open_loop_c <= 1.2
    assert on_mm.rmse_mem_open_loop_c is None  # no HBM column: HBM is fitted on llm alone
    assert "tau_mem_s" in res.time_constants_s and not res.warnings
    for key, value in res.time_constants_s.items():
        lo, hi = BOUNDS_S[key]
        assert lo < value < hi, key
    # The joint fit's own supply for the first trace is the one validate finds given its model.
    assert res.supply_c == pytest.approx(on_llm.supply_c, abs=0.01)
    assert res.rmse_open_loop_c == pytest.approx(
        math.hypot(on_llm.rmse_open_loop_c * math.sqrt(1816), on_mm.rmse_open_loop_c * math.sqrt(280))
        / math.sqrt(1816 + 280),
        abs=0.01,
    )


def test_a_joint_fit_whose_first_trace_has_no_hbm_still_fits_hbm() -> None:
    llm, mm = load("h100_llm_decode.csv"), load("h100_matmul_burst.csv")
    res = fit_traces([mm, llm])
    assert "tau_mem_s" in res.time_constants_s
    assert res.time_constants_s == pytest.approx(fit_traces([llm, mm]).time_constants_s, rel=1e-3)
    assert res.x0_k[2] == res.x0_k[1]  # the first segment has no HBM: its HBM starts at the plate
    json.dumps(res.summary(), allow_nan=False)  # the model file is strict JSON


def test_a_joint_fit_gives_each_trace_its_own_supply() -> None:
    """Synthetic: one plant, two sessions with coolant 10 K apart and different loads."""
    true = ThermalParams(0.025, 0.15, 0.022, 12.0, r_mem_k_per_w=0.03, tau_mem_s=0.5, mem_offset_c=1.0)
    texts = []
    for supply_c, step_w in ((28.0, 450.0), (38.0, 600.0)):
        t = np.arange(0.0, 120.0, 0.1)
        heat = 100.0 + step_w * ((t > 20) & (t < 70)) + 0.5 * step_w * (t > 90)
        x = simulate_rise(true, t, heat, np.array(true.steady_rise_k(100.0)))
        reading = np.convolve(np.concatenate([np.full(9, heat[0]), heat]), np.ones(10) / 10, mode="valid")
        die = np.round(supply_c + x[:, 0])
        texts.append(_csv(list(zip(t.round(3), reading, die, strict=True))))
    traces = [parse_trace_csv(text) for text in texts]
    res = fit_traces(traces)
    assert [validate(res.params, tr).supply_c for tr in traces] == [
        pytest.approx(28.0, abs=0.5),
        pytest.approx(38.0, abs=0.5),
    ]
    assert res.params.r_total_k_per_w == pytest.approx(true.r_total_k_per_w, rel=0.05)
    assert res.rmse_open_loop_c < 0.4
    with pytest.raises(TraceError, match="no trace"):
        fit_traces([])


def test_validate_on_the_fitted_trace_reproduces_the_fit() -> None:
    name = "h100_llm_decode.csv"
    res, again = clean_fit(name), validate(clean_fit(name).params, load(name))
    assert again.rmse_open_loop_c == pytest.approx(res.rmse_open_loop_c, abs=0.02)
    assert again.rmse_mem_open_loop_c == pytest.approx(res.rmse_mem_open_loop_c, abs=0.02)


# --- corrupted copies fit as well as the clean trace -----------------------------------------------


def _rows(name: str) -> tuple[list[str], list[list[str]]]:
    lines = (DATA / name).read_text().splitlines()
    return lines[0].split(","), [line.split(",") for line in lines[1:]]


@st.composite
def corruption(draw: st.DrawFn, name: str) -> str:
    """The trace's CSV with duplicated rows, swapped neighbours, blank cells and a 30 s gap."""
    header, rows = _rows(name)
    rows = [list(r) for r in rows]
    n = len(rows)
    idx = st.integers(0, n - 2)
    blank_cols = [header.index(c) for c in ("power_w", "gpu_temp_c", "mem_temp_c") if c in header]
    for i in draw(st.lists(idx, min_size=1, max_size=max(2, n // 50))):
        col = draw(st.sampled_from(blank_cols))
        rows[i][col] = ""
    # A 30 s gap: the logger stalled, the rows after it come 30 s later (kept away from the ends
    # so that both segments hold a state estimate).
    at = draw(st.integers(n // 5, 4 * n // 5))
    for r in rows[at:]:
        r[0] = f"{float(r[0]) + 30.0:.3f}"
    for i in draw(st.lists(idx, min_size=1, max_size=max(2, n // 50))):
        rows[i], rows[i + 1] = rows[i + 1], rows[i]  # swapped neighbours
    for i in draw(st.lists(idx, min_size=1, max_size=max(2, n // 50))):
        rows.insert(i, list(rows[i]))  # duplicated row (same timestamp)
    return "\n".join(",".join(r) for r in [header, *rows]) + "\n"


@pytest.mark.parametrize("name", TRACES)
@settings(
    max_examples=8,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # each example is a fit: no minutes-long shrink
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_corrupted_copies_fit_within_0_1_c_of_clean(name: str, data: st.DataObject) -> None:
    text = data.draw(corruption(name))
    trace = parse_trace_csv(text)
    assert trace.cleaned["gaps"] == 1 and trace.cleaned["segments"] == 2
    assert trace.cleaned["duplicate_timestamps_merged"] >= 1 and trace.cleaned["out_of_order"] >= 1
    res = fit_trace(trace)
    clean = clean_fit(name)
    assert abs(res.rmse_open_loop_c - clean.rmse_open_loop_c) <= 0.1
    if clean.rmse_mem_open_loop_c is not None:
        assert res.rmse_mem_open_loop_c is not None
        assert abs(res.rmse_mem_open_loop_c - clean.rmse_mem_open_loop_c) <= 0.1


# --- loading --------------------------------------------------------------------------------------


def _csv(rows: list[tuple[object, ...]], header: str = "t_s,power_w,gpu_temp_c") -> str:
    return header + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows)


def test_parse_sorts_merges_and_counts_what_it_cleaned() -> None:
    rows: list[tuple[object, ...]] = [(i * 0.1, 100 + i, 30 + i % 3, 31) for i in range(40)]
    rows.insert(10, (rows[10][0], 200, 40, 41))  # duplicate timestamp: merged as the mean
    rows[20], rows[21] = rows[21], rows[20]  # out of order
    rows[30] = (rows[30][0], "", 33, "n/a")  # blank power, non-numeric HBM
    rows[35] = (rows[35][0], 1e12, 900, 36)  # out of any physical range: missing
    trace = parse_trace_csv(_csv(rows, "t_s,power_w,gpu_temp_c,mem_temp_c"))
    assert np.all(np.diff(trace.t_s) > 0) and len(trace.t_s) == 40
    assert trace.cleaned["duplicate_timestamps_merged"] == 1
    assert trace.cleaned["out_of_order"] == 1
    assert trace.cleaned["missing_power_w"] == 1 and trace.cleaned["missing_mem_temp_c"] == 1
    assert trace.power_w[10] == pytest.approx((110 + 200) / 2)
    assert trace.power_w[29] == pytest.approx(129.0)  # the blank cell, interpolated from 128 and 130
    assert trace.mem_temp_c is not None and math.isnan(trace.mem_temp_c[29])
    assert trace.cleaned["out_of_range_power_w"] == 1 and trace.cleaned["out_of_range_gpu_temp_c"] == 1
    assert trace.power_w[34] == pytest.approx(134.0) and math.isnan(trace.gpu_temp_c[34])


def test_parse_splits_at_gaps_and_drops_tiny_segments() -> None:
    rows = [(i * 0.1, 100, 30) for i in range(30)]
    rows += [(100 + i * 0.1, 100, 30) for i in range(5)]  # too short to hold a state
    rows += [(200 + i * 0.1, 100, 30) for i in range(30)]
    trace = parse_trace_csv(_csv(rows))
    assert trace.cleaned["gaps"] == 2 and trace.segments == ((0, 30), (30, 60))
    assert trace.cleaned["rows_in_short_segments_dropped"] == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("t_s,power_w\n1,2\n", "missing column"),
        (_csv([(i, 100, 30) for i in range(5)]), "usable rows"),
        (_csv([("", 100, 30)] * 30), "usable rows"),
        (_csv([(i, "", 30) for i in range(30)]), "no usable power_w"),
    ],
)
def test_parse_rejects_unusable_traces(text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_trace_csv(text)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([(i * 0.1, 100 + 500 * (i > 20), 30 + i % 5) for i in range(50)], "too short"),
        ([(i * 0.1, 300 + i % 7, 30 + i % 5) for i in range(300)], "no power step"),
        ([(i * 0.1, 100 + 500 * (i > 100), 45) for i in range(300)], "constant temperature"),
    ],
)
def test_fit_says_why_a_trace_cannot_identify_a_model(rows: list[tuple[object, ...]], message: str) -> None:
    with pytest.raises(TraceError, match=message):
        fit_trace(parse_trace_csv(_csv(rows)))


# --- the method -----------------------------------------------------------------------------------


def test_deconvolution_undoes_a_one_second_average() -> None:
    rng = np.random.default_rng(1)
    heat = np.repeat(rng.uniform(100.0, 700.0, 30), 20)  # steps every 2 s on a 0.1 s grid
    taps = 10
    padded = np.concatenate([np.full(taps - 1, heat[0]), heat])
    reading = np.convolve(padded, np.ones(taps) / taps, mode="valid")
    est = deconvolve_boxcar(reading, taps)
    assert np.mean(np.abs(est - heat)) < 0.1 * np.mean(np.abs(reading - heat))
    assert deconvolve_boxcar(reading, 1) is reading


@pytest.mark.parametrize(("tau1", "g1", "tau2", "g2"), [(0.1, 0.027, 14.0, 0.019), (1.0, 0.01, 5.0, 0.05)])
def test_foster_and_cauer_forms_are_the_same_model(tau1: float, g1: float, tau2: float, g2: float) -> None:
    r_dp, tau_die, r_pc, tau_plate = foster_to_cauer(tau1, g1, tau2, g2)
    params = ThermalParams(r_dp, tau_die, r_pc, tau_plate)
    (t1, h1), (t2, h2), _ = cauer_to_foster(params)
    assert (t1, h1, t2, h2) == pytest.approx((tau1, g1, tau2, g2), rel=1e-9)
    assert params.r_total_k_per_w == pytest.approx(g1 + g2)


def test_fit_recovers_known_parameters_through_the_averaged_reading() -> None:
    """Synthetic: known plant, heat steps, NVML-like 1 s averaged power reading, integer °C."""
    true = ThermalParams(0.025, 0.15, 0.022, 12.0, r_mem_k_per_w=0.03, tau_mem_s=0.5, mem_offset_c=1.0)
    t = np.arange(0.0, 200.0, 0.1)
    heat = 100.0 + 450.0 * ((t > 20) & (t < 70)) + 250.0 * ((t > 100) & (t < 130)) + 300.0 * (t > 160)
    x = simulate_rise(true, t, heat, np.array(true.steady_rise_k(100.0)))
    reading = np.convolve(np.concatenate([np.full(9, heat[0]), heat]), np.ones(10) / 10, mode="valid")
    die, mem = np.round(28.0 + x[:, 0]), np.round(28.0 + 1.0 + x[:, 2])
    csv = _csv(list(zip(t.round(3), reading, die, mem, strict=True)), "t_s,power_w,gpu_temp_c,mem_temp_c")
    res = fit_trace(parse_trace_csv(csv))
    assert res.rmse_open_loop_c < 0.4  # whole-degree readings: 0.29 °C of quantisation alone
    assert res.params.r_total_k_per_w == pytest.approx(true.r_total_k_per_w, rel=0.05)
    assert res.params.tau_plate_s == pytest.approx(true.tau_plate_s, rel=0.15)
    assert res.params.r_mem_k_per_w == pytest.approx(true.r_mem_k_per_w, abs=0.005)
    assert res.supply_c == pytest.approx(28.0, abs=0.5)


# --- the model file -------------------------------------------------------------------------------


def test_params_from_model_round_trips_and_checks_every_value() -> None:
    doc = {"schema": MODEL_SCHEMA, "params": DEFAULT_PARAMS.scaled(1.2).as_dict(), "rmse_10s_c": 1.0}
    assert params_from_model(json.loads(json.dumps(doc))) == DEFAULT_PARAMS.scaled(1.2)
    bad: list[tuple[object, str]] = [
        ([], "one JSON object"),
        ({**doc, "schema": "x/1"}, "schema"),
        ({"schema": MODEL_SCHEMA}, "params"),
        ({**doc, "params": {**doc["params"], "tau_plate_s": -1.0}}, "tau_plate_s"),
        ({**doc, "params": {**doc["params"], "tau_die_s": float("nan")}}, "tau_die_s"),
        ({**doc, "params": {**doc["params"], "r_die_plate_k_per_w": "0.02"}}, "r_die_plate_k_per_w"),
        ({**doc, "params": {k: v for k, v in doc["params"].items() if k != "tau_mem_s"}}, "tau_mem_s"),
        ({**doc, "params": {**doc["params"], "speed_of_light": 1.0}}, "unknown"),
    ]
    for model, message in bad:
        with pytest.raises(ValueError, match=message):
            params_from_model(model)


# --- the discretisation ---------------------------------------------------------------------------


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

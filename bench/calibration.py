"""Benchmark of ``rackguard model fit``: speed on 3,000 rows, cross-validation, identifiability.

Usage: ``python3 -m rackguard.bench.calibration [--runs 5] [--json]``

* Speed: the median wall time of ``fit_trace`` (parse excluded, scipy already imported) on
  the two shared H100 traces and on a 3,000-row trace (the llm trace, a 30 s logger gap, then
  its first 1,184 rows again: two segments). The reference, timed in the same run on the same
  3,000 rows, is the fit this one replaced (main before #14: 7-parameter least squares on a
  per-sample simulation; its HBM step left out, so the reference is faster than it was).
* Cross-validation: each shared trace's model on the other trace (only supply and initial
  state re-estimated), die and HBM open-loop RMSE.
* Identifiability: each fit's searched time constants, their 95 % intervals and bounds.
* Joint fit: one model fitted to both traces at once (``model fit A.csv B.csv``), its error
  on each, its time constants and its wall time. Not a cross-validation: both traces are seen.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from rackguard.controllers.thermal import DEFAULT_PARAMS, simulate_rise
from rackguard.controllers.thermal_fit import (
    BOUNDS_S,
    FitResult,
    Trace,
    fit_trace,
    fit_traces,
    parse_trace_csv,
    validate,
)

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
LLM, MATMUL = DATA / "h100_llm_decode.csv", DATA / "h100_matmul_burst.csv"


def three_thousand_rows(path: Path = LLM) -> Trace:
    """The llm trace, a 30 s gap, then its first rows again: 3,000 rows in two segments."""
    lines = path.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    end = float(rows[-1].split(",")[0]) + 30.0
    extra = []
    for line in rows[: 3000 - len(rows)]:
        t, rest = line.split(",", 1)
        extra.append(f"{float(t) + end:.3f},{rest}")
    trace = parse_trace_csv("\n".join([header, *rows, *extra]) + "\n")
    assert len(trace.t_s) == 3000 and trace.cleaned["segments"] == 2
    return trace


def reference_fit(trace: Trace) -> float:
    """main's die-path fit before #14 (scipy least squares on ``simulate_rise``); returns its RMSE."""
    from scipy.optimize import least_squares

    t, p, y = trace.t_s - trace.t_s[0], trace.power_w, trace.gpu_temp_c
    d = DEFAULT_PARAMS

    def resid(v: np.ndarray) -> np.ndarray:
        prm = replace(
            d,
            r_die_plate_k_per_w=math.exp(v[2]),
            tau_die_s=math.exp(v[3]),
            r_plate_coolant_k_per_w=math.exp(v[4]),
            tau_plate_s=math.exp(v[5]),
        )
        heat = np.interp(t + v[6], t, p)
        x0 = np.array([v[1] + prm.r_die_plate_k_per_w * heat[0], v[1], v[1]])
        out: np.ndarray = v[0] + simulate_rise(prm, t, heat, x0)[:, 0] - y
        return out

    v0 = np.array(
        [
            float(y[0]) - d.r_total_k_per_w * float(p[0]),
            d.r_plate_coolant_k_per_w * float(p[0]),
            *np.log([d.r_die_plate_k_per_w, d.tau_die_s, d.r_plate_coolant_k_per_w, d.tau_plate_s]),
            0.5,
        ]
    )
    lo = np.array([-20.0, -5.0, *np.log([0.003, 0.05, 0.002, 2.0]), 0.0])
    hi = np.array([80.0, 60.0, *np.log([0.2, 5.0, 0.2, 200.0]), 1.5])
    sol = least_squares(resid, v0, bounds=(lo, hi), x_scale="jac")
    return float(np.sqrt(np.mean(sol.fun**2)))


def _time(fn: Any, runs: int) -> dict[str, Any]:
    """Median wall and CPU seconds of ``runs`` calls (CPU: less sensitive to a shared machine's load)."""
    walls, cpus = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {
        "median_s": round(statistics.median(walls), 3),
        "median_cpu_s": round(statistics.median(cpus), 3),
        "runs_s": [round(w, 3) for w in walls],
    }


def run(runs: int) -> dict[str, Any]:
    """All figures, as one JSON-ready dict."""
    traces = {
        "llm_decode": parse_trace_csv(LLM.read_text()),
        "matmul_burst": parse_trace_csv(MATMUL.read_text()),
    }
    big = three_thousand_rows()
    t0 = time.perf_counter()
    fit_trace(traces["matmul_burst"])  # imports scipy (the first fit in a process pays it)
    first_s = time.perf_counter() - t0
    speed: dict[str, Any] = {"first_fit_in_process_s": round(first_s, 3)}
    for name, trace in {**traces, "3000_rows": big}.items():
        speed[name] = {"rows": len(trace.t_s), **_time(lambda trace=trace: fit_trace(trace), runs)}
    speed["reference_3000_rows"] = _time(lambda: reference_fit(big), max(1, min(runs, 3)))
    new, ref = speed["3000_rows"], speed["reference_3000_rows"]
    speed["ratio_reference_over_new"] = round(ref["median_s"] / new["median_s"], 1)
    speed["ratio_reference_over_new_cpu"] = round(ref["median_cpu_s"] / new["median_cpu_s"], 1)

    both = list(traces.values())
    speed["joint_both_traces"] = {
        "rows": sum(len(t.t_s) for t in both),
        **_time(lambda: fit_traces(both), runs),
    }

    fits = {name: fit_trace(trace) for name, trace in traces.items()}
    own = {name: {**_errors(f), **_identifiability(f)} for name, f in fits.items()}
    cross = {}
    for a, b in (("matmul_burst", "llm_decode"), ("llm_decode", "matmul_burst")):
        v = validate(fits[a].params, traces[b], hbm="tau_mem_s" in fits[a].time_constants_s)
        cross[f"{a} -> {b}"] = _errors(v)
    joint = fit_traces(both)
    joint_out = {
        **_identifiability(joint),
        "on": {name: _errors(validate(joint.params, trace)) for name, trace in traces.items()},
    }
    return {"speed": speed, "fits": own, "cross_validation": cross, "joint_fit": joint_out}


def _errors(f: FitResult) -> dict[str, Any]:
    return {
        "rmse_die_c": round(f.rmse_open_loop_c, 3),
        "rmse_hbm_c": None if f.rmse_mem_open_loop_c is None else round(f.rmse_mem_open_loop_c, 3),
        "rmse_10s_die_c": round(f.rmse_10s_c, 3),
    }


def _identifiability(f: FitResult) -> dict[str, Any]:
    return {
        "time_constants_s": {
            k: {
                "value": round(v, 4),
                "interval_95": [round(x, 4) for x in f.intervals.get(k, (math.nan, math.nan))],
                "bounds": list(BOUNDS_S[k]),
            }
            for k, v in f.time_constants_s.items()
        },
        "warnings": list(f.warnings),
    }


def main(argv: list[str] | None = None) -> int:
    """Run and print the figures."""
    ap = argparse.ArgumentParser(prog="python3 -m rackguard.bench.calibration")
    ap.add_argument("--runs", type=int, default=5, help="timed fits per trace (median)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    out = run(max(1, args.runs))
    if args.json:
        print(json.dumps(out))
        return 0
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

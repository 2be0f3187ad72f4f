"""``rackguard model``: record a trace from NVML, fit the thermal model to it, show the defaults."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rackguard.controllers.thermal_fit import FitResult, Trace

EX_USAGE = 2
EX_UNAVAILABLE = 69
RECORD_COLUMNS = ("t_s", "power_w", "gpu_temp_c", "mem_temp_c", "sm_clock_mhz")


def register(sub: Any) -> None:
    """Add ``model fit``, ``model record`` and ``model defaults`` to the CLI."""
    p = sub.add_parser("model", help="thermal model: record a trace, fit it, show defaults")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION")
    fit = msub.add_parser("fit", help="fit the thermal RC model to CSV traces of one GPU")
    fit.add_argument(
        "traces",
        type=Path,
        nargs="+",
        metavar="TRACE",
        help="CSV with t_s, power_w, gpu_temp_c (+ mem_temp_c, coolant_supply_c); several are "
        "fitted together (each keeps its own supply temperature and initial state)",
    )
    fit.add_argument("--json", action="store_true", help="print one JSON object (the model file's)")
    fit.add_argument(
        "--validate",
        type=Path,
        action="append",
        default=[],
        metavar="CSV",
        help="also report the open-loop error on this trace, not used in the fit (repeatable)",
    )
    fit.add_argument(
        "--power-window-s",
        type=float,
        default=1.0,
        help="the power reading is the mean over this window (H100 NVML: 1 s; 0: instantaneous)",
    )
    fit.add_argument("--out", type=Path, help="write the model file (control.thermal_model_file)")
    fit.add_argument("--plot", type=Path, metavar="PNG", help="measured vs predicted, with residuals")
    fit.set_defaults(func=cmd_fit)
    rec = msub.add_parser("record", help="record a trace from NVML (read-only) while you run a load")
    rec.add_argument("--gpu", type=int, required=True, help="NVML index of the GPU")
    rec.add_argument("--seconds", type=float, required=True, help="how long to record")
    rec.add_argument("--period-s", type=float, default=0.1, help="sample period (default 0.1 s)")
    rec.add_argument("--out", type=Path, help="CSV file (default: stdout)")
    rec.set_defaults(func=cmd_record)
    show = msub.add_parser("defaults", help="print the built-in (trace-fitted) parameters")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=cmd_defaults)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EX_USAGE


def _load(path: Path) -> Trace:
    from rackguard.controllers.thermal_fit import parse_trace_csv

    return parse_trace_csv(path.read_text())


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit one or more traces; bad input gives a message on stderr and exit 2."""
    from rackguard.controllers.thermal import MODEL_SCHEMA
    from rackguard.controllers.thermal_fit import TraceError, fit_traces, validate

    def fail(path: Path, why: str) -> int:
        print(f"rackguard model fit: {path}: {why}", file=sys.stderr)
        return EX_USAGE

    if not 0.0 <= args.power_window_s <= 10.0:
        return fail(args.traces[0], "--power-window-s must be within [0, 10]")
    fitted_paths = [p.resolve() for p in args.traces]
    if dup := next(
        (p for p, r in zip(args.traces, fitted_paths, strict=True) if fitted_paths.count(r) > 1), None
    ):
        return fail(dup, "fitted twice (it would weigh double)")
    traces: dict[Path, Trace] = {}
    for path in (*args.traces, *args.validate):
        try:
            traces[path] = _load(path)
        except OSError as exc:
            return fail(path, f"cannot read: {exc.strerror or exc}")
        except (TraceError, UnicodeDecodeError) as exc:
            return fail(path, str(exc))
    fitted = [traces[p] for p in args.traces]
    t0 = time.perf_counter()
    try:
        res = fit_traces(fitted, power_window_s=args.power_window_s)
    except TraceError as exc:
        return fail(args.traces[exc.trace_index or 0], f"cannot identify a model: {exc}")
    fit_s = time.perf_counter() - t0
    cleaned: dict[str, int] = {}
    for trace in fitted:
        for k, v in trace.cleaned.items():
            cleaned[k] = cleaned.get(k, 0) + v
    out: dict[str, Any] = {
        "schema": MODEL_SCHEMA,
        "trace": " + ".join(map(str, args.traces)),  # for people (/v1/model); "traces" for programs
        "traces": [str(p) for p in args.traces],
        "fitted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "rows": sum(len(t.t_s) for t in fitted),
        "cleaned": cleaned,
        **res.summary(),
        "fit_s": round(fit_s, 3),
    }
    hbm = "tau_mem_s" in res.time_constants_s
    each: dict[Path, FitResult] = {args.traces[0]: res}
    if len(fitted) > 1:  # per-trace figures: the same supply and initial states as the joint fit
        each = {
            p: validate(res.params, traces[p], power_window_s=args.power_window_s, hbm=hbm)
            for p in args.traces
        }
        out["per_trace"] = {
            str(p): _errors(r.summary()) | {"supply_c": round(r.supply_c, 3)} for p, r in each.items()
        }
    checks: dict[Path, FitResult] = {}
    for path in args.validate:
        checks[path] = validate(
            res.params,
            traces[path],
            power_window_s=args.power_window_s,
            hbm=hbm,
        )
        out.setdefault("validation", {})[str(path)] = _errors(checks[path].summary())
    if args.out is not None:
        try:
            args.out.write_text(json.dumps(out, indent=1) + "\n")
        except OSError as exc:
            return fail(args.out, f"cannot write: {exc.strerror or exc}")
    if args.plot is not None:
        code = _plot(args.plot, {p: (traces[p], r) for p, r in (each | checks).items()})
        if code:
            return code
    if args.json:
        print(json.dumps(out))
        return 0
    _print_text(out)
    return 0


def _errors(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        k: summary[k] for k in ("rmse_open_loop_c", "rmse_10s_c", "rmse_mem_open_loop_c", "rmse_mem_10s_c")
    }


def _print_text(out: dict[str, Any]) -> None:
    print(
        f"{out['trace']}: {out['rows']} rows, {out['cleaned']['segments']} segment(s), "
        f"fit in {out['fit_s']} s (validation and plot not counted)"
    )
    changed = {k: v for k, v in out["cleaned"].items() if v and k not in ("rows_read", "segments")}
    if changed:
        print("  cleaned: " + ", ".join(f"{k} {v}" for k, v in changed.items()))
    for k, v in out["params"].items():
        print(f"  {k:26s} {v:.6g}")
    supply = "supply_c (effective, 1st)" if "per_trace" in out else "supply_c (effective)"
    print(f"  {supply:26s} {out['supply_c']:.3f}")
    for k, v in out["time_constants_s"].items():
        lo_hi = out["intervals_95"].get(k)
        ci = f"  95 % [{lo_hi[0]:.3g}, {lo_hi[1]:.3g}]" if lo_hi else ""
        print(f"  {k:26s} {v:.4g}{ci}")
    pooled = "  (all traces' samples)" if "per_trace" in out else ""
    print(f"  rmse_open_loop_c = {out['rmse_open_loop_c']}   rmse_10s_c = {out['rmse_10s_c']}{pooled}")
    if out["rmse_mem_open_loop_c"] is not None:
        print(
            f"  rmse_mem_open_loop_c = {out['rmse_mem_open_loop_c']}   rmse_mem_10s_c = {out['rmse_mem_10s_c']}"
        )
    for kind, key in (("fitted", "per_trace"), ("validation on", "validation")):
        for path, v in out.get(key, {}).items():
            mem = f", HBM {v['rmse_mem_open_loop_c']}" if v["rmse_mem_open_loop_c"] is not None else ""
            print(f"  {kind} {path}: open-loop die {v['rmse_open_loop_c']}{mem}, 10 s die {v['rmse_10s_c']}")
    for w in out["warnings"]:
        print(f"  warning: {w}")


def _plot(path: Path, runs: dict[Path, tuple[Trace, FitResult]]) -> int:
    """Measured against predicted (die, HBM) with residuals, one column per trace."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("rackguard model fit: --plot needs matplotlib (pip install 'rackguard[plot]')", file=sys.stderr)
        return EX_UNAVAILABLE
    fig, axes = plt.subplots(2, len(runs), figsize=(7 * len(runs), 6), squeeze=False, sharex="col")
    for col, (name, (trace, res)) in enumerate(runs.items()):
        top, bottom = axes[0][col], axes[1][col]
        series = [("die", trace.gpu_temp_c, res.die_pred_c, "C0")]
        if trace.mem_temp_c is not None and res.mem_pred_c is not None:
            series.append(("HBM", trace.mem_temp_c, res.mem_pred_c, "C1"))
        for label, meas, pred, color in series:
            top.plot(trace.t_s, meas, ".", ms=2, color=color, alpha=0.5, label=f"{label} measured")
            top.plot(trace.t_s, pred, "-", lw=1, color=color, label=f"{label} predicted")
            bottom.plot(trace.t_s, pred - meas, "-", lw=0.8, color=color, label=f"{label} residual")
        rm = res.rmse_mem_open_loop_c
        top.set_title(
            f"{name.name}: die RMSE {res.rmse_open_loop_c:.2f} °C"
            + (f", HBM {rm:.2f} °C" if rm is not None else "")
        )
        top.set_ylabel("°C")
        bottom.set_ylabel("predicted − measured, °C")
        bottom.set_xlabel("t, s")
        bottom.axhline(0.0, color="k", lw=0.5)
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        print(f"rackguard model fit: {path}: cannot write: {exc.strerror or exc}", file=sys.stderr)
        return EX_USAGE
    finally:
        plt.close(fig)
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    """Record one GPU from NVML, read-only, into the CSV that ``model fit`` reads."""
    from rackguard.sensors.base import SensorError
    from rackguard.sensors.nvml import NvmlBackend

    if not 0.01 <= args.period_s <= 10.0 or not 0.0 < args.seconds <= 86_400.0 or args.gpu < 0:
        print(
            "rackguard model record: need --gpu ≥ 0, 0 < --seconds ≤ 86400, 0.01 ≤ --period-s ≤ 10",
            file=sys.stderr,
        )
        return EX_USAGE
    backend = NvmlBackend([args.gpu])
    try:
        infos = backend.open()
    except SensorError as exc:
        print(f"rackguard model record: NVML: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    if not infos:
        backend.close()
        print(f"rackguard model record: no GPU with NVML index {args.gpu}", file=sys.stderr)
        return EX_UNAVAILABLE
    try:
        out: IO[str] = sys.stdout if args.out is None else args.out.open("w")
    except OSError as exc:
        backend.close()
        print(f"rackguard model record: {args.out}: cannot write: {exc.strerror or exc}", file=sys.stderr)
        return EX_USAGE
    try:
        rows, failed, stopped = _record(backend, args.gpu, args.seconds, args.period_s, out)
    finally:
        backend.close()
        if out is not sys.stdout:
            out.close()
    where = "stdout" if args.out is None else str(args.out)
    print(
        f"rackguard model record: GPU {args.gpu} ({infos[0].name}): {rows} rows to {where}, "
        f"{failed} failed reads" + (f"; stopped: {stopped}" if stopped else ""),
        file=sys.stderr,
    )
    return EX_UNAVAILABLE if stopped.startswith("GPU lost") else 0


def _record(backend: Any, gpu: int, seconds: float, period_s: float, out: IO[str]) -> tuple[int, int, str]:
    """Sample until ``seconds`` pass, ^C, or the GPU is lost; each row is flushed at once.

    Returns:
        Rows written, failed reads, and why it stopped early ("" if it did not).
    """
    from rackguard.sensors.base import GpuLost, SensorError

    def cell(v: float | None, digits: int) -> str:
        return "" if v is None else f"{v:.{digits}f}"

    out.write(",".join(RECORD_COLUMNS) + "\n")
    start = time.monotonic()
    t0: float | None = None
    rows = failed = k = 0
    try:
        while time.monotonic() - start < seconds:
            try:
                s = backend.read(gpu, slow=True)
            except GpuLost as exc:
                return rows, failed, f"GPU lost: {exc}"
            except SensorError:
                failed += 1
            else:
                t0 = s.t_s if t0 is None else t0
                out.write(
                    f"{s.t_s - t0:.3f},{cell(s.power_w, 3)},{cell(s.gpu_temp_c, 1)},"
                    f"{cell(s.mem_temp_c, 1)},{cell(s.sm_clock_mhz, 0)}\n"
                )
                out.flush()
                rows += 1
            k += 1
            time.sleep(max(0.0, start + k * period_s - time.monotonic()))
    except KeyboardInterrupt:
        return rows, failed, "interrupted"
    return rows, failed, ""


def cmd_defaults(args: argparse.Namespace) -> int:
    """Print the built-in parameters."""
    from rackguard.controllers.thermal import DEFAULT_PARAMS

    params = DEFAULT_PARAMS.as_dict()
    if args.json:
        print(json.dumps({"params": params}))
    else:
        for k, v in params.items():
            print(f"{k:26s} {v:.6g}")
    return 0

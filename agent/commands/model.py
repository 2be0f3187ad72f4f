"""``rackguard model``: fit the thermal model to a measured trace, or show the defaults."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EX_USAGE = 2


def register(sub: Any) -> None:
    """Add ``model fit`` and ``model defaults`` to the CLI."""
    p = sub.add_parser("model", help="thermal model: fit to a trace, show defaults")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION")
    fit = msub.add_parser("fit", help="fit the thermal RC model to a CSV trace")
    fit.add_argument(
        "trace", type=Path, help="CSV with t_s, power_w, gpu_temp_c (+ mem_temp_c, coolant_supply_c)"
    )
    fit.add_argument("--json", action="store_true", help="print one JSON object")
    fit.set_defaults(func=cmd_fit)
    show = msub.add_parser("defaults", help="print the built-in (trace-fitted) parameters")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=cmd_defaults)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EX_USAGE


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit a trace; bad input gives a message on stderr and exit 2."""
    from rackguard.controllers.thermal import TraceError, fit_trace, parse_trace_csv

    path: Path = args.trace
    try:
        text = path.read_text()
    except OSError as exc:
        print(f"rackguard model fit: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return EX_USAGE
    try:
        trace = parse_trace_csv(text)
    except TraceError as exc:
        print(f"rackguard model fit: {path}: {exc}", file=sys.stderr)
        return EX_USAGE
    res = fit_trace(trace)
    params = res.params.as_dict()
    out: dict[str, Any] = {
        "trace": str(path),
        "rows": len(trace.t_s),
        "params": params,
        "supply_c": round(res.supply_c, 3),
        "initial_state_k": dict(zip(("die", "plate", "mem"), (round(v, 3) for v in res.x0_k), strict=True)),
        "rmse_open_loop_c": round(res.rmse_open_loop_c, 4),
        "rmse_10s_c": round(res.rmse_10s_c, 4),
        "rmse_mem_open_loop_c": None
        if res.rmse_mem_open_loop_c is None
        else round(res.rmse_mem_open_loop_c, 4),
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{path}: {out['rows']} rows")
    for k, v in params.items():
        print(f"  {k:26s} {v:.6g}")
    print(f"  {'supply_c (effective)':26s} {res.supply_c:.3f}")
    print(f"  rmse_open_loop_c = {res.rmse_open_loop_c:.3f}   rmse_10s_c = {res.rmse_10s_c:.3f}")
    if res.rmse_mem_open_loop_c is not None:
        print(f"  rmse_mem_open_loop_c = {res.rmse_mem_open_loop_c:.3f}")
    return 0


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

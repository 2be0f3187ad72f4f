"""``rackguard bench``: benchmarks. ``bench controllers`` scores MPC, PID and threshold."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

EX_USAGE = 2
EX_UNAVAILABLE = 69


def default_scenario_dir() -> Path:
    """``bench/scenarios`` of the source tree (or of the current directory)."""
    here = Path(__file__).resolve().parents[2] / "bench" / "scenarios"
    return here if here.is_dir() else Path.cwd() / "bench" / "scenarios"


def register(sub: Any) -> None:
    """Add ``bench`` with its nested subcommands (``controllers``; more may follow)."""
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    c = bsub.add_parser("controllers", help="MPC vs PID vs threshold on scenario TOMLs")
    c.add_argument(
        "--scenario", action="append", type=Path, metavar="FILE", help="scenario TOML (repeatable)"
    )
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument(
        "--plot", type=Path, metavar="DIR", help="write one PNG per scenario (needs the 'plot' extra)"
    )
    c.add_argument("--duration-s", type=float, help="override every scenario's duration (quick runs)")
    c.add_argument(
        "--seed",
        type=int,
        help="override every scenario's noise seed (check a result is not one draw's luck)",
    )
    c.set_defaults(func=cmd_controllers)
    from rackguard.agent import benchagent

    benchagent.register(bsub)  # bench agent, bench fleet
    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EX_USAGE


def cmd_controllers(args: argparse.Namespace) -> int:
    """Run every scenario × controller; print a table or JSON."""
    from rackguard.controllers.harness import CONTROLLERS, ScenarioError, bench_scenario, parse_scenario

    plt: Any = None
    if args.plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as pyplot

            plt = pyplot
        except ImportError:
            print(
                "rackguard bench controllers: --plot needs matplotlib: pip install 'rackguard[plot]'",
                file=sys.stderr,
            )
            return EX_UNAVAILABLE
    files: list[Path] = args.scenario or sorted(default_scenario_dir().glob("*.toml"))
    if not files:
        print("rackguard bench controllers: no scenario files", file=sys.stderr)
        return EX_USAGE
    scenarios = []
    for f in files:
        try:
            scn = parse_scenario(f.read_text(), name=f.stem)
        except (OSError, ScenarioError) as exc:
            print(f"rackguard bench controllers: {f}: {exc}", file=sys.stderr)
            return EX_USAGE
        if args.duration_s:
            scn = scn.with_duration(args.duration_s)
        if args.seed is not None:
            scn = dataclasses.replace(scn, seed=args.seed)
        scenarios.append(scn)

    results = []
    for scn in scenarios:
        r = bench_scenario(scn)
        if plt is not None:
            _plot(plt, args.plot, scn.name, r)
        results.append(r)

    totals = {name: sum(r["controllers"][name]["served"] for r in results) for name in CONTROLLERS}
    oracle_total = sum(r["oracle_served"] for r in results)
    summary = {
        "served": {k: round(v, 1) for k, v in totals.items()},
        "oracle_served": round(oracle_total, 1),
        "mpc_vs_threshold": round(totals["mpc"] / totals["threshold"], 4) if totals["threshold"] else None,
        "mpc_vs_pid": round(totals["mpc"] / totals["pid"], 4) if totals["pid"] else None,
        "mpc_oracle_ratio": round(totals["mpc"] / oracle_total, 4) if oracle_total else None,
        "seconds_over_limit": {
            k: round(sum(r["controllers"][k]["seconds_over_limit"] for r in results), 2) for k in CONTROLLERS
        },
        "seconds_over_target": {
            k: round(sum(r["controllers"][k]["seconds_over_target"] for r in results), 2) for k in CONTROLLERS
        },
    }
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    if args.json:
        print(json.dumps({"scenarios": clean, "summary": summary}))
        return 0
    cols = (
        "served",
        "oracle_ratio",
        "seconds_over_limit",
        "seconds_over_target",
        "max_temp_c",
        "cap_changes",
        "leak_to_cap_s",
    )
    print(f"{'scenario':22s} {'ctrl':9s} " + " ".join(f"{c:>18s}" for c in cols))
    for r in clean:
        for name, m in r["controllers"].items():
            print(f"{r['name']:22s} {name:9s} " + " ".join(f"{m[c]!s:>18s}" for c in cols))
    print(json.dumps(summary, indent=2))
    return 0


def _plot(plt: Any, out_dir: Path, name: str, result: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    runs = {"oracle": result["_oracle"], **result["_runs"]}
    for ctrl, run in runs.items():
        ax1.plot(run.t_s, run.served_total, label=ctrl, lw=1)
        ax2.plot(run.t_s, run.max_die_c, label=ctrl, lw=1)
    ax1.set_ylabel("served concurrency (node)")
    ax2.set_ylabel("hottest die (°C)")
    ax2.set_xlabel("t (s)")
    ax1.legend(loc="lower right")
    ax1.set_title(name)
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=100)
    plt.close(fig)

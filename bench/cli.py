"""``rackguard bench``: the argument parsing and printing of every benchmark subcommand.

``bench controllers`` scores MPC, PID and threshold (and the oracle) on scenario TOMLs;
``bench agent`` and ``bench fleet`` measure the daemon. The benchmarks themselves are
imported only when their subcommand runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rackguard.bench.common import parse_hostport

EX_USAGE = 2
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70


def register(sub: Any) -> None:
    """Add ``bench`` with its nested subcommands: ``controllers``, ``agent``, ``fleet``."""
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    c = bsub.add_parser("controllers", help="MPC vs PID vs threshold on scenario TOMLs")
    c.add_argument(
        "--scenario",
        action="append",
        type=Path,
        metavar="FILE",
        help="scenario TOML (repeatable; default: the shipped scenarios)",
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

    a = bsub.add_parser("agent", help="the daemon's CPU, RSS, jitter, leak-to-cap latency, traffic, replay")
    a.add_argument("--gpus", type=int, default=8, help="simulated GPUs (default 8)")
    a.add_argument("--seconds", type=float, default=60.0, help="steady-state window (default 60)")
    a.add_argument("--warmup-s", type=float, default=5.0, help="before the window (default 5)")
    a.add_argument(
        "--leak-events", type=int, default=1000, help="leak → cap events to time (default 1000; 0 skips)"
    )
    a.add_argument(
        "--outage-s", type=float, default=30.0, help="broker outage for the replay phase (0 skips)"
    )
    a.add_argument(
        "--broker",
        type=parse_hostport,
        metavar="HOST:PORT",
        help="use this broker (default: start mosquitto)",
    )
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.set_defaults(func=cmd_agent)

    f = bsub.add_parser("fleet", help="many simulated nodes against one broker: the broker's load per node")
    f.add_argument("--nodes", type=int, default=200, help="simulated nodes (default 200)")
    f.add_argument("--procs", type=int, default=4, help="worker processes hosting them (default 4)")
    f.add_argument("--seconds", type=float, default=30.0, help="measured window (default 30)")
    f.add_argument("--warmup-s", type=float, default=10.0, help="after every node is online (default 10)")
    f.add_argument("--gpus", type=int, default=8, help="simulated GPUs per node (default 8)")
    f.add_argument(
        "--poll-period-s",
        type=float,
        default=1.0,
        help="GPU poll period (default 1.0: broker load depends only on the 1 s publish period)",
    )
    f.add_argument(
        "--broker",
        type=parse_hostport,
        metavar="HOST:PORT",
        help="use this broker (default: start mosquitto)",
    )
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.set_defaults(func=cmd_fleet)

    r = bsub.add_parser("rack", help="one rack, one budget: independent vs static vs coordinated vs oracle")
    r.add_argument("--nodes", type=int, default=8, help="agents, each its own process (default 8)")
    r.add_argument("--gpus", type=int, default=4, help="simulated GPUs per node (default 4)")
    r.add_argument(
        "--arm", action="append", choices=("independent", "static", "coordinated"), help="run only these arms"
    )
    r.add_argument("--quick", action="store_true", help="the timeline scaled by 0.4 (CI)")
    r.add_argument("--drill", choices=("broker",), help="broker: coordinated only, the broker down for 30 s")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=cmd_rack)

    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EX_USAGE


def cmd_controllers(args: argparse.Namespace) -> int:
    """Run every scenario × controller; print a table or JSON."""
    from rackguard.bench.harness import (
        CONTROLLERS,
        ScenarioError,
        bench_scenario,
        load_scenario,
        scenario_files,
    )

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
    files: list[Path] = args.scenario or scenario_files()
    if not files:
        print("rackguard bench controllers: no scenario files", file=sys.stderr)
        return EX_USAGE
    scenarios = []
    for f in files:
        try:
            scn = load_scenario(f)
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


def _progress(quiet: bool) -> Callable[[str], None]:
    return (lambda s: None) if quiet else (lambda s: print(f"# {s}", file=sys.stderr, flush=True))


def _print(out: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(out))
        return
    for k, v in out.items():
        print(f"{k:32s} {json.dumps(v)}")


def _report(name: str, bench: Callable[[], dict[str, Any]], as_json: bool) -> int:
    """Run one bench and print its figures; a harness failure exits EX_SOFTWARE with the reason."""
    try:
        out = bench()
    except RuntimeError as exc:
        print(f"rackguard bench {name}: {exc}", file=sys.stderr)
        return EX_SOFTWARE
    _print(out, as_json)
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    """``rackguard bench agent``."""
    from rackguard.bench.agent import AgentBenchOptions, run_agent_bench

    opts = AgentBenchOptions(
        gpus=args.gpus,
        seconds=args.seconds,
        warmup_s=args.warmup_s,
        leak_events=args.leak_events,
        outage_s=args.outage_s,
        broker=args.broker,
        progress=_progress(False),
    )
    return _report("agent", lambda: run_agent_bench(opts), args.json)


def cmd_fleet(args: argparse.Namespace) -> int:
    """``rackguard bench fleet``."""
    from rackguard.bench.fleet import FleetOptions, run_fleet_bench

    opts = FleetOptions(
        nodes=args.nodes,
        procs=max(1, min(args.procs, args.nodes)),
        seconds=args.seconds,
        warmup_s=args.warmup_s,
        gpus=args.gpus,
        poll_period_s=args.poll_period_s,
        broker=args.broker,
        progress=_progress(False),
    )
    return _report("fleet", lambda: run_fleet_bench(opts), args.json)


def cmd_rack(args: argparse.Namespace) -> int:
    """``rackguard bench rack``."""
    from rackguard.bench.rack import ARMS, RackOptions, run_rack_bench

    if args.nodes < 2:
        print("rackguard bench rack: --nodes must be at least 2", file=sys.stderr)
        return EX_USAGE
    opts = RackOptions(
        nodes=args.nodes,
        gpus=args.gpus,
        arms=tuple(a for a in ARMS if not args.arm or a in args.arm),
        quick=args.quick,
        drill=args.drill,
        progress=_progress(False),
    )
    return _report("rack", lambda: run_rack_bench(opts), args.json)

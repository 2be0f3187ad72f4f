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
import time
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
        "--plot",
        type=Path,
        metavar="DIR",
        help="write one PNG per scenario: cap, node power and heat into the coolant with their limits, "
        "hottest die/HBM with theirs, events marked (needs the 'plot' extra)",
    )
    c.add_argument(
        "--trace",
        type=Path,
        metavar="DIR",
        help="write one CSV per scenario and controller (oracle and causal included), one row per step",
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
    r.add_argument(
        "--drill",
        choices=("broker", "clock", "late-will"),
        help="coordinated only: broker, the broker down for 30 s; clock, two nodes' clocks ±1 h off through a "
        "pump failure; late-will, a node's old will arriving after its restart's claims",
    )
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=cmd_rack)

    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EX_USAGE


def cmd_controllers(args: argparse.Namespace) -> int:
    """Run every scenario × controller; print a table or JSON."""
    from rackguard.bench.harness import (
        ScenarioError,
        bench_scenario,
        load_scenario,
        scenario_files,
        write_trace,
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
    for i, scn in enumerate(scenarios, 1):
        # Progress on stderr (stdout stays the table or the JSON): each scenario takes seconds.
        print(f"[{i}/{len(scenarios)}] {scn.name} ...", end="", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        r = bench_scenario(scn)
        print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        if plt is not None:
            _plot(plt, args.plot, scn.name, r)
        if args.trace is not None:
            args.trace.mkdir(parents=True, exist_ok=True)
            for ctrl, res in {"oracle": r["_oracle"], "causal": r["_causal"], **r["_runs"]}.items():
                write_trace(args.trace / f"{scn.name}.{ctrl}.csv", res)
        results.append(r)

    summary = summarise(results)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    if args.json:
        print(json.dumps({"scenarios": clean, "summary": summary}))
        return 0
    cols = (
        "goodput_tokens_per_s",
        "oracle_ratio",
        "causal_ratio",
        "served",
        "seconds_over_limit",
        "max_temp_c",
        "cap_reversals_per_min",
        "max_drop_beyond_need_frac",
        "leak_to_cap_s",
    )
    print(f"{'scenario':22s} {'ctrl':9s} " + " ".join(f"{c[:18]:>18s}" for c in cols))
    for r in clean:
        rows = {"oracle": r["oracle"], "causal": r["causal"], **r["controllers"]}
        for name, m in rows.items():
            print(f"{r['name']:22s} {name:9s} " + " ".join(f"{m.get(c, '-')!s:>18s}" for c in cols))
    print(json.dumps(summary, indent=2))
    return 0


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the scenarios: goodput and served per controller, ratios, seconds over."""
    from rackguard.bench.harness import CONTROLLERS

    def total(key: str, name: str) -> float:
        return float(sum(r["controllers"][name][key] for r in results))

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 4) if b else None

    good = {k: total("goodput", k) for k in CONTROLLERS}
    served = {k: total("served", k) for k in CONTROLLERS}
    oracle_good = float(sum(r["oracle"]["goodput"] for r in results))
    causal_good = float(sum(r["causal"]["goodput"] for r in results))
    ceiling_good = float(sum(r["ceiling_goodput"] for r in results))
    no_slo_good = {
        k: float(sum(r["without_slo"][k]["goodput"] for r in results)) for k in ("pid", "threshold")
    }
    return {
        "goodput": {k: round(v) for k, v in good.items()}
        | {"oracle": round(oracle_good), "causal": round(causal_good)},
        "served": {k: round(v, 1) for k, v in served.items()},
        "oracle_served": round(sum(r["oracle_served"] for r in results), 1),
        "mpc_oracle_ratio": ratio(good["mpc"], oracle_good),
        "mpc_causal_ratio": ratio(good["mpc"], causal_good),
        "mpc_oracle_ratio_min": min((r["controllers"]["mpc"]["oracle_ratio"] or 0.0) for r in results),
        "mpc_vs_pid": ratio(good["mpc"], good["pid"]),
        "mpc_vs_threshold": ratio(good["mpc"], good["threshold"]),
        # The most any controller could reach against each baseline (see ``ceiling_goodput``).
        "ceiling_goodput": round(ceiling_good),
        "ceiling_vs_pid": ratio(ceiling_good, good["pid"]),
        "ceiling_vs_threshold": ratio(ceiling_good, good["threshold"]),
        # Against the baselines not told the SLO (up to max_cap: TPOT over the SLO is no goodput).
        "mpc_vs_pid_without_slo": ratio(good["mpc"], no_slo_good["pid"]),
        "mpc_vs_threshold_without_slo": ratio(good["mpc"], no_slo_good["threshold"]),
        "seconds_over_limit": {k: round(total("seconds_over_limit", k), 2) for k in CONTROLLERS}
        | {
            "oracle": round(sum(r["oracle"]["seconds_over_limit"] for r in results), 2),
            "causal": round(sum(r["causal"]["seconds_over_limit"] for r in results), 2),
        },
        "seconds_over_target": {k: round(total("seconds_over_target", k), 2) for k in CONTROLLERS},
    }


def _plot(plt: Any, out_dir: Path, name: str, result: dict[str, Any]) -> None:
    """Cap, node power, heat into the coolant and temperatures of every run, limits dashed, events marked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scn = result["_scenario"]
    lim = scn.limits
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(11, 10))
    runs = {"oracle": result["_oracle"], "causal": result["_causal"], **result["_runs"]}
    for ctrl, run in runs.items():
        rows = run.trace
        t = [r["t_s"] for r in rows]
        axes[0].plot(t, [r["cap_total"] for r in rows], label=ctrl, lw=1)
        axes[1].plot(t, [r["node_power_w"] / 1e3 for r in rows], label=ctrl, lw=1)
        axes[2].plot(t, [r["coolant_heat_w"] / 1e3 for r in rows], label=ctrl, lw=1)
        axes[3].plot(t, [r["max_die_c"] for r in rows], label=f"{ctrl} die", lw=1)
        if ctrl == "mpc":
            axes[3].plot(t, [r["max_mem_c"] for r in rows], label="mpc HBM", lw=1, ls=":")
    ref = result["_oracle"].trace
    t = [r["t_s"] for r in ref]
    axes[1].plot(t, [r["node_power_limit_w"] / 1e3 for r in ref], "k--", lw=1, label="power limit")
    axes[2].plot(t, [r["coolant_heat_limit_w"] / 1e3 for r in ref], "k--", lw=1, label="heat limit")
    axes[3].axhline(lim.gpu_temp_max_c, color="k", ls="--", lw=1, label="die max")
    axes[3].axhline(lim.mem_temp_max_c, color="grey", ls="--", lw=1, label="HBM max")
    for ax in axes:
        for t_ev, _label in scn.events():
            ax.axvline(t_ev, color="tab:red", lw=0.6, alpha=0.5)
    for t_ev, label in scn.events():
        axes[0].annotate(
            label, (t_ev, 1.0), xycoords=("data", "axes fraction"), fontsize=7, rotation=90, va="top"
        )
    axes[0].set_ylabel("total cap")
    axes[1].set_ylabel("node power (kW)")
    axes[2].set_ylabel("heat into coolant (kW)")
    axes[3].set_ylabel("hottest die / HBM (°C)")
    axes[3].set_xlabel("t (s)")
    for ax in axes:
        ax.legend(loc="lower right", fontsize=7)
    axes[0].set_title(name)
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

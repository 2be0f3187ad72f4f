"""Micro-benchmark of one control step: ``MpcController.step`` + ``SafetyLayer.apply``.

Usage: ``python3 -m rackguard.bench.stepbench [--scenarios DIR] [--passes 3]``

The observation streams are recorded once from closed-loop runs of the shipped scenarios
(8 GPUs, 1 s tick; the plant driven by the MPC through the safety layer), then replayed
into a fresh controller per scenario and pass, timing each step with ``perf_counter``
(wall) and ``process_time`` (CPU). Prints p50/p99/max per pass and the median over passes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from rackguard.bench.harness import SCENARIO_DIR, load_scenario, make_controller, observe, scenario_files
from rackguard.controllers.api import CoolantObs, Observation
from rackguard.controllers.mpc import MpcController
from rackguard.controllers.safety import SafetyLayer
from rackguard.sim.plant import Plant


def record(path: Path) -> tuple[MpcController, list[Observation]]:
    """The observation stream of a closed-loop MPC run of one scenario (and its controller)."""
    scn = load_scenario(path)
    plant = Plant(scn.plant, scn.supply_c.at(0.0), seed=scn.seed)
    ctrl = make_controller("mpc", scn, plant)
    assert isinstance(ctrl, MpcController)
    safety = SafetyLayer(scn.limits)
    stream = []
    held: CoolantObs | None = None
    for k in range(round(scn.duration_s / scn.tick_s)):
        t = k * scn.tick_s
        obs = observe(scn, plant, t, held)
        held = held if scn.silent(t) else obs.coolant
        stream.append(obs)
        dec = safety.apply(obs, ctrl.step(obs))
        offered = np.full(scn.plant.n_gpus, scn.load.at(t))
        plant.advance(
            scn.tick_s,
            np.array(dec.caps, dtype=float),
            offered,
            scn.supply_c.at(t),
            scn.flow_lpm.at(t),
            scn.limits,
            scn.share_at(t),
        )
    return ctrl, stream


def time_pass(streams: list[tuple[MpcController, list[Observation]]]) -> tuple[np.ndarray, np.ndarray]:
    """Replay every stream into a fresh controller; per-step wall and CPU seconds."""
    wall, cpu = [], []
    for proto, stream in streams:
        ctrl = MpcController(proto.limits, proto.n_gpus, proto.model, settings=replace(proto.settings))
        safety = SafetyLayer(proto.limits)
        for obs in stream:
            w0, c0 = time.perf_counter(), time.process_time()
            safety.apply(obs, ctrl.step(obs))
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    return np.asarray(wall), np.asarray(cpu)


def main() -> None:
    """Record the streams, time the passes, print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", type=Path, default=SCENARIO_DIR)
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    streams = [record(p) for p in scenario_files(args.scenarios)]
    n = sum(len(s) for _, s in streams)
    rows = []
    for i in range(args.passes):
        wall, cpu = time_pass(streams)
        row = [float(np.percentile(a, q)) * 1e3 for a in (wall, cpu) for q in (50, 99, 100)]
        rows.append(row)
        print(
            f"pass {i + 1}: {n} steps  wall p50 {row[0]:.3f} p99 {row[1]:.3f} max {row[2]:.3f} ms"
            f"  cpu p50 {row[3]:.3f} p99 {row[4]:.3f} max {row[5]:.3f} ms"
        )
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    print(
        f"median of {args.passes}: wall p50 {med[0]:.3f} p99 {med[1]:.3f} ms  cpu p50 {med[3]:.3f} p99 {med[4]:.3f} ms"
    )


if __name__ == "__main__":
    main()

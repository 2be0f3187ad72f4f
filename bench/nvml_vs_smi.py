"""Cost of one GPU sample: NvmlBackend vs. spawning nvidia-smi.

Compares, per GPU sample (medians over ``--n`` repetitions, methods interleaved):

- ``nvml_slow``: ``NvmlBackend.read(i, slow=True)`` (every field rackguard reads),
- ``nvml_fast``: ``NvmlBackend.read(i, slow=False)`` (for reference),
- ``smi_query``: ``nvidia-smi --query-gpu=<the same fields> --format=csv`` (whole process),
- ``smi_xml``: ``nvidia-smi -q -x`` (whole process; what Telegraf's nvidia_smi input runs).

Wall time is ``time.perf_counter``. CPU time is this process's ``time.process_time``
plus, for the subprocesses, the children's user+system time from
``resource.getrusage(RUSAGE_CHILDREN)``. One nvidia-smi run covers every GPU, so its
cost is divided by the GPU count, as is one NVML sweep over all GPUs.

Usage::

    python3 -m rackguard.bench.nvml_vs_smi --n 50 [--json]

Read-only: changes no GPU setting.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rackguard.sensors.base import SensorError
from rackguard.sensors.nvml import NvmlBackend

SMI_QUERY_FIELDS = "power.draw,temperature.gpu,temperature.memory,clocks.sm,utilization.gpu,power.limit,clocks_event_reasons.active"
BASELINE = "nvml_slow"


@dataclass
class Method:
    """One way of getting a sample of every GPU, and its measured costs per GPU sample."""

    name: str
    label: str
    run: Callable[[], None]
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    child_cpu_s: list[float] = field(default_factory=list)


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _measure(method: Method, n_gpus: int) -> None:
    """Run ``method`` once; append wall, total CPU and child CPU per GPU sample."""
    child0 = _children_cpu_s()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    method.run()
    wall_s = time.perf_counter() - t0
    own_cpu_s = time.process_time() - cpu0
    child_cpu_s = _children_cpu_s() - child0
    method.wall_s.append(wall_s / n_gpus)
    method.cpu_s.append((own_cpu_s + child_cpu_s) / n_gpus)
    method.child_cpu_s.append(child_cpu_s / n_gpus)


def _smi_runner(cmd: list[str]) -> Callable[[], None]:
    def run() -> None:
        proc = subprocess.run(cmd, capture_output=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")

    return run


def _nvml_runner(backend: NvmlBackend, indices: list[int], *, slow: bool) -> Callable[[], None]:
    def run() -> None:
        for i in indices:
            backend.read(i, slow=slow)

    return run


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:,.1f}x"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=30, help="repetitions per method (default 30)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed repetitions per method first (default 2)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be at least 1")

    backend = NvmlBackend()
    try:
        infos = backend.open()
    except SensorError as e:
        print(f"nvml_vs_smi: no usable NVIDIA GPU here ({e}); nothing to measure.", file=sys.stderr)
        return 1
    try:
        if not infos:
            print("nvml_vs_smi: NVML sees no GPUs; nothing to measure.", file=sys.stderr)
            return 1
        smi = shutil.which("nvidia-smi")
        if smi is None:
            print("nvml_vs_smi: nvidia-smi is not on PATH; cannot compare.", file=sys.stderr)
            return 1
        driver = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.splitlines()
        indices = [i.index for i in infos]
        n_gpus = len(indices)
        methods = [
            Method(BASELINE, "NvmlBackend.read(slow=True)", _nvml_runner(backend, indices, slow=True)),
            Method("nvml_fast", "NvmlBackend.read(slow=False)", _nvml_runner(backend, indices, slow=False)),
            Method(
                "smi_query",
                "nvidia-smi --query-gpu=... --format=csv",
                _smi_runner([smi, f"--query-gpu={SMI_QUERY_FIELDS}", "--format=csv"]),
            ),
            Method("smi_xml", "nvidia-smi -q -x", _smi_runner([smi, "-q", "-x"])),
        ]
        for m in methods:
            for _ in range(args.warmup):
                m.run()
        for _ in range(args.n):  # interleaved, so drift affects every method alike
            for m in methods:
                _measure(m, n_gpus)
    finally:
        backend.close()

    base = methods[0]
    base_wall_s = statistics.median(base.wall_s)
    base_cpu_s = statistics.median(base.cpu_s)
    rows: dict[str, dict[str, Any]] = {
        m.name: {
            "label": m.label,
            "wall_s": statistics.median(m.wall_s),
            "cpu_s": statistics.median(m.cpu_s),
            "child_cpu_s": statistics.median(m.child_cpu_s),
            "wall_ratio_vs_nvml_slow": _ratio(statistics.median(m.wall_s), base_wall_s),
            "cpu_ratio_vs_nvml_slow": _ratio(statistics.median(m.cpu_s), base_cpu_s),
        }
        for m in methods
    }
    results: dict[str, Any] = {
        "gpus": [{"index": i.index, "name": i.name, "uuid": i.uuid} for i in infos],
        "driver_version": driver[0].strip() if driver else None,
        "n": args.n,
        "unit": "seconds per GPU sample (median)",
        "methods": rows,
    }

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    names = sorted({i.name for i in infos})
    print(f"{n_gpus} GPU(s): {', '.join(names)}; driver {results['driver_version']}; n={args.n}")
    print("per GPU sample, medians (CPU = own + children)")
    print(f"{'method':<42} {'wall ms':>10} {'CPU ms':>10} {'wall/nvml':>10} {'CPU/nvml':>10}")
    for m in methods:
        r = rows[m.name]
        print(
            f"{m.label:<42} {r['wall_s'] * 1e3:>10.3f} {r['cpu_s'] * 1e3:>10.3f} "
            f"{_fmt_ratio(r['wall_ratio_vs_nvml_slow']):>10} {_fmt_ratio(r['cpu_ratio_vs_nvml_slow']):>10}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU % of one core and peak RSS of any command, for before/after comparisons.

Usage: ``python3 -m rackguard.bench.process_cpu [--window-s 15] [--windows 3] -- CMD ...``

Starts CMD, waits ``--warmup-s``, then measures the process's user + system time over
``--windows`` windows of ``--window-s`` each; prints each window, the median and the peak RSS
(``VmHWM``), then stops CMD with SIGTERM.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import psutil


def measure(cmd: list[str], *, warmup_s: float, window_s: float, windows: int) -> tuple[list[float], float]:
    """CPU % of one core per window and peak RSS in MiB."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(warmup_s)
        p = psutil.Process(proc.pid)
        out = []
        for _ in range(windows):
            c0, t0 = sum(p.cpu_times()[:2]), time.monotonic()
            time.sleep(window_s)
            c1, t1 = sum(p.cpu_times()[:2]), time.monotonic()
            out.append(100.0 * (c1 - c0) / (t1 - t0))
        with open(f"/proc/{proc.pid}/status") as f:
            hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        return out, hwm_kib / 1024
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m rackguard.bench.process_cpu", description=__doc__.split("\n")[0]
    )
    p.add_argument("--warmup-s", type=float, default=6.0)
    p.add_argument("--window-s", type=float, default=15.0)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("give the command after --")
    cpu, hwm = measure(cmd, warmup_s=a.warmup_s, window_s=a.window_s, windows=a.windows)
    print(
        " ".join(f"{c:.2f}" for c in cpu),
        f"median {statistics.median(cpu):.2f} % of one core, peak RSS {hwm:.1f} MiB",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

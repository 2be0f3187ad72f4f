"""``rackguard restore-power-limits``: put back the GPU power limits the agent saved.

Run from the unit's ``ExecStopPost=`` so limits are restored even after a crash
or SIGKILL. Exit 0 when restored or when there is nothing to restore, 1 if any
GPU could not be restored (the state file is kept), 78 on a config error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "restore-power-limits", help="restore the GPU power limits saved by the power-limit actuator"
    )
    p.add_argument("--config", type=Path, help="TOML config file (for power_limits.state_file)")
    p.add_argument("--state-file", type=Path, help="the state file (default: from the config)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from rackguard.agent import log as logmod
    from rackguard.agent.commands.run import load_or_exit

    if args.state_file is not None:
        path: Path = args.state_file
    else:
        cfg = load_or_exit(args.config)
        if isinstance(cfg, int):
            return cfg
        path = cfg.power_limits.resolved_state_file()
    if not path.exists():
        print(f"nothing to restore: {path} does not exist")
        return 0
    logmod.configure("info", "auto")
    from rackguard.agent.power_limits import load_state, restore

    try:  # the file first: a corrupt one is the problem to report, whatever NVML says
        load_state(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(
            f"{path} is corrupt, so no power limit was restored ({type(exc).__name__}: {exc}). "
            "Each GPU keeps its current limit; reset one with `nvidia-smi -i <index> -pl <watts>` "
            "(its default is power_limit_default_w in the node's status message), then delete the file.",
            file=sys.stderr,
        )
        return 1
    from rackguard.sensors.base import SensorError
    from rackguard.sensors.nvml import NvmlBackend

    backend = NvmlBackend()
    try:
        infos = backend.open()
    except SensorError as exc:
        print(f"cannot open NVML to restore the limits saved in {path}: {exc}", file=sys.stderr)
        return 1
    try:
        errors = restore(path, backend, infos)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"cannot read {path}: {exc}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    for e in errors:
        print(e, file=sys.stderr)
    return 1 if errors else 0

"""Optional NVML power-limit actuator (``[power_limits] enabled = true``; needs root).

Policy, per decision:

* the cap's reason is in ``min_on_reasons`` (default leak, thermal): every GPU
  goes to its device minimum (``GpuInfo.power_limit_min_w``);
* else with a node budget (``power_limits.node_power_budget_w``, default
  ``control.node_power_budget_w``): the budget split evenly over the GPUs;
* else: each GPU's original limit.

Every target is clamped to the device's ``[power_limit_min_w, power_limit_max_w]``
and written only when it differs from the last written value by at least
``min_change_w``. Before the first write the original limits are saved to a state
file (written atomically; an existing file is kept, since after a crash it holds
the true originals). ``restore()`` writes them back and removes the file; the
daemon calls it on shutdown, and ``rackguard restore-power-limits`` (systemd
``ExecStopPost=``) does the same after a crash. A failed write is an error: it is
logged, counted, and raised as :class:`PowerLimitError`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rackguard.agent import log as logmod
from rackguard.agent.metrics import Metrics
from rackguard.controllers.api import Decision
from rackguard.sensors.base import GpuInfo

STATE_SCHEMA = "rackguard.power_limits/1"


class PowerLimitDevice(Protocol):
    """The NVML boundary (``rackguard.sensors.nvml.NvmlBackend``; tests pass a fake)."""

    def get_power_limit_w(self, index: int) -> float | None: ...
    def set_power_limit_w(self, index: int, watts: float) -> None: ...


class PowerLimitError(Exception):
    """One or more power-limit writes failed."""


@dataclass(frozen=True, slots=True)
class Saved:
    """One GPU's original limit, as saved in the state file."""

    index: int
    uuid: str
    original_w: float


def save_state(path: Path, saved: Sequence[Saved]) -> None:
    """Write the originals atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "schema": STATE_SCHEMA,
        "t_s": time.time(),
        "gpus": [{"index": s.index, "uuid": s.uuid, "original_w": s.original_w} for s in saved],
    }
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> list[Saved]:
    """The saved originals (raises OSError/ValueError on a missing or bad file)."""
    body: Any = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(body, dict) or body.get("schema") != STATE_SCHEMA:
        raise ValueError(f"{path}: not a {STATE_SCHEMA} file")
    out = []
    for g in body["gpus"]:
        w = float(g["original_w"])
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"{path}: bad original_w {w!r}")
        out.append(Saved(int(g["index"]), str(g["uuid"]), w))
    return out


def restore(path: Path, device: PowerLimitDevice, infos: Sequence[GpuInfo]) -> list[str]:
    """Write the saved originals back (matched by UUID) and remove the state file.

    Args:
        path: The state file. Missing: nothing to do.
        device: Where to write.
        infos: The GPUs as opened now (indices may have changed since the save).

    Returns:
        Errors, one per GPU that could not be restored (the file is kept if any).
    """
    log = logmod.get("power_limits")
    if not path.exists():
        return []
    by_uuid = {i.uuid: i.index for i in infos}
    errors = []
    for s in load_state(path):
        index = by_uuid.get(s.uuid)
        if index is None:
            errors.append(f"gpu {s.uuid}: not present; original {s.original_w:.0f} W not restored")
            continue
        try:
            device.set_power_limit_w(index, s.original_w)
            log.info("power_limit_restored", gpu=index, uuid=s.uuid, limit_w=s.original_w)
        except Exception as exc:
            errors.append(f"gpu {index} ({s.uuid}): restoring {s.original_w:.0f} W failed: {exc}")
    for e in errors:
        log.error("power_limit_restore_failed", error=e)
    if not errors:
        path.unlink()
    return errors


class PowerLimitActuator:
    """Maps decisions to per-GPU power limits and writes the ones that change.

    Args:
        infos: The GPUs (their power-limit constraints and UUIDs).
        device: The NVML boundary.
        state_file: Where the originals are saved before the first write.
        budget_w: Node GPU power budget split evenly across GPUs (None: originals).
        min_on_reasons: Cap reasons that send every GPU to its minimum.
        min_change_w: Smaller changes are not written.
        metrics: The agent's metrics.
    """

    def __init__(
        self,
        infos: Sequence[GpuInfo],
        device: PowerLimitDevice,
        state_file: Path,
        *,
        budget_w: float | None,
        min_on_reasons: Sequence[str] = ("leak", "thermal"),
        min_change_w: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.infos = list(infos)
        self.device = device
        self.state_file = state_file
        self.budget_w = budget_w
        self.min_on_reasons = frozenset(min_on_reasons)
        self.min_change_w = min_change_w
        self.metrics = metrics
        self.original_w: dict[int, float] = {}
        self.written_w: dict[int, float] = {}
        self.writes_total = 0
        self.log = logmod.get("power_limits")

    def start(self) -> None:
        """Read the original limits and save them (keeping a file left by a crash)."""
        saved: dict[str, float] = {}
        if self.state_file.exists():
            saved = {s.uuid: s.original_w for s in load_state(self.state_file)}
            self.log.warning("power_limit_state_found", path=str(self.state_file), gpus=len(saved))
        for info in self.infos:
            if not info.uuid:
                continue  # not identified at start: never touched
            if info.uuid in saved:
                self.original_w[info.index] = saved[info.uuid]
                continue
            now_w = self.device.get_power_limit_w(info.index)
            if now_w is None:
                now_w = info.power_limit_default_w
            if now_w is not None:
                self.original_w[info.index] = now_w
        save_state(
            self.state_file,
            [
                Saved(i.index, i.uuid, self.original_w[i.index])
                for i in self.infos
                if i.index in self.original_w
            ],
        )

    def targets(self, decision: Decision) -> dict[int, float]:
        """The limit each GPU should have for this decision (clamped to its constraints)."""
        out = {}
        for info in self.infos:
            lo, hi = info.power_limit_min_w, info.power_limit_max_w
            if lo is None or hi is None or info.index not in self.original_w:
                continue  # no constraints known: never touch this GPU
            if decision.reason in self.min_on_reasons:
                want = lo
            elif self.budget_w is not None:
                want = self.budget_w / len(self.infos)
            else:
                want = self.original_w[info.index]
            out[info.index] = min(max(want, lo), hi)
        return out

    def apply(self, decision: Decision) -> list[int]:
        """Write the limits that changed (blocking: call from a worker thread).

        Returns:
            The GPUs written.

        Raises:
            PowerLimitError: a write failed (after trying every GPU).
        """
        written, errors = [], []
        for index, want_w in self.targets(decision).items():
            last_w = self.written_w.get(index, self.original_w[index])  # never written: the original
            if abs(want_w - last_w) < self.min_change_w:
                continue
            try:
                self.device.set_power_limit_w(index, want_w)
            except Exception as exc:
                errors.append(f"gpu {index}: setting {want_w:.0f} W failed: {exc}")
                if self.metrics is not None:
                    self.metrics.power_limit_write_errors.inc()
                continue
            self.written_w[index] = want_w
            self.writes_total += 1
            written.append(index)
            if self.metrics is not None:
                self.metrics.power_limit_w.labels(str(index)).set(want_w)
            self.log.info("power_limit_set", gpu=index, limit_w=want_w, reason=decision.reason)
        if errors:
            for e in errors:
                self.log.error("power_limit_write_failed", error=e)
            raise PowerLimitError("; ".join(errors))
        return written

    def restore(self) -> list[str]:
        """Write the originals back and remove the state file (returns errors)."""
        errors = restore(self.state_file, self.device, self.infos)
        if not errors:
            self.written_w.clear()
        return errors

"""Energy per token: GPU energy counter deltas over the tokens the gates reported.

Per publish window: ``energy_per_token_j = ΔE_gpu / tokens`` and
``facility_energy_per_token_j = ΔE_gpu × PUE / tokens``. ΔE_gpu sums each GPU's
energy-counter delta since the previous window. A counter that went backwards
was reset (driver reload, GPU reset): its new value is the energy since the
reset, so that is the delta. A GPU with no reading this window (lost, or its
slow read not yet done) is skipped and keeps its last value, so its energy
lands in the next window it is read in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rackguard.agent.config import Config


@dataclass(frozen=True, slots=True)
class EnergyWindow:
    """One window's figures.

    Attributes:
        gpu_energy_j: Energy of the counted GPUs in the window (None if none had two readings).
        gpus_counted: GPUs that contributed a delta.
        tokens: Tokens completed in the window.
        requests: Requests completed in the window.
        energy_per_token_j: ``gpu_energy_j / tokens`` (None without tokens or energy).
        facility_energy_per_token_j: ``energy_per_token_j × pue``.
        pue: The facility's power usage effectiveness.
    """

    gpu_energy_j: float | None
    gpus_counted: int
    tokens: int
    requests: int
    energy_per_token_j: float | None
    facility_energy_per_token_j: float | None
    pue: float


class EnergyMeter:
    """Turns cumulative GPU energy counters and token counts into per-window figures.

    Args:
        pue: Power usage effectiveness (≥ 1) of the facility.
    """

    def __init__(self, pue: float) -> None:
        if pue < 1.0:
            raise ValueError(f"pue must be >= 1, got {pue}")
        self.pue = pue
        self._last_j: dict[int, float] = {}

    def reconfigure(self, cfg: Config) -> None:
        self.pue = cfg.energy.pue

    def window(self, energy_j: dict[int, float | None], tokens: int, requests: int = 0) -> EnergyWindow:
        """Close a window.

        Args:
            energy_j: Each GPU's energy counter now (None: not read), by GPU index.
            tokens: Tokens completed since the previous window.
            requests: Requests completed since the previous window.

        Returns:
            The window's figures.
        """
        total_j = 0.0
        counted = 0
        for index, now_j in energy_j.items():
            if now_j is None:
                continue
            last_j = self._last_j.get(index)
            self._last_j[index] = now_j
            if last_j is None:
                continue  # first reading: a baseline only
            total_j += now_j - last_j if now_j >= last_j else now_j
            counted += 1
        gpu_j = total_j if counted else None
        per_token = gpu_j / tokens if gpu_j is not None and tokens > 0 else None
        return EnergyWindow(
            gpu_energy_j=gpu_j,
            gpus_counted=counted,
            tokens=tokens,
            requests=requests,
            energy_per_token_j=per_token,
            facility_energy_per_token_j=per_token * self.pue if per_token is not None else None,
            pue=self.pue,
        )

"""Simulated GPUs: a real backend behind the GpuBackend interface.

Each GPU is a two-node thermal RC network, die → cold plate → coolant, plus a
slower HBM node. Power is a saturating function of the concurrency the GPU is
serving. The coolant's supply temperature and flow come from outside (config,
or the simulated CDU); the plate-to-coolant conductance scales with flow^0.8
and the coolant warms along the node by P_node / (ṁ·cp).

Default parameters were fitted (least squares, 10 ms Euler integration) to
``shared/data/h100_llm_decode.csv``: die→plate 0.027 K/W, plate→coolant
0.019 K/W with τ ≈ 15 s; the die's fast τ ≈ 0.5 s is from the H100 step test
(``shared/facts/h100.md``), below the traces' 0.1 s sampling. HBM: 0.035 K/W
above coolant plus 3 K, τ ≈ 20 s (idle 33 °C, 700 W 55 °C).

Time is real: each read integrates the physics up to ``clock()``.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rackguard.physics import WATER_CP_J_PER_KG_K, WATER_DENSITY_KG_PER_L, mass_flow_kg_per_s
from rackguard.sensors.base import GpuBackend, GpuInfo, GpuLost, GpuSample, GpuThresholds


@dataclass(frozen=True, slots=True)
class SimGpuParams:
    """Physical parameters of one simulated GPU (H100 SXM defaults)."""

    p_idle_w: float = 70.0
    p_max_w: float = 700.0
    c_half: float = 24.0  # concurrency at half the dynamic power
    r_die_plate_k_per_w: float = 0.027
    c_die_j_per_k: float = 18.5  # τ ≈ 0.5 s
    r_plate_coolant_k_per_w: float = 0.019  # at nominal flow
    c_plate_j_per_k: float = 790.0  # τ ≈ 15 s
    r_mem_k_per_w: float = 0.035
    mem_offset_c: float = 3.0
    tau_mem_s: float = 20.0
    nominal_flow_lpm: float = 12.0  # node flow at which r_plate_coolant applies
    power_noise_w: float = 4.0

    def power_w(self, concurrency: float) -> float:
        """Steady power at a given concurrency: monotone, saturating."""
        c = max(0.0, concurrency)
        return self.p_idle_w + (self.p_max_w - self.p_idle_w) * c / (c + self.c_half)


H100_THRESHOLDS = GpuThresholds(slowdown_c=89.0, shutdown_c=95.0, gpu_max_c=87.0, mem_max_c=95.0)


class _SimGpu:
    def __init__(self, index: int, params: SimGpuParams, t0: float, coolant_c: float) -> None:
        self.index = index
        self.p = params
        self.lock = threading.Lock()
        self.t = t0
        self.concurrency = 0.0
        self.cap: float = math.inf
        self.power_w = params.p_idle_w
        self.energy_j = 0.0
        self.die_c = coolant_c + params.p_idle_w * (
            params.r_die_plate_k_per_w + params.r_plate_coolant_k_per_w
        )
        self.plate_c = coolant_c + params.p_idle_w * params.r_plate_coolant_k_per_w
        self.mem_c = coolant_c + params.mem_offset_c + params.p_idle_w * params.r_mem_k_per_w
        self.lost: str | None = None
        self.hang_s = 0.0


class SimBackend(GpuBackend):
    """N simulated GPUs sharing one coolant loop.

    Args:
        gpus: number of GPUs.
        params: physical parameters (same for every GPU).
        offered_concurrency: concurrency the clients want per GPU; the GPU serves
            ``min(offered, cap)``.
        supply_temp_c: coolant supply temperature.
        flow_lpm: coolant flow through the node's cold plates.
        seed: noise seed.
        clock: monotonic time source (tests pass their own).
    """

    name = "sim"

    def __init__(
        self,
        gpus: int = 8,
        *,
        params: SimGpuParams | None = None,
        offered_concurrency: float = 256.0,
        supply_temp_c: float = 32.0,
        flow_lpm: float = 12.0,
        noise_c: float = 0.2,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.params = params or SimGpuParams()
        self.clock = clock
        self.supply_temp_c = supply_temp_c
        self.flow_lpm = flow_lpm
        self.noise_c = noise_c
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        t0 = clock()
        self._gpus = [_SimGpu(i, self.params, t0, supply_temp_c) for i in range(gpus)]
        for g in self._gpus:
            g.concurrency = offered_concurrency
        self._offered = [offered_concurrency] * gpus

    # -- inputs from the outside world -------------------------------------------------
    def set_offered(self, concurrency: float | list[float]) -> None:
        """Set the concurrency clients offer (per GPU, or one value for all)."""
        values = concurrency if isinstance(concurrency, list) else [concurrency] * len(self._gpus)
        self._offered = [max(0.0, float(v)) for v in values]

    def set_caps(self, caps: list[int] | tuple[int, ...]) -> None:
        """Apply concurrency caps (as inference servers obeying the agent would)."""
        for g, cap in zip(self._gpus, caps, strict=False):
            with g.lock:
                self._advance(g)
                g.cap = float(cap)

    def set_coolant(self, *, supply_temp_c: float | None = None, flow_lpm: float | None = None) -> None:
        """Update the coolant supply temperature and/or flow (from config or the simulated CDU)."""
        for g in self._gpus:
            with g.lock:
                self._advance(g)
        if supply_temp_c is not None:
            self.supply_temp_c = supply_temp_c
        if flow_lpm is not None:
            self.flow_lpm = max(1e-3, flow_lpm)

    def lose_gpu(self, index: int, error: str = "GPU is lost", *, hang_s: float = 0.0) -> None:
        """Fault drill: make a GPU raise GpuLost (or hang for ``hang_s`` first)."""
        self._gpus[index].lost = error
        self._gpus[index].hang_s = hang_s

    def restore_gpu(self, index: int) -> None:
        self._gpus[index].lost = None
        self._gpus[index].hang_s = 0.0

    # -- derived -----------------------------------------------------------------------
    def total_power_w(self) -> float:
        return sum(g.power_w for g in self._gpus)

    def return_temp_c(self) -> float:
        """Coolant return temperature: supply plus the heat the node put in."""
        return self.supply_temp_c + self.total_power_w() / self._mdot_cp()

    def served(self, index: int) -> float:
        g = self._gpus[index]
        return min(self._offered[index], g.cap)

    def _mdot_cp(self) -> float:
        return mass_flow_kg_per_s(self.flow_lpm, WATER_DENSITY_KG_PER_L) * WATER_CP_J_PER_KG_K

    # -- physics -----------------------------------------------------------------------
    def _advance(self, g: _SimGpu) -> None:
        now = self.clock()
        dt = now - g.t
        if dt <= 0:
            return
        g.t = now
        p = g.p
        g.concurrency = min(self._offered[g.index], g.cap)
        target_w = p.power_w(g.concurrency)
        r_pc = p.r_plate_coolant_k_per_w * (p.nominal_flow_lpm / self.flow_lpm) ** 0.8
        # Coolant at this GPU: supply plus half the node's temperature rise.
        coolant_c = self.supply_temp_c + 0.5 * self.total_power_w() / self._mdot_cp()
        steps = min(2000, max(1, math.ceil(dt / 0.02)))
        h = dt / steps
        for _ in range(steps):
            g.power_w += (target_w - g.power_w) * min(1.0, h / 0.05)  # power settles in ~50 ms
            q_dp = (g.die_c - g.plate_c) / p.r_die_plate_k_per_w
            q_pc = (g.plate_c - coolant_c) / r_pc
            g.die_c += h * (g.power_w - q_dp) / p.c_die_j_per_k
            g.plate_c += h * (q_dp - q_pc) / p.c_plate_j_per_k
            mem_target = coolant_c + p.mem_offset_c + p.r_mem_k_per_w * g.power_w
            g.mem_c += (mem_target - g.mem_c) * min(1.0, h / p.tau_mem_s)
            g.energy_j += g.power_w * h

    def die_temp_c(self, index: int) -> float:
        """The true (unquantised) die temperature, for tests and scenarios."""
        g = self._gpus[index]
        with g.lock:
            self._advance(g)
            return g.die_c

    # -- GpuBackend --------------------------------------------------------------------
    def open(self) -> list[GpuInfo]:
        return [self._info(g.index) for g in self._gpus]

    def _info(self, index: int) -> GpuInfo:
        return GpuInfo(
            index=index,
            uuid=f"GPU-5140-0000-0000-0000-{index:012d}",
            name="Simulated H100 80GB HBM3",
            thresholds=H100_THRESHOLDS,
            power_limit_min_w=200.0,
            power_limit_max_w=self.params.p_max_w,
            power_limit_default_w=self.params.p_max_w,
        )

    def reopen(self, index: int) -> GpuInfo:
        if self._gpus[index].lost:
            raise GpuLost(f"gpu {index}: {self._gpus[index].lost}")
        return self._info(index)

    def read(self, index: int, *, slow: bool) -> GpuSample:
        g = self._gpus[index]
        if g.lost:
            if g.hang_s:
                time.sleep(g.hang_s)
            raise GpuLost(f"gpu {index}: {g.lost}")
        with g.lock:
            self._advance(g)
            power_w, die_c, mem_c, energy_j = g.power_w, g.die_c, g.mem_c, g.energy_j
        with self._rng_lock:
            noise_w = self._rng.gauss(0.0, self.params.power_noise_w)
            noise_c = self._rng.gauss(0.0, self.noise_c)
        power_w = max(0.0, power_w + noise_w)
        events: tuple[str, ...] = ()
        if power_w >= 0.98 * self.params.p_max_w:
            events = ("sw_power_cap",)
        elif g.concurrency <= 0:
            events = ("gpu_idle",)
        util = 100.0 * g.concurrency / (g.concurrency + 1.0)
        return GpuSample(
            index=index,
            t_s=time.time(),
            power_w=round(power_w, 3),
            gpu_temp_c=float(round(die_c + noise_c)),  # NVML reports whole degrees
            sm_clock_mhz=1980.0 if g.concurrency > 0 else 345.0,
            util_pct=round(util, 1),
            power_limit_w=self.params.p_max_w,
            clock_events=events,
            energy_j=round(energy_j, 3) if slow else None,
            mem_temp_c=float(round(mem_c)) if slow else None,
        )

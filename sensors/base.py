"""The one interface every GPU backend implements, and the plain data it returns.

Backends are blocking: the agent calls them from worker threads, never on the
event loop. A backend translates its vendor's errors into the exceptions here,
so the rest of rackguard never sees ``NVMLError``.

A field a device does not support is ``None`` in a sample; a GPU that stops
answering raises :class:`GpuLost`.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field

# NVML clock-event ("throttle") reason bits, decoded to stable names.
CLOCK_EVENT_BITS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clock_setting",
}


def decode_clock_events(mask: int) -> tuple[str, ...]:
    """Names of the set bits in an NVML clock-event mask; unknown bits as ``bit_0x...``."""
    names = [name for bit, name in CLOCK_EVENT_BITS.items() if mask & bit]
    rest = mask & ~sum(CLOCK_EVENT_BITS)
    bit = 1
    while rest:
        if rest & bit:
            names.append(f"bit_{bit:#x}")
            rest &= ~bit
        bit <<= 1
    return tuple(names)


class SensorError(Exception):
    """A backend failed in a way that is not specific to one GPU."""


class GpuLost(SensorError):
    """A GPU stopped answering (fell off the bus, unknown error, timed out)."""


@dataclass(frozen=True, slots=True)
class GpuThresholds:
    """Temperature thresholds read from the device once at start. Units: °C."""

    slowdown_c: float | None = None
    shutdown_c: float | None = None
    gpu_max_c: float | None = None
    mem_max_c: float | None = None


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """Static facts about one GPU, read once at start."""

    index: int
    uuid: str
    name: str
    thresholds: GpuThresholds = field(default_factory=GpuThresholds)
    power_limit_min_w: float | None = None
    power_limit_max_w: float | None = None
    power_limit_default_w: float | None = None


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One read of one GPU. ``t_s`` is wall-clock seconds when it was read.

    Fast fields (power, temperature, clocks, utilisation) are read every poll.
    Slow fields (``energy_j``, ``mem_temp_c``) are ``None`` when this read did not
    include them; the agent carries the last slow values forward.
    """

    index: int
    t_s: float
    power_w: float | None = None
    gpu_temp_c: float | None = None
    sm_clock_mhz: float | None = None
    util_pct: float | None = None
    power_limit_w: float | None = None
    clock_events: tuple[str, ...] = ()
    energy_j: float | None = None
    mem_temp_c: float | None = None


class Capability(enum.Enum):
    """Device writes a backend may support; ask :meth:`GpuBackend.supports` before using one."""

    POWER_LIMIT = "power_limit"  # get_power_limit_w / set_power_limit_w


class Unsupported(SensorError):
    """The backend does not support this operation (see :meth:`GpuBackend.supports`)."""


class GpuBackend(abc.ABC):
    """A source of GPU samples: NVML, or the simulator.

    All methods block; call them from a worker thread. ``read`` must be safe to
    call for different GPUs from different threads at the same time. Reads are
    mandatory; writes are capabilities a backend declares in ``capabilities``.
    """

    name: str = "gpu"
    capabilities: frozenset[Capability] = frozenset()

    def supports(self, capability: Capability) -> bool:
        """Whether this backend implements a device write."""
        return capability in self.capabilities

    def get_power_limit_w(self, index: int) -> float | None:
        """The GPU's enforced power limit (``Capability.POWER_LIMIT``)."""
        raise Unsupported(f"backend {self.name} cannot read power limits")

    def set_power_limit_w(self, index: int, watts: float) -> None:
        """Set the GPU's power limit (``Capability.POWER_LIMIT``). Raises on failure."""
        raise Unsupported(f"backend {self.name} cannot set power limits")

    @abc.abstractmethod
    def open(self) -> list[GpuInfo]:
        """Initialise and return the GPU inventory. Raises SensorError."""

    @abc.abstractmethod
    def read(self, index: int, *, slow: bool) -> GpuSample:
        """Read one GPU; include the slow fields when ``slow``. Raises GpuLost."""

    def reopen(self, index: int) -> GpuInfo:
        """Try to get a lost GPU back. Raises GpuLost while it is still gone."""
        raise GpuLost(f"gpu {index}: backend {self.name} cannot reacquire GPUs")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the backend."""

"""A fake ``pynvml`` module: N GPUs in memory, at the hardware boundary.

Install it with ``monkeypatch.setattr(rackguard.sensors.nvml, "pynvml", FakeNvml([...]))``.
Constants, ctypes structs and exception classes come from the real ``pynvml``
package, so the backend's error translation is exercised with the genuine
``NVMLError_GpuIsLost`` & co.

Per GPU you can set the readings, make calls unsupported (``errors``), make
every call fail (``fail``: the GPU is lost), or make every call block (``hang_s``,
cut short by ``FakeNvml.release``). ``calls`` counts calls per function name.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pynvml as real

H100_THRESHOLDS_C: dict[int, int] = {
    real.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: 95,
    real.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: 89,
    real.NVML_TEMPERATURE_THRESHOLD_GPU_MAX: 87,
    real.NVML_TEMPERATURE_THRESHOLD_MEM_MAX: 95,
}


@dataclass
class FakeGpu:
    """One simulated GPU. Raw NVML units: mW, mJ, °C, MHz, %."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    power_mw: int = 100_000
    temp_c: int = 35
    mem_temp_c: int = 36
    sm_clock_mhz: int = 1980
    util_pct: int = 0
    energy_mj: int = 1_000_000
    limit_mw: int = 700_000
    enforced_limit_mw: int | None = None  # None: same as limit_mw
    default_limit_mw: int = 700_000
    min_limit_mw: int = 200_000
    max_limit_mw: int = 700_000
    thresholds_c: dict[int, int] = field(default_factory=lambda: dict(H100_THRESHOLDS_C))
    clock_event_mask: int = 0x1
    # Function name (or "field:<id>" for one field value) -> NVML error code it returns.
    errors: dict[str, int] = field(default_factory=dict)
    # Every call for this GPU raises NVMLError(fail), e.g. NVML_ERROR_GPU_IS_LOST.
    fail: int | None = None
    # Every call for this GPU blocks this long, or until FakeNvml.release is set.
    hang_s: float = 0.0
    calls: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class FakeHandle:
    index: int


class FakeNvml:
    """Stands in for the ``pynvml`` module.

    Args:
        gpus: the GPUs, by NVML index. Replace an entry to put a different
            device at that index.
    """

    def __init__(self, gpus: list[FakeGpu]) -> None:
        self.gpus = gpus
        self.initialised = 0  # NVML's init refcount
        self.init_error: int | None = None
        self.shutdown_error: int | None = None
        self.missing: set[str] = set()  # functions this "binding version" lacks
        self.calls: Counter[str] = Counter()  # library-level calls
        self.release = threading.Event()

    # Constants, structs and exception classes: the real ones.
    def __getattr__(self, name: str) -> Any:
        if name.startswith(("NVML_", "NVMLError", "c_nvml", "nvmlExceptionClass")):
            return getattr(real, name)
        raise AttributeError(f"fake pynvml has no {name}")

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("nvml") and name in object.__getattribute__(self, "missing"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)

    # --- library --------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise real.NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.calls["nvmlShutdown"] += 1
        if self.shutdown_error is not None:
            raise real.NVMLError(self.shutdown_error)
        if not self.initialised:
            raise real.NVMLError(real.NVML_ERROR_UNINITIALIZED)
        self.initialised -= 1

    def _check_init(self) -> None:
        if not self.initialised:
            raise real.NVMLError(real.NVML_ERROR_UNINITIALIZED)

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return len(self.gpus)

    def _gpu(self, index: int, fn: str) -> FakeGpu:
        """The GPU for a call: counts it, then hangs / fails as configured."""
        self._check_init()
        if not 0 <= index < len(self.gpus):
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[index]
        gpu.calls[fn] += 1
        if gpu.hang_s:
            self.release.wait(gpu.hang_s)
        if gpu.fail is not None:
            raise real.NVMLError(gpu.fail)
        if fn in gpu.errors:
            raise real.NVMLError(gpu.errors[fn])
        return gpu

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._gpu(index, "nvmlDeviceGetHandleByIndex")
        return FakeHandle(index)

    # --- identity and limits ----------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> bytes:
        return self._gpu(handle.index, "nvmlDeviceGetUUID").uuid.encode()  # bytes, as nvidia-ml-py 13 returns

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return self._gpu(handle.index, "nvmlDeviceGetName").name

    def nvmlDeviceGetTemperatureThreshold(self, handle: FakeHandle, which: int) -> int:
        gpu = self._gpu(handle.index, "nvmlDeviceGetTemperatureThreshold")
        if which not in gpu.thresholds_c:
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)
        return gpu.thresholds_c[which]

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: FakeHandle) -> list[int]:
        gpu = self._gpu(handle.index, "nvmlDeviceGetPowerManagementLimitConstraints")
        return [gpu.min_limit_mw, gpu.max_limit_mw]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: FakeHandle) -> int:
        return self._gpu(handle.index, "nvmlDeviceGetPowerManagementDefaultLimit").default_limit_mw

    def nvmlDeviceGetPowerManagementLimit(self, handle: FakeHandle) -> int:
        return self._gpu(handle.index, "nvmlDeviceGetPowerManagementLimit").limit_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        gpu = self._gpu(handle.index, "nvmlDeviceGetEnforcedPowerLimit")
        return gpu.limit_mw if gpu.enforced_limit_mw is None else gpu.enforced_limit_mw

    def nvmlDeviceSetPowerManagementLimit(self, handle: FakeHandle, limit_mw: int) -> None:
        gpu = self._gpu(handle.index, "nvmlDeviceSetPowerManagementLimit")
        if not isinstance(limit_mw, int) or not gpu.min_limit_mw <= limit_mw <= gpu.max_limit_mw:
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        gpu.limit_mw = limit_mw

    # --- readings ---------------------------------------------------------------------

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._gpu(handle.index, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        gpu = self._gpu(handle.index, "nvmlDeviceGetTemperature")
        if sensor != real.NVML_TEMPERATURE_GPU:
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temp_c

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock: int) -> int:
        gpu = self._gpu(handle.index, "nvmlDeviceGetClockInfo")
        if clock != real.NVML_CLOCK_SM:
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)
        return gpu.sm_clock_mhz

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> Any:
        gpu = self._gpu(handle.index, "nvmlDeviceGetUtilizationRates")
        return real.c_nvmlUtilization_t(gpu=gpu.util_pct, memory=0)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        return self._gpu(handle.index, "nvmlDeviceGetCurrentClocksEventReasons").clock_event_mask

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        return self._gpu(handle.index, "nvmlDeviceGetCurrentClocksThrottleReasons").clock_event_mask

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        return self._gpu(handle.index, "nvmlDeviceGetTotalEnergyConsumption").energy_mj

    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, field_ids: list[int]) -> Any:
        """Real ``c_nvmlFieldValue_t`` array; each field carries its own ``nvmlReturn``."""
        gpu = self._gpu(handle.index, "nvmlDeviceGetFieldValues")
        values = (real.c_nvmlFieldValue_t * len(field_ids))()
        for fv, fid in zip(values, field_ids, strict=True):
            fv.fieldId = fid
            fv.nvmlReturn = real.NVML_SUCCESS
            if f"field:{fid}" in gpu.errors:
                fv.nvmlReturn = gpu.errors[f"field:{fid}"]
            elif fid == real.NVML_FI_DEV_MEMORY_TEMP:
                fv.valueType = real.NVML_VALUE_TYPE_UNSIGNED_INT
                fv.value.uiVal = gpu.mem_temp_c
            elif fid == real.NVML_FI_DEV_POWER_INSTANT:
                fv.valueType = real.NVML_VALUE_TYPE_UNSIGNED_INT
                fv.value.uiVal = gpu.power_mw
            elif fid == real.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION:
                fv.valueType = real.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
                fv.value.ullVal = gpu.energy_mj
            else:
                fv.nvmlReturn = real.NVML_ERROR_NOT_SUPPORTED
        return values


def h100s(n: int = 2) -> list[FakeGpu]:
    """``n`` idle H100-like GPUs with distinct UUIDs."""
    return [FakeGpu(uuid=f"GPU-0000000{i}-aaaa-bbbb-cccc-ddddeeeeffff") for i in range(n)]

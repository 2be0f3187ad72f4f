"""NVML GPU backend: the only module in rackguard that imports ``pynvml``.

Every NVML call goes through this module's global ``pynvml`` (tests swap it for a
fake), and every ``NVMLError`` is translated here:

- ``NOT_SUPPORTED`` / ``NO_PERMISSION`` / ``FUNCTION_NOT_FOUND`` on one field: the
  field is ``None``, and the backend remembers it per GPU and never asks again.
- Any other error during a read (``GPU_IS_LOST``, ``UNKNOWN``, ``TIMEOUT``,
  ``UNINITIALIZED``, ``DRIVER_NOT_LOADED``, ...): :class:`~rackguard.sensors.base.GpuLost`.
- Failures of ``nvmlInit`` or of the inventory, and failed power-limit writes:
  :class:`~rackguard.sensors.base.SensorError`.

All calls block (the slow ones, energy and field values, take 3-18 ms on an H100);
call them from worker threads. Reads of different GPUs may run concurrently: the
backend holds no lock while it talks to NVML.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pynvml

from rackguard.sensors.base import (
    Capability,
    GpuBackend,
    GpuInfo,
    GpuLost,
    GpuSample,
    GpuThresholds,
    SensorError,
    decode_clock_events,
)

log = logging.getLogger(__name__)

# Error codes meaning "this device/driver cannot give you this field".
_UNSUPPORTED_CODES = frozenset(
    {
        pynvml.NVML_ERROR_NOT_SUPPORTED,
        pynvml.NVML_ERROR_NO_PERMISSION,
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    }
)

# Code -> constant name, for readable messages ("NVML_ERROR_GPU_IS_LOST").
_ERROR_NAMES: dict[int, str] = {
    getattr(pynvml, n): n
    for n in dir(pynvml)
    if n.startswith("NVML_ERROR_") and isinstance(getattr(pynvml, n), int)
}

_MW_PER_W = 1000.0
_MJ_PER_J = 1000.0


def _error_text(e: Exception) -> str:
    """``"GPU is lost [NVML_ERROR_GPU_IS_LOST]"`` for an NVMLError."""
    code = getattr(e, "value", None)
    name = _ERROR_NAMES.get(code, f"NVML error {code}") if isinstance(code, int) else type(e).__name__
    try:
        text = str(e)
    except Exception:  # str() of an NVMLError may call into the library
        text = ""
    return f"{text} [{name}]" if text else name


def _text(value: str | bytes) -> str:
    """NVML strings come back as ``bytes`` or ``str`` depending on the pynvml version."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _field_value(fv: Any) -> float:
    """The numeric value of one ``c_nvmlFieldValue_t``, by its ``valueType``."""
    attr = {
        pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
        pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
        pynvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
    }.get(int(fv.valueType), "uiVal")
    return float(getattr(fv.value, attr))


@dataclass
class _Gpu:
    """Per-GPU state. Only the thread reading this GPU touches ``unsupported``."""

    info: GpuInfo
    handle: Any
    # Keys of fields NVML said it cannot give us; never asked for again.
    unsupported: set[str] = field(default_factory=set)


class NvmlBackend(GpuBackend):
    """GPU samples from NVML.

    Args:
        indices: NVML indices of the GPUs to use; ``None`` means all of them.
    """

    name = "nvml"
    capabilities = frozenset({Capability.POWER_LIMIT})

    def __init__(self, indices: list[int] | None = None) -> None:
        self._indices = None if indices is None else list(indices)
        self._gpus: dict[int, _Gpu] = {}
        self._unidentified: dict[int, str] = {}  # index -> why it could not be identified at open
        self._initialised = False
        self._lock = threading.Lock()  # guards open/close only, never held during reads

    # --- lifecycle -------------------------------------------------------------------

    def open(self) -> list[GpuInfo]:
        """Initialise NVML and read the inventory.

        A GPU that cannot be identified (handle, UUID, name) does not stop the others:
        it is listed with an empty UUID, its reads raise :class:`GpuLost`, and
        :meth:`reopen` identifies it once NVML answers for it.

        Returns:
            One :class:`GpuInfo` per GPU, in index order.

        Raises:
            SensorError: NVML cannot start (no driver/library), a requested index
                does not exist, or no GPU at all can be identified.
        """
        with self._lock:
            if self._initialised:
                self._shutdown()
            try:
                pynvml.nvmlInit()
            except (pynvml.NVMLError, OSError) as e:
                raise SensorError(f"NVML init failed: {_error_text(e)}") from e
            self._initialised = True
            try:
                count = int(pynvml.nvmlDeviceGetCount())
                indices = list(range(count)) if self._indices is None else self._indices
                missing = [i for i in indices if not 0 <= i < count]
                if missing:
                    raise SensorError(f"GPU indices {missing} not present (NVML sees {count} GPUs)")
                gpus: dict[int, _Gpu] = {}
                unidentified: dict[int, str] = {}
                for i in indices:
                    try:
                        gpus[i] = self._inventory(i)
                    except SensorError as e:
                        unidentified[i] = str(e)
                        log.error("gpu %d: not identified at start, will retry: %s", i, e)
            except pynvml.NVMLError as e:
                self._shutdown()
                raise SensorError(f"NVML inventory failed: {_error_text(e)}") from e
            except BaseException:
                self._shutdown()
                raise
            if not gpus:
                self._shutdown()
                raise SensorError("no GPU could be identified: " + "; ".join(unidentified.values()))
            self._gpus = gpus
            self._unidentified = unidentified
            return [gpus[i].info if i in gpus else GpuInfo(index=i, uuid="", name="") for i in indices]

    def close(self) -> None:
        """Shut NVML down; errors are ignored. Reads after this raise GpuLost."""
        with self._lock:
            self._shutdown()

    def _shutdown(self) -> None:
        self._gpus = {}
        self._unidentified = {}
        if self._initialised:
            self._initialised = False
            try:
                pynvml.nvmlShutdown()
            except Exception as e:  # closing must not fail
                log.debug("nvmlShutdown failed: %s", e)

    def _inventory(self, index: int) -> _Gpu:
        """Handle, identity, thresholds and power-limit range of one GPU. Raises SensorError."""
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            name = _text(pynvml.nvmlDeviceGetName(handle))
        except pynvml.NVMLError as e:
            raise SensorError(f"gpu {index}: cannot identify: {_error_text(e)}") from e
        gpu = _Gpu(info=GpuInfo(index=index, uuid=uuid, name=name), handle=handle)
        try:
            thresholds = GpuThresholds(
                slowdown_c=self._threshold(gpu, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN),
                shutdown_c=self._threshold(gpu, pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN),
                gpu_max_c=self._threshold(gpu, pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX),
                mem_max_c=self._threshold(gpu, pynvml.NVML_TEMPERATURE_THRESHOLD_MEM_MAX),
            )
            constraints = self._optional(
                gpu, "limit_constraints", "nvmlDeviceGetPowerManagementLimitConstraints"
            )
            default_mw = self._optional(gpu, "limit_default", "nvmlDeviceGetPowerManagementDefaultLimit")
        except GpuLost as e:
            raise SensorError(str(e)) from e
        min_w = max_w = None
        if constraints is not None:
            min_w, max_w = (float(v) / _MW_PER_W for v in constraints)
        gpu.info = GpuInfo(
            index=index,
            uuid=uuid,
            name=name,
            thresholds=thresholds,
            power_limit_min_w=min_w,
            power_limit_max_w=max_w,
            power_limit_default_w=None if default_mw is None else float(default_mw) / _MW_PER_W,
        )
        # Thresholds and limits are read once; no reason to keep their misses.
        gpu.unsupported.clear()
        return gpu

    def _threshold(self, gpu: _Gpu, which: int) -> float | None:
        value = self._optional(gpu, f"threshold_{which}", "nvmlDeviceGetTemperatureThreshold", which)
        return None if value is None else float(value)

    def reopen(self, index: int) -> GpuInfo:
        """Get a lost GPU back by index, if it is the same device (same UUID).

        Raises:
            GpuLost: NVML still cannot reach it, or another device now has this index.
        """
        old = self._gpus.get(index)
        if not self._initialised or (old is None and index not in self._unidentified):
            raise GpuLost(f"gpu {index}: not in the open inventory")
        try:
            new = self._inventory(index)
        except SensorError as e:
            who = "not identified yet" if old is None else f"({old.info.uuid}): still lost"
            raise GpuLost(f"gpu {index} {who}: {e}") from e
        if old is None:  # first identification of a GPU that failed at open
            self._gpus[index] = new
            self._unidentified.pop(index, None)
            return new.info
        if new.info.uuid != old.info.uuid:
            raise GpuLost(
                f"gpu {index}: UUID changed from {old.info.uuid} to {new.info.uuid}; refusing to reopen"
            )
        self._gpus[index] = new  # one assignment: readers see the old or the new state
        return new.info

    # --- reads -----------------------------------------------------------------------

    def _gpu(self, index: int) -> _Gpu:
        gpu = self._gpus.get(index)
        if gpu is None:
            why = self._unidentified.get(index)
            if not self._initialised:
                raise GpuLost(f"gpu {index}: not open")
            raise GpuLost(f"gpu {index}: not identified: {why}" if why else f"gpu {index}: not in inventory")
        return gpu

    def _optional(self, gpu: _Gpu, key: str, fn_name: str, *args: Any) -> Any | None:
        """Call ``pynvml.<fn_name>(handle, *args)``; None if unsupported (remembered under ``key``).

        Raises:
            GpuLost: on any other NVML error.
        """
        if key in gpu.unsupported:
            return None
        fn: Callable[..., Any] | None = getattr(pynvml, fn_name, None)
        if fn is None:  # older nvidia-ml-py without this binding
            gpu.unsupported.add(key)
            return None
        try:
            return fn(gpu.handle, *args)
        except pynvml.NVMLError as e:
            if getattr(e, "value", None) in _UNSUPPORTED_CODES:
                gpu.unsupported.add(key)
                return None
            raise GpuLost(
                f"gpu {gpu.info.index} ({gpu.info.uuid}): {fn_name} failed: {_error_text(e)}"
            ) from e

    def read(self, index: int, *, slow: bool) -> GpuSample:
        """Read one GPU.

        Args:
            index: NVML index of an opened GPU.
            slow: also read the energy counter and the memory temperature
                (each a ~3 ms call, up to ~18 ms).

        Returns:
            The sample; unsupported fields are None. ``t_s`` is taken just before
            the first NVML call.

        Raises:
            GpuLost: the GPU (or the driver) stopped answering.
        """
        gpu = self._gpu(index)
        t_s = time.time()
        power_mw = self._optional(gpu, "power", "nvmlDeviceGetPowerUsage")
        temp_c = self._optional(gpu, "gpu_temp", "nvmlDeviceGetTemperature", pynvml.NVML_TEMPERATURE_GPU)
        sm_mhz = self._optional(gpu, "sm_clock", "nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_SM)
        util = self._optional(gpu, "util", "nvmlDeviceGetUtilizationRates")
        limit_mw = self._optional(gpu, "limit_enforced", "nvmlDeviceGetEnforcedPowerLimit")
        if limit_mw is None:
            limit_mw = self._optional(gpu, "limit", "nvmlDeviceGetPowerManagementLimit")
        mask = self._optional(gpu, "clock_events", "nvmlDeviceGetCurrentClocksEventReasons")
        if mask is None:  # drivers/bindings before the "event" rename
            mask = self._optional(gpu, "throttle_reasons", "nvmlDeviceGetCurrentClocksThrottleReasons")

        energy_j = mem_temp_c = None
        if slow:
            energy_mj = self._optional(gpu, "energy", "nvmlDeviceGetTotalEnergyConsumption")
            energy_j = None if energy_mj is None else float(energy_mj) / _MJ_PER_J
            mem_temp_c = self._mem_temp_c(gpu)

        return GpuSample(
            index=index,
            t_s=t_s,
            power_w=None if power_mw is None else float(power_mw) / _MW_PER_W,
            gpu_temp_c=None if temp_c is None else float(temp_c),
            sm_clock_mhz=None if sm_mhz is None else float(sm_mhz),
            util_pct=None if util is None else float(util.gpu),
            power_limit_w=None if limit_mw is None else float(limit_mw) / _MW_PER_W,
            clock_events=() if mask is None else decode_clock_events(int(mask)),
            energy_j=energy_j,
            mem_temp_c=mem_temp_c,
        )

    def _mem_temp_c(self, gpu: _Gpu) -> float | None:
        """HBM temperature via the field-values API; each field carries its own return code."""
        values = self._optional(gpu, "mem_temp", "nvmlDeviceGetFieldValues", [pynvml.NVML_FI_DEV_MEMORY_TEMP])
        if not values:
            return None
        fv = values[0]
        ret = int(fv.nvmlReturn)
        if ret == pynvml.NVML_SUCCESS:
            return _field_value(fv)
        if ret in _UNSUPPORTED_CODES:
            gpu.unsupported.add("mem_temp")
            return None
        e = pynvml.NVMLError(ret)
        raise GpuLost(
            f"gpu {gpu.info.index} ({gpu.info.uuid}): field NVML_FI_DEV_MEMORY_TEMP failed: {_error_text(e)}"
        ) from e

    # --- power limit (for the actuator) ------------------------------------------------

    def get_power_limit_w(self, index: int) -> float | None:
        """The configured power-management limit in W (None if the GPU has none).

        Raises:
            GpuLost: the GPU stopped answering.
        """
        gpu = self._gpu(index)
        mw = self._optional(gpu, "limit", "nvmlDeviceGetPowerManagementLimit")
        return None if mw is None else float(mw) / _MW_PER_W

    def set_power_limit_w(self, index: int, watts: float) -> None:
        """Set the power-management limit. Needs root; changes the real device.

        Args:
            index: NVML index of an opened GPU.
            watts: the new limit; NVML rejects values outside the constraints.

        Raises:
            GpuLost: the GPU stopped answering.
            SensorError: the write failed for any other reason (permission,
                unsupported, out of range, not a finite number).
        """
        gpu = self._gpu(index)
        if not math.isfinite(watts) or watts <= 0:
            raise SensorError(f"gpu {index}: refusing to set power limit to {watts!r} W")
        mw = round(watts * _MW_PER_W)
        try:
            pynvml.nvmlDeviceSetPowerManagementLimit(gpu.handle, mw)
        except pynvml.NVMLError as e:
            msg = f"gpu {index} ({gpu.info.uuid}): setting power limit to {watts:.0f} W failed: {_error_text(e)}"
            code = getattr(e, "value", None)
            if code in _UNSUPPORTED_CODES or code == pynvml.NVML_ERROR_INVALID_ARGUMENT:
                raise SensorError(msg) from e
            raise GpuLost(msg) from e

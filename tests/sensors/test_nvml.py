"""NvmlBackend against a fake pynvml (real NVMLError classes, fake devices)."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import pynvml as real
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rackguard.sensors import nvml
from rackguard.sensors.base import GpuLost, SensorError, decode_clock_events
from rackguard.sensors.nvml import NvmlBackend
from tests.sensors.fake_pynvml import FakeGpu, FakeNvml, h100s

ALL_ERROR_CODES = sorted({getattr(real, n) for n in dir(real) if n.startswith("NVML_ERROR_")})
UNSUPPORTED_CODES = [
    real.NVML_ERROR_NOT_SUPPORTED,
    real.NVML_ERROR_NO_PERMISSION,
    real.NVML_ERROR_FUNCTION_NOT_FOUND,
]
SLOW_CALLS = ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetFieldValues")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNvml]:
    f = FakeNvml(h100s(2))
    monkeypatch.setattr(nvml, "pynvml", f)
    yield f
    f.release.set()  # unblock any hung call


@pytest.fixture
def backend(fake: FakeNvml) -> Iterator[NvmlBackend]:
    b = NvmlBackend()
    b.open()
    yield b
    b.close()


# --- open / inventory ---------------------------------------------------------------------


def test_open_reads_inventory_thresholds_and_limits(fake: FakeNvml) -> None:
    fake.gpus[1].min_limit_mw = 150_500
    b = NvmlBackend()
    infos = b.open()
    assert [i.index for i in infos] == [0, 1]
    assert infos[0].uuid == fake.gpus[0].uuid  # bytes from NVML decoded to str
    assert isinstance(infos[0].uuid, str)
    assert infos[0].name == "NVIDIA H100 80GB HBM3"
    th = infos[0].thresholds
    assert (th.slowdown_c, th.shutdown_c, th.gpu_max_c, th.mem_max_c) == (89, 95, 87, 95)
    assert infos[1].power_limit_min_w == 150.5
    assert infos[1].power_limit_max_w == 700.0
    assert infos[1].power_limit_default_w == 700.0
    b.close()
    assert fake.initialised == 0


def test_open_unsupported_thresholds_and_limits_are_none(fake: FakeNvml) -> None:
    fake.gpus[0].thresholds_c = {real.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: 85}
    fake.gpus[0].errors = {
        "nvmlDeviceGetPowerManagementLimitConstraints": real.NVML_ERROR_NOT_SUPPORTED,
        "nvmlDeviceGetPowerManagementDefaultLimit": real.NVML_ERROR_NO_PERMISSION,
    }
    info = NvmlBackend().open()[0]
    assert info.thresholds.slowdown_c == 85
    assert info.thresholds.shutdown_c is None and info.thresholds.mem_max_c is None
    assert info.power_limit_min_w is None and info.power_limit_max_w is None
    assert info.power_limit_default_w is None


def test_indices_restrict_gpus(fake: FakeNvml) -> None:
    fake.gpus = h100s(4)
    b = NvmlBackend(indices=[3, 1])
    assert [i.index for i in b.open()] == [3, 1]
    with pytest.raises(GpuLost, match="gpu 0"):
        b.read(0, slow=False)
    assert b.read(3, slow=False).index == 3


def test_missing_index_is_a_sensor_error_and_shuts_down(fake: FakeNvml) -> None:
    with pytest.raises(SensorError, match=r"\[5\] not present"):
        NvmlBackend(indices=[0, 5]).open()
    assert fake.initialised == 0


@pytest.mark.parametrize("code", [real.NVML_ERROR_LIBRARY_NOT_FOUND, real.NVML_ERROR_DRIVER_NOT_LOADED])
def test_init_failure_is_sensor_error(fake: FakeNvml, code: int) -> None:
    fake.init_error = code
    with pytest.raises(SensorError, match="NVML init failed") as ei:
        NvmlBackend().open()
    assert type(ei.value) is SensorError
    assert isinstance(ei.value.__cause__, real.NVMLError)
    assert fake.calls["nvmlShutdown"] == 0


def test_gpu_unidentifiable_at_open_does_not_stop_the_others(fake: FakeNvml) -> None:
    fake.gpus[1].fail = real.NVML_ERROR_GPU_IS_LOST
    b = NvmlBackend()
    infos = b.open()
    assert [(i.index, i.uuid) for i in infos] == [(0, fake.gpus[0].uuid), (1, "")]
    assert infos[1].power_limit_max_w is None  # nothing known: the actuator never touches it
    assert b.read(0, slow=True).power_w is not None
    with pytest.raises(GpuLost, match="gpu 1: not identified: gpu 1: cannot identify: GPU is lost"):
        b.read(1, slow=False)
    with pytest.raises(GpuLost, match="gpu 1 not identified yet"):
        b.reopen(1)
    fake.gpus[1].fail = None
    info = b.reopen(1)
    assert info.uuid == fake.gpus[1].uuid and info.thresholds.slowdown_c == 89
    assert b.read(1, slow=True).energy_j == 1000.0
    b.close()
    with pytest.raises(GpuLost, match="not open"):
        b.read(1, slow=False)


def test_no_gpu_identifiable_at_open_is_sensor_error(fake: FakeNvml) -> None:
    for g in fake.gpus:
        g.fail = real.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(SensorError, match="no GPU could be identified: gpu 0: cannot identify") as ei:
        NvmlBackend().open()
    assert type(ei.value) is SensorError
    assert fake.initialised == 0


def test_real_pynvml_open_works_or_raises_sensor_error() -> None:
    """With the real library: on a machine without a driver, open() must not leak NVMLError."""
    b = NvmlBackend()
    try:
        b.open()
    except SensorError:
        pass
    finally:
        b.close()


# --- reads ----------------------------------------------------------------------------


def test_read_converts_units(fake: FakeNvml, backend: NvmlBackend) -> None:
    g = fake.gpus[1]
    g.power_mw, g.temp_c, g.mem_temp_c, g.sm_clock_mhz, g.util_pct = 123_456, 61, 55, 1410, 97
    g.energy_mj, g.limit_mw, g.enforced_limit_mw = 5_000_500, 700_000, 650_000
    s = backend.read(1, slow=True)
    assert s.index == 1
    assert s.power_w == pytest.approx(123.456)
    assert s.energy_j == pytest.approx(5000.5)
    assert s.power_limit_w == 650.0  # the enforced limit
    assert (s.gpu_temp_c, s.mem_temp_c, s.sm_clock_mhz, s.util_pct) == (61, 55, 1410, 97)
    assert s.t_s > 0


@given(power_mw=st.integers(0, 2**32 - 1), energy_mj=st.integers(0, 2**64 - 1))
def test_unit_conversion_property(power_mw: int, energy_mj: int) -> None:
    fake = FakeNvml([FakeGpu(uuid="GPU-x", power_mw=power_mw, energy_mj=energy_mj)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nvml, "pynvml", fake)
        b = NvmlBackend()
        b.open()
        s = b.read(0, slow=True)
        b.close()
    assert s.power_w == pytest.approx(power_mw / 1000)
    assert s.energy_j == pytest.approx(energy_mj / 1000)


def test_enforced_limit_unsupported_falls_back_to_management_limit(
    fake: FakeNvml, backend: NvmlBackend
) -> None:
    fake.gpus[0].errors["nvmlDeviceGetEnforcedPowerLimit"] = real.NVML_ERROR_NOT_SUPPORTED
    fake.gpus[0].limit_mw = 600_000
    assert backend.read(0, slow=False).power_limit_w == 600.0


@pytest.mark.parametrize(
    ("mask", "names"),
    [
        (0x0, ()),
        (0x1, ("gpu_idle",)),
        (0x4 | 0x40, ("sw_power_cap", "hw_thermal")),
        (0x8 | 0x1000, ("hw_slowdown", "bit_0x1000")),
    ],
)
def test_clock_events_decoded(
    fake: FakeNvml, backend: NvmlBackend, mask: int, names: tuple[str, ...]
) -> None:
    fake.gpus[0].clock_event_mask = mask
    assert backend.read(0, slow=False).clock_events == names
    assert names == decode_clock_events(mask)


def test_clock_events_fall_back_to_throttle_reasons(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].clock_event_mask = 0x4
    fake.gpus[0].errors["nvmlDeviceGetCurrentClocksEventReasons"] = real.NVML_ERROR_FUNCTION_NOT_FOUND
    for _ in range(3):
        assert backend.read(0, slow=False).clock_events == ("sw_power_cap",)
    calls = fake.gpus[0].calls
    assert calls["nvmlDeviceGetCurrentClocksEventReasons"] == 1
    assert calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 3


def test_old_binding_without_event_reasons_function(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.missing.add("nvmlDeviceGetCurrentClocksEventReasons")
    fake.gpus[0].clock_event_mask = 0x20
    assert backend.read(0, slow=False).clock_events == ("sw_thermal",)


def test_slow_fields_only_when_slow(fake: FakeNvml, backend: NvmlBackend) -> None:
    calls = fake.gpus[0].calls
    for _ in range(5):
        s = backend.read(0, slow=False)
        assert s.energy_j is None and s.mem_temp_c is None
    assert all(calls[c] == 0 for c in SLOW_CALLS)
    s = backend.read(0, slow=True)
    assert s.energy_j == 1000.0 and s.mem_temp_c == 36
    assert all(calls[c] == 1 for c in SLOW_CALLS)
    assert calls["nvmlDeviceGetPowerUsage"] == 6


@pytest.mark.parametrize("code", UNSUPPORTED_CODES)
def test_unsupported_fields_are_none_and_not_retried(fake: FakeNvml, backend: NvmlBackend, code: int) -> None:
    g = fake.gpus[0]
    g.errors = {
        "nvmlDeviceGetPowerUsage": code,
        "nvmlDeviceGetTotalEnergyConsumption": code,
        f"field:{real.NVML_FI_DEV_MEMORY_TEMP}": code,  # per-field return code
    }
    for _ in range(4):
        s = backend.read(0, slow=True)
        assert s.power_w is None and s.energy_j is None and s.mem_temp_c is None
        assert s.gpu_temp_c == 35  # the rest still read
    assert g.calls["nvmlDeviceGetPowerUsage"] == 1
    assert g.calls["nvmlDeviceGetTotalEnergyConsumption"] == 1
    assert g.calls["nvmlDeviceGetFieldValues"] == 1
    assert g.calls["nvmlDeviceGetTemperature"] == 4
    # Remembered per GPU: GPU 1 still reads everything.
    s1 = backend.read(1, slow=True)
    assert s1.power_w == 100.0 and s1.energy_j == 1000.0 and s1.mem_temp_c == 36


def test_field_values_call_unsupported_as_a_whole(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].errors["nvmlDeviceGetFieldValues"] = real.NVML_ERROR_NOT_SUPPORTED
    assert backend.read(0, slow=True).mem_temp_c is None
    assert backend.read(0, slow=True).mem_temp_c is None
    assert fake.gpus[0].calls["nvmlDeviceGetFieldValues"] == 1


# --- lost GPUs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls", "text"),
    [
        (real.NVML_ERROR_GPU_IS_LOST, real.NVMLError_GpuIsLost, "GPU is lost [NVML_ERROR_GPU_IS_LOST]"),
        (real.NVML_ERROR_UNKNOWN, real.NVMLError_Unknown, "Unknown Error [NVML_ERROR_UNKNOWN]"),
        (real.NVML_ERROR_UNINITIALIZED, real.NVMLError_Uninitialized, "Uninitialized"),
        (real.NVML_ERROR_DRIVER_NOT_LOADED, real.NVMLError_DriverNotLoaded, "Driver Not Loaded"),
        (real.NVML_ERROR_TIMEOUT, real.NVMLError_Timeout, "Timeout"),
    ],
)
def test_lost_gpu_raises_gpulost_others_still_read(
    fake: FakeNvml, backend: NvmlBackend, code: int, cls: type[Exception], text: str
) -> None:
    fake.gpus[1].fail = code
    for slow in (False, True):
        with pytest.raises(GpuLost) as ei:
            backend.read(1, slow=slow)
        msg = str(ei.value)
        assert msg.startswith(f"gpu 1 ({fake.gpus[1].uuid}): nvmlDeviceGetPowerUsage failed")
        assert text in msg
        assert isinstance(ei.value.__cause__, cls)
    assert backend.read(0, slow=True).power_w == 100.0


def test_lost_in_a_field_value_return_code(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].errors[f"field:{real.NVML_FI_DEV_MEMORY_TEMP}"] = real.NVML_ERROR_GPU_IS_LOST
    assert backend.read(0, slow=False).power_w == 100.0
    with pytest.raises(GpuLost, match="NVML_FI_DEV_MEMORY_TEMP failed: GPU is lost"):
        backend.read(0, slow=True)


@pytest.mark.parametrize("code", [c for c in ALL_ERROR_CODES if c != real.NVML_SUCCESS])
def test_no_nvml_error_ever_leaks_from_read(fake: FakeNvml, backend: NvmlBackend, code: int) -> None:
    fake.gpus[0].errors["nvmlDeviceGetPowerUsage"] = code
    try:
        s = backend.read(0, slow=True)
    except GpuLost as e:
        assert isinstance(e.__cause__, real.NVMLError)
    else:
        assert code in UNSUPPORTED_CODES and s.power_w is None


def test_reopen_fails_while_lost_and_works_after_recovery(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[1].fail = real.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(GpuLost):
        backend.read(1, slow=False)
    with pytest.raises(GpuLost, match=r"gpu 1 .*still lost"):
        backend.reopen(1)
    fake.gpus[1].fail = None
    info = backend.reopen(1)
    assert info.uuid == fake.gpus[1].uuid and info.thresholds.slowdown_c == 89
    assert backend.read(1, slow=True).energy_j == 1000.0


def test_reopen_refuses_a_different_device(fake: FakeNvml, backend: NvmlBackend) -> None:
    old_uuid = fake.gpus[1].uuid
    fake.gpus[1] = FakeGpu(uuid="GPU-ffffffff-new0-new0-new0-000000000000")
    with pytest.raises(GpuLost, match=f"UUID changed from {old_uuid} to GPU-ffffffff"):
        backend.reopen(1)


def test_reopen_unknown_index(backend: NvmlBackend) -> None:
    with pytest.raises(GpuLost, match="gpu 7"):
        backend.reopen(7)


def test_hung_gpu_does_not_block_reads_of_others(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].hang_s = 60.0
    done: list[object] = []
    t = threading.Thread(target=lambda: done.append(backend.read(0, slow=False)), daemon=True)
    t.start()
    while fake.gpus[0].calls["nvmlDeviceGetPowerUsage"] == 0:  # wait until GPU 0 is inside NVML
        threading.Event().wait(0.001)
    assert backend.read(1, slow=True).power_w == 100.0
    assert t.is_alive() and not done  # GPU 1 answered while GPU 0 was still stuck
    fake.gpus[0].hang_s = 0.0
    fake.release.set()
    t.join(30)
    assert len(done) == 1


def test_concurrent_reads_of_different_gpus(fake: FakeNvml) -> None:
    fake.gpus = h100s(8)
    for i, g in enumerate(fake.gpus):
        g.power_mw = 100_000 + i * 1000
    b = NvmlBackend()
    b.open()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(200):
                assert b.read(i, slow=True).power_w == 100 + i
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# --- close ----------------------------------------------------------------------------


def test_close_shuts_down_ignores_errors_and_reads_then_fail(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.shutdown_error = real.NVML_ERROR_UNKNOWN
    backend.close()
    backend.close()
    assert fake.calls["nvmlShutdown"] == 1
    with pytest.raises(GpuLost, match="not open"):
        backend.read(0, slow=False)


def test_open_twice_reinitialises(fake: FakeNvml, backend: NvmlBackend) -> None:
    backend.open()
    assert fake.initialised == 1


# --- power limit ----------------------------------------------------------------------


def test_set_and_get_power_limit(fake: FakeNvml, backend: NvmlBackend) -> None:
    backend.set_power_limit_w(1, 612.5)
    assert fake.gpus[1].limit_mw == 612_500
    assert backend.get_power_limit_w(1) == 612.5
    assert fake.gpus[0].limit_mw == 700_000


@pytest.mark.parametrize(
    "code", [real.NVML_ERROR_NO_PERMISSION, real.NVML_ERROR_NOT_SUPPORTED, real.NVML_ERROR_INVALID_ARGUMENT]
)
def test_failed_power_limit_write_raises_sensor_error(
    fake: FakeNvml, backend: NvmlBackend, code: int
) -> None:
    fake.gpus[0].errors["nvmlDeviceSetPowerManagementLimit"] = code
    with pytest.raises(SensorError, match="setting power limit to 500 W failed") as ei:
        backend.set_power_limit_w(0, 500)
    assert type(ei.value) is SensorError
    assert fake.gpus[0].limit_mw == 700_000


def test_out_of_range_power_limit_rejected_by_nvml(fake: FakeNvml, backend: NvmlBackend) -> None:
    with pytest.raises(SensorError, match="Invalid Argument"):
        backend.set_power_limit_w(0, 900)


@pytest.mark.parametrize("watts", [math.nan, math.inf, -5.0, 0.0])
def test_nonsense_power_limit_refused_before_nvml(fake: FakeNvml, backend: NvmlBackend, watts: float) -> None:
    with pytest.raises(SensorError, match="refusing"):
        backend.set_power_limit_w(0, watts)
    assert fake.gpus[0].calls["nvmlDeviceSetPowerManagementLimit"] == 0


def test_power_limit_write_on_lost_gpu_is_gpulost(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].fail = real.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(GpuLost):
        backend.set_power_limit_w(0, 500)
    with pytest.raises(GpuLost):
        backend.get_power_limit_w(0)

"""NvmlBackend on a real GPU, cross-checked against nvidia-smi. Skips without NVML.

Read-only: nothing here changes a GPU setting (no power-limit writes).
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from rackguard.sensors.base import GpuInfo, SensorError
from rackguard.sensors.nvml import NvmlBackend

pytestmark = pytest.mark.gpu

TEMP_TOL_C = 2.0
POWER_TOL_FRAC = 0.10
POWER_TOL_FLOOR_W = 15.0  # idle power jitters by more than 10 % of ~70 W


@pytest.fixture
def opened() -> Iterator[tuple[NvmlBackend, list[GpuInfo]]]:
    b = NvmlBackend()
    try:
        infos = b.open()
    except SensorError as e:
        pytest.skip(f"no NVML here: {e}")
    if not infos:
        b.close()
        pytest.skip("NVML sees no GPUs")
    yield b, infos
    b.close()


def _smi(uuid: str, fields: str) -> list[str | None]:
    """One nvidia-smi query for one GPU; ``[N/A]``-style values become None."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        pytest.skip("nvidia-smi not on PATH")
    out = subprocess.run(
        [exe, f"--id={uuid}", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    values = [v.strip() for v in out.strip().splitlines()[0].split(",")]
    return [None if not v or "N/A" in v or "Not Supported" in v else v for v in values]


def test_open_inventory(opened: tuple[NvmlBackend, list[GpuInfo]]) -> None:
    _, infos = opened
    assert len({i.uuid for i in infos}) == len(infos)
    for info in infos:
        assert info.uuid.startswith(("GPU-", "MIG-")), info.uuid
        assert info.name


def test_thresholds_and_limits_are_plausible(opened: tuple[NvmlBackend, list[GpuInfo]]) -> None:
    _, infos = opened
    for info in infos:
        th = info.thresholds
        if th.slowdown_c is not None:
            assert 60 < th.slowdown_c < 130, info
            if th.shutdown_c is not None:
                assert th.shutdown_c >= th.slowdown_c, info
        if info.power_limit_min_w is not None and info.power_limit_max_w is not None:
            assert 0 < info.power_limit_min_w <= info.power_limit_max_w < 5000, info
            if info.power_limit_default_w is not None:
                assert info.power_limit_min_w <= info.power_limit_default_w <= info.power_limit_max_w, info


def test_read_fields_are_plausible(opened: tuple[NvmlBackend, list[GpuInfo]]) -> None:
    b, infos = opened
    for info in infos:
        s = b.read(info.index, slow=True)
        assert s.index == info.index
        assert abs(s.t_s - time.time()) < 5
        assert s.gpu_temp_c is not None and 0 < s.gpu_temp_c < 110
        assert s.power_w is None or 0 <= s.power_w < 5000
        assert s.sm_clock_mhz is None or 0 <= s.sm_clock_mhz < 5000
        assert s.util_pct is None or 0 <= s.util_pct <= 100
        assert s.power_limit_w is None or 0 < s.power_limit_w < 5000
        assert all(isinstance(n, str) for n in s.clock_events)
        assert s.mem_temp_c is None or 0 < s.mem_temp_c < 120
        assert s.energy_j is None or s.energy_j >= 0
        fast = b.read(info.index, slow=False)
        assert fast.energy_j is None and fast.mem_temp_c is None
        limit_w = b.get_power_limit_w(info.index)  # read only
        assert limit_w is None or 0 < limit_w < 5000


def test_readings_agree_with_nvidia_smi(opened: tuple[NvmlBackend, list[GpuInfo]]) -> None:
    b, infos = opened
    for info in infos:
        before = b.read(info.index, slow=False)
        smi_temp, smi_power = _smi(info.uuid, "temperature.gpu,power.draw")
        after = b.read(info.index, slow=False)

        assert before.gpu_temp_c is not None and after.gpu_temp_c is not None
        if smi_temp is not None:
            mean_c = (before.gpu_temp_c + after.gpu_temp_c) / 2
            tol_c = TEMP_TOL_C + abs(after.gpu_temp_c - before.gpu_temp_c) / 2
            assert abs(float(smi_temp) - mean_c) <= tol_c, (info.index, smi_temp, before, after)

        if smi_power is not None and before.power_w is not None and after.power_w is not None:
            mean_w = (before.power_w + after.power_w) / 2
            tol_w = max(POWER_TOL_FRAC * mean_w, POWER_TOL_FLOOR_W) + abs(after.power_w - before.power_w) / 2
            assert abs(float(smi_power) - mean_w) <= tol_w, (info.index, smi_power, before, after)


def test_energy_counter_only_grows(opened: tuple[NvmlBackend, list[GpuInfo]]) -> None:
    b, infos = opened
    for info in infos:
        energies_j: list[float] = []
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            e = b.read(info.index, slow=True).energy_j
            if e is None:
                pytest.skip(f"gpu {info.index}: energy counter not supported")
            energies_j.append(e)
            time.sleep(0.2)
        assert len(energies_j) >= 5
        assert all(b2 >= b1 for b1, b2 in itertools.pairwise(energies_j)), energies_j
        assert energies_j[-1] > energies_j[0], energies_j  # even idle draws tens of W


def test_reopen_finds_the_same_gpu(opened: tuple[NvmlBackend, list[GpuInfo]]) -> None:
    b, infos = opened
    for info in infos:
        again = b.reopen(info.index)
        assert again.uuid == info.uuid
        assert b.read(info.index, slow=False).gpu_temp_c is not None

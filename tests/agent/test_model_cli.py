"""``rackguard model fit`` (--json, --out, --validate, --plot, bad input) and ``model record`` (NVML, read-only)."""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import pytest

from rackguard.agent.commands import model
from rackguard.controllers.thermal import MODEL_SCHEMA, params_from_model
from rackguard.controllers.thermal_fit import parse_trace_csv
from rackguard.sensors import nvml
from tests.sensors.fake_pynvml import FakeNvml, h100s

DATA = Path(__file__).resolve().parents[1] / "data"
LLM, MATMUL = DATA / "h100_llm_decode.csv", DATA / "h100_matmul_burst.csv"


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="rackguard")
    model.register(parser.add_subparsers())
    args = parser.parse_args(["model", *argv])
    code: int = args.func(args)
    return code


def test_fit_json_is_the_model_file_and_reports_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.json"
    assert cli("fit", str(MATMUL), "--validate", str(LLM), "--out", str(out), "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert printed["schema"] == MODEL_SCHEMA and params_from_model(printed).tau_plate_s > 0
    assert printed["cleaned"]["rows_read"] == 280 and printed["cleaned"]["segments"] == 1
    assert set(printed["time_constants_s"]) == {"tau_fast_s", "tau_slow_s", "power_lag_s"}
    v = printed["validation"][str(LLM)]
    assert v["rmse_open_loop_c"] <= 1.0
    assert v["rmse_mem_open_loop_c"] is None  # matmul has no HBM column: its HBM part is not a fit
    assert any("built-in" in w for w in printed["warnings"])


def test_fit_of_two_traces_reports_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.json"
    assert cli("fit", str(LLM), str(MATMUL), "--out", str(out), "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed and params_from_model(printed).tau_plate_s > 0
    assert printed["rows"] == 1816 + 280 and printed["cleaned"]["segments"] == 2
    assert printed["traces"] == [str(LLM), str(MATMUL)] and printed["trace"] == f"{LLM} + {MATMUL}"
    each = printed["per_trace"]
    assert each[str(LLM)]["rmse_open_loop_c"] <= 1.0 and each[str(MATMUL)]["rmse_open_loop_c"] <= 1.0
    assert each[str(LLM)]["rmse_mem_open_loop_c"] is not None
    assert each[str(MATMUL)]["rmse_mem_open_loop_c"] is None
    assert each[str(MATMUL)]["supply_c"] - each[str(LLM)]["supply_c"] > 5.0  # the matmul run was warmer
    assert cli("fit", str(LLM), str(MATMUL)) == 0
    assert "fitted " + str(MATMUL) in capsys.readouterr().out


def test_fit_refuses_a_trace_fitted_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    link = tmp_path / "same.csv"
    link.symlink_to(LLM)
    assert cli("fit", str(LLM), str(link)) == 2
    assert "fitted twice" in capsys.readouterr().err
    monkeypatch.chdir(LLM.parent)
    assert cli("fit", LLM.name, str(LLM)) == 2
    # Checking a fit on its own trace is allowed (it reproduces the fit's figures).
    assert cli("fit", str(LLM), "--validate", str(LLM), "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["validation"][str(LLM)]["rmse_open_loop_c"] == pytest.approx(out["rmse_open_loop_c"], abs=0.02)


def test_fit_reports_what_it_cleaned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = LLM.read_text().splitlines()
    lines.insert(50, lines[50])  # one repeated timestamp: what main refused ("must increase strictly")
    lines[100] = ",".join(["", *lines[100].split(",")[1:]])
    trace = tmp_path / "t.csv"
    trace.write_text("\n".join(lines) + "\n")
    assert cli("fit", str(trace), "--json") == 0
    cleaned = json.loads(capsys.readouterr().out)["cleaned"]
    assert cleaned["duplicate_timestamps_merged"] == 1 and cleaned["rows_without_time"] == 1


def test_fit_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "fit.png"
    assert cli("fit", str(LLM), "--validate", str(MATMUL), "--plot", str(png)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert "validation on" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("t_s,power_w\n1,2\n", "missing column"),
        ("t_s,power_w,gpu_temp_c\n" + "".join(f"{i * 0.1},300,40\n" for i in range(300)), "no power step"),
    ],
)
def test_fit_bad_input_exits_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "trace.csv"
    if content is not None:
        path.write_text(content)
    assert cli("fit", str(path)) == 2
    err = capsys.readouterr().err
    assert "rackguard model fit" in err and message in err and "Traceback" not in err
    # Among several traces, the message names the one that failed.
    assert cli("fit", str(LLM), str(path)) == 2
    err = capsys.readouterr().err
    assert f"{path}: " in err and str(LLM) not in err and message in err


def test_record_reads_nvml_read_only_into_the_documented_csv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeNvml(h100s(2))
    monkeypatch.setattr(nvml, "pynvml", fake)
    gpu = fake.gpus[1]
    gpu.power_mw, gpu.temp_c, gpu.mem_temp_c = 120_000, 35, 37
    stop = threading.Event()

    def load_step() -> None:  # the operator's load starts 0.5 s in
        stop.wait(0.5)
        gpu.power_mw, gpu.temp_c, gpu.mem_temp_c = 650_000, 52, 55

    threading.Thread(target=load_step, daemon=True).start()
    out = tmp_path / "trace.csv"
    t0 = time.monotonic()
    assert cli("record", "--gpu", "1", "--seconds", "1.5", "--period-s", "0.05", "--out", str(out)) == 0
    stop.set()
    assert time.monotonic() - t0 < 5.0
    header = out.read_text().splitlines()[0].split(",")
    assert header[:3] == ["t_s", "power_w", "gpu_temp_c"] and "mem_temp_c" in header
    trace = parse_trace_csv(out.read_text())  # what `model fit` reads
    assert 20 <= len(trace.t_s) <= 31 and trace.t_s[0] == 0.0
    assert set(trace.power_w) == {120.0, 650.0} and set(trace.gpu_temp_c) == {35.0, 52.0}
    assert trace.mem_temp_c is not None and set(trace.mem_temp_c) == {37.0, 55.0}
    # Read-only: nothing was set on any GPU, and GPU 0 was not touched at all.
    for g in fake.gpus:
        assert not [c for c in g.calls if "Set" in c], g.calls
    assert not fake.gpus[0].calls
    assert "rows to" in capsys.readouterr().err


def test_record_without_that_gpu_exits_69(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(nvml, "pynvml", FakeNvml(h100s(1)))
    assert cli("record", "--gpu", "3", "--seconds", "0.2") == 69
    assert "rackguard model record" in capsys.readouterr().err

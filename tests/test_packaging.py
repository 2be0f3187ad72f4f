"""Must-show: a non-editable install holds one top-level package, ``rackguard``, and works from it.

The wheel is installed with ``pip --target`` into a temporary folder and used with ``python -S``
(no site: the developer's editable install and its path hooks are not seen) from outside the
repository, with only the dependencies' site-packages beside it.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


LAYERS = ("agent", "controllers", "sensors", "sim", "bench")
BUILD_LITTER = (
    "build",
    "dist",
    "*.egg-info",
    ".git",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    "state",
    "out",
)


def source_modules() -> set[str]:
    """The package's modules as the repository has them, as paths inside the installed package."""
    out = {p.name for p in (REPO / "rackguard").glob("*.py")}
    for layer in LAYERS:
        out |= {f"{layer}/{p.relative_to(REPO / layer)}" for p in (REPO / layer).rglob("*.py")}
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a clean copy of the tree: setuptools never cleans an in-tree build/, and a stale
    # build/lib would smuggle deleted modules into the wheel.
    src = tmp_path_factory.mktemp("src") / "rackguard"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(*BUILD_LITTER))
    target = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    r = subprocess.run(
        [*pip, "--target", str(target), "."], cwd=src, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return target


def run_py(installed: Path, cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RACKGUARD_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(installed), *site.getsitepackages()])
    return subprocess.run(
        [sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_one_top_level_package(installed: Path) -> None:
    top = {p.name for p in installed.iterdir() if not p.name.endswith(".dist-info")} - {"bin"}
    assert top == {"rackguard"}
    layers = {p.name for p in (installed / "rackguard").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert layers == {"agent", "controllers", "sensors", "sim", "bench"}
    assert not any(p.is_symlink() for p in (installed / "rackguard").iterdir())
    pkg = installed / "rackguard"
    assert {str(p.relative_to(pkg)) for p in pkg.rglob("*.py")} == source_modules()
    assert sorted(p.name for p in (installed / "rackguard" / "bench" / "scenarios").glob("*.toml"))
    # The files shipped scenarios read (a CSV load, a model fit) ship beside them.
    data = installed / "rackguard" / "bench" / "scenarios" / "data"
    assert {p.name for p in data.iterdir()} >= {"diurnal_load.csv", "h100_llm_decode_fit.json"}


@pytest.mark.parametrize("name", ["agent", "sensors", "controllers", "sim", "bench"])
def test_generic_names_are_not_importable(installed: Path, tmp_path: Path, name: str) -> None:
    r = run_py(installed, tmp_path, "-c", f"import {name}")
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, r.stderr


def test_gate_imports_from_the_installed_package(installed: Path, tmp_path: Path) -> None:
    r = run_py(installed, tmp_path, "-c", "import rackguard.agent.gate as g; print(g.__file__)")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(installed)


def test_demo_runs_from_the_installed_package(installed: Path, tmp_path: Path) -> None:
    script = installed / "bin" / "rackguard"  # the console script, as `rackguard demo` runs it
    r = run_py(installed, tmp_path, str(script), "demo", "--seconds", "6", timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "status: online (8 GPUs, backend sim)" in r.stdout
    assert sum(1 for line in r.stdout.splitlines() if "mpc/" in line) >= 2, r.stdout

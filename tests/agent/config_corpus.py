"""Run one CLI command on every malformed config of ``tests/data/bad_configs`` in one process.

``python -m tests.agent.config_corpus check-config`` (or ``run``) prints one JSON line per case:
``{"case", "rc", "stderr"}``, where ``rc`` is what ``rackguard`` would exit with. ``run`` is
``rackguard run --sim --config FILE``; a case that starts the agent instead of exiting is stopped
after a few seconds and reported as ``"started"``, and the cases after it as not run (a stopped
agent may leave threads behind). One process for the whole corpus keeps the test fast (a fresh
interpreter per case costs about a second).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import tomllib
from pathlib import Path
from types import FrameType
from typing import Any

CORPUS = Path(__file__).resolve().parents[1] / "data" / "bad_configs"
SECRETS = CORPUS / "secrets"


def cases() -> dict[str, dict[str, Any]]:
    """The manifest: file name → {key, words?, env?, no_credentials?}."""
    with open(CORPUS / "manifest.toml", "rb") as f:
        return tomllib.load(f)


def environ_for(case: dict[str, Any]) -> dict[str, str]:
    """The environment a case runs in: no stray overrides, the corpus' credentials, the case's env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RACKGUARD_", "CREDENTIALS_DIRECTORY"))}
    if not case.get("no_credentials"):
        env["CREDENTIALS_DIRECTORY"] = str(SECRETS)
    env.update(case.get("env", {}))
    return env


def argv_for(mode: str, path: Path) -> list[str]:
    return ["check-config", str(path)] if mode == "check-config" else ["run", "--sim", "--config", str(path)]


class _Started(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise _Started


def main(mode: str) -> None:
    from rackguard.agent import cli

    signal.signal(signal.SIGALRM, _alarm)
    started = None
    for name, case in cases().items():
        if started:
            print(json.dumps({"case": name, "rc": f"not run: {started} started the agent", "stderr": ""}))
            continue
        os.environ.clear()
        os.environ.update(environ_for(case))
        err = io.StringIO()
        rc: int | str
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                signal.alarm(5)
                rc = cli.main(argv_for(mode, CORPUS / name))
        except _Started:
            rc, started = "started", name
        except BaseException as exc:  # a traceback is a failure the test reports
            rc = f"raised {type(exc).__name__}: {exc}"
        finally:
            signal.alarm(0)
        print(json.dumps({"case": name, "rc": rc, "stderr": err.getvalue()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

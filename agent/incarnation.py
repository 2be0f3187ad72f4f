"""The agent's incarnation number: grows on every start, like Sparkplug's bdSeq.

It is stored in the state directory (``$STATE_DIRECTORY/incarnation``, else beside
``outbox.path``), so a restarted agent (even one SIGKILLed) takes the next number. The birth
(``status`` online), the last will (``status`` offline) and every rack claim of one run carry
it, so a consumer can match a will to the birth it ends, and a peer can ignore a will that
arrives after the node has already restarted.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path

from rackguard.agent import log as logmod
from rackguard.agent.config import Config

FILE = "incarnation"


def path_for(cfg: Config, environ: Mapping[str, str] | None = None) -> Path | None:
    """Where the number is kept: ``$STATE_DIRECTORY``, else beside the outbox, else nowhere."""
    environ = os.environ if environ is None else environ
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / FILE
    outbox = cfg.outbox.resolved_path(environ)
    return outbox.parent / FILE if outbox is not None else None


def next_incarnation(path: Path | None) -> int:
    """Read, increment and durably store the incarnation; return the new one.

    Without a state directory (or when it cannot be written) the number is the wall clock in
    milliseconds: it still grows across restarts unless the clock is set back, which is logged.
    """
    log = logmod.get("agent")
    clock = int(time.time() * 1000)
    if path is None:
        log.warning("incarnation_not_durable", reason="no state directory", incarnation=clock)
        return clock
    last = 0
    with contextlib.suppress(OSError, ValueError):
        last = int(path.read_text().strip() or 0)
    value = last + 1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{value}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        value = max(value, clock)
        log.error("incarnation_not_durable", path=str(path), error=str(exc), incarnation=value)
    return value

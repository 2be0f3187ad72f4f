"""structlog set-up: JSON lines when stdout is not a TTY (journald), console on a TTY."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


# What configure() last set: (level, format); a reload that changes ``log.*`` calls it again.
current: tuple[str, str] = ("info", "auto")


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog for the process. ``fmt`` is auto, json or console."""
    global current
    current = (level, fmt)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if use_json else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(),  # resolves sys.stdout at each write
        cache_logger_on_first_use=False,
    )


def get(name: str) -> Any:
    return structlog.get_logger(name)


class RateLimitedLog:
    """Logs a repeated (key, reason) at most once per ``period_s``, with the count since."""

    def __init__(self, log: Any, period_s: float = 60.0) -> None:
        self.log = log
        self.period_s = period_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def warning(self, key: str, reason: str, event: str, **kw: Any) -> bool:
        now = time.monotonic()
        last, count = self._last.get((key, reason), (-1e18, 0))
        count += 1
        if now - last >= self.period_s:
            self.log.warning(event, key=key, reason=reason, count=count, **kw)
            self._last[(key, reason)] = (now, 0)
            return True
        self._last[(key, reason)] = (last, count)
        return False

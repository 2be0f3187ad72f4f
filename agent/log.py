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
    """Logs each (event, reason) at most once per ``period_s``, with how many were suppressed.

    ``reason`` must come from a small fixed set (a category, never a topic, id or payload):
    the limit is per reason, so a flood spread over many topics or senders still makes
    one line a period. Details go in the keyword arguments of the line that is logged.
    """

    MAX_KEYS = 512  # a bound in case a caller passes an unbounded reason anyway

    def __init__(self, log: Any, period_s: float = 60.0) -> None:
        self.log = log
        self.period_s = period_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def _due(self, event: str, reason: str) -> int | None:
        now = time.monotonic()
        key = (event, reason)
        last, suppressed = self._last.get(key, (-1e18, 0))
        if now - last >= self.period_s:
            if len(self._last) >= self.MAX_KEYS and key not in self._last:
                self._last.clear()
            self._last[key] = (now, 0)
            return suppressed
        self._last[key] = (last, suppressed + 1)
        return None

    def warning(self, event: str, reason: str, **kw: Any) -> bool:
        """Log ``event`` at warning level unless one with this reason went out within the period."""
        suppressed = self._due(event, reason)
        if suppressed is None:
            return False
        self.log.warning(event, reason=reason, suppressed=suppressed, **kw)
        return True

    def exception(self, event: str, reason: str, **kw: Any) -> bool:
        """As :meth:`warning`, at error level with the traceback (call from an ``except``)."""
        suppressed = self._due(event, reason)
        if suppressed is None:
            return False
        self.log.exception(event, reason=reason, suppressed=suppressed, **kw)
        return True

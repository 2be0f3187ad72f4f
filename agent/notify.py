"""systemd's notify protocol in pure Python: READY=1, STATUS=..., WATCHDOG=1.

The messages go as datagrams to ``$NOTIFY_SOCKET`` (a path, or an abstract
socket when it starts with ``@``). Without that variable every call is a no-op,
so the agent runs the same outside systemd. The watchdog interval comes from
``$WATCHDOG_USEC`` (only when ``$WATCHDOG_PID`` is unset or ours); the tick loop
calls ``watchdog()`` every tick and a ping goes out at most every half interval.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from rackguard.agent import log as logmod


class Notifier:
    """Sends sd_notify messages; all methods are cheap no-ops when not under systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.log = logmod.get("notify")
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if addr.startswith("@"):
            self.address = "\0" + addr[1:]  # Linux abstract namespace
        elif addr.startswith("/"):
            self.address = addr
        self.watchdog_period_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_period_s = int(usec) / 1e6 / 2  # ping at half the timeout
        self._next_ping_mono = 0.0
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; return True when sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                # Non-blocking: a full notify queue must never stall the control loop (the
                # message is dropped instead; a missed WATCHDOG=1 is re-sent half an interval later).
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as exc:
            if not self._failed:  # once: a broken notify socket must not flood the journal
                self.log.warning("sd_notify_failed", error=str(exc))
                self._failed = True
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def reloading(self) -> bool:
        return self.send(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self, now_mono: float | None = None) -> bool:
        """Ping the watchdog if half its interval has passed since the last ping."""
        if self.watchdog_period_s is None or self.address is None:
            return False
        now = time.monotonic() if now_mono is None else now_mono
        if now < self._next_ping_mono:
            return False
        self._next_ping_mono = now + self.watchdog_period_s
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

"""Sequence numbers that continue across restarts.

Each published stream (``cap``, ``telemetry``) numbers its messages with ``seq``. A
consumer must never see a number twice for two different messages, so a restart must
continue above every number used before, even after a crash. The store reserves
numbers in blocks: the file holds, per stream, a ceiling above every number handed
out, written (atomically, fsynced) before a number at or above the old ceiling is used.
A restart starts at the ceilings, so a crash skips at most one block and never repeats.

A store that cannot be written keeps counting in memory and says so in :attr:`fault`;
one that is unreadable at start (corrupt) starts its streams above the current time in
milliseconds, which is above any earlier number unless the clock went back.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from rackguard.agent import log as logmod

BLOCK = 1000
_MAX_SEQ = 2**62


class SeqStore:
    """Per-stream counters reserved in blocks in a small JSON file.

    Args:
        path: The file (its directory must exist or be creatable), or None: memory only.
        block: How many numbers one write reserves.
    """

    def __init__(self, path: Path | None, block: int = BLOCK) -> None:
        self.path = path
        self.block = block
        self.fault: str | None = None
        self.log = logmod.get("seq")
        self._ceiling: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._floor = 0  # every stream starts above this (set when the file was lost)
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._lost(f"cannot read {path}: {exc.strerror or exc}")
            return
        try:
            data = json.loads(raw)
            streams = data["streams"]
            ceilings = {str(k): int(v) for k, v in streams.items()}
            if not all(0 <= v <= _MAX_SEQ for v in ceilings.values()):
                raise ValueError("seq out of range")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._lost(f"{path} is corrupt: {exc}")
            return
        self._last = dict(ceilings)  # everything below the ceilings may have been used

    def _lost(self, why: str) -> None:
        self._floor = int(time.time() * 1000)
        self.fault = why
        self.log.error("seq_store_lost", error=why, restart_above=self._floor)

    def last(self, stream: str) -> int:
        """The last number handed out (or reserved before a restart) for ``stream``."""
        return self._last.get(stream, self._floor)

    def next(self, stream: str) -> int:
        """The next number of ``stream``; reserves a new block first when needed."""
        n = self.last(stream) + 1
        self.reserve(stream, n)
        return n

    def reserve(self, stream: str, seq: int) -> None:
        """Record that ``seq`` is used (counted elsewhere): a restart will start above it."""
        if seq >= self._ceiling.get(stream, 0) or (self.fault or "").startswith("cannot write"):
            self._ceiling[stream] = max(self._ceiling.get(stream, 0), seq + self.block)
            self._write()
        self._last[stream] = max(self._last.get(stream, self._floor), seq)

    def _write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        body = json.dumps({"streams": self._ceiling}, sort_keys=True).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if self.fault is None:
                self.log.error("seq_store_write_failed", path=str(self.path), error=exc.strerror or str(exc))
            self.fault = f"cannot write {self.path}: {exc.strerror or exc}"
            return
        if self.fault is not None and self.fault.startswith("cannot write"):
            self.log.warning("seq_store_recovered", path=str(self.path))
            self.fault = None

"""The queue of messages waiting for the broker's acknowledgement.

Both outboxes are bounded: when full they drop the oldest telemetry first and
never an alarm, and count every drop. Messages leave only when acknowledged.
Ids increase strictly and are never reused, so "created before id N" is a total
order that survives restarts (the MQTT link uses it to tell history from live).

``SqliteOutbox`` is the durable one (SQLite, WAL). Its fsync policy:
``synchronous = "full"`` (default) fsyncs the WAL on every commit, and every
``put`` and every ``ack`` batch is one transaction, so a power cut loses at most
the transaction being written (one message, or one ack batch, which is then
re-sent as a duplicate). ``"normal"`` fsyncs only at checkpoints: a process
crash still loses nothing, but a power cut can lose everything since the last
checkpoint. The per-stream sequence counters and the drop count live in the
same database and are written in the same transaction as the message.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from rackguard.agent import log as logmod

Kind = Literal["telemetry", "alarm"]
_DROPPED_KEY = "_dropped_total"  # a row of the counters table, beside the seq streams


@dataclass(frozen=True, slots=True)
class OutMsg:
    """One history message. ``seq`` (when set) is the per-``kind`` stream counter to persist."""

    topic: str
    payload: bytes
    kind: Kind = "telemetry"
    qos: int = 1
    retain: bool = False
    expiry_s: int | None = None
    seq: int | None = None


class Outbox(Protocol):
    dropped_total: int
    max_messages: int

    def put(self, msg: OutMsg) -> None: ...
    def peek(
        self, limit: int, *, after_id: int = 0, upto_id: int | None = None
    ) -> list[tuple[int, OutMsg]]: ...
    def ack(self, ids: list[int]) -> None: ...
    def last_id(self) -> int: ...
    def last_seq(self, stream: str) -> int: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...


class MemoryOutbox:
    """In-memory, bounded, ordered outbox (not durable: a restart loses it)."""

    def __init__(self, max_messages: int = 10_000) -> None:
        self.max_messages = max_messages
        self.dropped_total = 0
        self._ids = itertools.count(1)
        self._last_id = 0
        self._seqs: dict[str, int] = {}
        self._q: OrderedDict[int, OutMsg] = OrderedDict()

    def put(self, msg: OutMsg) -> None:
        self._last_id = next(self._ids)
        self._q[self._last_id] = msg
        if msg.seq is not None:
            self._seqs[msg.kind] = max(self._seqs.get(msg.kind, 0), msg.seq)
        while len(self._q) > self.max_messages:
            victim = next((i for i, m in self._q.items() if m.kind == "telemetry"), None)
            if victim is None:
                break  # only alarms left: alarms are never dropped
            del self._q[victim]
            self.dropped_total += 1

    def peek(self, limit: int, *, after_id: int = 0, upto_id: int | None = None) -> list[tuple[int, OutMsg]]:
        """The oldest ``limit`` messages with ``after_id < id <= upto_id``, in order."""
        if limit <= 0:
            return []
        it = ((i, m) for i, m in self._q.items() if i > after_id and (upto_id is None or i <= upto_id))
        return list(itertools.islice(it, limit))

    def ack(self, ids: list[int]) -> None:
        for i in ids:
            self._q.pop(i, None)

    def last_id(self) -> int:
        return self._last_id

    def last_seq(self, stream: str) -> int:
        return self._seqs.get(stream, 0)

    def __len__(self) -> int:
        return len(self._q)

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    kind TEXT NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    expiry_s INTEGER,
    created_s REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_kind_id ON outbox (kind, id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class SqliteOutbox:
    """Durable, bounded, ordered outbox in one SQLite file (WAL mode).

    Args:
        path: the database file; its directory is created if missing.
        max_messages: bound on queued messages (alarms may exceed it: never dropped).
        synchronous: ``"full"`` (fsync per commit) or ``"normal"`` (fsync per checkpoint).

    Raises:
        sqlite3.Error, OSError: the database cannot be opened or created.
    """

    def __init__(
        self, path: Path, max_messages: int = 10_000, *, synchronous: Literal["full", "normal"] = "full"
    ) -> None:
        self.path = path
        self.max_messages = max_messages
        self.log = logmod.get("outbox")
        self._errors = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per operation.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.executescript(_SCHEMA)
            self._count = int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            self._last_id = int(row[0]) if row else 0
            self.dropped_total = self._counter(_DROPPED_KEY)
        except BaseException:
            self._db.close()
            raise
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)

    def _counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def put(self, msg: OutMsg) -> None:
        """Store a message (and its seq) in one transaction; drop the oldest telemetry if full.

        A write error (disk full, I/O error) is logged and counted as a drop: the
        control loop must not stop because the disk did.
        """
        try:
            self._put(msg)
        except sqlite3.Error as exc:
            self.dropped_total += 1
            self._errors += 1
            if self._errors in (1, 10, 100) or self._errors % 1000 == 0:
                self.log.error("outbox_write_failed", error=str(exc), kind=msg.kind, errors=self._errors)

    def _put(self, msg: OutMsg) -> None:
        db = self._db
        dropped = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.execute(
                "INSERT INTO outbox (topic, payload, kind, qos, retain, expiry_s, created_s)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (msg.topic, msg.payload, msg.kind, msg.qos, int(msg.retain), msg.expiry_s, time.time()),
            )
            last_id = int(cur.lastrowid or 0)
            if msg.seq is not None:
                db.execute(
                    "INSERT INTO counters (name, value) VALUES (?, ?)"
                    " ON CONFLICT(name) DO UPDATE SET value = max(value, excluded.value)",
                    (msg.kind, msg.seq),
                )
            excess = self._count + 1 - self.max_messages
            if excess > 0:
                # Oldest telemetry first; alarms are never dropped.
                dropped = db.execute(
                    "DELETE FROM outbox WHERE id IN"
                    " (SELECT id FROM outbox WHERE kind = 'telemetry' ORDER BY id LIMIT ?)",
                    (excess,),
                ).rowcount
                if dropped:
                    db.execute(
                        "INSERT INTO counters (name, value) VALUES (?, ?)"
                        " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                        (_DROPPED_KEY, dropped),
                    )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self._last_id = last_id
        self._count += 1 - dropped
        self.dropped_total += dropped

    def peek(self, limit: int, *, after_id: int = 0, upto_id: int | None = None) -> list[tuple[int, OutMsg]]:
        """The oldest ``limit`` messages with ``after_id < id <= upto_id``, in order."""
        if limit <= 0:
            return []
        rows = self._db.execute(
            "SELECT id, topic, payload, kind, qos, retain, expiry_s FROM outbox"
            " WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
            (after_id, upto_id if upto_id is not None else 2**62, limit),
        ).fetchall()
        return [(int(i), OutMsg(t, bytes(p), k, int(q), bool(r), e)) for i, t, p, k, q, r, e in rows]

    def ack(self, ids: list[int]) -> None:
        """Remove acknowledged messages, one transaction for the batch."""
        if not ids:
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            n = db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids]).rowcount
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self._count -= max(0, n)

    def last_id(self) -> int:
        return self._last_id

    def last_seq(self, stream: str) -> int:
        """The highest seq stored for a stream (0 when none): restarts continue from here."""
        return self._counter(stream)

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        self._db.close()


def open_outbox(
    path: Path | None, max_messages: int, *, synchronous: Literal["full", "normal"] = "full"
) -> SqliteOutbox | MemoryOutbox:
    """The durable outbox at ``path``, or a memory one when ``path`` is None or cannot be opened.

    A corrupt database is moved aside (``<name>.corrupt-<time>``) and a fresh one created.
    """
    log = logmod.get("outbox")
    if path is None:
        log.warning("outbox_not_durable", reason="no outbox.path and no $STATE_DIRECTORY")
        return MemoryOutbox(max_messages)
    for attempt in range(2):
        try:
            box = SqliteOutbox(path, max_messages, synchronous=synchronous)
            log.info("outbox_opened", path=str(path), queued=len(box), dropped_total=box.dropped_total)
            return box
        except sqlite3.DatabaseError as exc:
            if attempt or isinstance(exc, sqlite3.OperationalError):
                log.error("outbox_open_failed", path=str(path), error=str(exc), fallback="memory")
                break
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            log.error("outbox_corrupt", path=str(path), error=str(exc), moved_to=str(aside))
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(path) + suffix)
                if src.exists():
                    src.rename(Path(str(aside) + suffix))
        except OSError as exc:
            log.error("outbox_open_failed", path=str(path), error=str(exc), fallback="memory")
            break
    return MemoryOutbox(max_messages)

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
    max_messages: int
    fault: str | None  # why messages are not stored durably now (None: fine, or not asked for)
    faults_total: int
    lost_on_open: bool  # the store was found corrupt at start (its queue and seqs are gone)

    @property
    def dropped_total(self) -> int: ...
    @property
    def durable(self) -> bool: ...

    def put(self, msg: OutMsg, msg_id: int | None = None) -> None: ...
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

    durable = False
    fault: str | None = None
    faults_total = 0
    lost_on_open = False

    def __init__(self, max_messages: int = 10_000) -> None:
        self.max_messages = max_messages
        self.dropped_total = 0
        self._ids = itertools.count(1)
        self._last_id = 0
        self._seqs: dict[str, int] = {}
        self._q: OrderedDict[int, OutMsg] = OrderedDict()

    def put(self, msg: OutMsg, msg_id: int | None = None) -> None:
        """Queue ``msg`` (under ``msg_id``, which must exceed every id so far, when given)."""
        self._last_id = next(self._ids) if msg_id is None else msg_id
        if msg_id is not None:
            self._ids = itertools.count(msg_id + 1)
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

    def __contains__(self, msg_id: int) -> bool:
        return msg_id in self._q

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

    durable = True
    fault: str | None = None  # a write error raises to the caller instead (ResilientOutbox)
    faults_total = 0
    lost_on_open = False

    def __init__(
        self, path: Path, max_messages: int = 10_000, *, synchronous: Literal["full", "normal"] = "full"
    ) -> None:
        self.path = path
        self.max_messages = max_messages
        self.log = logmod.get("outbox")
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

    def put(self, msg: OutMsg, msg_id: int | None = None) -> None:
        """Store a message (and its seq) in one transaction; drop the oldest telemetry if full.

        Raises:
            sqlite3.Error: the write failed (disk full, read-only, I/O error); nothing changed.
        """
        self._put(msg, msg_id)

    def _put(self, msg: OutMsg, msg_id: int | None) -> None:
        db = self._db
        dropped = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.execute(
                "INSERT INTO outbox (id, topic, payload, kind, qos, retain, expiry_s, created_s)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    msg_id,
                    msg.topic,
                    msg.payload,
                    msg.kind,
                    msg.qos,
                    int(msg.retain),
                    msg.expiry_s,
                    time.time(),
                ),
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


class ResilientOutbox:
    """The durable outbox, kept going through storage faults; it recovers by itself.

    Messages go to SQLite at ``path``. When the file cannot be opened or written (disk
    full, read-only, I/O error), they go to a bounded memory queue instead, so that live
    messages still go out (without durability), and :attr:`fault` says why. Every
    ``retry_s`` the database is tried again; once it takes a write, the messages held in
    memory move into it. An acknowledgement whose delete fails is remembered and retried,
    and never raises: a full disk must not take the broker link down. Ids are allocated
    here, so they increase across both stores.

    Args:
        path: The database file, or None for memory only (not a fault: nothing was asked for).
        max_messages: Bound of each store.
        synchronous: SQLite's fsync policy.
        retry_s: How often a failed database is tried again.
    """

    def __init__(
        self,
        path: Path | None,
        max_messages: int = 10_000,
        *,
        synchronous: Literal["full", "normal"] = "full",
        retry_s: float = 5.0,
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.retry_s = retry_s
        self.log = logmod.get("outbox")
        self.db: SqliteOutbox | None = None
        self.mem = MemoryOutbox(max_messages)
        self.fault: str | None = None
        self.faults_total = 0
        self.lost_on_open = False  # the database was missing, empty or corrupt at start
        self._max_messages = max_messages
        self._retry_at = 0.0
        self._unacked_deletes: set[int] = set()
        self._open()
        self._last_id = self.db.last_id() if self.db is not None else 0

    # -- storage ---------------------------------------------------------------------------
    def _open(self) -> None:
        if self.path is None:
            return
        path = self.path
        existed = path.exists() and path.stat().st_size > 0
        for attempt in range(2):
            try:
                self.db = SqliteOutbox(path, self._max_messages, synchronous=self.synchronous)
                self.log.info(
                    "outbox_opened", path=str(path), queued=len(self.db), dropped_total=self.db.dropped_total
                )
                return
            except sqlite3.DatabaseError as exc:
                if attempt or isinstance(exc, sqlite3.OperationalError):
                    self._failed(f"cannot open {path}: {exc}")
                    return
                aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
                self.log.error("outbox_corrupt", path=str(path), error=str(exc), moved_to=str(aside))
                self.lost_on_open = existed
                for suffix in ("", "-wal", "-shm"):
                    src = Path(str(path) + suffix)
                    if src.exists():
                        src.rename(Path(str(aside) + suffix))
            except OSError as exc:
                self._failed(f"cannot open {path}: {exc.strerror or exc}")
                return

    def _failed(self, why: str) -> None:
        if self.fault is None:
            self.log.error("outbox_fault", fault=why, fallback="memory", retry_s=self.retry_s)
        self.fault = why
        self.faults_total += 1
        self._retry_at = time.monotonic() + self.retry_s

    def _recovered(self) -> None:
        assert self.db is not None
        moved = 0
        for i, m in self.mem.peek(len(self.mem)):
            try:
                self.db.put(m, i)
            except sqlite3.Error:
                break
            self.mem.ack([i])
            moved += 1
        self.log.warning(
            "outbox_recovered", after=self.fault, moved_from_memory=moved, left_in_memory=len(self.mem)
        )
        self.fault = None

    def _retry_due(self) -> bool:
        return self.fault is not None and time.monotonic() >= self._retry_at

    # -- the Outbox protocol -------------------------------------------------------------
    @property
    def max_messages(self) -> int:
        return self._max_messages

    @max_messages.setter
    def max_messages(self, n: int) -> None:
        self._max_messages = n
        self.mem.max_messages = n
        if self.db is not None:
            self.db.max_messages = n

    @property
    def dropped_total(self) -> int:
        return self.mem.dropped_total + (self.db.dropped_total if self.db is not None else 0)

    @property
    def durable(self) -> bool:
        return self.db is not None and self.fault is None

    def put(self, msg: OutMsg, msg_id: int | None = None) -> None:
        """Store ``msg``: in the database, or in memory while the database fails."""
        msg_id = self._last_id + 1 if msg_id is None else msg_id
        self._last_id = msg_id
        if self.db is None and self._retry_due():
            self._open()
        if self.db is not None and (self.fault is None or self._retry_due()):
            try:
                self.db.put(msg, msg_id)
            except sqlite3.Error as exc:
                self._failed(f"outbox write failed: {exc}")
            else:
                if self.fault is not None:
                    self._recovered()
                return
        self.mem.put(msg, msg_id)

    def peek(self, limit: int, *, after_id: int = 0, upto_id: int | None = None) -> list[tuple[int, OutMsg]]:
        if limit <= 0:
            return []
        extra = len(self._unacked_deletes)
        rows: list[tuple[int, OutMsg]] = []
        if self.db is not None:
            try:
                rows = self.db.peek(limit + extra, after_id=after_id, upto_id=upto_id)
            except sqlite3.Error as exc:
                self._failed(f"outbox read failed: {exc}")
        if extra:
            rows = [r for r in rows if r[0] not in self._unacked_deletes]
        rows += self.mem.peek(limit, after_id=after_id, upto_id=upto_id)
        rows.sort(key=lambda r: r[0])
        return rows[:limit]

    def ack(self, ids: list[int]) -> None:
        """Forget acknowledged messages; never raises (a failed delete is retried later)."""
        in_db = [i for i in ids if i not in self.mem]
        self.mem.ack(ids)
        if self.db is None or not (in_db or self._unacked_deletes):
            return
        todo = [*self._unacked_deletes, *in_db]
        try:
            self.db.ack(todo)
        except sqlite3.Error as exc:
            self._unacked_deletes.update(in_db)
            self._failed(f"outbox delete failed: {exc}")
        else:
            self._unacked_deletes.clear()

    def last_id(self) -> int:
        return self._last_id

    def last_seq(self, stream: str) -> int:
        db_seq = 0
        if self.db is not None:
            with contextlib.suppress(sqlite3.Error):
                db_seq = self.db.last_seq(stream)
        return max(db_seq, self.mem.last_seq(stream))

    def __len__(self) -> int:
        return len(self.mem) + (len(self.db) - len(self._unacked_deletes) if self.db is not None else 0)

    def close(self) -> None:
        if len(self.mem) and self.path is not None:
            self.log.error("outbox_closed_with_messages_in_memory", lost=len(self.mem), fault=self.fault)
        if self.db is not None:
            with contextlib.suppress(sqlite3.Error):
                self.db.ack(list(self._unacked_deletes))
            self.db.close()


def open_outbox(
    path: Path | None, max_messages: int, *, synchronous: Literal["full", "normal"] = "full"
) -> ResilientOutbox:
    """The outbox at ``path`` (None: memory only, with a warning), kept going through storage faults.

    A corrupt database is moved aside (``<name>.corrupt-<time>``) and a fresh one created.
    """
    if path is None:
        logmod.get("outbox").warning("outbox_not_durable", reason="no outbox.path and no $STATE_DIRECTORY")
    return ResilientOutbox(path, max_messages, synchronous=synchronous)

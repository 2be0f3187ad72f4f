"""The outboxes: order, acks, the drop policy, and durability across restarts and SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rackguard.agent.config import OutboxConfig
from rackguard.agent.outbox import MemoryOutbox, Outbox, OutMsg, ResilientOutbox, SqliteOutbox, open_outbox

REPO = Path(__file__).resolve().parents[2]
Factory = Callable[[int], Outbox]


@pytest.fixture(params=["memory", "sqlite", "resilient"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    if request.param == "memory":
        return lambda n: MemoryOutbox(n)
    if request.param == "resilient":
        return lambda n: ResilientOutbox(tmp_path / "state" / "outbox.sqlite", n)
    return lambda n: SqliteOutbox(tmp_path / "state" / "outbox.sqlite", n)


def tele(n: int) -> OutMsg:
    return OutMsg("t/telemetry", f"t{n}".encode(), "telemetry", seq=n)


def alarm(n: int) -> OutMsg:
    return OutMsg("t/alarm", f"a{n}".encode(), "alarm", seq=n)


def payloads(box: Outbox) -> list[bytes]:
    return [m.payload for _, m in box.peek(10_000)]


def test_order_peek_ranges_and_ack(make: Factory) -> None:
    box = make(100)
    for n in range(1, 6):
        box.put(tele(n))
    assert payloads(box) == [b"t1", b"t2", b"t3", b"t4", b"t5"]
    ids = [i for i, _ in box.peek(10)]
    assert ids == sorted(ids) and box.last_id() == ids[-1]
    assert [m.payload for _, m in box.peek(10, upto_id=ids[1])] == [b"t1", b"t2"]
    assert [m.payload for _, m in box.peek(2, after_id=ids[1])] == [b"t3", b"t4"]
    box.ack(ids[:2])
    assert payloads(box) == [b"t3", b"t4", b"t5"] and len(box) == 3
    assert box.last_seq("telemetry") == 5 and box.last_seq("alarm") == 0


def test_full_drops_oldest_telemetry_first_never_alarms(make: Factory) -> None:
    box = make(10)
    box.put(tele(1))
    box.put(alarm(1))
    for n in range(2, 30):
        box.put(tele(n))
    for n in range(2, 5):
        box.put(alarm(n))
    got = payloads(box)
    assert len(got) == 10
    assert [p for p in got if p.startswith(b"a")] == [b"a1", b"a2", b"a3", b"a4"]
    assert [p for p in got if p.startswith(b"t")] == [f"t{n}".encode() for n in range(24, 30)]
    assert box.dropped_total == 33 - 10
    # Only alarms left: the bound yields rather than drop one.
    for n in range(5, 20):
        box.put(alarm(n))
    assert all(p.startswith(b"a") for p in payloads(box))
    assert len(box) == 19 and box.dropped_total == 33 - 4


def test_sqlite_survives_reopen_with_seq_ids_and_drops(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    box = SqliteOutbox(path, 10)
    for n in range(1, 16):
        box.put(tele(n))
    box.ack([i for i, _ in box.peek(3)])
    last_id, dropped = box.last_id(), box.dropped_total
    box.close()
    box = SqliteOutbox(path, 10)
    assert dropped == 5 and box.dropped_total == 5
    assert box.last_seq("telemetry") == 15 and box.last_id() == last_id
    assert payloads(box) == [f"t{n}".encode() for n in range(9, 16)] and len(box) == 7
    box.ack([i for i, _ in box.peek(100)])
    box.put(tele(16))
    assert box.peek(1)[0][0] == last_id + 1  # ids never reused, even after the table emptied
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    box.close()


def test_sqlite_loses_nothing_on_sigkill(tmp_path: Path) -> None:
    """Every put that returned is on disk when the process is SIGKILLed mid-stream."""
    path = tmp_path / "outbox.sqlite"
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from rackguard.agent.outbox import SqliteOutbox, OutMsg
        box = SqliteOutbox(Path({str(path)!r}), 1_000_000)
        n = 0
        while True:
            n += 1
            box.put(OutMsg("t", str(n).encode(), "telemetry", seq=n))
            if n % 2 == 0:
                box.ack([i for i, _ in box.peek(1)])
            print(n, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    last = 0
    deadline = time.monotonic() + 30
    while last < 300 and time.monotonic() < deadline:
        last = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    box = SqliteOutbox(path, 1_000_000)
    assert box.last_seq("telemetry") >= last
    seqs = [int(m.payload) for _, m in box.peek(10**6)]
    n = box.last_seq("telemetry")
    assert seqs == list(range(n // 2 + 1, n + 1))  # half acked from the front, none lost
    box.close()


def test_open_outbox_paths_and_corruption(tmp_path: Path) -> None:
    cfg = OutboxConfig(path=Path("q.sqlite"))
    assert cfg.resolved_path({"STATE_DIRECTORY": "/var/lib/rackguard"}) == Path("/var/lib/rackguard/q.sqlite")
    assert OutboxConfig().resolved_path({"STATE_DIRECTORY": "/s:/t"}) == Path("/s/outbox.sqlite")
    assert OutboxConfig().resolved_path({}) is None
    assert OutboxConfig(path=Path("/x/y.db")).resolved_path({"STATE_DIRECTORY": "/s"}) == Path("/x/y.db")
    mem = open_outbox(None, 10)
    assert mem.db is None and mem.fault is None and not mem.durable  # nothing asked for: no fault
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    box = open_outbox(bad, 10)
    assert box.durable and len(box) == 0 and box.lost_on_open
    assert list(tmp_path.glob("bad.sqlite.corrupt-*"))
    box.close()

"""The inference-server gate: admission and draining, expiry/offline fallback, HTTP fallback."""

from __future__ import annotations

import asyncio
import json
import time

from rackguard.agent.gate import Gate
from rackguard.agent.http import HttpServer, json_response
from tests.conftest import free_port


def cap(caps: list[int], valid_for_s: float = 100.0, now: float | None = None) -> bytes:
    now = time.time() if now is None else now
    return json.dumps({"caps": caps, "total": sum(caps), "valid_until_s": now + valid_for_s}).encode()


async def test_drop_drains_without_killing_and_never_over_admits() -> None:
    gate = Gate(node_topic="rackguard/s/r/n", safe_cap=2, gpu=1)
    assert gate.limit == 2 and gate.source == "safe"  # no cap yet
    gate.handle_status(b'{"state": "online"}')
    gate.handle_cap(cap([9, 4]), "mqtt")
    assert (gate.limit, gate.source) == (4, "mqtt")

    done = [asyncio.Event() for _ in range(10)]
    entered: list[int] = []
    peak = [0]

    async def request(i: int) -> None:
        async with gate:
            entered.append(i)
            peak[0] = max(peak[0], gate.in_flight)
            await done[i].wait()
            gate.report_tokens(10)

    tasks = [asyncio.create_task(request(i)) for i in range(10)]
    await asyncio.sleep(0.01)
    assert entered == [0, 1, 2, 3] and gate.in_flight == 4

    gate.handle_cap(cap([9, 1]), "mqtt")  # the cap drops below what is in flight
    assert gate.limit == 1 and gate.in_flight == 4  # nothing killed
    for i in (0, 1, 2):
        done[i].set()
        await asyncio.sleep(0.01)
        assert len(entered) == 4  # draining: no admission while in flight >= 1
    assert gate.in_flight == 1
    done[3].set()
    await asyncio.sleep(0.01)
    assert entered == [0, 1, 2, 3, 4] and gate.in_flight == 1  # first come, first served

    gate.handle_cap(cap([9, 3]), "mqtt")  # rises: the next two waiters go in at once
    await asyncio.sleep(0.01)
    assert entered == [0, 1, 2, 3, 4, 5, 6] and gate.in_flight == 3
    for e in done:
        e.set()
    await asyncio.gather(*tasks)
    assert gate.in_flight == 0 and gate.completed_total == 10 and gate.tokens_total == 100
    assert peak[0] == 4 and gate.max_admitted_over_limit == 0


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    gate = Gate(node_topic="x/y", safe_cap=1)
    hold = asyncio.Event()

    async def busy() -> None:
        async with gate:
            await hold.wait()

    t1 = asyncio.create_task(busy())
    await asyncio.sleep(0)
    t2 = asyncio.create_task(busy())
    await asyncio.sleep(0.01)
    t2.cancel()
    hold.set()
    await t1
    assert gate.in_flight == 0 and t2.cancelled()
    async with gate:
        assert gate.in_flight == 1


def test_expiry_offline_and_message_expiry_fall_back_to_safe_cap() -> None:
    now = [1000.0]
    seen: list[tuple[int, str]] = []
    gate = Gate(node_topic="x", safe_cap=3, clock=lambda: now[0], on_limit=lambda n, s: seen.append((n, s)))
    gate.handle_status(b'{"state": "online"}')
    gate.handle_cap(cap([10, 10], valid_for_s=5.0, now=now[0]), "mqtt")  # node-wide gate: total
    assert gate.limit == 20
    now[0] += 5.0
    gate._update()  # the tick loop runs this every 0.1 s
    assert (gate.limit, gate.source) == (3, "safe")
    # The MQTT 5 expiry can be shorter than valid_until_s: the earlier wins.
    gate.handle_cap(cap([10, 10], valid_for_s=60.0, now=now[0]), "mqtt", expiry_s=2.0)
    assert gate.limit == 20
    now[0] += 2.0
    gate._update()
    assert gate.limit == 3
    # The agent's last will: safe at once, even with a valid cap.
    gate.handle_cap(cap([10, 10], now=now[0]), "mqtt")
    gate.handle_status(b'{"state": "offline", "reason": "connection lost"}')
    assert gate.limit == 3
    gate.handle_cap(b"garbage", "mqtt")
    assert gate.limit == 3
    assert seen == [(20, "mqtt"), (3, "safe"), (20, "mqtt"), (3, "safe"), (20, "mqtt"), (3, "safe")]


async def test_http_fallback_when_mqtt_is_unreachable() -> None:
    valid_until = [time.time() + 1.5]

    def route() -> tuple[int, str, bytes]:
        return json_response(200, {"caps": [6], "total": 6, "valid_until_s": valid_until[0]})

    server = HttpServer("127.0.0.1", 0, {"/v1/cap": route})
    port = await server.start()
    gate = Gate(
        node_topic="x",
        safe_cap=2,
        gpu=0,
        port=free_port(),  # nothing listens: MQTT is unreachable
        http_url=f"http://127.0.0.1:{port}/v1/cap",
        reconnect_s=0.2,
    )
    await gate.start()
    try:
        for _ in range(100):
            if gate.source == "http":
                break
            await asyncio.sleep(0.05)
        assert (gate.limit, gate.source) == (6, "http")
        await server.close()  # the agent is gone too: the cap expires
        for _ in range(100):
            if gate.source == "safe":
                break
            await asyncio.sleep(0.05)
        assert (gate.limit, gate.source) == (2, "safe")
    finally:
        await gate.close()
        await server.close()

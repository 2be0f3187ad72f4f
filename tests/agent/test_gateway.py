"""The admission gateway without an agent: classes, shedding, spill-over, HTTP, bad input.

With no agent the gateway's limit is ``safe_cap`` × the upstream's GPUs (the broker port
is closed), which pins the limit for these tests. The cap-following tests, with a real
mosquitto and a simulated agent, are in test_gateway_agent.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psutil
import pytest

from rackguard.agent import config as configmod
from rackguard.agent.gateway.server import Gateway
from rackguard.agent.mosquitto import free_port
from rackguard.bench.fake_openai import FakeUpstream


def gw_config(
    upstreams: list[FakeUpstream], *, fallback: FakeUpstream | None = None, **gateway: Any
) -> configmod.Config:
    g: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "upstreams": [{"name": u.name, "url": u.url, "gpus": [i]} for i, u in enumerate(upstreams)],
        "safe_cap": 2,
        **gateway,
    }
    if fallback is not None:
        g["fallback"] = {"url": fallback.url}
    return configmod.validate(
        {
            "node": {"site": "s", "rack": "r", "name": "n1"},
            "mqtt": {"port": free_port()},  # nothing listens: no cap, safe_cap holds
            "http": {"port": 0},
            "gateway": g,
        }
    )


@asynccontextmanager
async def running(cfg: configmod.Config) -> AsyncIterator[Gateway]:
    gw = Gateway(cfg)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.close()


@asynccontextmanager
async def fakes(*ups: FakeUpstream) -> AsyncIterator[None]:
    for u in ups:
        await u.start()
    try:
        yield
    finally:
        for u in ups:
            await u.close()


def client(gw: Gateway, cls: str | None = None, **kw: Any) -> openai.AsyncOpenAI:
    headers = {"x-rackguard-class": cls} if cls else None
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="k", max_retries=0, default_headers=headers, **kw
    )


MSG = [{"role": "user", "content": "hi"}]


async def test_openai_client_stream_and_not_usage_hidden_headers_and_models() -> None:
    up = FakeUpstream("a", tokens=5, token_interval_s=0.01)
    async with fakes(up), running(gw_config([up], model_params={"m": 1e9})) as gw:
        c = client(gw)
        r = await c.chat.completions.create(model="m", messages=MSG)
        assert (
            r.choices[0].message.content == "xxxxx" and r.usage is not None and r.usage.completion_tokens == 5
        )
        chunks = [ch async for ch in await c.chat.completions.create(model="m", messages=MSG, stream=True)]
        # The client did not ask for usage: the gateway asked for it and removed it.
        assert json.loads(up.last_body)["stream_options"] == {"include_usage": True}
        assert all(ch.usage is None and ch.choices for ch in chunks)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "xxxxx"
        # A client that asked for usage gets it.
        chunks = [
            ch
            async for ch in await c.chat.completions.create(
                model="m", messages=MSG, stream=True, stream_options={"include_usage": True}
            )
        ]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
        # Headers both ways, /v1/models and embeddings pass through.
        raw = await c.chat.completions.with_raw_response.create(
            model="m", messages=MSG, extra_headers={"x-tenant": "t1"}
        )
        assert raw.headers["x-upstream"] == "a" and up.last_headers["x-tenant"] == "t1"
        assert up.last_headers["Authorization"] == "Bearer k"
        models = await c.models.list()
        assert [m.id for m in models.data] == ["m"]
        emb = await c.embeddings.create(model="e", input="hi")
        assert emb.data[0].embedding == [0.1, 0.2]
        await c.close()
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gw.port}/metrics") as r:
            body = await r.text()
        assert 'rackguard_gateway_requests_total{cls="default",outcome="ok"} 5.0' in body
        assert 'rackguard_gateway_tokens_total{cls="default",kind="completion"} 20.0' in body
        assert "rackguard_gateway_time_per_output_token_seconds_count" in body
        m = gw.metrics
        tokens = sum(m.tokens.labels("default", k)._value.get() for k in ("prompt", "completion"))
        emb_tokens = 3  # the embeddings request names model "e", which has no parameter count
        assert m.flops.labels("default")._value.get() == 2 * 1e9 * (tokens - emb_tokens)


def classes(**extra: Any) -> list[dict[str, Any]]:
    return [
        {"name": "high", "priority": 10, "max_queue_s": 2.0, **extra},
        {"name": "low", "priority": 0, "max_queue_s": 0.3},
    ]


async def overload(gw: Gateway, n_high: int, n_low: int) -> dict[str, list[Any]]:
    """Fire both classes at once; return each class's results (a completion or an exception)."""
    out: dict[str, list[Any]] = {"high": [], "low": []}
    clients = {k: client(gw, k) for k in out}

    async def one(cls: str) -> None:
        try:
            r = await clients[cls].chat.completions.with_raw_response.create(model="m", messages=MSG)
            out[cls].append(r)
        except openai.APIStatusError as exc:
            out[cls].append(exc)

    await asyncio.gather(*(one("high") for _ in range(n_high)), *(one("low") for _ in range(n_low)))
    for c in clients.values():
        await c.close()
    return out


async def test_overload_high_class_first_low_class_shed_429_with_retry_after() -> None:
    up = FakeUpstream("a", delay_s=0.1)
    async with fakes(up), running(gw_config([up], classes=classes())) as gw:
        res = await overload(gw, n_high=20, n_low=20)
        # limit 2, 0.1 s each: 20 high requests take ~1 s, within high's 2 s; low waits 0.3 s, behind them.
        assert all(not isinstance(r, Exception) for r in res["high"])
        shed = [r for r in res["low"] if isinstance(r, openai.RateLimitError)]
        assert len(shed) >= 15, [type(r).__name__ for r in res["low"]]
        assert all(int(r.response.headers["Retry-After"]) >= 1 for r in shed)
        assert up.max_in_flight <= 2 and gw.upstreams[0].adm.max_admitted_over_limit == 0
        waits = gw.metrics.queue_wait.labels("high")
        assert waits._sum.get() / 20 < 2.0  # the mean; the p99 is in BENCHMARKS (bench gateway)
        assert gw.upstreams[0].counters["low"].shed_total == len(shed)


async def test_spill_to_fallback_zero_errors_and_counted() -> None:
    up, fb = FakeUpstream("a", delay_s=0.1), FakeUpstream("fallback")
    async with fakes(up, fb), running(gw_config([up], fallback=fb, classes=classes())) as gw:
        res = await overload(gw, n_high=20, n_low=20)
        assert not [r for rs in res.values() for r in rs if isinstance(r, Exception)]  # clients see 0 errors
        spilled = [r for r in res["low"] if r.headers["x-upstream"] == "fallback"]
        assert len(spilled) >= 15 and fb.requests == len(spilled)
        assert gw.upstreams[0].counters["low"].spilled_total == len(spilled)
        assert gw.metrics.fallback.labels("low")._value.get() == len(spilled)


async def test_safety_reason_sends_everything_to_fallback() -> None:
    up, fb = FakeUpstream("a"), FakeUpstream("fallback")
    async with fakes(up, fb), running(gw_config([up], fallback=fb)) as gw:
        cap = {"caps": [3], "total": 3, "valid_until_s": time.time() + 60, "reason": "leak"}
        gw.handle_status(b'{"state": "online"}')
        gw.handle_cap(json.dumps(cap).encode(), "mqtt")
        assert gw.upstreams[0].adm.limit == 3
        c = client(gw)
        for _ in range(3):
            raw = await c.chat.completions.with_raw_response.create(model="m", messages=MSG)
            assert raw.headers["x-upstream"] == "fallback"
        gw.handle_cap(json.dumps(dict(cap, reason="mpc")).encode(), "mqtt")
        raw = await c.chat.completions.with_raw_response.create(model="m", messages=MSG)
        assert raw.headers["x-upstream"] == "a" and up.requests == 1
        await c.close()


async def test_reserved_share_keeps_slots_for_its_class() -> None:
    up = FakeUpstream("a", delay_s=0.3)
    async with fakes(up), running(gw_config([up], safe_cap=4, classes=classes(reserved_share=0.5))) as gw:
        # 6 low requests at once: only 2 go in, 2 slots stay reserved for "high".
        lows = asyncio.gather(*(overload(gw, 0, 1) for _ in range(6)))
        for _ in range(100):
            if gw.upstreams[0].adm.waiting == 4:
                break
            await asyncio.sleep(0.01)
        assert gw.upstreams[0].adm.in_flight_by_class == [0, 2] and gw.upstreams[0].adm.waiting == 4
        high = await overload(gw, 2, 0)
        assert all(not isinstance(r, Exception) for r in high["high"])
        await lows


async def test_upstream_down_502_slot_freed_and_api_key_class(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# key class\nsecret-high high\n")
    dead = FakeUpstream("dead")
    dead.port = free_port()  # nothing listens
    cfg = gw_config([dead], classes=classes(), api_keys_file=str(keys))
    async with running(cfg) as gw:
        c = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="secret-high", max_retries=0
        )
        for _ in range(3):
            with pytest.raises(openai.APIStatusError) as e:
                await c.chat.completions.create(model="m", messages=MSG)
            assert e.value.status_code == 502
        await c.close()
        assert gw.upstreams[0].adm.in_flight == 0
        assert gw.upstreams[0].counters["high"].error_total == 3  # the key chose the class


async def test_bad_input_clear_errors() -> None:
    up = FakeUpstream("a")
    async with fakes(up), running(gw_config([up], max_body_bytes=4096, classes=classes())) as gw:
        base = f"http://127.0.0.1:{gw.port}"
        async with aiohttp.ClientSession() as s:
            deep = b"[" * 2000 + b"]" * 2000  # nested past Python's recursion limit, under the size limit
            for body, want in [(b"{not json", 400), (b"[1, 2]", 400), (b"x" * 8192, 413), (deep, 400)]:
                async with s.post(base + "/v1/chat/completions", data=body) as r:
                    assert r.status == want, body[:20]
                    err = (await r.json())["error"]
                    assert err["type"] == "invalid_request_error" and err["message"]
            async with s.post(
                base + "/v1/chat/completions", json={"model": "m"}, headers={"x-rackguard-class": "vip"}
            ) as r:
                assert r.status == 400 and "unknown class" in (await r.json())["error"]["message"]
        assert up.requests == 0 and gw.metrics.bad_requests._value.get() == 5


async def test_slow_client_and_disconnect_free_their_slots() -> None:
    up = FakeUpstream("a", tokens=2000, token_interval_s=0.0)
    async with fakes(up), running(gw_config([up], safe_cap=1, write_timeout_s=0.5, body_timeout_s=0.5)) as gw:
        # A client that sends half a body and stalls holds no slot, and is dropped after body_timeout_s.
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        await w.drain()
        assert (await asyncio.wait_for(r.readexactly(12), 5)) == b"HTTP/1.1 408"
        w.close()
        # A streaming client that never reads: dropped after write_timeout_s, slot freed.
        sock = socket.create_connection(("127.0.0.1", gw.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = json.dumps({"model": "m", "messages": MSG, "stream": True}).encode()
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        up.tokens = 200_000  # far more than the socket buffers hold
        for _ in range(100):
            if gw.upstreams[0].adm.in_flight == 1:
                break
            await asyncio.sleep(0.05)
        assert gw.upstreams[0].adm.in_flight == 1
        for _ in range(100):
            if gw.upstreams[0].adm.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        assert gw.upstreams[0].adm.in_flight == 0, "a client that reads nothing held its slot"
        sock.close()
        # A client that disconnects mid-stream cancels its upstream request.
        up.tokens, up.token_interval_s = 100, 0.05
        c = client(gw)
        stream = await c.chat.completions.create(model="m", messages=MSG, stream=True)
        async for _ in stream:
            break
        await stream.close()
        await c.close()
        for _ in range(100):
            if up.in_flight == 0 and gw.upstreams[0].adm.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        assert up.in_flight == 0 and gw.upstreams[0].adm.in_flight == 0


async def test_10000_requests_past_the_queue_bound_get_429_memory_bounded() -> None:
    up = FakeUpstream("a", delay_s=30.0)
    async with fakes(up):
        cfg = gw_config(
            [up], safe_cap=1, max_queue=10, classes=[{"name": "d", "priority": 0, "max_queue_s": 60}]
        )
        gw = Gateway(cfg)
        await gw.start()
        proc = psutil.Process()
        conn = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(connector=conn) as s:
            url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
            hold = [
                asyncio.create_task(s.post(url, json={"model": "m"})) for _ in range(11)
            ]  # 1 in flight, 10 queued
            for _ in range(100):
                if gw.upstreams[0].adm.waiting == 10:
                    break
                await asyncio.sleep(0.05)
            rss0 = proc.memory_info().rss
            statuses: dict[int, int] = {}

            async def one() -> None:
                async with s.post(url, json={"model": "m"}) as r:
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    assert "Retry-After" in r.headers

            for _ in range(10):
                await asyncio.gather(*(one() for _ in range(1000)))
            grown_mb = (proc.memory_info().rss - rss0) / 2**20
            for t in hold:
                t.cancel()
        await gw.close()
        print(f"10,000 requests past the queue bound: {statuses}, RSS grew {grown_mb:.1f} MiB")
        assert statuses == {429: 10_000}
        assert gw.upstreams[0].adm.waiting <= 10 and grown_mb < 50, grown_mb


async def test_admission_orders_by_priority_then_arrival_and_estimates_the_wait() -> None:
    from rackguard.agent.config import GatewayClass
    from rackguard.agent.gateway.admission import Admission

    cls = [
        GatewayClass(name="lo", priority=0, max_queue_s=10),
        GatewayClass(name="hi", priority=5, max_queue_s=10),
        GatewayClass(name="hi2", priority=5, max_queue_s=10),
    ]
    adm = Admission(cls, limit=1)
    assert adm.try_admit(0)
    order: list[str] = []
    held = [0]  # class of each slot taken, oldest first

    async def wait(c: int, tag: str) -> None:
        assert await adm.acquire(c, 5)
        order.append(tag)
        held.append(c)

    tasks = []
    for c, tag in [(0, "lo1"), (1, "hi1"), (2, "hi2-a"), (0, "lo2"), (1, "hi1-b")]:
        tasks.append(asyncio.create_task(wait(c, tag)))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert adm.expected_wait_s(1) == 0.0  # nothing served yet: no estimate
    adm.served(0.2)
    assert adm.expected_wait_s(1) == pytest.approx((3 + 1) * 0.2)  # three queued at priority 5, then itself
    assert adm.expected_wait_s(0) == pytest.approx((5 + 1) * 0.2)  # everyone is ahead of a low request
    for _ in range(5):
        adm.release(held.pop(0))
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert order == ["hi1", "hi2-a", "hi1-b", "lo1", "lo2"]  # priority, then arrival across equal classes
    adm.set_limit(0)
    assert adm.expected_wait_s(1) == float("inf")


def test_gateway_command_exits_78_naming_the_bad_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    keys = tmp_path / "keys"
    keys.write_text("k1 nosuchclass\n")
    bad = {
        "a.toml": ('[gateway]\nlisten = "nowhere"\n', "gateway.listen"),
        "b.toml": (f'[gateway]\napi_keys_file = "{keys}"\n', "gateway.api_keys_file"),
        "c.toml": (
            '[[gateway.classes]]\nname = "x"\npriority = 1\nmax_queue_s = -1\n',
            "gateway.classes[0].max_queue_s",
        ),
    }
    for name, (text, key) in bad.items():
        (tmp_path / name).write_text(text)
        r = subprocess.run(
            [sys.executable, "-m", "rackguard.agent.cli", "gateway", "--config", str(tmp_path / name)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert r.returncode == 78 and key in r.stderr, (name, r.stderr)


async def test_upstream_timeout_504_slot_freed_and_carbon_topic_bounded() -> None:
    up = FakeUpstream("slow", delay_s=3.0)
    async with fakes(up), running(gw_config([up], upstream_timeout_s=0.3)) as gw:
        c = client(gw)
        with pytest.raises(openai.APIStatusError) as e:
            await c.chat.completions.create(model="m", messages=MSG)
        assert e.value.status_code == 504
        await c.close()
        assert gw.upstreams[0].adm.in_flight == 0
        for _ in range(100):
            if up.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        assert up.in_flight == 0 and up.cancelled == 1  # the upstream request was abandoned, not left running
        # The grid's carbon intensity from MQTT: a number or {"g_per_kwh": ...}, bounded.
        gw.handle_carbon(b'{"g_per_kwh": 250}')
        assert gw.carbon_g_per_kwh == 250.0
        for bad in (b"-5", b"nan", b'"x"', b"1e9", b"{}", b"[1]"):
            gw.handle_carbon(bad)
        assert gw.carbon_g_per_kwh == 250.0 and gw.rejected_total == 6
        gw.handle_carbon(b"410.5")
        assert gw.carbon_g_per_kwh == 410.5

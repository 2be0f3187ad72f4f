"""The gateway's own HTTP/1.1 layer (agent/gateway/http1.py): what a proxy meets on the wire.

The server side is driven over raw sockets (pipelining, HTTP/1.0, ``Expect: 100-continue``,
malformed and oversized heads); the client side against raw upstreams that close idle
connections, answer close-delimited, or break off. The last test runs ``rackguard gateway`` itself
(uvloop's event loop) with the official ``openai`` client.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai

from rackguard.agent.mosquitto import free_port
from rackguard.bench.fake_openai import FakeUpstream
from tests.agent.test_gateway import MSG, fakes, gw_config, running
from tests.conftest import REPO

BODY = json.dumps({"model": "m", "messages": MSG}).encode()


def post(body: bytes = BODY, *, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/" + version + b"\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body
    )


async def read_response(r: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in headers:
        return status, headers, await r.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        out = b""
        while size := int((await r.readuntil(b"\r\n"))[:-2], 16):
            out += (await r.readexactly(size + 2))[:-2]
        await r.readexactly(2)
        return status, headers, out
    return status, headers, await asyncio.wait_for(r.read(), 5)  # close-delimited


async def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    up = FakeUpstream("a", delay_s=0.05)
    async with fakes(up), running(gw_config([up])) as gw:
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        tagged = [json.dumps({"model": f"m{i}", "messages": MSG}).encode() for i in range(3)]
        w.write(b"".join(post(b) for b in tagged))  # three requests in one segment
        models = []
        for _ in tagged:
            status, _, body = await read_response(r)
            assert status == 200
            models.append(json.loads(body)["model"])
        assert models == ["m0", "m1", "m2"]  # answered in the order asked
        assert up.max_in_flight == 1  # one at a time per connection
        w.close()


async def test_http10_client_gets_its_stream_close_delimited_and_expect_100_continue() -> None:
    up = FakeUpstream("a", tokens=3, token_interval_s=0.01)
    async with fakes(up), running(gw_config([up])) as gw:
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(post(json.dumps({"model": "m", "messages": MSG, "stream": True}).encode(), version=b"1.0"))
        status, headers, body = await read_response(r)
        assert status == 200 and "transfer-encoding" not in headers and headers["connection"] == "close"
        assert body.count(b"data: ") == 4 and body.endswith(b"data: [DONE]\n\n")  # 3 tokens + [DONE]
        w.close()
        # curl sends a body over 1 KiB only after "100 Continue".
        big = json.dumps({"model": "m", "messages": MSG, "pad": "x" * 2000}).encode()
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(post(big, extra=b"Expect: 100-continue\r\n").split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
        assert await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        w.write(big)
        status, _, _ = await read_response(r)
        assert status == 200 and "expect" not in {k.lower() for k in up.last_headers}
        w.close()


async def test_malformed_and_oversized_heads_are_refused_and_counted() -> None:
    up = FakeUpstream("a")
    async with fakes(up), running(gw_config([up])) as gw:
        cases = [
            (b"GARBAGE\r\n\r\n", 400),
            (b"POST /v1/chat/completions HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
            (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404),
            (b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        ]
        for raw, want in cases:
            r, w = await asyncio.open_connection("127.0.0.1", gw.port)
            w.write(raw)
            status, _, body = await read_response(r)
            assert status == want, (raw[:30], status)
            assert json.loads(body)["error"]["message"]
            w.close()
        assert gw.metrics.bad_requests._value.get() == 2  # 400 and 431; 404/405 are not requests for us
        assert up.requests == 0


async def raw_upstream(
    answer: bytes, *, close_reused: bool = False, hang_up: bool = False
) -> tuple[asyncio.Server, list[int]]:
    """An upstream that answers every request with ``answer``. ``close_reused``: a connection's second
    request is met by a close without an answer (a server's idle keep-alive time-out racing it).
    ``hang_up``: close after the first answer."""
    counts = [0, 0]  # requests answered, connections opened

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        counts[1] += 1
        n = 0
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                length = next(
                    int(ln.split(b":")[1])
                    for ln in head.split(b"\r\n")
                    if ln.lower().startswith(b"content-length")
                )
                await r.readexactly(length)
                n += 1
                if close_reused and n > 1:
                    break
                counts[0] += 1
                w.write(answer)
                await w.drain()
                if hang_up or (b"Content-Length" not in answer and b"chunked" not in answer):
                    break  # close-delimited body, or breaking off
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, counts


OK = json.dumps({"id": "x", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}).encode()


async def test_upstream_closing_a_reused_connection_is_retried_once_on_a_fresh_one() -> None:
    server, counts = await raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(OK), OK),
        close_reused=True,
    )
    port = server.sockets[0].getsockname()[1]
    up = FakeUpstream("a")
    up.port = port
    async with running(gw_config([up])) as gw:
        c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="k", max_retries=0)
        for _ in range(4):
            r = await c.chat.completions.create(model="m", messages=MSG)
            assert r.usage is not None and r.usage.completion_tokens == 2
        await c.close()
    server.close()
    assert counts == [4, 4]  # each reuse was refused and retried on a new connection: 0 client errors


async def test_close_delimited_upstream_body_and_an_upstream_that_breaks_off() -> None:
    server, _ = await raw_upstream(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + OK)
    broken, _ = await raw_upstream(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"half', hang_up=True)
    ups = []
    for s in (server, broken):
        u = FakeUpstream("a")
        u.port = s.sockets[0].getsockname()[1]
        ups.append(u)
    async with running(gw_config(ups[:1])) as gw:
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(post())
        status, _, body = await read_response(r)
        assert status == 200 and body == OK
        w.close()
    async with running(gw_config(ups[1:])) as gw:
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(post())
        status, _, body = await read_response(r)
        assert status == 502 and gw.upstreams[0].adm.in_flight == 0
        w.close()
    server.close()
    broken.close()


async def test_rackguard_gateway_command_serves_the_openai_client(tmp_path: Path) -> None:
    """The command as deployed (uvloop): stream and not, then a clean SIGTERM."""
    up = FakeUpstream("a", tokens=4, token_interval_s=0.005)
    port = free_port()
    cfg = tmp_path / "gw.toml"
    async with fakes(up):
        cfg.write_text(
            f'[mqtt]\nport = {free_port()}\n[http]\nport = 0\n[gateway]\nlisten = "127.0.0.1:{port}"\n'
            f'safe_cap = 4\n[[gateway.upstreams]]\nname = "a"\nurl = "{up.url}"\ngpus = [0]\n'
        )
        p = subprocess.Popen(
            [sys.executable, "-m", "rackguard.agent.cli", "gateway", "--config", str(cfg)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        try:
            c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
            deadline = time.monotonic() + 20
            while True:
                try:
                    r = await c.chat.completions.create(model="m", messages=MSG)
                    break
                except openai.APIConnectionError:
                    assert time.monotonic() < deadline and p.poll() is None
                    await asyncio.sleep(0.1)
            assert r.choices[0].message.content == "xxxx"
            chunks = [
                ch async for ch in await c.chat.completions.create(model="m", messages=MSG, stream=True)
            ]
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "xxxx"
            await c.close()
        finally:
            p.send_signal(signal.SIGTERM)
            out, err = p.communicate(timeout=20)
        assert p.returncode == 0, err.decode()[-2000:]
        assert b"Traceback" not in err, err.decode()[-2000:]
        # No broker at [mqtt]: said once (then once a minute), not silently.
        assert (out + err).count(b'"gateway_mqtt_unreachable"') == 1, (out + err).decode()[-2000:]


async def scripted_upstream(
    script: Callable[[int, bytes], tuple[float, bytes | None]],
) -> tuple[asyncio.Server, list[bytes]]:
    """An upstream whose answer to a connection's n-th request (from 1) is ``script(n, head)``:
    (delay s, the bytes to send, or None to close without answering). Returns each request it read."""
    heads: list[bytes] = []

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        n = 0
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                heads.append(head)
                length = 0
                for ln in head.split(b"\r\n"):
                    if ln.lower().startswith(b"content-length"):
                        length = int(ln.split(b":")[1])
                heads[-1] += await r.readexactly(length)  # the head, then the body
                n += 1
                delay_s, answer = script(n, head)
                await asyncio.sleep(delay_s)
                if answer is None:
                    break
                w.write(answer)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        w.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0), heads


def ok_answer(body: bytes = OK) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


def upstream_at(server: asyncio.Server, path: str = "") -> Any:
    """A stand-in naming ``server``'s address, under ``path`` (gw_config reads ``name`` and ``url``)."""
    return SimpleNamespace(name="a", url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}{path}")


async def test_review_findings_on_the_server_side() -> None:
    """A header that never ends, 2,000 pipelined 404s, HEAD, Upgrade: h2c, an absolute-form target."""
    server, heads = await scripted_upstream(lambda n, head: (0.0, ok_answer()))
    async with running(gw_config([upstream_at(server, "/pfx")])) as gw:
        # A header value without a line end: refused at the head limit, not buffered without end.
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nX-Long: ")
        t0 = time.monotonic()
        for _ in range(40):
            w.write(b"a" * 16384)
        status, _, _ = await read_response(r)
        assert status == 431 and time.monotonic() - t0 < 5
        w.close()
        # Pipelined 404s are answered in a loop (recursion would overflow the stack).
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
        for _ in range(2000):
            assert (await read_response(r))[0] == 404
        # HEAD on a GET route: the head only, and the connection stays usable.
        w.write(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: " in head
        status, _, body = await read_response(r)  # would misparse if HEAD had carried a body
        assert status == 200 and json.loads(body)["ok"] is True
        w.close()
        # Upgrade: h2c is answered over HTTP/1.1 (curl --http2), then the connection closes.
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
        )
        status, headers, _ = await read_response(r)
        assert status == 200 and headers["connection"] == "close"
        w.close()
        # The same with a body (curl --http2 -d …): llhttp stops after the head, the body is read
        # anyway, arriving in pieces, and the upgrade's headers do not reach the upstream.
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        req = post(extra=b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n")
        cut = req.index(b"\r\n\r\n") + 10
        for piece in (req[:cut], req[cut : cut + 5], req[cut + 5 :]):
            w.write(piece)
            await asyncio.sleep(0.02)
        status, headers, _ = await read_response(r)
        assert status == 200 and headers["connection"] == "close"
        assert heads[-1].endswith(b"\r\n\r\n" + BODY)
        assert b"http2-settings" not in heads[-1].lower() and b"upgrade" not in heads[-1].lower()
        w.close()
        # HTTP/2 with prior knowledge (curl --http2-prior-knowledge): SETTINGS, then GOAWAY
        # HTTP_1_1_REQUIRED, so the client can say why; counted as a bad request.
        bad0 = gw.metrics.bad_requests._value.get()
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
        frames = await asyncio.wait_for(r.read(), 5)  # then the gateway closes
        assert frames[3] == 0x4 and frames[9 + 3] == 0x7  # SETTINGS, then GOAWAY
        assert int.from_bytes(frames[-4:], "big") == 0xD  # HTTP_1_1_REQUIRED
        assert gw.metrics.bad_requests._value.get() == bad0 + 1
        w.close()
        # An absolute-form target is forwarded in origin form, under the upstream's path prefix.
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(
            post().replace(b"POST /v1/chat/completions", b"POST http://gw.example/v1/chat/completions?x=1")
        )
        status, _, _ = await read_response(r)
        assert status == 200 and heads[-1].startswith(b"POST /pfx/v1/chat/completions?x=1 HTTP/1.1\r\n")
        w.close()
    server.close()


async def test_upgrade_requests_in_a_pipeline_and_refused_ones_are_answered() -> None:
    """An Upgrade request after another in one write: both answered, in order. One with a body
    over the limit or chunked: 413/400 sent, not an empty reply. One whose body never comes: 408
    within the request's own time (head and body), not a fresh period for the body."""
    upg = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n"
    server, heads = await scripted_upstream(lambda n, head: (0.0, ok_answer()))
    async with running(gw_config([upstream_at(server)], max_body_bytes=4096, body_timeout_s=1.0)) as gw:
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(post() + post(b'{"model": "m", "n": 2}', extra=upg))
        first = await read_response(r)
        second = await read_response(r)
        assert first[0] == 200 and first[1].get("connection") != "close"
        assert second[0] == 200 and second[1]["connection"] == "close"
        assert heads[-1].endswith(b'{"model": "m", "n": 2}')
        w.close()
        for req, status in (
            (post(b"x" * 5000, extra=upg), 413),
            (post(extra=upg).replace(b"Content-Length: ", b"Transfer-Encoding: chunked\r\nX-Was: "), 400),
        ):
            r, w = await asyncio.open_connection("127.0.0.1", gw.port)
            w.write(req)
            assert (await read_response(r))[0] == status
            w.close()
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        head = post(extra=upg)
        head = head[: head.index(b"\r\n\r\n") + 4]
        t0 = time.monotonic()
        w.write(head[:20])
        await asyncio.sleep(0.6)
        w.write(head[20:] + b"{")  # the head after 0.6 s, then one byte of the body
        assert (await read_response(r))[0] == 408
        assert time.monotonic() - t0 < 1.6  # 1 s from the head's start (+ the sweep), not 0.6 + 1
        w.close()
    server.close()


async def test_review_findings_on_the_upstream_side() -> None:
    """1xx before the answer; a reused connection that fails late is not retried (the work may be done)."""
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    server, heads = await scripted_upstream(
        lambda n, head: (0.0, early + ok_answer(b'{"n": %d}' % len(heads)))
    )
    async with running(gw_config([upstream_at(server)])) as gw:
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        for i in range(1, 4):  # each answer is its own: a 103 taken as the answer would shift them
            w.write(post())
            status, _, body = await read_response(r)
            assert status == 200 and json.loads(body) == {"n": i}
        w.close()
    server.close()
    # The connection's 2nd request: 0.3 s of "work", then the upstream drops it.
    server, heads = await scripted_upstream(lambda n, head: (0.0, ok_answer()) if n == 1 else (0.3, None))
    async with running(gw_config([upstream_at(server)])) as gw:
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(post())
        assert (await read_response(r))[0] == 200
        w.write(post())
        assert (await read_response(r))[0] == 502
        assert len(heads) == 2  # not sent a third time
        assert gw.upstreams[0].adm.in_flight == 0
        w.close()
    server.close()


async def test_a_relay_paused_by_its_client_does_not_pool_a_paused_connection() -> None:
    from rackguard.agent.gateway.http1 import UpstreamPool, UpstreamResponse, _ClientConnection

    class Transport:
        reading = True

        def pause_reading(self) -> None:
            self.reading = False

        def resume_reading(self) -> None:
            self.reading = True

        def close(self) -> None:
            raise AssertionError("a finished keep-alive answer must be pooled, not closed")

    pool = UpstreamPool("http://127.0.0.1:1", connect_timeout_s=1)
    conn = _ClientConnection()
    t = Transport()
    conn.connection_made(t)  # type: ignore[arg-type]
    resp = UpstreamResponse(pool, conn)
    conn.resp, resp.keep_alive = resp, True
    resp.pause_reading()  # the client stalled as the last chunk went out
    resp._complete()
    resp.release()
    assert pool._idle == [conn] and t.reading

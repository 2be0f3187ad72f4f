"""A fake OpenAI-compatible server (aiohttp) for the gateway's tests and benchmark.

It answers ``/v1/chat/completions``, ``/v1/completions`` (streamed or not),
``/v1/embeddings`` and ``/v1/models`` like vLLM does, taking ``delay_s`` per request
(or ``token_interval_s`` per streamed token), and it records what the gateway must be
judged on: requests in flight (sampled at each arrival), the most ever in flight,
requests cancelled by a disconnect, and the headers and bodies it received.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from typing import Any, cast

from aiohttp import web


class FakeUpstream:
    """One fake server.

    Args:
        name: Returned in the ``x-upstream`` header and the completion's ``model`` suffix.
        delay_s: Time per non-streamed request (before the answer).
        tokens: Completion tokens per request.
        token_interval_s: Time between streamed tokens.
    """

    def __init__(
        self, name: str = "fake", *, delay_s: float = 0.0, tokens: int = 8, token_interval_s: float = 0.0
    ):
        self.name, self.delay_s, self.tokens, self.token_interval_s = name, delay_s, tokens, token_interval_s
        self.in_flight = 0
        self.max_in_flight = 0
        self.samples: list[tuple[float, int]] = []  # (monotonic s, in flight) at each arrival
        self.requests = 0
        self.cancelled = 0
        self.last_headers: dict[str, str] = {}
        self.last_body: bytes = b""
        self.port = 0
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        self.app = app
        self._chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m"}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> int:
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, backlog=1024, ssl_context=ssl_context)
        await site.start()
        sockets = getattr(site._server, "sockets", None)  # asyncio's or uvloop's Server
        assert sockets
        self.port = sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.last_headers = dict(request.headers)
        self.last_body = body
        req: dict[str, Any] = json.loads(body)
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.samples.append((time.monotonic(), self.in_flight))
        try:
            if req.get("stream"):
                return await self._stream(request, req)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            prompt = len(json.dumps(req.get("messages") or req.get("prompt") or "")) // 4 + 1
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": self.tokens,
                "total_tokens": prompt + self.tokens,
            }
            chat = request.path.endswith("chat/completions")
            choice = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "x" * self.tokens},
                    "finish_reason": "stop",
                }
                if chat
                else {"index": 0, "text": "x" * self.tokens, "finish_reason": "stop"}
            )
            out = {
                "id": "c1",
                "object": "chat.completion" if chat else "text_completion",
                "created": 0,
                "model": str(req.get("model", "m")),
                "choices": [choice],
                "usage": usage,
            }
            return web.json_response(out, headers={"x-upstream": self.name})
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, req: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-upstream": self.name})
        await resp.prepare(request)
        chunk = dict(self._chunk, model=str(req.get("model", "m")))
        for i in range(self.tokens):
            if self.token_interval_s:
                await asyncio.sleep(self.token_interval_s)
            finish = "stop" if i == self.tokens - 1 else None
            c = dict(chunk, choices=[{"index": 0, "delta": {"content": "x"}, "finish_reason": finish}])
            await resp.write(b"data: " + json.dumps(c).encode() + b"\n\n")
        opts = req.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            u = {"prompt_tokens": 5, "completion_tokens": self.tokens, "total_tokens": 5 + self.tokens}
            await resp.write(b"data: " + json.dumps(dict(chunk, choices=[], usage=u)).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        await request.read()
        out = {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            "model": "e",
            "usage": {"prompt_tokens": 3, "total_tokens": 3},
        }
        return web.json_response(out)

    async def _models(self, request: web.Request) -> web.Response:
        out = {
            "object": "list",
            "data": [{"id": "m", "object": "model", "created": 0, "owned_by": self.name}],
        }
        return web.json_response(out, headers={"x-upstream": self.name})


_FAST_BODY = json.dumps(
    {
        "id": "c1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()
_FAST_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(_FAST_BODY)).encode()
    + b"\r\n\r\n"
    + _FAST_BODY
)


class _FastProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive: every request gets the same small chat completion at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t, self.buf = cast(asyncio.Transport, transport), b""  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            n = int(head[i + 15 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
            if len(self.buf) < end + 4 + n:
                return
            self.buf = self.buf[end + 4 + n :]
            self.t.write(_FAST_RESPONSE)


def _sse_chunk(obj: dict[str, Any]) -> bytes:
    data = b"data: " + json.dumps(obj).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


_STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
_CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m"}


class _StreamProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive SSE streams like :meth:`FakeUpstream._stream` (``tokens`` tokens
    ``interval_s`` apart, then usage if asked, then ``[DONE]``), on timer callbacks: a cheap upstream,
    so that the benchmark's machine spends its CPU on what it measures."""

    def __init__(self, tokens: int, interval_s: float) -> None:
        self.tokens, self.interval_s = tokens, interval_s
        token = dict(_CHUNK, choices=[{"index": 0, "delta": {"content": "x"}, "finish_reason": None}])
        last = dict(_CHUNK, choices=[{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}])
        usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}
        self.token, self.last = _sse_chunk(token), _sse_chunk(last)
        self.done = _sse_chunk(dict(_CHUNK, choices=[], usage=usage))
        self.end = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t, self.buf = cast(asyncio.Transport, transport), b""

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].lower()
        i = head.find(b"content-length:")
        n = int(head[i + 15 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
        if len(self.buf) < end + 4 + n:
            return
        body, self.buf = self.buf[end + 4 : end + 4 + n], self.buf[end + 4 + n :]
        usage = b'"include_usage": true' in body or b'"include_usage":true' in body
        self.t.write(_STREAM_HEAD)
        self.timer = asyncio.get_running_loop().call_later(self.interval_s, self._token, 0, usage)

    def _token(self, i: int, usage: bool) -> None:
        if i < self.tokens - 1:
            self.t.write(self.token)
            self.timer = asyncio.get_running_loop().call_later(self.interval_s, self._token, i + 1, usage)
            return
        self.timer = None
        self.t.write(self.last + (self.done if usage else b"") + self.end)


async def serve_fast(port: int = 0) -> asyncio.Server:
    """The fastest upstream this machine can run: for throughput ceilings, not behaviour."""
    return await asyncio.get_running_loop().create_server(_FastProtocol, "127.0.0.1", port, backlog=1024)


def main() -> None:
    """Serve until killed. ``--port P``: :class:`FakeUpstream` (answers like vLLM: streamed or not,
    ``/v1/models``, ``/v1/embeddings``), for trying the gateway. ``--stream-port`` and ``--fast-port``:
    the benchmark's cheap upstreams (SSE streams only; small completions only)."""
    import argparse

    p = argparse.ArgumentParser(prog="python3 -m rackguard.bench.fake_openai")
    p.add_argument("--port", type=int, default=None, help="a FakeUpstream (like vLLM)")
    p.add_argument("--stream-port", type=int, default=None, help="raw SSE streams (benchmark)")
    p.add_argument("--fast-port", type=int, default=None, help="raw small completions (benchmark)")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--token-interval-s", type=float, default=0.05)
    a = p.parse_args()
    if a.port is None and a.stream_port is None and a.fast_port is None:
        p.error("give --port, --stream-port or --fast-port")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        if a.port is not None:
            # Not streamed, the answer comes when a stream would have ended.
            up = FakeUpstream(
                "fake",
                delay_s=a.tokens * a.token_interval_s,
                tokens=a.tokens,
                token_interval_s=a.token_interval_s,
            )
            await up.start(a.port)
            print(f"fake OpenAI-compatible server on {up.url}/v1", flush=True)
        if a.stream_port is not None:
            await loop.create_server(
                lambda: _StreamProtocol(a.tokens, a.token_interval_s),
                "127.0.0.1",
                a.stream_port,
                backlog=1024,
            )
        if a.fast_port is not None:
            await serve_fast(a.fast_port)
        await asyncio.Event().wait()

    from rackguard.agent.commands.gateway import loop_factory

    with asyncio.Runner(loop_factory=loop_factory()) as runner:  # uvloop: the upstream costs less CPU
        runner.run(run())


if __name__ == "__main__":
    main()

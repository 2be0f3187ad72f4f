"""A lean HTTP/1.1 server and upstream client on asyncio protocols and httptools (llhttp's parser).

Why not aiohttp here: a request proxied through a bare aiohttp server and client costs 330–500 µs of
CPU on the dev VM, and the gateway must stay under ~330 µs (3,000 requests/s on one core). The
gateway on these protocols and uvloop costs ~180–210 µs, about half of it in its two ``send`` calls.
What they do, and no more:

* **Server.** Keep-alive and pipelined requests (answered in order, in a loop), ``Expect:
  100-continue``, HEAD on the GET routes, HTTP/1.0 clients (streams close-delimited), ``Upgrade``
  ignored (answered over HTTP/1.1, body read, then closed), the HTTP/2 preface answered with GOAWAY
  ``HTTP_1_1_REQUIRED``. A request's head and body must arrive within
  ``body_timeout_s`` (408), the head stay under ``MAX_HEAD_BYTES`` (431) and the body under
  ``max_body_bytes`` (413); a malformed request gets 400; each is counted through ``on_bad``. An idle
  keep-alive connection is closed after ``KEEPALIVE_S`` (aborted if the client left a response
  unread). A client that disconnects cancels its handler (and so its upstream call).
* **Responses** are whole (:class:`Response`) or streamed (:meth:`ServerConnection.start`, ``write``,
  ``end``); :meth:`ServerConnection.relay` streams an upstream's body from the upstream connection's
  callback, with flow control: while the client reads nothing the upstream is not read, and a client
  stalled for ``write_timeout_s`` is cut.
* **Client.** :class:`UpstreamPool` keeps idle keep-alive connections per upstream (``http`` or
  ``https``), forgets those idle longer than ``POOL_IDLE_S`` (servers close theirs: uvicorn's default
  is 5 s), and retries once on a fresh connection when a reused one closed within ``RETRY_WITHIN_S``
  of the request and before answering (its idle close crossed the request; a later failure is not
  retried: the upstream may have done the work). Interim 1xx answers are skipped. A response is read
  whole or chunk by chunk with backpressure; abandoning it closes the connection, so the upstream
  sees the client go.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http
import math
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

SWEEP_S = 0.1
KEEPALIVE_S = 75.0
LINGER_S = 2.0  # after a refusal: how long the client may keep sending before the connection is cut  # an idle client connection is closed after this
POOL_IDLE_S = 4.0  # a pooled upstream connection idle this long is not reused
POOL_MAX_IDLE = 256
RETRY_WITHIN_S = 0.1  # a reused connection that fails sooner than this was closed before our request
MAX_HEAD_BYTES = 64 * 1024
MAX_READ_BYTES = 256 * 1024  # the most one read hands data_received (uvloop's buffer)
MAX_PIPELINED_BYTES = 256 * 1024  # read ahead while a request is being answered
READ_HIGH_BYTES = 1024 * 1024  # upstream body buffered before reading pauses
MAX_RESPONSE_BYTES = 256 * 1024 * 1024  # a whole (non-streamed) upstream body

Headers = list[tuple[bytes, bytes]]


class _Refused(Exception):
    """Raised inside a parser callback: answer ``status`` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of ``name`` (lower case), case-insensitively."""
    for k, v in headers:
        if len(k) == len(name) and k.lower() == name:
            return v
    return None


@dataclass(slots=True)
class Request:
    method: str
    path: str  # without the query
    target: bytes  # path and query, as sent
    headers: Headers
    body: bytes
    http_11: bool
    keep_alive: bool
    refused: tuple[int, str] | None = None  # answered with this status and reason, in its turn

    def header(self, name: bytes) -> bytes | None:
        return header(self.headers, name)


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: Headers = field(default_factory=list)


def _refused(status: int, reason: str) -> Request:
    return Request("", "", b"", [], b"", True, False, (status, reason))


# To an HTTP/2 client that skipped Upgrade (prior knowledge): an empty SETTINGS frame, then
# GOAWAY (last stream 0, HTTP_1_1_REQUIRED = 0xd), so it says why rather than "empty reply".
_H2_GOAWAY = bytes.fromhex("000000040000000000" + "000008070000000000" + "00000000" + "0000000d")

Handler = Callable[[Request, "ServerConnection"], Awaitable[Response | None]]


def _head(status: int, headers: Headers, extra: bytes) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b"Unknown"
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    parts.extend(k + b": " + v + b"\r\n" for k, v in headers)
    parts.append(extra)
    parts.append(b"\r\n")
    return b"".join(parts)


class HttpServer:
    """Serves ``route(method, path) -> handler`` on one listening socket.

    Args:
        routes: ``{(method, path): handler}``; a handler returns a :class:`Response`, or None once it
            has streamed one through the connection.
        error: Builds an error response: ``error(status, message)``.
        on_bad: Called with the status and reason of each request refused before any handler (400,
            408, 413, 431; 505 for an HTTP/2 preface).
    """

    def __init__(
        self,
        routes: Mapping[tuple[str, str], Handler],
        *,
        error: Callable[[int, str], Response],
        on_bad: Callable[[int, str], None],
        max_body_bytes: int,
        body_timeout_s: float,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.routes = routes
        self.paths = {p for _, p in routes}
        self.error, self.on_bad, self.on_error = error, on_bad, on_error
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s
        self.connections: set[ServerConnection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, backlog: int = 1024) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ServerConnection(self), host, port, backlog=backlog, reuse_address=True
        )
        sockets = getattr(self._server, "sockets", None)  # asyncio's or uvloop's Server
        assert sockets
        self._sweeper = loop.create_task(self._sweep(), name="http-deadlines")
        return int(sockets[0].getsockname()[1])

    async def _sweep(self) -> None:
        """Every ``SWEEP_S``: connections past their deadline (a request's time, keep-alive idle)."""
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for c in [c for c in self.connections if c.deadline <= now]:
                c.deadline = math.inf
                c.on_deadline()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            c.abort()
        if self._server is not None:
            await self._server.wait_closed()


class ServerConnection(asyncio.Protocol):
    """One client connection: parses requests, runs their handlers one at a time, writes answers."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: Headers = []
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._too_large = False
        self._ready: collections.deque[Request] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._pending = bytearray()  # bytes read while a request is being answered
        self.deadline = math.inf  # monotonic s; the server's sweep calls on_deadline past it
        self.on_deadline: Callable[[], None] = self._idle_timeout
        self._closed = False
        self._paused_writing = False
        self._streaming = False  # a streamed response started and not ended
        self._relaying: UpstreamResponse | None = None
        self._write_timeout_s = math.inf
        self._chunked = True
        self._close_after = False
        self._in_message = False  # a request begun and not complete
        self._headers_done = False
        self._head_fed = 0  # bytes fed while a head was incomplete
        self._upgraded = False  # the parser stopped at an Upgrade request
        self._held: Request | None = None  # that request, until its body is read
        self._held_need = 0
        self._message_deadline = math.inf  # monotonic s: the request begun must be in by then
        self._discarding = False  # refused: input is read and dropped until the close

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.connections.add(self)
        self._arm(KEEPALIVE_S, self._idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.server.connections.discard(self)
        self._disarm()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client left: its upstream call goes too

    def eof_received(self) -> bool:
        return False  # a half-closed client is gone: close (and cancel its handler)

    def pause_writing(self) -> None:
        self._paused_writing = True
        if self._relaying is not None:  # stop reading the upstream; cut the client if it stays stalled
            self._relaying.pause_reading()
            self._arm(self._write_timeout_s, self.abort)

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._relaying is not None:
            self._disarm()
            self._relaying.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._task is not None:  # answering a request: keep reading (to see a disconnect), parse later
            self._pending += data
            if len(self._pending) > MAX_PIPELINED_BYTES and self.transport is not None:
                self.transport.pause_reading()
            return
        if self._parse(data):
            self._next()

    # -- parsing -------------------------------------------------------------------------
    def _parse(self, data: bytes) -> bool:
        """Feed the parser; False once the connection was refused (and is closing)."""
        if self._upgraded:
            return self._collect_body(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # Served over HTTP/1.1 as if it had not asked (``Upgrade: h2c``); the parser stops
            # after the head, so the connection closes after the answers, and a body that
            # follows the head (curl --http2 -d …) is read here.
            if self._ready:  # the Upgrade request, last: the ones before it are answered as usual
                self._ready[-1].keep_alive = False
            self._upgraded = True
            return self._upgrade_body(data[exc.args[0] :] if exc.args else b"")
        except httptools.HttpParserError as exc:
            if "PRI" in str(exc):  # llhttp: "Pause on PRI/Upgrade", the HTTP/2 connection preface
                self._refuse(505, "HTTP/2 without Upgrade", _H2_GOAWAY)
            elif isinstance(exc.__context__, _Refused):  # raised by a callback below
                self._refuse(exc.__context__.status, str(exc.__context__))
            else:
                self._refuse(400, f"malformed HTTP request: {exc}"[:200])
            return False
        if not self._headers_done:
            # httptools joins a header's pieces before calling on_header: count what it holds.
            self._head_fed += len(data)
            if self._head_fed > MAX_HEAD_BYTES + MAX_READ_BYTES:
                self._refuse(431, f"request head over {MAX_HEAD_BYTES} bytes")
                return False
        return True

    def _upgrade_body(self, rest: bytes) -> bool:
        """After an Upgrade head: hold its request back until its Content-Length body is read."""
        if not self._ready or self._ready[-1].refused is not None:
            return True
        r = self._ready[-1]
        try:
            need = int(r.header(b"content-length") or b"0")
        except ValueError:
            need = -1
        # A refusal is answered after the requests before it.
        if r.header(b"transfer-encoding") is not None:
            self._ready[-1] = _refused(
                400, "a chunked body with Upgrade is not supported; send Content-Length"
            )
        elif need < 0:
            self._ready[-1] = _refused(400, "bad Content-Length")
        elif need > self.server.max_body_bytes:
            self._ready[-1] = _refused(413, f"request body over {self.server.max_body_bytes} bytes")
        if self._ready[-1].refused is not None or need == 0:
            return True
        self._held, self._held_need = self._ready.pop(), need
        self._body, self._body_bytes = [], 0
        # The body gets what is left of the request's time, not a fresh one.
        self._arm(max(self._message_deadline - time.monotonic(), 0.0), self._body_timeout)
        return self._collect_body(rest)

    def _collect_body(self, data: bytes) -> bool:
        """Bytes after an Upgrade head: the held request's body; anything past it is dropped."""
        held = self._held
        if held is None or not data:
            return True
        take = data[: self._held_need - self._body_bytes]
        self._body.append(take)
        self._body_bytes += len(take)
        if self._body_bytes == self._held_need:
            self._held = None
            self._disarm()
            held.body = b"".join(self._body)
            self._body = []
            self._ready.append(held)
        return True

    def on_message_begin(self) -> None:
        self._url, self._headers, self._head_bytes = b"", [], 0
        self._body, self._body_bytes, self._too_large = [], 0, False
        self._in_message, self._headers_done, self._head_fed = True, False, 0
        self._message_deadline = time.monotonic() + self.server.body_timeout_s
        self._arm(self.server.body_timeout_s, self._body_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _Refused(431, f"request head over {MAX_HEAD_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _Refused(431, f"request head over {MAX_HEAD_BYTES} bytes")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done, self._head_fed = True, 0
        e = header(self._headers, b"expect")
        if e is not None and e.lower() == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.server.max_body_bytes:
            self._too_large = True
            self._body = []
        elif not self._too_large:
            self._body.append(body)
        if self._body_bytes > self.server.max_body_bytes + 1024 * 1024:
            raise _Refused(413, f"request body over {self.server.max_body_bytes} bytes")  # stop reading

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_message, self._headers_done = False, False
        p = self._parser
        if self._too_large:
            self._ready.append(_refused(413, f"request body over {self.server.max_body_bytes} bytes"))
            return
        url = httptools.parse_url(self._url) if self._url else None
        path = url.path if url is not None and url.path else b"/"
        target = path + b"?" + url.query if url is not None and url.query else path  # origin-form
        self._ready.append(
            Request(
                p.get_method().decode("ascii", "replace"),
                path.decode("latin-1"),
                target,
                self._headers,
                b"".join(self._body),
                p.get_http_version() == "1.1",
                p.should_keep_alive(),
            )
        )

    def _next(self) -> None:
        """Answer parsed requests in order until one needs a handler (a task) or none is left.

        A loop, not recursion: thousands of pipelined 404s must not exhaust the stack.
        """
        while self._task is None and not self._closed:
            if not self._ready:
                if not self._pending or (self._upgraded and self._held is None):
                    return
                data = bytes(self._pending)  # read while the last request was answered
                self._pending.clear()
                if self.transport is not None:
                    self.transport.resume_reading()
                if not self._parse(data):
                    return
                continue
            req = self._ready.popleft()
            self._disarm()
            if req.refused is not None:  # read whole (so the client sees the answer), then refused
                self._refuse(*req.refused)
                return
            routes = self.server.routes
            head_only = req.method == "HEAD"
            handler = routes.get(("GET" if head_only else req.method, req.path))
            if handler is None:
                allowed = req.path in self.server.paths
                resp = self.server.error(
                    405 if allowed else 404, "method not allowed" if allowed else "not found"
                )
                self._send(resp, req.keep_alive, head_only)
                if not req.keep_alive:
                    self.close()
                    return
                self._rearm()
                continue
            self._task = asyncio.get_running_loop().create_task(self._run(handler, req, head_only))

    async def _run(self, handler: Handler, req: Request, head_only: bool) -> None:
        keep = req.keep_alive
        self._chunked, self._close_after = req.http_11, not keep
        try:
            resp = await handler(req, self)
        except asyncio.CancelledError:
            keep = False
            if not self._closed:
                raise
            return
        except Exception as exc:  # a handler's bug must not take the connection's neighbours with it
            if self.server.on_error is not None:
                self.server.on_error(exc)
            resp, keep = (None if self._streaming else self.server.error(500, "internal error")), False
        finally:
            self._task = None
        if self._streaming:  # a stream that did not end (client too slow, upstream broke): cut it
            self.abort()
            return
        if resp is not None:
            self._send(resp, keep, head_only)
        if not keep or self._close_after:
            self.close()
            return
        self._rearm()
        self._next()

    def _rearm(self) -> None:
        """Between requests: the keep-alive idle limit, or the body time of one half received (an
        Upgrade request's body included)."""
        if self._in_message or self._held is not None:
            self._arm(self.server.body_timeout_s, self._body_timeout)
        else:
            self._arm(KEEPALIVE_S, self._idle_timeout)

    def _refuse(self, status: int, message: str, raw: bytes | None = None) -> None:
        """Answer a request refused before its handler (or send ``raw``), then close without
        losing that answer."""
        self.server.on_bad(status, message)
        if raw is not None and self.transport is not None:
            self.transport.write(raw)
        elif self._task is None and not self._ready:
            self._send(self.server.error(status, message), False)
        # Closing with unread input makes the kernel send a reset, which can destroy the answer
        # before the client reads it: half-close, discard what still comes, abort after LINGER_S.
        self._discarding = True
        if self.transport is not None and not self._closed and self.transport.can_write_eof():
            self.transport.write_eof()
            self._arm(LINGER_S, self.abort)
        else:
            self.close()

    def _body_timeout(self) -> None:
        self._refuse(408, "request not received in time")

    def _idle_timeout(self) -> None:
        if self._task is None:
            if self.transport is not None and self.transport.get_write_buffer_size():
                self.abort()  # a client that reads nothing: do not wait on its buffer
            else:
                self.close()

    def _arm(self, delay_s: float, cb: Callable[[], None]) -> None:
        """A deadline (checked by the server's sweep: no timer per request)."""
        self.deadline, self.on_deadline = time.monotonic() + delay_s, cb

    def _disarm(self) -> None:
        self.deadline = math.inf

    # -- answering -----------------------------------------------------------------------
    def _send(self, resp: Response, keep: bool, head_only: bool = False) -> None:
        if self._closed or self.transport is None:
            return
        extra = b"Content-Length: %d\r\n" % len(resp.body)
        if not keep:
            extra += b"Connection: close\r\n"
        self.transport.write(_head(resp.status, resp.headers, extra) + (b"" if head_only else resp.body))

    def start(self, status: int, headers: Headers) -> None:
        """Begin a streamed response (chunked; close-delimited for an HTTP/1.0 client)."""
        if self._closed or self.transport is None:
            raise ConnectionResetError("client disconnected")
        self._streaming = True
        if self._chunked:
            extra = b"Transfer-Encoding: chunked\r\n"
        else:
            extra, self._close_after = b"Connection: close\r\n", True
        self.transport.write(_head(status, headers, extra))

    def write(self, data: bytes) -> None:
        """Write part of a streamed body."""
        if self._closed or self.transport is None:
            raise ConnectionResetError("client disconnected")
        if data:
            self.transport.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def end(self) -> None:
        if self._closed or self.transport is None:
            raise ConnectionResetError("client disconnected")
        if self._chunked:
            self.transport.write(b"0\r\n\r\n")
        self._streaming = False

    async def relay(
        self, up: UpstreamResponse, sink: Callable[[bytes], bytes], write_timeout_s: float
    ) -> None:
        """Stream ``up``'s body to this client as it arrives, each chunk through ``sink`` (which returns
        what to write, and must not raise). While the client reads nothing the upstream is not read
        either; a client stalled for ``write_timeout_s`` is cut (its handler is cancelled). Raises
        :class:`UpstreamError` if the upstream breaks off."""

        def on_chunk(chunk: bytes) -> None:
            out = sink(chunk)
            if out and not self._closed and self.transport is not None:
                self.write(out)

        self._relaying, self._write_timeout_s = up, write_timeout_s
        if self._paused_writing:
            self.pause_writing()
        try:
            await up.relay(on_chunk)
        finally:
            self._relaying = None
            self._disarm()

    @property
    def streaming(self) -> bool:
        """A streamed response has started and not ended."""
        return self._streaming

    def close(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.abort()


# -- the upstream client ---------------------------------------------------------------
class UpstreamError(ConnectionError):
    """The upstream could not be reached, or broke off its answer."""


class _ClientConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.resp: UpstreamResponse | None = None
        self.got_bytes = False
        self.interim = False  # inside a 1xx response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.resp is not None:
            self.resp._lost(exc)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.resp is None:  # nothing was asked: a server that talks out of turn is not reused
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.resp._fail(UpstreamError(f"malformed upstream response: {exc}"[:200]))
            self.close()

    def on_status(self, status: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.resp is not None
        self.resp.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.resp is not None
        r = self.resp
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # interim (100 Continue, 103 Early Hints): the answer follows
            self.interim = True
            r.headers = []
            return
        r.status = status
        r.keep_alive = self.parser.should_keep_alive()
        r.delimited = header(r.headers, b"content-length") is not None or (
            (te := header(r.headers, b"transfer-encoding")) is not None and b"chunked" in te.lower()
        )
        if not r.head.done():
            r.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self.resp is not None
        self.resp._data(body)

    def on_message_complete(self) -> None:
        assert self.resp is not None
        if self.interim:
            self.interim = False
            return
        self.resp._complete()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()


class UpstreamResponse:
    """An upstream's answer: ``status`` and ``headers`` once :meth:`UpstreamPool.request` returns."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_done",
        "_end",
        "_error",
        "_paused",
        "_released",
        "_sink",
        "_waiter",
        "conn",
        "delimited",
        "head",
        "headers",
        "keep_alive",
        "pool",
        "status",
    )

    def __init__(self, pool: UpstreamPool, conn: _ClientConnection) -> None:
        self.pool, self.conn = pool, conn
        self.status = 0
        self.headers: Headers = []
        self.keep_alive = False
        self.delimited = True
        self.head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._released = False
        self._sink: Callable[[bytes], None] | None = None
        self._end: asyncio.Future[None] | None = None

    @property
    def content_type(self) -> str:
        v = header(self.headers, b"content-type") or b""
        return v.split(b";", 1)[0].strip().lower().decode("latin-1")

    # from the connection
    def _data(self, body: bytes) -> None:
        if self._sink is not None:
            self._sink(body)
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH_BYTES:
            self.pause_reading()
        self._wake()

    def _complete(self) -> None:
        self._done = True
        self._wake()
        if self._end is not None and not self._end.done():
            self._end.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        for f in (self.head, self._end):
            if f is not None and not f.done():
                f.set_exception(exc)
                f.exception()  # retrieved: a cancelled waiter will not
        self._wake()

    def _lost(self, exc: Exception | None) -> None:
        if self._done:
            return
        if self.head.done() and not self.delimited and self._error is None:
            self._complete()  # a body delimited by the connection's close
        else:
            self._fail(UpstreamError(f"upstream closed the connection{f': {exc}' if exc else ''}"))

    def _wake(self) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    # for the caller
    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, as it arrives."""
        try:
            while True:
                while self._chunks:
                    c = self._chunks.popleft()
                    self._buffered -= len(c)
                    if self._buffered < READ_HIGH_BYTES // 4:
                        self.resume_reading()
                    yield c
                if self._done:
                    return
                if self._error is not None:
                    raise self._error
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
        finally:
            self.release()

    async def relay(self, sink: Callable[[bytes], None]) -> None:
        """Hand the body to ``sink`` as it arrives, inside the connection's callback (no task switch
        per chunk); returns when it has ended. ``sink`` must not raise."""
        self._sink = sink
        try:
            while self._chunks:
                c = self._chunks.popleft()
                self._buffered -= len(c)
                sink(c)
            if self._paused:
                self.resume_reading()
            if self._done:
                return
            if self._error is not None:
                raise self._error
            self._end = asyncio.get_running_loop().create_future()
            await self._end
        finally:
            self.release()

    def pause_reading(self) -> None:
        if not self._paused and self.conn.transport is not None and not self.conn.closed:
            self._paused = True
            self.conn.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.conn.transport is not None and not self.conn.closed:
            self._paused = False
            self.conn.transport.resume_reading()

    async def read(self) -> bytes:
        """The whole body."""
        out: list[bytes] = []
        n = 0
        async for c in self.chunks():
            n += len(c)
            if n > MAX_RESPONSE_BYTES:
                raise UpstreamError(f"upstream response over {MAX_RESPONSE_BYTES} bytes")
            out.append(c)
        return b"".join(out)

    def release(self) -> None:
        """Back to the pool if the answer was read whole and may be kept; else the connection closes."""
        if self._released:
            return
        self._released = True
        self.conn.resp = None
        if self._done and self.keep_alive and not self.conn.closed and self._error is None:
            self.resume_reading()  # a relay paused by a slow client must not pool a paused connection
            self.pool._put(self.conn)
        else:
            self.conn.close()


class UpstreamPool:
    """Keep-alive connections to one upstream base URL (``http://host:port/prefix`` or ``https``)."""

    def __init__(self, url: str, *, connect_timeout_s: float) -> None:
        u = urlsplit(url)
        self.https = u.scheme == "https"
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if self.https else 80)
        self.prefix = u.path.rstrip("/").encode()
        self.host_header = (u.netloc.rsplit("@", 1)[-1]).encode()
        self.connect_timeout_s = connect_timeout_s
        self._ssl = ssl.create_default_context() if self.https else None
        self._idle: list[_ClientConnection] = []

    async def _connect(self) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    _ClientConnection,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError as exc:
            raise UpstreamError(f"connect to {self.host}:{self.port} timed out") from exc
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return conn

    def _take(self) -> _ClientConnection | None:
        now = time.monotonic()
        while self._idle:
            c = self._idle.pop()
            if not c.closed and now - c.idle_since < POOL_IDLE_S:
                return c
            c.close()
        return None

    def _put(self, conn: _ClientConnection) -> None:
        conn.idle_since = time.monotonic()
        conn.got_bytes = False
        if len(self._idle) < POOL_MAX_IDLE:
            self._idle.append(conn)
        else:
            conn.close()

    async def request(self, method: bytes, target: bytes, headers: Headers, body: bytes) -> UpstreamResponse:
        """Send a request and wait for the answer's head. The caller must read or :meth:`release` it."""
        head = [b"%s %s%s HTTP/1.1\r\nHost: %s\r\n" % (method, self.prefix, target, self.host_header)]
        head.extend(k + b": " + v + b"\r\n" for k, v in headers)
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        data = b"".join(head) + body
        reused = self._take()
        for conn in (reused, None) if reused is not None else (None,):
            if conn is None:
                conn = await self._connect()
            resp = UpstreamResponse(self, conn)
            conn.resp = resp
            assert conn.transport is not None
            conn.transport.write(data)
            sent = time.monotonic()
            try:
                await resp.head
            except UpstreamError:
                resp.release()
                if conn is reused and not conn.got_bytes and time.monotonic() - sent < RETRY_WITHIN_S:
                    continue  # it had closed while idle (the close crossed our request): once more, fresh
                raise
            except BaseException:
                resp.release()
                raise
            return resp
        raise AssertionError("unreachable")

    def close(self) -> None:
        for c in self._idle:
            c.close()
        self._idle.clear()


@contextlib.asynccontextmanager
async def upstream_call(
    pool: UpstreamPool, method: bytes, target: bytes, headers: Headers, body: bytes
) -> AsyncIterator[UpstreamResponse]:
    """``async with``: the answer, released (or its connection closed) on the way out."""
    resp = await pool.request(method, target, headers, body)
    try:
        yield resp
    finally:
        resp.release()

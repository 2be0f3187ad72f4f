"""Local HTTP: ``GET /metrics``, ``GET /healthz``, ``GET /v1/cap``.

A tiny HTTP/1.1 server on asyncio streams (GET only, one request per
connection). It binds to loopback by default: it is for the node's own
Prometheus scraper, health checks and inference servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
from collections.abc import Callable
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rackguard.agent import log as logmod

MAX_REQUEST_BYTES = 8192
MAX_CONNECTIONS = 128  # open at once; more are answered 503 and closed at once (bounded fds)
READ_TIMEOUT_S = 5.0
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b'Content-Length: 28\r\nConnection: close\r\n\r\n{"error": "too many clients"}'
)
Route = Callable[[], tuple[int, str, bytes]]


def json_response(status: int, body: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode()


_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    400: "Bad Request",
    503: "Service Unavailable",
}


class HttpServer:
    """Serves fixed routes; each route returns (status, content type, body)."""

    def __init__(self, host: str, port: int, routes: dict[str, Route]) -> None:
        self.host = host
        self.port = port
        self.routes = routes
        self._server: asyncio.Server | None = None
        self.active = 0
        self.busy_total = 0  # connections turned away at MAX_CONNECTIONS
        self.log = logmod.get("http")
        self._rl = logmod.RateLimitedLog(self.log, 60.0)

    async def start(self) -> int:
        """Start listening; returns the bound port (useful with port 0 in tests)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=128)
        _quiet_accept_errors(asyncio.get_running_loop(), self._rl)
        self.port = self._server.sockets[0].getsockname()[1]
        self.log.info("http_listening", host=self.host, port=self.port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= MAX_CONNECTIONS:
            self.busy_total += 1
            self._rl.warning("http_busy", "too_many_connections", limit=MAX_CONNECTIONS)
            with contextlib.suppress(Exception):
                writer.write(_BUSY)
                writer.close()
            return
        self.active += 1
        try:
            await self._serve(reader, writer)
        finally:
            self.active -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            if len(head) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            path = target.split("?", 1)[0]
            if method != "GET":
                status, ctype, body = json_response(405, {"error": "GET only"})
            elif path in self.routes:
                status, ctype, body = self.routes[path]()
            else:
                status, ctype, body = json_response(404, {"error": "not found", "paths": sorted(self.routes)})
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, ctype, body = json_response(400, {"error": "bad request"})
        except Exception:
            self.log.exception("http_route_failed")
            status, ctype, body = json_response(503, {"error": "internal error"})
        head_out = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            writer.write(head_out.encode("latin-1") + body)
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT_S)  # a client that never reads
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop, rl: logmod.RateLimitedLog) -> None:
    """Out of file descriptors, asyncio logs a traceback per refused accept: one line a minute instead."""
    previous = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (
            errno.EMFILE,
            errno.ENFILE,
            errno.ENOBUFS,
            errno.ENOMEM,
        ):
            rl.warning("http_accept_failed", errno.errorcode.get(exc.errno or 0, "oserror"), error=str(exc))
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)


METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST

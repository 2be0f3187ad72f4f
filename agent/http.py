"""Local HTTP: ``GET /metrics``, ``GET /healthz``, ``GET /v1/cap``.

A tiny HTTP/1.1 server on asyncio streams (GET only, one request per
connection). It binds to loopback by default: it is for the node's own
Prometheus scraper, health checks and inference servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rackguard.agent import log as logmod

MAX_REQUEST_BYTES = 8192
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
        self.log = logmod.get("http")

    async def start(self) -> int:
        """Start listening; returns the bound port (useful with port 0 in tests)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self.log.info("http_listening", host=self.host, port=self.port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
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
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST

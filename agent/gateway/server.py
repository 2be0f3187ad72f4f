"""The gateway: a reverse proxy (``http1.py``: asyncio protocols, httptools) with admission per upstream.

Per request: classify (API key, else the class header, else the default class), read
the body (bounded in size and time), pick the upstream with the most room, wait for a
slot in its priority queue (at most the class's ``max_queue_s``), then proxy. A request
whose expected wait (the requests ahead of it over the limit, times the average time a
slot is held) exceeds ``max_queue_s``, that finds the queue full, or that waited that long,
is spilled to the fallback when there is one and shed with 429 + ``Retry-After`` otherwise. While the cap's reason is a
safety reason (leak, thermal, stale, lost GPU) every request goes to the fallback.

Streams pass through event by event; the gateway asks for ``stream_options.include_usage``
when the client did not, and removes that usage chunk from what the client sees. A client
that disconnects cancels its upstream request (its handler is cancelled) and frees its
slot; a client that reads nothing for ``write_timeout_s`` is dropped.

Limits follow the agent like the gate library (:class:`rackguard.agent.gate.CapRules`):
the retained cap over MQTT, ``/v1/cap`` while the broker is unreachable, ``safe_cap``
(per GPU) while no cap is valid. Each upstream reports like a gate on
``.../gate/<gateway_id>-<upstream>``, with per-class counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from rackguard.agent import log as logmod
from rackguard.agent.config import Config, GatewayClass, read_secret
from rackguard.agent.gate import CapRules, http_get, mqtt_client
from rackguard.agent.gateway.admission import Admission
from rackguard.agent.gateway.energy import EnergyLedger, Usage
from rackguard.agent.gateway.http1 import (
    Handler,
    Headers,
    HttpServer,
    Request,
    Response,
    ServerConnection,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    upstream_call,
)
from rackguard.agent.gateway.metrics import GatewayMetrics
from rackguard.agent.messages import GATE_MAX_ENERGY_J, GateClassCounters, GateReport, Telemetry, dump
from rackguard.agent.mqtt import Topics

TICK_S = 0.1
J_PER_KWH = 3.6e6
INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_HOP = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
        b"accept-encoding",
        b"expect",
    }
)
_HOP_OUT = _HOP | {b"content-encoding"}
_JSON = [(b"Content-Type", b"application/json")]


def _pass(headers: Headers, hop: frozenset[bytes]) -> Headers:
    """The end-to-end headers: hop-by-hop ones dropped, and those ``Connection`` names."""
    named = [v for k, v in headers if k.lower() == b"connection"]
    if named:
        hop = hop | {t.strip().lower() for v in named for t in v.split(b",")}
    return [(k, v) for k, v in headers if k.lower() not in hop]


@dataclass(slots=True)
class ClassCounters:
    """One class's cumulative counters at one upstream (for its gate report)."""

    completed_total: int = 0
    slo_met_total: int = 0
    shed_total: int = 0
    spilled_total: int = 0
    error_total: int = 0
    tokens_total: int = 0
    goodput_tokens_total: int = 0
    energy_j_total: float = 0.0


@dataclass(eq=False)
class Upstream:
    name: str
    url: str
    gpus: tuple[int, ...]
    rules: CapRules
    adm: Admission
    pool: UpstreamPool
    ledger: EnergyLedger = field(default_factory=EnergyLedger)
    counters: dict[str, ClassCounters] = field(default_factory=dict)
    last_energy: tuple[float, float] | None = None  # (t_s, summed energy counter)
    completed_total: int = 0
    tokens_total: int = 0
    limit_log: list[tuple[float, int]] = field(default_factory=list)  # (monotonic s, limit): last 256


@dataclass(slots=True)
class _Req:
    cls: GatewayClass
    ci: int
    arrive_mono: float
    model: str | None
    stream: bool
    queue_wait_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class _Call:
    """One request on its way through: what _forward and _stream need."""

    request: Request
    conn: ServerConnection
    body: bytes
    rec: _Req
    strip_usage: bool


def _error(status: int, message: str, kind: str, headers: Headers | None = None) -> Response:
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    return Response(status, body, [*_JSON, *(headers or [])])


def _protocol_error(status: int, message: str) -> Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _error(status, message, kind)


def _usage_int(usage: dict[str, Any], key: str) -> int:
    v = usage.get(key)
    return v if isinstance(v, int) and 0 <= v < 2**40 else 0


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class Gateway:
    """The admission gateway.

    Args:
        cfg: The whole config (``[gateway]``, ``[mqtt]``, ``[node]``, ``[energy]``, ``[control]``).
    """

    def __init__(self, cfg: Config) -> None:
        g = cfg.gateway
        self.cfg, self.g = cfg, g
        self.classes = list(g.classes)
        self.class_index = {c.name: i for i, c in enumerate(self.classes)}
        lowest = min(self.classes, key=lambda c: c.priority)
        self.default_class = self.class_index[g.default_class or lowest.name]
        self.api_keys = g.api_keys()
        per_gpu_safe = cfg.control.safe_cap if g.safe_cap is None else g.safe_cap
        self.upstreams = [
            Upstream(
                u.name,
                u.url.rstrip("/"),
                tuple(u.gpus),
                CapRules(per_gpu_safe * len(u.gpus), u.gpus),
                Admission(self.classes, per_gpu_safe * len(u.gpus)),
                UpstreamPool(u.url, connect_timeout_s=g.connect_timeout_s),
                counters={c.name: ClassCounters() for c in self.classes},
            )
            for u in g.upstreams
        ]
        self.fallback_url = g.fallback.url.rstrip("/") if g.fallback else None
        self.fallback = (
            UpstreamPool(self.fallback_url, connect_timeout_s=g.connect_timeout_s)
            if self.fallback_url
            else None
        )
        self.class_header = g.class_header.lower().encode()
        self.topics = Topics.for_node(cfg.node, cfg.mqtt.topic_prefix)
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:30]
        self.gateway_id = g.gateway_id or f"gw-{host}"
        self.cap_url = g.cap_url or (
            f"http://{cfg.http.host}:{cfg.http.port}/v1/cap" if cfg.http.port else None
        )
        self.carbon_g_per_kwh = cfg.energy.grid_carbon_g_per_kwh
        self.metrics = GatewayMetrics()
        self._cls_metrics = {c.name: self._children(c.name) for c in self.classes}
        self.mqtt_connected = False
        self.rejected_total = 0  # bad MQTT payloads (telemetry, carbon)
        self._client: aiomqtt.Client | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.port = 0
        self.log = logmod.get("gateway")
        self._rl = logmod.RateLimitedLog(self.log, 60.0)
        self.http = self._build_server()

    def _children(self, name: str) -> dict[str, Any]:
        m = self.metrics
        return {
            "queue_wait": m.queue_wait.labels(name),
            "ttft": m.ttft.labels(name),
            "latency": m.latency.labels(name),
            "tpot": m.tpot.labels(name),
            "prompt": m.tokens.labels(name, "prompt"),
            "completion": m.tokens.labels(name, "completion"),
            "flops": m.flops.labels(name),
            "slo_met": m.slo_met.labels(name),
            "goodput": m.goodput_tokens.labels(name),
            "fallback": m.fallback.labels(name),
            **{o: m.requests.labels(name, o) for o in ("ok", "shed", "spilled", "error")},
        }

    # -- HTTP --------------------------------------------------------------------------
    def _build_server(self) -> HttpServer:
        routes: dict[tuple[str, str], Handler] = {("POST", p): self._inference for p in INFERENCE_PATHS}
        routes |= {("GET", "/v1/models"): self._models, ("GET", "/metrics"): self._metrics}
        routes[("GET", "/healthz")] = self._healthz
        return HttpServer(
            routes,
            error=_protocol_error,
            on_bad=self._bad_request,
            on_error=lambda exc: self.log.error("gateway_handler_failed", error=repr(exc)[:300]),
            max_body_bytes=self.g.max_body_bytes,
            body_timeout_s=self.g.body_timeout_s,
        )

    async def start(self) -> int:
        """Connect to the broker, start serving; returns the bound port."""
        host, port = parse_listen(self.g.listen)
        self.port = await self.http.start(host, port)
        self._tasks = [
            asyncio.create_task(self._mqtt_loop(), name="gateway-mqtt"),
            asyncio.create_task(self._tick_loop(), name="gateway-tick"),
        ]
        if self.cap_url:
            self._tasks.append(asyncio.create_task(self._http_cap_loop(), name="gateway-http-cap"))
        self.log.info(
            "gateway_listening", host=host, port=self.port, upstreams=[u.name for u in self.upstreams]
        )
        return self.port

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.http.close()
        for u in self.upstreams:
            u.pool.close()
        if self.fallback is not None:
            self.fallback.close()

    def _classify(self, request: Request) -> int | Response:
        auth = request.header(b"authorization") or b""
        if self.api_keys and auth.startswith(b"Bearer "):
            name = self.api_keys.get(auth[7:].strip().decode("latin-1"))
            if name is not None:
                return self.class_index[name]
        raw = request.header(self.class_header)
        if raw is None:
            return self.default_class
        name = raw.decode("latin-1")
        ci = self.class_index.get(name.strip())
        if ci is None:
            return _error(
                400, f"unknown class {name[:64]!r} in {self.g.class_header}", "invalid_request_error"
            )
        return ci

    def _pick(self) -> Upstream | None:
        best, room = None, -math.inf
        for u in self.upstreams:
            r = u.adm.limit - u.adm.in_flight - u.adm.waiting
            if r > room:
                best, room = u, r
        return best

    async def _inference(self, request: Request, conn: ServerConnection) -> Response | None:
        """One inference request; its head and body arrived whole, in time and within the size limit."""
        arrive = time.monotonic()
        ci = self._classify(request)
        if isinstance(ci, Response):
            self.metrics.bad_requests.inc()
            return ci
        body = request.body
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            self.metrics.bad_requests.inc()
            return _error(400, f"request body is not valid JSON: {str(exc)[:200]}", "invalid_request_error")
        if not isinstance(obj, dict):
            self.metrics.bad_requests.inc()
            return _error(400, "request body must be a JSON object", "invalid_request_error")
        stream = obj.get("stream") is True
        strip_usage = False
        if stream and request.path != "/v1/embeddings":
            so = obj.get("stream_options")
            if not (isinstance(so, dict) and so.get("include_usage") is True):
                head = body.rstrip()
                if "stream_options" not in obj and head.lstrip().startswith(b"{"):
                    body = head[:-1] + b',"stream_options":{"include_usage":true}}'  # UTF-8 object: append
                else:
                    obj["stream_options"] = {**(so if isinstance(so, dict) else {}), "include_usage": True}
                    body = json.dumps(obj).encode()
                strip_usage = True
        model = obj.get("model")
        cls = self.classes[ci]
        rec = _Req(cls, ci, arrive, model if isinstance(model, str) else None, stream)

        call = _Call(request, conn, body, rec, strip_usage)
        up = self._pick()
        if up is None:
            return await self._overflow(call, None, "no upstream configured")
        if self.fallback is not None and (reason := up.rules.safety_reason()) is not None:
            return await self._spill(call, up, reason)
        if not up.adm.try_admit(ci):
            queued = sum(u.adm.waiting for u in self.upstreams)
            if queued >= self.g.max_queue:
                return await self._overflow(call, up, "queue full")
            if (expected_s := up.adm.expected_wait_s(ci)) > cls.max_queue_s:
                return await self._overflow(call, up, "queue wait too long", expected_s)
            if not await up.adm.acquire(ci, cls.max_queue_s):
                return await self._overflow(call, up, "queue wait too long")
        rec.queue_wait_s = time.monotonic() - arrive
        rid = up.ledger.start(time.time())
        ok = False
        try:
            resp, ok = await self._forward(call, up.pool)
            return resp
        finally:
            if ok:
                up.adm.served(time.monotonic() - rec.arrive_mono - rec.queue_wait_s)
            up.adm.release(ci)
            up.ledger.finish(
                rid,
                time.time(),
                rec.prompt_tokens + rec.completion_tokens if ok else 0,
                functools.partial(self._energy_done, up, cls.name),
            )
            self._observe(rec, "ok" if ok else "error", up)

    async def _overflow(
        self, call: _Call, up: Upstream | None, why: str, expected_s: float | None = None
    ) -> Response | None:
        rec = call.rec
        if self.fallback is not None:
            return await self._spill(call, up, why)
        self._observe(rec, "shed", up)
        wait_s = expected_s if expected_s is not None and math.isfinite(expected_s) else rec.cls.max_queue_s
        retry_s = max(1, min(math.ceil(wait_s), 3600))
        return _error(
            429,
            f"over capacity ({why}) for class {rec.cls.name}",
            "rate_limit_exceeded",
            headers=[(b"Retry-After", str(retry_s).encode())],
        )

    async def _spill(self, call: _Call, up: Upstream | None, why: str) -> Response | None:
        assert self.fallback is not None
        rec = call.rec
        rec.queue_wait_s = time.monotonic() - rec.arrive_mono
        self._cls_metrics[rec.cls.name]["fallback"].inc()
        ok = False
        try:
            resp, ok = await self._forward(call, self.fallback)
            return resp
        finally:
            self._observe(rec, "spilled" if ok else "error", up)

    async def _forward(self, call: _Call, pool: UpstreamPool) -> tuple[Response | None, bool]:
        """Proxy to ``pool``; returns the response (None: streamed) and whether it was a success."""
        rec, request = call.rec, call.request
        headers = _pass(request.headers, _HOP)
        try:
            async with asyncio.timeout(self.g.upstream_timeout_s):
                up = await pool.request(b"POST", request.target, headers, call.body)
                try:
                    out_headers = _pass(up.headers, _HOP_OUT)
                    if rec.stream and up.status == 200 and up.content_type == "text/event-stream":
                        return None, await self._stream(call, up, out_headers)
                    data = await up.read()
                finally:
                    up.release()
        except UpstreamError as exc:
            self._rl.warning(
                "gateway_upstream_failed", type(exc).__name__, upstream=pool.host, error=str(exc)[:200]
            )
            if call.conn.streaming:
                return None, False  # the upstream broke mid-stream: the client's stream is cut
            return _error(502, f"upstream unavailable: {str(exc)[:200]}", "upstream_error"), False
        except TimeoutError:
            if call.conn.streaming:
                return None, False
            return _error(504, "upstream timed out", "upstream_error"), False
        ok = up.status == 200
        if ok:
            rec.ttft_s = time.monotonic() - rec.arrive_mono
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                usage = json.loads(data).get("usage")
                if isinstance(usage, dict):
                    rec.prompt_tokens = _usage_int(usage, "prompt_tokens")
                    rec.completion_tokens = _usage_int(usage, "completion_tokens")
        return Response(up.status, data, out_headers), ok

    async def _stream(self, call: _Call, up: UpstreamResponse, headers: Headers) -> bool:
        """Pass an SSE stream through event by event; whether it ended well."""
        rec, strip_usage = call.rec, call.strip_usage
        buf = b""

        def events(chunk: bytes) -> bytes:
            nonlocal buf
            buf = buf + chunk if buf else chunk
            if b"\r\n" in buf:
                buf = buf.replace(b"\r\n", b"\n")
            if b"\n\n" not in buf:
                return b""
            *evs, buf = buf.split(b"\n\n")
            return b"".join(e for e in (self._event(ev + b"\n\n", rec, strip_usage) for ev in evs) if e)

        try:
            call.conn.start(200, headers)
            await call.conn.relay(up, events, self.g.write_timeout_s)  # a stalled client is cut
            if buf:
                call.conn.write(buf)
            call.conn.end()
        except ConnectionError as exc:
            if isinstance(exc, UpstreamError):
                self._rl.warning(
                    "gateway_upstream_failed", "stream", upstream=up.pool.host, error=str(exc)[:200]
                )
            return False  # the client left, or the upstream broke off mid-stream
        return True

    def _event(self, ev: bytes, rec: _Req, strip_usage: bool) -> bytes | None:
        """Look at one SSE event (first token, usage); None drops it (the usage chunk we asked for)."""
        if rec.ttft_s is not None and (
            b'"usage"' not in ev or b'"usage":null' in ev or b'"usage": null' in ev
        ):
            return ev  # the common case: nothing to learn, no JSON to parse
        start = ev.find(b"data:")
        if start < 0:
            return ev
        payload = ev[start + 5 :].strip()
        if payload == b"[DONE]" or not payload.startswith(b"{"):
            return ev
        try:
            obj = json.loads(payload)
        except ValueError:
            return ev
        if not isinstance(obj, dict):
            return ev
        if rec.ttft_s is None and obj.get("choices"):
            rec.ttft_s = time.monotonic() - rec.arrive_mono
        usage = obj.get("usage")
        if isinstance(usage, dict):
            rec.prompt_tokens = _usage_int(usage, "prompt_tokens")
            rec.completion_tokens = _usage_int(usage, "completion_tokens")
            if strip_usage:
                if not obj.get("choices"):
                    return None
                obj["usage"] = None
                return b"data: " + json.dumps(obj).encode() + b"\n\n"
        return ev

    def _observe(self, rec: _Req, outcome: str, up: Upstream | None) -> None:
        m = self._cls_metrics[rec.cls.name]
        m[outcome].inc()
        counters = up.counters[rec.cls.name] if up is not None else None
        if outcome == "shed":
            if counters:
                counters.shed_total += 1
            return
        now = time.monotonic()
        m["queue_wait"].observe(rec.queue_wait_s)
        if outcome == "error":
            if counters:
                counters.error_total += 1
            return
        latency = now - rec.arrive_mono
        ttft = rec.ttft_s if rec.ttft_s is not None else latency
        m["latency"].observe(latency)
        m["ttft"].observe(ttft)
        if rec.stream and rec.completion_tokens > 1:
            m["tpot"].observe((latency - ttft) / (rec.completion_tokens - 1))
        tokens = rec.prompt_tokens + rec.completion_tokens
        m["prompt"].inc(rec.prompt_tokens)
        m["completion"].inc(rec.completion_tokens)
        params = self.g.model_params.get(rec.model or "")
        if params:
            m["flops"].inc(2.0 * params * tokens)
        c = rec.cls
        met = (c.slo_ttft_s is None or ttft <= c.slo_ttft_s) and (
            c.slo_latency_s is None or latency <= c.slo_latency_s
        )
        if met:
            m["slo_met"].inc()
            m["goodput"].inc(rec.completion_tokens)
        if counters is None:
            return
        if outcome == "spilled":
            counters.spilled_total += 1
            return
        assert up is not None
        up.completed_total += 1
        up.tokens_total += rec.completion_tokens
        counters.completed_total += 1
        counters.tokens_total += rec.completion_tokens
        if met:
            counters.slo_met_total += 1
            counters.goodput_tokens_total += rec.completion_tokens

    def _energy_done(self, up: Upstream, cls: str, u: Usage) -> None:
        if not u.covered:
            return
        e = self.cfg.energy
        self.metrics.energy.labels(cls).observe(u.energy_j)
        kwh = u.energy_j / J_PER_KWH
        if self.carbon_g_per_kwh is not None:
            self.metrics.carbon.labels(cls).inc(kwh * self.carbon_g_per_kwh)
        if e.wue_l_per_kwh is not None:
            self.metrics.water.labels(cls).inc(kwh * e.wue_l_per_kwh)
        c = up.counters[cls]
        c.energy_j_total = min(c.energy_j_total + u.energy_j, GATE_MAX_ENERGY_J)

    async def _models(self, request: Request, conn: ServerConnection) -> Response:
        pool = self.upstreams[0].pool if self.upstreams else self.fallback
        if pool is None:
            return _error(503, "no upstream configured", "upstream_error")
        try:
            async with (
                asyncio.timeout(self.g.upstream_timeout_s),
                upstream_call(pool, b"GET", request.target, _pass(request.headers, _HOP), b"") as up,
            ):
                data = await up.read()
                return Response(up.status, data, _pass(up.headers, _HOP_OUT))
        except (UpstreamError, TimeoutError) as exc:
            return _error(502, f"upstream unavailable: {type(exc).__name__}", "upstream_error")

    async def _metrics(self, request: Request, conn: ServerConnection) -> Response:
        body = generate_latest(self.metrics.registry)
        return Response(200, body, [(b"Content-Type", CONTENT_TYPE_LATEST.encode())])

    async def _healthz(self, request: Request, conn: ServerConnection) -> Response:
        ups = {
            u.name: {
                "limit": u.adm.limit,
                "source": u.rules.limit()[1],
                "in_flight": u.adm.in_flight,
                "queued": u.adm.waiting,
                "safety_reason": u.rules.safety_reason(),
            }
            for u in self.upstreams
        }
        ok = bool(self.upstreams or self.fallback_url)
        degraded = [] if self.mqtt_connected else ["mqtt disconnected: no cap or status from the agent"]
        for name, u in ups.items():
            if u["source"] == "safe":
                degraded.append(f"{name}: no valid cap, admitting safe_cap per GPU")
            if u["safety_reason"] is not None:
                degraded.append(f"{name}: cap held by safety ({u['safety_reason']}), all to the fallback")
        body = {
            "ok": ok,
            "status": "failed" if not ok else "degraded" if degraded else "ok",
            "degraded": degraded,
            "mqtt_connected": self.mqtt_connected,
            "upstreams": ups,
        }
        return Response(200 if ok else 503, json.dumps(body).encode(), list(_JSON))

    # -- following the agent -----------------------------------------------------------
    def handle_cap(self, payload: bytes, source: str, expiry_s: float | None = None) -> None:
        for u in self.upstreams:
            error = u.rules.take_cap(payload, "http" if source == "http" else "mqtt", expiry_s)
            if error is not None:
                self._rl.warning("gateway_cap_invalid", "invalid", upstream=u.name, error=error)
        self._apply_limits()

    def handle_status(self, payload: bytes) -> None:
        for u in self.upstreams:
            u.rules.take_status(payload)
        self._apply_limits()

    def handle_telemetry(self, payload: bytes) -> None:
        """Energy windows per upstream from the agent's telemetry (GPU energy counters)."""
        try:
            t = Telemetry.model_validate_json(payload)
        except ValidationError as exc:
            self._reject("telemetry", str(exc.errors()[0]["msg"]))
            return
        if t.historical:
            return  # replayed after an outage: its windows are in the past
        energy = {g.index: g.energy_j for g in t.gpus}
        now = time.time()
        for u in self.upstreams:
            vals = [energy.get(i) for i in u.gpus]
            if any(v is None for v in vals):
                continue  # a GPU not read this window: its energy lands in the next window it is
            if any(v is None or not math.isfinite(v) or not 0 <= v <= GATE_MAX_ENERGY_J for v in vals):
                self._reject("telemetry", "energy_j out of bounds")
                continue
            total = sum(v for v in vals if v is not None)
            last = u.last_energy
            u.last_energy = (t.t_s, total)
            if last is None or t.t_s <= last[0]:
                continue
            delta = total - last[1] if total >= last[1] else total  # a counter reset
            u.ledger.add_window(last[0], t.t_s, delta, now)
            self.metrics.gpu_energy.labels(u.name).inc(delta)

    def handle_carbon(self, payload: bytes) -> None:
        """The grid's carbon intensity: a number, or JSON with ``g_per_kwh``; bounded 0..5000."""
        try:
            v = json.loads(payload)
            if isinstance(v, dict):
                v = v["g_per_kwh"]
            value = float(v)
            if not (math.isfinite(value) and 0 <= value <= 5000):
                raise ValueError(f"out of bounds: {value}")
        except (ValueError, KeyError, TypeError) as exc:
            self._reject("carbon", str(exc)[:200])
            return
        self.carbon_g_per_kwh = value

    def _bad_request(self, status: int, why: str) -> None:
        self.metrics.bad_requests.inc()
        self._rl.warning("gateway_request_refused", str(status), status=status, detail=why[:200])

    def _reject(self, what: str, why: str) -> None:
        self.rejected_total += 1
        self._rl.warning("gateway_payload_rejected", what, detail=why[:200])

    def _apply_limits(self) -> None:
        now = time.monotonic()
        for u in self.upstreams:
            limit, source = u.rules.limit()
            if limit != u.adm.limit:
                self.log.info(
                    "gateway_limit", upstream=u.name, limit=limit, source=source, in_flight=u.adm.in_flight
                )
                u.limit_log.append((now, limit))
                del u.limit_log[:-256]
            u.adm.set_limit(limit)

    def reports(self) -> list[GateReport]:
        out = []
        now = time.time()
        for u in self.upstreams:
            limit, source = u.rules.limit()
            out.append(
                GateReport(
                    gate_id=f"{self.gateway_id}-{u.name}"[:64],
                    gpu=None,
                    gpus=list(u.gpus),
                    t_s=now,
                    in_flight=u.adm.in_flight,
                    limit=limit,
                    source=source,
                    completed_total=u.completed_total,
                    tokens_total=u.tokens_total,
                    classes={k: GateClassCounters(**vars_of(c)) for k, c in u.counters.items()},
                )
            )
        return out

    async def _tick_loop(self) -> None:
        next_report = time.monotonic()
        m = self.metrics
        while True:
            self._apply_limits()
            for u in self.upstreams:
                m.in_flight.labels(u.name).set(u.adm.in_flight)
                m.limit.labels(u.name).set(u.adm.limit)
                m.limit_safe.labels(u.name).set(1.0 if u.rules.limit()[1] == "safe" else 0.0)
                m.idle_energy.labels(u.name)  # exported from the start
            for c in self.classes:
                m.queued.labels(c.name).set(
                    sum(u.adm.queued(self.class_index[c.name]) for u in self.upstreams)
                )
            m.mqtt_connected.set(1.0 if self.mqtt_connected else 0.0)
            if time.monotonic() >= next_report and self._client is not None:
                next_report = time.monotonic() + self.g.report_period_s
                for r in self.reports():
                    try:
                        await self._client.publish(f"{self.topics.base}/gate/{r.gate_id}", dump(r), qos=0)
                    except aiomqtt.MqttError as exc:
                        self.log.debug("gateway_report_failed", error=str(exc))
            await asyncio.sleep(TICK_S)

    async def _mqtt_loop(self) -> None:
        c = self.cfg.mqtt
        username = self.g.mqtt_username or c.username
        pw_file = self.g.mqtt_password_file if self.g.mqtt_username else c.password_file
        subs = {self.topics.status, self.topics.cap, self.topics.telemetry}
        if self.cfg.energy.grid_carbon_topic:
            subs.add(self.cfg.energy.grid_carbon_topic)
        while True:
            password = read_secret(pw_file).get_secret_value() if pw_file else None
            try:
                async with mqtt_client(
                    c.host,
                    c.port,
                    identifier=f"rackguard-{self.gateway_id}",
                    keepalive_s=c.keepalive_s,
                    username=username,
                    password=password,
                    ca_file=c.tls.ca_file if c.tls else None,
                    cert_file=c.tls.cert_file if c.tls else None,
                    key_file=c.tls.key_file if c.tls else None,
                ) as client:
                    for topic in sorted(subs):
                        await client.subscribe(topic, qos=1)
                    self._client, self.mqtt_connected = client, True
                    self.log.info("gateway_mqtt_connected", host=c.host, port=c.port)
                    async for msg in client.messages:
                        self._on_message(msg)
            except aiomqtt.MqttError as exc:
                if self.mqtt_connected:
                    self.log.warning("gateway_mqtt_disconnected", error=str(exc))
                else:  # unreachable: said once a minute
                    self._rl.warning(
                        "gateway_mqtt_unreachable",
                        "unreachable",
                        host=c.host,
                        port=c.port,
                        error=str(exc),
                        limits="from cap_url while it answers, else safe_cap per GPU",
                    )
            finally:
                self._client, self.mqtt_connected = None, False
            await asyncio.sleep(c.reconnect_min_s)

    def _on_message(self, msg: aiomqtt.Message) -> None:
        payload = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload or "").encode()
        topic = str(msg.topic)
        if topic == self.topics.cap:
            expiry = getattr(msg.properties, "MessageExpiryInterval", None) if msg.properties else None
            self.handle_cap(payload, "mqtt", float(expiry) if expiry is not None else None)
        elif topic == self.topics.status:
            self.handle_status(payload)
        elif topic == self.topics.telemetry:
            self.handle_telemetry(payload)
        else:
            self.handle_carbon(payload)

    async def _http_cap_loop(self) -> None:
        assert self.cap_url is not None
        while True:
            if not self.mqtt_connected:
                try:
                    body = await asyncio.to_thread(http_get, self.cap_url)
                except OSError as exc:
                    self.log.debug("gateway_http_cap_failed", error=str(exc))
                else:
                    self.handle_cap(body, "http")
            await asyncio.sleep(1.0)


def vars_of(c: ClassCounters) -> dict[str, Any]:
    return {k: getattr(c, k) for k in ClassCounters.__dataclass_fields__}

"""The admission gateway's overhead: direct vs through the gateway vs through HAProxy, in one run.

Usage: ``python3 -m rackguard.bench.gateway [--rounds 3] [--streams 200] [--json] [--gateway-tree DIR]``

``--gateway-tree`` also runs the gateway from another checkout (``reference``), in the same rounds.

Processes: a fake OpenAI-compatible upstream (``bench/fake_openai.py``: raw asyncio servers for
streams and for small requests, so that the upstream costs the machine little CPU), the gateway (``rackguard gateway``,
no broker: its limit is a large ``safe_cap``; one process per phase), HAProxy 2.x (one thread),
and this load generator (raw asyncio HTTP/1.1 keep-alive clients); all on uvloop where they are
Python, none pinned to a CPU (the gateway and HAProxy are one thread each). Each round measures
the paths one after the other, so they share the machine's noise.

* **Streams:** ``--streams`` concurrent SSE streams (8 tokens 50 ms apart; connections start spread
  over one stream's duration, or all at once with ``--lockstep``) for ``--seconds``;
  time to first token and total latency per stream, p50/p99 per path. Added latency =
  path − direct, per round; the median over rounds is reported.
* A bare aiohttp proxy (``aiohttp``: server + client, nothing else) is measured too: what the
  gateway cost when it was built on aiohttp.
* **Throughput:** ``--conns`` keep-alive connections sending small non-streamed chat
  completions as fast as they are answered, for ``--seconds``. Requests/s achieved, and
  the gateway's requests per CPU-second (its ceiling on one core, whatever else the
  machine runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from rackguard.agent.mosquitto import free_port

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
STREAM_S = 0.4  # the fake upstream's stream: 8 tokens 50 ms apart
STREAM_BODY = json.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
).encode()


def request(body: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer k\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


async def _read_response(r: asyncio.StreamReader, first: list[float] | None = None) -> int:
    head = await r.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await r.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            if first is not None and not first and size:
                first.append(time.perf_counter())
            await r.readexactly(size + 2)
            if size == 0:
                return status
    i = lower.find(b"content-length:")
    n = int(lower[i + 15 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
    await r.readexactly(n)
    return status


async def throughput(port: int, conns: int, seconds: float) -> tuple[int, int]:
    """(ok responses, other responses) in ``seconds`` over ``conns`` keep-alive connections."""
    req = request(BODY)
    counts = [0, 0]
    stop = time.monotonic() + seconds

    async def conn() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < stop:
            w.write(req)
            status = await _read_response(r)
            counts[0 if status == 200 else 1] += 1
        w.close()

    await asyncio.gather(*(conn() for _ in range(conns)))
    return counts[0], counts[1]


async def streams(
    port: int, n: int, seconds: float, lockstep: bool = False
) -> tuple[list[float], list[float], int]:
    """Times to first token and total latencies (s) of streams, ``n`` at once, and failures.

    Each connection starts at a random moment within one stream's duration (``STREAM_S``, seeded), so
    requests arrive spread out as they do from many users; ``lockstep`` starts all ``n`` together, and
    they then stay in step: a burst of ``n`` requests every ``STREAM_S``.
    """
    req = request(STREAM_BODY)
    ttft: list[float] = []
    total: list[float] = []
    failed = [0]
    stop = time.monotonic() + seconds
    rng = random.Random(n)

    async def conn() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        if not lockstep:
            await asyncio.sleep(rng.uniform(0, STREAM_S))
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            first: list[float] = []
            w.write(req)
            if await _read_response(r, first) != 200 or not first:
                failed[0] += 1
                continue
            ttft.append(first[0] - t0)
            total.append(time.perf_counter() - t0)
        w.close()

    await asyncio.gather(*(conn() for _ in range(n)))
    return ttft, total, failed[0]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def haproxy_config(port: int, upstream: int, fast: int, sock: Path) -> str:
    return f"""global
    nbthread 1
    maxconn 4000
    stats socket {sock} mode 600 level admin
defaults
    mode http
    option http-no-delay
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe_stream
    bind 127.0.0.1:{port}
    default_backend be_stream
frontend fe_fast
    bind 127.0.0.1:{port + 1}
    default_backend be_fast
backend be_stream
    server s1 127.0.0.1:{upstream} maxconn 4000
backend be_fast
    server s1 127.0.0.1:{fast} maxconn 4000
"""


def gateway_toml(port: int, upstream: int) -> str:
    return f"""[log]
level = "warning"
[mqtt]
port = {free_port()}
[http]
port = 0
[gateway]
listen = "127.0.0.1:{port}"
safe_cap = 10000
max_queue = 100000
[[gateway.upstreams]]
name = "fake"
url = "http://127.0.0.1:{upstream}"
gpus = [0]
"""


async def bare_proxy(port: int, upstream: int) -> None:
    """The floor of the gateway's stack: an aiohttp server whose handler forwards with an aiohttp
    client and returns the answer (no admission, streaming, telemetry or metrics)."""
    import aiohttp
    from aiohttp import web

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    )

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with session.post(f"http://127.0.0.1:{upstream}{request.path}", data=body) as up:
            if up.content_type != "text/event-stream":
                return web.Response(status=up.status, body=await up.read(), content_type=up.content_type)
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": up.content_type})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Procs:
    """The upstream, two gateways (streams, fast) and HAProxy, stopped on exit."""

    def __init__(self, tmp: Path, ref_tree: Path | None = None) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.up, self.fast = free_port(), free_port()
        self.gw_stream, self.gw_fast = free_port(), free_port()
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        py = sys.executable
        self.spawn(
            [
                py,
                "-m",
                "rackguard.bench.fake_openai",
                "--stream-port",
                str(self.up),
                "--fast-port",
                str(self.fast),
            ],
            env,
        )
        for port, upstream, name in ((self.gw_stream, self.up, "s"), (self.gw_fast, self.fast, "f")):
            cfg = tmp / f"gw-{name}.toml"
            cfg.write_text(gateway_toml(port, upstream))
            self.spawn([py, "-m", "rackguard.agent.cli", "gateway", "--config", str(cfg)], env)
        self.gateway_fast_pid = self.procs[-1].pid
        self.ref: tuple[int, int] | None = None
        if ref_tree is not None:  # the same gateway config, run from another checkout
            self.ref = (free_port(), free_port())
            ref_env = dict(env, PYTHONPATH=str(ref_tree))
            for port, upstream, name in ((self.ref[0], self.up, "rs"), (self.ref[1], self.fast, "rf")):
                cfg = tmp / f"gw-{name}.toml"
                cfg.write_text(gateway_toml(port, upstream))
                cmd = [py, "-m", "rackguard.agent.cli", "gateway", "--config", str(cfg)]
                self.spawn(cmd, ref_env, cwd=ref_tree)
            self.ref_fast_pid = self.procs[-1].pid
        self.bare_stream, self.bare_fast = free_port(), free_port()
        for port, upstream in ((self.bare_stream, self.up), (self.bare_fast, self.fast)):
            self.spawn([py, "-m", "rackguard.bench.gateway", "--bare-proxy", str(port), str(upstream)], env)
        self.bare_fast_pid = self.procs[-1].pid
        taken = {self.up, self.fast, self.gw_stream, self.gw_fast, self.bare_stream, self.bare_fast}
        taken |= set(self.ref or ())
        self.hap = free_port()
        while self.hap + 1 in taken or not _free(self.hap + 1):  # HAProxy's two ports: hap, hap + 1
            self.hap = free_port()
        hcfg = tmp / "haproxy.cfg"
        hcfg.write_text(haproxy_config(self.hap, self.up, self.fast, tmp / "haproxy.sock"))
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.spawn([haproxy, "-f", str(hcfg), "-db"], env)  # nbthread 1: one core

    def spawn(self, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        with open(self.tmp / f"proc{len(self.procs)}.log", "wb") as log:
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, cwd=cwd)
        self.procs.append(p)

    def dead(self) -> str:
        """The processes that exited, with the end of their stderr (a start that failed)."""
        return "; ".join(
            f"process {i} exited {p.returncode}: "
            f"{(self.tmp / f'proc{i}.log').read_text(errors='replace')[-500:]}"
            for i, p in enumerate(self.procs)
            if p.poll() is not None
        )

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(10)


async def wait_ready(ports: list[int]) -> None:
    for port in ports:
        for _ in range(200):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"nothing listens on {port}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        procs = Procs(Path(d), args.gateway_tree)
        try:
            ports = [procs.up, procs.fast, procs.gw_stream, procs.gw_fast, procs.hap, procs.hap + 1]
            ports += list(procs.ref or ())
            try:
                await wait_ready([*ports, procs.bare_stream, procs.bare_fast])
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}; {procs.dead() or 'no process exited'}") from None
            cpu_of = {
                "gateway": psutil.Process(procs.gateway_fast_pid),
                "aiohttp": psutil.Process(procs.bare_fast_pid),
            }
            paths = {
                "direct": (procs.up, procs.fast),
                "gateway": (procs.gw_stream, procs.gw_fast),
                "haproxy": (procs.hap, procs.hap + 1),
                "aiohttp": (procs.bare_stream, procs.bare_fast),
            }
            if procs.ref is not None:
                paths["reference"] = procs.ref
                cpu_of["reference"] = psutil.Process(procs.ref_fast_pid)
            rounds: list[dict[str, Any]] = []
            await streams(procs.gw_stream, 20, 1.0)  # warm up
            for _ in range(args.rounds):
                rnd: dict[str, Any] = {}
                for name, (sport, fport) in paths.items():
                    ttft, total, failed = await streams(sport, args.streams, args.seconds, args.lockstep)
                    proc = cpu_of.get(name, cpu_of["gateway"])
                    c0 = sum(proc.cpu_times()[:2])
                    t0 = time.monotonic()
                    ok, bad = await throughput(fport, args.conns, args.seconds)
                    wall = time.monotonic() - t0
                    cpu = sum(proc.cpu_times()[:2]) - c0
                    rnd[name] = {
                        "streams": len(total),
                        "stream_failures": failed,
                        "ttft_p50_ms": 1e3 * pct(ttft, 0.5),
                        "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
                        "latency_p50_ms": 1e3 * pct(total, 0.5),
                        "latency_p99_ms": 1e3 * pct(total, 0.99),
                        "rps": ok / wall,
                        "non_200": bad,
                    }
                    if name in cpu_of:
                        rnd[name]["rps_per_cpu_s"] = ok / cpu if cpu > 0 else float("nan")
                rounds.append(rnd)
        finally:
            procs.close()
    out: dict[str, Any] = {"rounds": rounds, "median": {}}
    for name in rounds[0]:
        keys = rounds[0][name].keys()
        out["median"][name] = {k: statistics.median(r[name][k] for r in rounds) for k in keys}
    for name in [n for n in rounds[0] if n != "direct"]:
        for k in ("ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms", "latency_p99_ms"):
            out["median"][name][f"added_{k}"] = statistics.median(r[name][k] - r["direct"][k] for r in rounds)
    return out


async def classes(seconds: float, fallback: bool) -> dict[str, Any]:
    """Two classes over a limit of 4 (0.1 s requests): 20 high + 40 low closed-loop clients.

    High alone would fill the upstream (20 clients, 4 slots: ~0.5 s queue); low is what overloads it.

    Returns per class: requests, p50/p99 queue wait (from the gateway's records), shed (429),
    spilled, client-visible errors.
    """
    import aiohttp

    from rackguard.agent import config as configmod
    from rackguard.agent.gateway.server import Gateway
    from rackguard.bench.fake_openai import FakeUpstream

    up, fb = FakeUpstream("a", delay_s=0.1), FakeUpstream("fallback", delay_s=0.1)
    await up.start()
    await fb.start()
    g: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "upstreams": [{"name": "a", "url": up.url, "gpus": [0]}],
        "safe_cap": 4,
        "classes": [
            {"name": "high", "priority": 10, "max_queue_s": 1.0},
            {"name": "low", "priority": 0, "max_queue_s": 0.5},
        ],
    }
    if fallback:
        g["fallback"] = {"url": fb.url}
    cfg = configmod.validate({"mqtt": {"port": free_port()}, "http": {"port": 0}, "gateway": g})
    gw = Gateway(cfg)
    await gw.start()
    waits: dict[str, list[float]] = {"high": [], "low": []}
    status: dict[str, dict[int, int]] = {"high": {}, "low": {}}
    stop = time.monotonic() + seconds
    orig = gw._observe

    def observe(rec: Any, outcome: str, u: Any) -> None:
        if outcome == "ok":
            waits[rec.cls.name].append(rec.queue_wait_s)
        orig(rec, outcome, u)

    gw._observe = observe  # type: ignore[method-assign,assignment]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def client(cls: str) -> None:
            while time.monotonic() < stop:
                async with s.post(
                    f"http://127.0.0.1:{gw.port}/v1/chat/completions",
                    data=BODY,
                    headers={"x-rackguard-class": cls, "Content-Type": "application/json"},
                ) as r:
                    await r.read()
                    status[cls][r.status] = status[cls].get(r.status, 0) + 1
                    if r.status == 429:
                        await asyncio.sleep(0.05)

        await asyncio.gather(*(client("high") for _ in range(20)), *(client("low") for _ in range(40)))
    out = {}
    for c in ("high", "low"):
        counters = gw.upstreams[0].counters[c]
        out[c] = {
            "ok": counters.completed_total,
            "queue_wait_p50_s": pct(waits[c], 0.5),
            "queue_wait_p99_s": pct(waits[c], 0.99),
            "shed_429": counters.shed_total,
            "spilled": counters.spilled_total,
            "client_errors": sum(n for st, n in status[c].items() if st != 200),
        }
    await gw.close()
    await up.close()
    await fb.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--streams", type=int, default=200, help="concurrent SSE streams (default 200)")
    p.add_argument("--conns", type=int, default=64, help="connections for the throughput phase")
    p.add_argument("--seconds", type=float, default=6.0, help="per path, per phase, per round")
    p.add_argument(
        "--gateway-tree", type=Path, help="also run the gateway from this checkout (a same-run reference)"
    )
    p.add_argument("--lockstep", action="store_true", help="start all streams at once (bursts)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--classes", action="store_true", help="only the two-class overload (in-process)")
    p.add_argument("--bare-proxy", nargs=2, type=int, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bare_proxy:
        from rackguard.agent.commands.gateway import loop_factory

        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(bare_proxy(*args.bare_proxy))
        return 0
    if args.classes:
        res = {f"fallback={fb}": asyncio.run(classes(args.seconds, fb)) for fb in (False, True)}
        print(json.dumps(res, indent=1))
        return 0
    from rackguard.agent.commands.gateway import loop_factory

    with asyncio.Runner(loop_factory=loop_factory()) as runner:  # uvloop: the load costs less CPU
        out = runner.run(run(args))
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    med = out["median"]
    print(
        f"medians over {args.rounds} rounds ({args.streams} streams; {args.conns} connections for throughput)"
    )
    print(
        f"{'path':8} {'ttft p50':>9} {'ttft p99':>9} {'lat p50':>9} {'lat p99':>9} {'req/s':>8}  added (ttft p50/p99, lat p50/p99 ms)"
    )
    for name, m in med.items():
        added = (
            ""
            if name == "direct"
            else "  {:+.2f} / {:+.2f}, {:+.2f} / {:+.2f}".format(
                m["added_ttft_p50_ms"],
                m["added_ttft_p99_ms"],
                m["added_latency_p50_ms"],
                m["added_latency_p99_ms"],
            )
        )
        print(
            f"{name:8} {m['ttft_p50_ms']:9.2f} {m['ttft_p99_ms']:9.2f} {m['latency_p50_ms']:9.2f} "
            f"{m['latency_p99_ms']:9.2f} {m['rps']:8.0f}{added}"
        )
    print(
        f"requests per CPU-second (one-core ceiling): gateway {med['gateway']['rps_per_cpu_s']:.0f}, "
        f"bare aiohttp proxy {med['aiohttp']['rps_per_cpu_s']:.0f}"
        + (f", reference {med['reference']['rps_per_cpu_s']:.0f}" if "reference" in med else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

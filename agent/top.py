"""The state behind ``rackguard top``: what the agents publish, folded into one view.

:class:`TopState` takes every message on ``<prefix>/<site>/<rack>/<node>/{status,
telemetry,cap,claim,alarm/<sensor>}`` (:meth:`TopState.handle`, never raises) and renders a
scope with rich: one node (a row per GPU against its limits), a rack or a site (a row
per node, with its share of the rack's capacity from its claim). Everything shown comes from MQTT, so it works from any machine that may read
the topics. A node whose telemetry is older than three publish periods is ``STALE``; one
whose status is ``offline`` is ``OFFLINE``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

Scope = Literal["node", "rack", "site"]
KEY_SCOPES: dict[str, Scope] = {"n": "node", "r": "rack", "s": "site"}
MAX_PAYLOAD_BYTES = 1 << 20
LEAK_ORDER = {"ok": 0, "warning": 1, "critical": 2}


@dataclass
class NodeView:
    """The latest of each message one node published (parsed JSON objects)."""

    site: str
    rack: str
    name: str
    status: dict[str, Any] | None = None
    telemetry: dict[str, Any] | None = None
    telemetry_mono: float | None = None
    cap: dict[str, Any] | None = None
    claim: dict[str, Any] | None = None
    alarms: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.site, self.rack, self.name

    def state(self, now_mono: float) -> str:
        """``ONLINE``, ``OFFLINE`` (its status says so) or ``STALE`` (no recent telemetry)."""
        if self.status is not None and self.status.get("state") == "offline":
            return "OFFLINE"
        period = _num((self.status or {}).get("publish_period_s")) or 1.0
        if self.telemetry_mono is None or now_mono - self.telemetry_mono > 3 * period:
            return "STALE"
        return "ONLINE"

    def latched_alarms(self) -> list[dict[str, Any]]:
        return [a for a in self.alarms.values() if a.get("latched", "ok") != "ok"]


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _mean(stat: Any) -> float | None:
    return _num(stat.get("mean")) if isinstance(stat, dict) else None


def _fmt(x: float | None, nd: int = 0, unit: str = "") -> str:
    return "–" if x is None else f"{x:.{nd}f}{unit}"


class TopState:
    """Every node seen on the broker, and the scope being shown.

    Args:
        prefix: The topic prefix (``mqtt.topic_prefix``).
        site, rack, node: The node the view starts on (None: the first one seen).
        scope: ``node``, ``rack`` or ``site``.
    """

    def __init__(
        self,
        prefix: str = "rackguard",
        *,
        site: str | None = None,
        rack: str | None = None,
        node: str | None = None,
        scope: Scope = "node",
        monotonic: Any = time.monotonic,
    ) -> None:
        self.prefix = prefix
        self.focus = (site, rack, node)
        self.scope: Scope = scope
        self.nodes: dict[tuple[str, str, str], NodeView] = {}
        self.monotonic = monotonic
        self.rejected = 0

    def topic_filters(self) -> list[str]:
        site = self.focus[0] or "+"
        base = f"{self.prefix}/{site}/+/+"
        return [f"{base}/status", f"{base}/telemetry", f"{base}/cap", f"{base}/claim", f"{base}/alarm/+"]

    def handle(self, topic: str, payload: bytes) -> None:
        """Fold one message in; anything malformed is counted and ignored."""
        parts = topic.split("/")
        if len(parts) < 5 or parts[0] != self.prefix or len(payload) > MAX_PAYLOAD_BYTES:
            self.rejected += 1
            return
        site, rack, name, kind = parts[1], parts[2], parts[3], "/".join(parts[4:])
        if not payload:  # a cleared retained message
            return
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            self.rejected += 1
            return
        if not isinstance(doc, dict):
            self.rejected += 1
            return
        n = self.nodes.setdefault((site, rack, name), NodeView(site, rack, name))
        if kind == "status":
            n.status = doc
        elif kind == "telemetry":
            if doc.get("historical"):
                return  # replayed history is not the node's present
            n.telemetry, n.telemetry_mono = doc, self.monotonic()
        elif kind == "cap":
            n.cap = doc
        elif kind == "claim":
            n.claim = doc
        elif kind.startswith("alarm/"):
            n.alarms[kind.removeprefix("alarm/")] = doc
        if self.focus[2] is None:
            self.focus = (site, rack, name)

    # -- scope -------------------------------------------------------------------------------
    def set_scope(self, scope: Scope) -> None:
        self.scope = scope

    def key(self, ch: str) -> bool:
        """Handle a key press: n/r/s change the scope, tab/j/k move between nodes. False: quit."""
        if ch in ("q", "\x03"):
            return False
        if ch in ("n", "r", "s"):
            self.scope = KEY_SCOPES[ch]
        elif ch in ("\t", "j", "k") and self.nodes:
            keys = sorted(self.nodes)
            cur = keys.index(self.focus) if self.focus in keys else -1
            step = -1 if ch == "k" else 1
            self.focus = keys[(cur + step) % len(keys)]
        return True

    def in_scope(self) -> list[NodeView]:
        site, rack, name = self.focus
        out = []
        for key, n in sorted(self.nodes.items()):
            if self.scope == "node" and key != (site, rack, name):
                continue
            if self.scope == "rack" and (n.site, n.rack) != (site, rack):
                continue
            if self.scope == "site" and n.site != site:
                continue
            out.append(n)
        return out

    # -- rendering ---------------------------------------------------------------------------
    def render(self) -> RenderableType:
        now = self.monotonic()
        site, rack, name = self.focus
        where = {"node": f"{site}/{rack}/{name}", "rack": f"{site}/{rack}", "site": f"{site}"}[self.scope]
        head = Text.assemble(
            ("rackguard top", "bold"),
            f"  scope: {self.scope} {where}  ",
            ("[n]ode [r]ack [s]ite  tab/j/k: next node  q: quit", "dim"),
        )
        nodes = self.in_scope()
        if not nodes:
            return Group(head, Text("waiting for agents on the broker ..."))
        parts: list[RenderableType] = [head]
        if self.scope == "node":
            n = nodes[0]
            parts += [self._node_header(n, now), self._gpu_table(n), self._coolant_line(n)]
        else:
            parts.append(self._node_table(nodes, now))
            if self.scope == "rack":
                parts.append(self._rack_line(nodes))
        alarms = [(n, a) for n in nodes for a in n.latched_alarms()]
        if alarms:
            for n, a in alarms:
                parts.append(
                    Text(
                        f"LEAK ALARM {n.name} {a.get('sensor')}: reads {str(a.get('state')).upper()}, "
                        f"latched {str(a.get('latched')).upper()}"
                        + (" (needs an OK reading and ack-leak)" if a.get("ack_required") else ""),
                        style="bold white on red",
                    )
                )
        else:
            parts.append(Text("no leak alarms", style="green"))
        return Group(*parts)

    def _cap_text(self, n: NodeView) -> str:
        c = n.cap
        if c is None:
            return "cap: none yet"
        extra = ""
        if c.get("manual_ceiling") is not None:
            extra += f", manual ceiling {c['manual_ceiling']}"
        if c.get("mpc_paused"):
            extra += ", MPC paused"
        return f"cap {c.get('total')} (safe_cap {c.get('safe_cap')}) reason {c.get('reason')} binding {c.get('binding')}{extra}"

    def _node_header(self, n: NodeView, now: float) -> Text:
        state = n.state(now)
        style = {"ONLINE": "green", "STALE": "yellow", "OFFLINE": "bold red"}[state]
        return Text.assemble((f"{n.name} {state}", style), "  ", self._cap_text(n), self._share_text(n))

    @staticmethod
    def _share_text(n: NodeView) -> Text:
        c = n.claim
        if c is None:
            return Text("")
        share, cap = _num(c.get("share_w")), _num(c.get("capacity_w"))
        return Text.assemble(
            f"  rack share {_fmt(share, 0, ' W')} of {_fmt(cap, 0, ' W')}",
            ("  FALLBACK" if c.get("fallback") is True else "", "bold yellow"),
        )

    @staticmethod
    def _rack_line(nodes: list[NodeView]) -> Text:
        """The rack's split: the shares in force against the capacity the members see."""
        claims = [n.claim for n in nodes if n.claim is not None]
        if not claims:
            return Text("rack: no claims (not coordinated)", style="dim")
        shares = [s for c in claims if (s := _num(c.get("share_w"))) is not None]
        caps = [x for c in claims if (x := _num(c.get("capacity_w"))) is not None]
        fallback = [n.name for n in nodes if n.claim is not None and n.claim.get("fallback") is True]
        over = bool(caps) and sum(shares) > min(caps)
        return Text.assemble(
            "rack: shares ",
            (_fmt(sum(shares), 0, " W"), "bold red" if over else "green"),
            f" of capacity {_fmt(min(caps) if caps else None, 0, ' W')} ({len(claims)} claims)",
            ("  fallback: " + ", ".join(fallback), "bold yellow") if fallback else "",
        )

    def _gpu_table(self, n: NodeView) -> Table:
        t = Table(box=None, pad_edge=False)
        for col in ("GPU", "state", "power W / limit", "die °C / limit", "HBM °C / limit", "util %", "cap"):
            t.add_column(col, justify="right" if col != "state" else "left")
        inventory = {g.get("index"): g for g in (n.status or {}).get("gpus", []) if isinstance(g, dict)}
        caps = (n.cap or {}).get("caps") or []
        for g in (n.telemetry or {}).get("gpus", []):
            if not isinstance(g, dict):
                continue
            i = g.get("index")
            th = (inventory.get(i) or {}).get("thresholds") or {}
            die_limit = _num(th.get("gpu_max_c")) or _num(th.get("slowdown_c"))
            die, hbm = _mean(g.get("gpu_temp_c")), _mean(g.get("mem_temp_c"))
            hot = die is not None and die_limit is not None and die >= die_limit - 2
            state = str(g.get("state", "?")).upper()
            t.add_row(
                f"GPU {i}",
                Text(state, style="bold red" if state != "OK" else "green"),
                f"{_fmt(_mean(g.get('power_w')))} / {_fmt(_num(g.get('power_limit_w')))}",
                Text(f"{_fmt(die, 1)} / {_fmt(die_limit)}", style="bold red" if hot else ""),
                f"{_fmt(hbm, 1)} / {_fmt(_num(th.get('mem_max_c')))}",
                _fmt(_mean(g.get("util_pct"))),
                str(caps[i]) if isinstance(i, int) and 0 <= i < len(caps) else "–",
            )
        return t

    def _coolant_line(self, n: NodeView) -> Text:
        c = (n.telemetry or {}).get("coolant")
        if not isinstance(c, dict):
            return Text("coolant: no sensors declared", style="dim")
        margin = _num(c.get("flow_margin"))
        stale = [
            s.get("id") for s in c.get("sensors", []) if isinstance(s, dict) and s.get("state") == "stale"
        ]
        return Text.assemble(
            "coolant: supply ",
            _fmt(_num(c.get("supply_temp_c")), 1, " °C"),
            "  return ",
            _fmt(_num(c.get("return_temp_c")), 1, " °C"),
            "  flow ",
            _fmt(_num(c.get("flow_lpm")), 1, " L/min"),
            "  margin ",
            (_fmt(margin, 2), "bold red" if margin is not None and margin < 1.1 else "green"),
            "  heat ",
            _fmt(_num(c.get("heat_removed_w")), 0, " W"),
            ("  STALE: " + ", ".join(map(str, stale)), "bold yellow") if stale else "",
        )

    def _node_table(self, nodes: list[NodeView], now: float) -> Table:
        t = Table(box=None, pad_edge=False)
        for col in (
            "node",
            "state",
            "GPUs ok",
            "power W",
            "max die °C",
            "cap",
            "reason",
            "binding",
            "share W",
            "flow margin",
            "leak",
        ):
            t.add_column(col)
        for n in nodes:
            gpus = [g for g in (n.telemetry or {}).get("gpus", []) if isinstance(g, dict)]
            ok = sum(1 for g in gpus if g.get("state") == "ok")
            powers = [p for g in gpus if (p := _mean(g.get("power_w"))) is not None]
            temps = [x for g in gpus if (x := _mean(g.get("gpu_temp_c"))) is not None]
            coolant = (n.telemetry or {}).get("coolant") or {}
            cap = n.cap or {}
            state = n.state(now)
            leak = str(coolant.get("leak", "–")) if isinstance(coolant, dict) else "–"
            for a in n.latched_alarms():  # an alarm arrives before the next telemetry shows it
                if LEAK_ORDER.get(str(a.get("latched")), 0) > LEAK_ORDER.get(leak, 0):
                    leak = str(a.get("latched"))
            t.add_row(
                f"{n.rack}/{n.name}" if self.scope == "site" else n.name,
                Text(state, style={"ONLINE": "green", "STALE": "yellow", "OFFLINE": "bold red"}[state]),
                f"{ok}/{len(gpus)}",
                _fmt(sum(powers) if powers else None),
                _fmt(max(temps) if temps else None, 1),
                str(cap.get("total", "–")),
                str(cap.get("reason", "–")),
                str(cap.get("binding", "–")),
                _fmt(_num((n.claim or {}).get("share_w"))),
                _fmt(_num(coolant.get("flow_margin")) if isinstance(coolant, dict) else None, 2),
                Text(leak.upper(), style="bold red" if leak not in ("ok", "–") else ""),
            )
        return t

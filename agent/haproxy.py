"""HAProxy's runtime API: set each server's ``maxconn`` to the sum of its GPUs' caps.

HAProxy changes a server's ``maxconn`` live (``set maxconn server B/S N`` on its stats
socket, which needs ``level admin``); requests over it wait in HAProxy's queue. This
module talks to that socket (blocking; callers run it in a thread), one command per
connection.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

from rackguard.agent.config import HaproxyConfig


class HaproxyError(Exception):
    """The runtime API refused a command or could not be reached."""


class HaproxyRuntime:
    """One HAProxy stats socket.

    Args:
        path: The UNIX socket (``stats socket PATH level admin``).
        timeout_s: Per command.
    """

    def __init__(self, path: Path | str, timeout_s: float = 1.0) -> None:
        self.path, self.timeout_s = str(path), timeout_s

    def command(self, cmd: str) -> str:
        """Send one command; return HAProxy's answer (raises HaproxyError on a socket error)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout_s)
                s.connect(self.path)
                s.sendall(cmd.encode() + b"\n")
                chunks = []
                while chunk := s.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise HaproxyError(f"{self.path}: {exc.strerror or exc}") from exc
        return b"".join(chunks).decode(errors="replace")

    def set_maxconn(self, backend: str, server: str, maxconn: int) -> None:
        answer = self.command(f"set maxconn server {backend}/{server} {int(maxconn)}").strip()
        if answer:
            raise HaproxyError(f"set maxconn {backend}/{server}: {answer[:200]}")

    def maxconn(self, backend: str, server: str) -> int | None:
        """The server's current ``maxconn`` (the stats' ``slim``); None if unlimited or not found."""
        lines = self.command("show stat").splitlines()
        if not lines or not lines[0].startswith("# "):
            raise HaproxyError(f"show stat: {lines[:1]}")
        header = lines[0][2:].split(",")
        px, sv, slim = header.index("pxname"), header.index("svname"), header.index("slim")
        for line in lines[1:]:
            f = line.split(",")
            if len(f) > slim and f[px] == backend and f[sv] == server:
                return int(f[slim]) if f[slim] else None
        return None


def maxconns(cfg: HaproxyConfig, caps: Sequence[int] | None, safe_cap: int) -> dict[str, int]:
    """Each server's ``maxconn``: the sum of its GPUs' caps, or ``safe_cap`` per GPU without caps.

    A GPU the caps do not cover counts as ``safe_cap``. HAProxy reads ``maxconn 0`` as
    "no limit", so a server whose caps sum to 0 gets 1 (the least it can be held to).
    """
    out = {}
    for s in cfg.servers:
        total = sum(caps[g] if caps is not None and g < len(caps) else safe_cap for g in s.gpus)
        out[s.name] = max(total, 1)
    return out

"""Must-show: the daemon cannot tell a simulated node from a real one.

``agent/daemon.py`` names no simulator, and no module in ``agent/`` asks a backend what it is
(``isinstance``/``hasattr``/``getattr`` on anything called backend): device writes are
capabilities the backend declares (``GpuBackend.supports``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"
INTROSPECTION = {"isinstance", "hasattr", "getattr", "type"}


def inspections(source: str) -> list[str]:
    """Calls like ``hasattr(self.backend, ...)`` in a module's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        call = node if isinstance(node, ast.Call) else None
        if call is None or not isinstance(call.func, ast.Name) or call.func.id not in INTROSPECTION:
            continue
        if call.args and "backend" in ast.unparse(call.args[0]).lower():
            found.append(f"{call.lineno}: {ast.unparse(call)}")
    return found


def test_daemon_has_no_reference_to_the_simulator() -> None:
    text = (AGENT / "daemon.py").read_text()
    assert not re.search(r"\bsim\b|Sim[A-Z]|\.sim\.|sim_", text)


def test_nothing_in_agent_inspects_a_backend() -> None:
    offenders = {p.name: found for p in sorted(AGENT.rglob("*.py")) if (found := inspections(p.read_text()))}
    assert offenders == {}


def test_the_check_catches_what_main_did() -> None:
    old = "if isinstance(self.backend, SimBackend): pass\nf = getattr(self.backend, 'served', None)"
    assert len(inspections(old)) == 2

"""``rackguard bench``: benchmarks. The parsers and commands live in :mod:`rackguard.bench.cli`."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add ``bench`` (``controllers``, ``agent``, ``fleet``)."""
    from rackguard.bench import cli

    cli.register(sub)

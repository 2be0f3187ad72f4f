"""rackguard: keeps liquid-cooled GPU racks safe and busy.

The repository keeps ``agent/``, ``controllers/`` and ``sensors/`` (and ``sim/``, ``bench/``) at its
top; this package links them in, so everything imports as ``rackguard.<layer>.<module>`` and an
installed wheel holds one top-level name.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rackguard")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

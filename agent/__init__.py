"""rackguard agent: the daemon, its config, MQTT, actuators and CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rackguard")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

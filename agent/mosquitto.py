"""A local mosquitto for benchmarks and tests: one launcher, used by both.

``stop``/``start`` make an outage on the same port. With ``persistence``, the
broker keeps sessions (a persistent subscriber's queue) across the outage.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Mosquitto:
    """A mosquitto on 127.0.0.1:port, configured in ``workdir``.

    Attributes:
        extra_conf: Lines appended to the generated mosquitto.conf (TLS, ACLs, …).
        anonymous: Allow clients without credentials.
        persistence: Keep sessions and queued messages across stop/start.
        nodelay: ``set_tcp_nodelay true``, as deployments should (see BENCHMARKS.md).
    """

    port: int
    workdir: Path
    extra_conf: str = ""
    anonymous: bool = True
    persistence: bool = False
    nodelay: bool = True
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def conf(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log(self) -> Path:
        return self.workdir / "mosquitto.log"

    def _write_conf(self) -> None:
        lines = [f"listener {self.port} {self.host}", f"allow_anonymous {str(self.anonymous).lower()}"]
        if self.persistence:
            db = self.workdir / "mosquitto-db"
            db.mkdir(exist_ok=True)
            # mosquitto started as root drops to user mosquitto, which must reach and write the db.
            self.workdir.chmod(self.workdir.stat().st_mode | 0o011)
            db.chmod(0o777)
            lines += ["persistence true", f"persistence_location {db}/", "max_queued_messages 100000"]
        else:
            lines.append("persistence false")
        lines.append("sys_interval 1")
        if self.nodelay:
            lines.append("set_tcp_nodelay true")  # no Nagle delay on small QoS 1 messages
        self.conf.write_text("\n".join(lines) + "\n" + self.extra_conf + "\n")

    def start(self) -> None:
        """Start and wait until it accepts connections (RuntimeError if it does not)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_conf()
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

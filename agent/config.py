"""Configuration: TOML validated by pydantic v2, unknown keys forbidden.

Load order: built-in defaults < TOML file < environment ``RACKGUARD_<SECTION>__<KEY>``
(e.g. ``RACKGUARD_MQTT__PORT=1884``). Values from the environment are strings;
pydantic coerces them to the field's type.

Secrets are never values in the file: they are paths (``mqtt.password_file``),
resolved against ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``) when
relative and that variable is set. Validation reads them once (readable, UTF-8,
long enough, TLS files parse), so ``check-config`` rejects whatever ``run`` would;
the agent reads them again when it needs them.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import socket
import ssl
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rackguard.controllers.thermal import ThermalParams, params_from_model
from rackguard.physics import WATER_CP_J_PER_KG_K, WATER_DENSITY_KG_PER_L
from rackguard.sensors.coolant import CoolantSensor

ENV_PREFIX = "RACKGUARD_"
_TOPIC_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
HMAC_SECRET_MIN_BYTES = 32  # RFC 2104: a key shorter than the hash's output (SHA-256: 32 bytes) weakens it


class ConfigError(Exception):
    """An invalid configuration. ``errors`` holds ``(key_path, reason)`` pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{k}: {r}" for k, r in errors))

    def render(self) -> str:
        return "\n".join(f"config error: {key}: {reason}" for key, reason in self.errors)


Reload = Literal["live", "restart"]
LIVE: Reload = "live"
RESTART: Reload = "restart"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    # How SIGHUP treats each field: "live" = the running component takes the new value
    # (its ``reconfigure(cfg)``); "restart" = kept until the agent restarts, and named in
    # the ``reloaded needs_restart=[...]`` log line. Every field is declared (a test checks).
    RELOAD: ClassVar[dict[str, Reload]] = {}


def resolve_secret_path(path: Path) -> Path:
    """Resolve a secret's path: relative paths live in ``$CREDENTIALS_DIRECTORY`` when set."""
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and cred_dir:
        return Path(cred_dir) / path
    return path


_SECRET_MAX_BYTES = 64 * 1024


def _read_secret_file(path: Path, limit: int = 0) -> tuple[Path, bytes]:
    """Resolve a secret or TLS file and read up to ``limit`` bytes; the error says where it looked."""
    resolved = resolve_secret_path(path)
    try:
        with resolved.open("rb") as f:
            return resolved, f.read(limit)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if path.is_absolute():
            raise ValueError(f"cannot read {str(path)!r}: {why}") from None
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir:
            where = f"looked in $CREDENTIALS_DIRECTORY ({cred_dir})"
        else:
            where = (
                f"$CREDENTIALS_DIRECTORY is unset, so it looked in the working directory ({Path.cwd()}); "
                "under systemd, add LoadCredential= to the unit; by hand, run with "
                "CREDENTIALS_DIRECTORY=/etc/rackguard/credentials or give an absolute path"
            )
        raise ValueError(f"cannot read {str(path)!r}: {why} ({where})") from None


def _readable_secret(path: Path | None) -> Path | None:
    if path is None:
        return None
    return _read_secret_file(path)[0]


def _secret_value(raw: bytes, path: Path) -> str:
    """A secret file's value: its first line, stripped (what :func:`read_secret` returns)."""
    if len(raw) > _SECRET_MAX_BYTES:
        raise ValueError(f"{str(path)!r} is over {_SECRET_MAX_BYTES // 1024} KiB: not a secret file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{str(path)!r} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})"
        ) from None
    value = text.splitlines()[0].strip() if text else ""
    if not value:
        raise ValueError(f"{str(path)!r} is empty (the secret is its first line)")
    if "\x00" in value:
        raise ValueError(f"{str(path)!r} contains a NUL character")
    return value


def _valid_secret(path: Path | None, min_bytes: int = 1) -> Path | None:
    """A secret file that is readable, UTF-8 and at least ``min_bytes`` long: its resolved path."""
    if path is None:
        return None
    resolved, raw = _read_secret_file(path, _SECRET_MAX_BYTES + 1)
    n = len(_secret_value(raw, resolved).encode())
    if n < min_bytes:
        raise ValueError(
            f"{str(resolved)!r} holds a {n}-byte secret; at least {min_bytes} bytes are needed "
            "(make one with: openssl rand -hex 32)"
        )
    return resolved


def read_secret(path: Path) -> SecretStr:
    """Read a secret file (first line, stripped)."""
    text = path.read_text(encoding="utf-8")
    return SecretStr(text.splitlines()[0].strip() if text else "")


def _host(v: str) -> str:
    """An IP address or a host name (RFC 1123 labels; ``_`` tolerated); not resolved here."""
    try:
        ipaddress.ip_address(v)
        return v
    except ValueError:
        pass
    name = v.removesuffix(".")
    if not name or len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        raise ValueError("must be an IP address or a host name")
    return v


def topic_filter(v: str) -> str:
    """An MQTT topic filter: ``+`` fills a whole level, ``#`` only as the whole last level, no NUL."""
    if not v:
        raise ValueError("an MQTT topic filter cannot be empty")
    if "\x00" in v:
        raise ValueError("an MQTT topic filter cannot contain NUL")
    levels = v.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError("'#' must be the whole last level of an MQTT topic filter (e.g. 'bms/#')")
        if "+" in level and level != "+":
            raise ValueError("'+' must be a whole level of an MQTT topic filter (e.g. 'bms/+/leak')")
    return v


def _bind_address(v: str) -> str:
    """A local address to listen on: an IP address, or ``localhost`` (no DNS lookup at start)."""
    if v != "localhost":
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(
                "must be an IP address to listen on (e.g. 127.0.0.1, 0.0.0.0, ::) or localhost"
            ) from None
    return v


def _no_nul_path(v: Path) -> Path:
    if "\x00" in str(v):
        raise ValueError("a path cannot contain NUL")
    return v


Host = Annotated[str, AfterValidator(_host)]
BindAddress = Annotated[str, AfterValidator(_bind_address)]
FilePath = Annotated[Path, AfterValidator(_no_nul_path)]
# MQTT strings are at most 65,535 UTF-8 bytes, with no NUL.
NoNul = Annotated[str, Field(max_length=65_535 // 4, pattern=r"^[^\x00]*$")]
TopicFilter = Annotated[str, Field(max_length=256), AfterValidator(topic_filter)]


def _no_key_password() -> bytes:
    raise ValueError("the key is encrypted; rackguard needs an unencrypted key (protect it by file mode)")


def _tls_context() -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _ssl_reason(exc: Exception) -> str:
    return re.sub(r" \(_ssl\.c:\d+\)", "", str(exc))


TopicSafe = Annotated[str, Field(min_length=1, max_length=64, pattern=_TOPIC_SAFE.pattern)]


class NodeConfig(_Section):
    RELOAD: ClassVar[dict[str, Reload]] = {"site": RESTART, "rack": RESTART, "name": RESTART}

    site: TopicSafe = "site"
    rack: TopicSafe = "rack"
    name: TopicSafe = Field(
        default_factory=lambda: re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64]
    )


class TlsConfig(_Section):
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("ca_file", "cert_file")
    @classmethod
    def _certificate(cls, v: Path | None) -> Path | None:
        """Readable and holding at least one PEM certificate (as the TLS handshake will load it)."""
        resolved = _readable_secret(v)
        if resolved is not None:
            try:
                _tls_context().load_verify_locations(cafile=resolved)
            except (ssl.SSLError, ValueError) as exc:
                raise ValueError(f"{str(resolved)!r} is not a PEM certificate ({_ssl_reason(exc)})") from None
        return resolved

    @field_validator("key_file")
    @classmethod
    def _key(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        """Readable, an unencrypted PEM private key, and the key of ``cert_file``."""
        resolved = _readable_secret(v)
        cert = info.data.get("cert_file")
        if resolved is not None and cert is not None:
            try:
                _tls_context().load_cert_chain(cert, resolved, password=_no_key_password)
            except ssl.SSLError as exc:
                raise ValueError(
                    f"{str(resolved)!r} is not the PEM private key of cert_file ({_ssl_reason(exc)})"
                ) from None
        return resolved

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MqttConfig(_Section):
    RELOAD: ClassVar[dict[str, Reload]] = {
        f: RESTART
        for f in (
            "host",
            "port",
            "keepalive_s",
            "username",
            "password_file",
            "client_id",
            "topic_prefix",
            "tls",
            "reconnect_min_s",
            "reconnect_max_s",
            "publish_timeout_s",
        )
    }

    host: Host = "localhost"
    port: int = Field(default=1883, ge=1, le=65535)
    keepalive_s: int = Field(default=15, ge=2, le=3600)
    username: NoNul | None = None
    password_file: Path | None = None
    client_id: NoNul | None = None
    topic_prefix: TopicSafe = "rackguard"
    tls: TlsConfig | None = None
    reconnect_min_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    publish_timeout_s: float = Field(default=10.0, gt=0, le=300)

    @field_validator("password_file")
    @classmethod
    def _password_readable(cls, v: Path | None) -> Path | None:
        return _valid_secret(v)

    @model_validator(mode="after")
    def _checks(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs username")
        return self

    def password(self) -> SecretStr | None:
        """The broker password, read from its file now (so rotation needs no restart)."""
        return read_secret(self.password_file) if self.password_file else None


class SimConfig(_Section):
    """The simulated node used by ``backend = "sim"``."""

    RELOAD: ClassVar[dict[str, Reload]] = {
        f: RESTART
        for f in ("gpus", "seed", "offered_concurrency", "supply_temp_c", "flow_lpm", "ambient_noise_c")
    }

    gpus: int = Field(default=8, ge=1, le=64)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    offered_concurrency: float = Field(default=256.0, ge=0, le=1e6)
    supply_temp_c: float = Field(default=32.0, ge=0, le=80)
    flow_lpm: float = Field(default=12.0, gt=0, le=1000)
    ambient_noise_c: float = Field(default=0.2, ge=0, le=5)


class SensorsConfig(_Section):
    RELOAD: ClassVar[dict[str, Reload]] = {
        "backend": RESTART,
        "gpu_indices": RESTART,
        "poll_period_s": LIVE,
        "slow_period_s": LIVE,
        "read_timeout_s": LIVE,
        "lost_retry_min_s": LIVE,
        "lost_retry_max_s": LIVE,
    }

    backend: Literal["nvml", "sim"] = "nvml"
    poll_period_s: float = Field(default=0.1, ge=0.01, le=60)
    slow_period_s: float = Field(default=1.0, ge=0.01, le=600)
    read_timeout_s: float = Field(default=0.5, gt=0, le=30)
    lost_retry_min_s: float = Field(default=1.0, gt=0, le=600)
    lost_retry_max_s: float = Field(default=60.0, gt=0, le=3600)
    gpu_indices: list[Annotated[int, Field(ge=0)]] | None = None

    @model_validator(mode="after")
    def _periods(self) -> SensorsConfig:
        if self.slow_period_s < self.poll_period_s:
            raise ValueError("slow_period_s must be >= poll_period_s")
        if self.lost_retry_max_s < self.lost_retry_min_s:
            raise ValueError("lost_retry_max_s must be >= lost_retry_min_s")
        return self


class TelemetryConfig(_Section):
    RELOAD: ClassVar[dict[str, Reload]] = {"publish_period_s": LIVE}

    publish_period_s: float = Field(default=1.0, ge=0.05, le=3600)


class OutboxConfig(_Section):
    """The durable queue of telemetry and alarms waiting for the broker (agent/outbox.py)."""

    RELOAD: ClassVar[dict[str, Reload]] = {
        "path": RESTART,
        "synchronous": RESTART,
        "max_messages": LIVE,
        "replay_rate_msgs_s": LIVE,
    }

    path: FilePath | None = Field(
        default=None,
        description="SQLite file; relative paths (and the default, outbox.sqlite) live in "
        "$STATE_DIRECTORY when systemd sets it. Unset and no $STATE_DIRECTORY: in memory only.",
    )
    max_messages: int = Field(default=100_000, ge=10, le=10_000_000)
    replay_rate_msgs_s: float = Field(default=50.0, gt=0, le=100_000, description="history replay rate")
    synchronous: Literal["full", "normal"] = Field(
        default="full", description="full: fsync the WAL per commit; normal: per checkpoint"
    )

    def resolved_path(self, environ: Mapping[str, str] | None = None) -> Path | None:
        """Where the database lives: under ``$STATE_DIRECTORY`` when set, else ``path`` (or None)."""
        environ = os.environ if environ is None else environ
        state = environ.get("STATE_DIRECTORY", "").split(":")[0]
        if state and (self.path is None or not self.path.is_absolute()):
            return Path(state) / (self.path or "outbox.sqlite")
        return self.path


class HttpConfig(_Section):
    RELOAD: ClassVar[dict[str, Reload]] = {"host": RESTART, "port": RESTART}

    host: BindAddress = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535, description="0 disables the HTTP server")


MODEL_FILE_MAX_BYTES = 1 << 20


def read_thermal_model(path: Path) -> tuple[ThermalParams, dict[str, Any]]:
    """Read a thermal model file (``rackguard model fit --out``).

    Returns:
        The parameters and the whole JSON object.

    Raises:
        ValueError: Unreadable, not JSON, or not a valid model (the reason says which).
    """
    try:
        if (size := Path(path).stat().st_size) > MODEL_FILE_MAX_BYTES:
            raise ValueError(f"{path} is {size} bytes; a model file is at most {MODEL_FILE_MAX_BYTES}")
        model = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    try:
        return params_from_model(model), model
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


class ControlConfig(_Section):
    """The MPC, the safety layer and the published cap."""

    RELOAD: ClassVar[dict[str, Reload]] = {
        f: LIVE
        for f in (
            "period_s",
            "cap_ttl_s",
            "cap_refresh_s",
            "gpu_temp_max_c",
            "mem_temp_max_c",
            "slowdown_c",
            "margin_c",
            "node_power_budget_w",
            "min_cap",
            "max_cap",
            "safe_cap",
            "leak_cap",
            "cap_rise_per_s",
            "thermal_model_file",
            "node_power_ramp_w_per_s",
            "tpot_slo_s",
        )
    }

    period_s: float = Field(default=1.0, ge=0.05, le=60)
    cap_ttl_s: float = Field(default=10.0, ge=1, le=3600, description="MQTT 5 expiry of the cap message")
    cap_refresh_s: float = Field(
        default=3.0, ge=0.1, le=3600, description="republish an unchanged cap this often"
    )
    gpu_temp_max_c: float | None = Field(
        default=None, ge=30, le=120, description="default: the GPU's 'GPU max'"
    )
    mem_temp_max_c: float | None = Field(
        default=None, ge=30, le=120, description="default: the GPU's 'memory max'"
    )
    slowdown_c: float | None = Field(default=None, ge=30, le=120, description="default: the GPU's slowdown")
    margin_c: float = Field(default=2.0, ge=0, le=30)
    node_power_budget_w: float | None = Field(default=None, gt=0, le=1e6)
    min_cap: int = Field(default=1, ge=0)
    max_cap: int = Field(default=256, ge=1, le=100_000)
    safe_cap: int = Field(default=8, ge=0)
    leak_cap: int = Field(default=4, ge=0)
    cap_rise_per_s: float = Field(default=32.0, gt=0, le=1e6)
    thermal_model_file: Path | None = Field(
        default=None, description="model file from `rackguard model fit --out` (default: built-in model)"
    )

    node_power_ramp_w_per_s: float | None = Field(
        default=None,
        gt=0,
        le=1e6,
        description="largest node power rise per second the MPC plans (grid smoothing)",
    )
    tpot_slo_s: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description="per-token latency SLO: caps stay at the concurrency meeting it",
    )

    @field_validator("thermal_model_file")
    @classmethod
    def _model_readable(cls, v: Path | None) -> Path | None:
        if v is not None:
            read_thermal_model(v)
        return v

    @model_validator(mode="after")
    def _caps(self) -> ControlConfig:
        for name in ("min_cap", "safe_cap", "leak_cap"):
            if getattr(self, name) > self.max_cap:
                raise ValueError(f"{name} must be <= max_cap")
        if self.cap_refresh_s >= self.cap_ttl_s:
            raise ValueError("cap_refresh_s must be < cap_ttl_s")
        return self


class CoolantConfig(_Section):
    """Coolant, CDU and leak sensors read over MQTT, and the coolant's physics (agent/coolant_monitor.py)."""

    RELOAD: ClassVar[dict[str, Reload]] = {
        f: RESTART
        for f in (
            "subscribe",
            "sensors",
            "cp_j_per_kg_k",
            "density_kg_per_l",
            "design_delta_t_c",
            "max_future_s",
            "leak_clear",
        )
    }

    subscribe: list[TopicFilter] = Field(
        default_factory=list,
        description="topic filters for the rack's sensors; a message on one that no sensor declares is rejected",
    )
    sensors: list[CoolantSensor] = Field(default_factory=list)
    cp_j_per_kg_k: float = Field(
        default=WATER_CP_J_PER_KG_K, gt=0, le=10_000, description="coolant specific heat (water)"
    )
    density_kg_per_l: float = Field(
        default=WATER_DENSITY_KG_PER_L, gt=0, le=5, description="coolant density (water)"
    )
    design_delta_t_c: float = Field(default=10.0, gt=0, le=50, description="design supply→return rise")
    max_future_s: float = Field(
        default=5.0, ge=0, le=3600, description="clock skew allowed in payload timestamps"
    )
    leak_clear: Literal["ack", "auto"] = Field(
        default="ack",
        description="ack: a leak stays latched until the detector reads OK and an operator acks",
    )

    @model_validator(mode="after")
    def _unique(self) -> CoolantConfig:
        for attr in ("id", "topic"):
            seen: set[str] = set()
            for s in self.sensors:
                if getattr(s, attr) in seen:
                    raise ValueError(f"two coolant sensors have {attr} {getattr(s, attr)!r}")
                seen.add(getattr(s, attr))
        return self


class GateConfig(_Section):
    """Reports from the inference servers' gates (agent/gate.py) on ``.../gate/<gate_id>``."""

    RELOAD: ClassVar[dict[str, Reload]] = {"report_max_age_s": LIVE}

    report_max_age_s: float = Field(
        default=3.0, gt=0, le=600, description="a gate's in-flight count older than this is ignored"
    )


class EnergyConfig(_Section):
    """Energy per token (GPU energy counters over gate-reported tokens), and its carbon and water."""

    RELOAD: ClassVar[dict[str, Reload]] = {
        "pue": LIVE,
        "grid_carbon_g_per_kwh": RESTART,
        "grid_carbon_topic": RESTART,
        "wue_l_per_kwh": RESTART,
    }

    pue: float = Field(default=1.2, ge=1.0, le=5.0, description="facility power usage effectiveness")
    grid_carbon_g_per_kwh: float | None = Field(
        default=None, ge=0, le=5000, description="grid carbon intensity (the gateway's carbon per request)"
    )
    grid_carbon_topic: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        default=None,
        description="MQTT topic carrying the grid's carbon intensity (a number, or JSON with "
        "g_per_kwh); overrides grid_carbon_g_per_kwh once a valid value arrives",
    )
    wue_l_per_kwh: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="site water usage effectiveness (the gateway's water per request)",
    )


class CommandsConfig(_Section):
    """Operator commands on ``.../cmd`` (agent/operator_commands.py), answered on ``.../cmd/ack``."""

    RELOAD: ClassVar[dict[str, Reload]] = {
        "enabled": RESTART,
        "hmac_secret_file": LIVE,
        "require_signature": LIVE,
        "max_skew_s": LIVE,
    }

    enabled: bool = True
    hmac_secret_file: Path | None = Field(
        default=None, description="HMAC-SHA256 key file; relative paths live in $CREDENTIALS_DIRECTORY"
    )
    require_signature: bool = Field(default=False, description="reject commands without a valid signature")
    max_skew_s: float = Field(
        default=30.0, gt=0, le=3600, description="a command's t_s must be within this of the agent's clock"
    )

    @field_validator("hmac_secret_file")
    @classmethod
    def _secret_readable(cls, v: Path | None) -> Path | None:
        return _valid_secret(v, HMAC_SECRET_MIN_BYTES)

    @model_validator(mode="after")
    def _needs_secret(self) -> CommandsConfig:
        if self.require_signature and self.hmac_secret_file is None:
            raise ValueError("require_signature needs hmac_secret_file")
        return self

    def secret(self) -> SecretStr | None:
        """The HMAC key, read from its file now (so rotation needs no restart)."""
        return read_secret(self.hmac_secret_file) if self.hmac_secret_file else None


class PowerLimitsConfig(_Section):
    """Optional NVML power-limit actuator (agent/power_limits.py). Needs root; off by default."""

    RELOAD: ClassVar[dict[str, Reload]] = {
        f: RESTART for f in ("enabled", "state_file", "node_power_budget_w", "min_on_reasons", "min_change_w")
    }

    enabled: bool = False
    state_file: FilePath | None = Field(
        default=None,
        description="where the original limits are saved before the first write; relative paths (and the "
        "default, power_limits.json) live in $STATE_DIRECTORY, else /var/lib/rackguard",
    )
    node_power_budget_w: float | None = Field(
        default=None,
        gt=0,
        le=1e6,
        description="split evenly across the GPUs; default: control.node_power_budget_w",
    )
    min_on_reasons: tuple[Literal["leak", "thermal", "gpu_lost", "stale"], ...] = Field(
        default=("leak", "thermal"),
        description="cap reasons that set every GPU to its device minimum",
    )
    min_change_w: float = Field(default=5.0, ge=0, le=1000, description="smaller changes are not written")

    def resolved_state_file(self, environ: Mapping[str, str] | None = None) -> Path:
        """The state file: under ``$STATE_DIRECTORY`` when set, else /var/lib/rackguard."""
        environ = os.environ if environ is None else environ
        path = self.state_file or Path("power_limits.json")
        if path.is_absolute():
            return path
        state = environ.get("STATE_DIRECTORY", "").split(":")[0]
        return Path(state or "/var/lib/rackguard") / path


class GatewayUpstream(_Section):
    """One OpenAI-compatible server behind the gateway."""

    name: TopicSafe
    url: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$", max_length=512)]
    gpus: list[Annotated[int, Field(ge=0, le=1024)]] = Field(
        min_length=1, description="the GPU indices this upstream runs on: its limit is the sum of their caps"
    )


class GatewayClass(_Section):
    """A workload class: the queue is ordered by priority (higher first), then by arrival."""

    name: TopicSafe
    priority: int = Field(ge=-1000, le=1000)
    max_queue_s: float = Field(gt=0, le=3600, description="a longer wait is shed (429) or spilled")
    reserved_share: float | None = Field(
        default=None, ge=0, le=1, description="share of each upstream's limit only this class may use"
    )
    slo_ttft_s: float | None = Field(default=None, gt=0, le=3600, description="time-to-first-token SLO")
    slo_latency_s: float | None = Field(default=None, gt=0, le=36_000, description="total latency SLO")


class GatewayFallback(_Section):
    """Where shed requests go (an air-cooled pool, a remote endpoint), and everything during a leak."""

    url: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$", max_length=512)]


def _default_classes() -> list[GatewayClass]:
    return [GatewayClass(name="default", priority=0, max_queue_s=30.0)]


class GatewayConfig(_Section):
    """``rackguard gateway``: the OpenAI-compatible admission gateway (agent/gateway/)."""

    RELOAD: ClassVar[dict[str, Reload]] = {
        f: RESTART
        for f in (
            "listen",
            "upstreams",
            "classes",
            "class_header",
            "default_class",
            "api_keys_file",
            "fallback",
            "safe_cap",
            "max_queue",
            "max_body_bytes",
            "body_timeout_s",
            "connect_timeout_s",
            "upstream_timeout_s",
            "write_timeout_s",
            "model_params",
            "gateway_id",
            "cap_url",
            "report_period_s",
            "mqtt_username",
            "mqtt_password_file",
        )
    }

    listen: Annotated[str, Field(pattern=r"^\[?[A-Za-z0-9_.:-]*\]?:\d{1,5}$")] = "127.0.0.1:8000"
    upstreams: list[GatewayUpstream] = Field(default_factory=list)
    classes: list[GatewayClass] = Field(default_factory=_default_classes, min_length=1, max_length=16)
    class_header: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,64}$")] = "x-rackguard-class"
    default_class: str | None = Field(default=None, description="default: the lowest-priority class")
    api_keys_file: Path | None = Field(
        default=None,
        description="lines 'API_KEY CLASS': a bearer key's class wins over the class header; "
        "relative paths live in $CREDENTIALS_DIRECTORY",
    )
    fallback: GatewayFallback | None = None
    safe_cap: int | None = Field(
        default=None, ge=0, le=100_000, description="per GPU; default control.safe_cap"
    )
    max_queue: int = Field(default=1000, ge=0, le=1_000_000, description="requests waiting, all classes")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=1024**3)
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600, description="to receive a request's body")
    connect_timeout_s: float = Field(default=5.0, gt=0, le=600)
    upstream_timeout_s: float = Field(default=600.0, gt=0, le=86_400, description="a whole upstream call")
    write_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="a client that reads nothing this long is dropped"
    )
    model_params: dict[Annotated[str, Field(max_length=256)], Annotated[float, Field(gt=0, le=1e15)]] = Field(
        default_factory=dict, description="parameters per model name, for FLOPs = 2 × params × tokens"
    )
    gateway_id: TopicSafe | None = Field(default=None, description="default: gw-<host>")
    cap_url: Annotated[str, Field(pattern=r"^https?://\S+$")] | None = Field(
        default=None, description="the agent's /v1/cap while the broker is unreachable; default from [http]"
    )
    report_period_s: float = Field(default=1.0, ge=0.1, le=60, description="gate reports to the agent")
    mqtt_username: str | None = Field(default=None, description="default: mqtt.username")
    mqtt_password_file: Path | None = Field(default=None, description="default: mqtt.password_file")

    @field_validator("api_keys_file", "mqtt_password_file")
    @classmethod
    def _secret_readable(cls, v: Path | None) -> Path | None:
        return _readable_secret(v)

    @model_validator(mode="after")
    def _checks(self) -> GatewayConfig:
        for attr, items in (("upstreams", self.upstreams), ("classes", self.classes)):
            names = [x.name for x in items]
            if len(set(names)) != len(names):
                raise ValueError(f"two {attr} have the same name")
        if self.default_class is not None and self.default_class not in {c.name for c in self.classes}:
            raise ValueError(f"default_class {self.default_class!r} is not a class")
        if sum(c.reserved_share or 0.0 for c in self.classes) > 1.0:
            raise ValueError("classes' reserved_share add up to more than 1")
        if self.mqtt_password_file is not None and self.mqtt_username is None:
            raise ValueError("mqtt_password_file needs mqtt_username")
        return self

    def api_keys(self) -> dict[str, str]:
        """API key → class, read from ``api_keys_file`` now (raises ValueError naming a bad line)."""
        if self.api_keys_file is None:
            return {}
        classes = {c.name for c in self.classes}
        out: dict[str, str] = {}
        for n, line in enumerate(self.api_keys_file.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or parts[1] not in classes:
                raise ValueError(f"{self.api_keys_file}:{n}: want 'API_KEY CLASS' with a known class")
            out[parts[0]] = parts[1]
        return out


class HaproxyServer(_Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    gpus: list[Annotated[int, Field(ge=0, le=1024)]] = Field(min_length=1)


class HaproxyConfig(_Section):
    """HAProxy's runtime API: each server's ``maxconn`` follows the sum of its GPUs' caps."""

    socket: Path = Field(description="the stats socket (``stats socket ... level admin``)")
    backend: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    servers: list[HaproxyServer] = Field(min_length=1)
    timeout_s: float = Field(default=1.0, gt=0, le=30)


class ActuatorsConfig(_Section):
    """Optional actuators beyond the published cap."""

    RELOAD: ClassVar[dict[str, Reload]] = {"haproxy": RESTART}

    haproxy: HaproxyConfig | None = None


class RackMember(BaseModel):
    """An expected member of the rack."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: TopicSafe
    weight: float = Field(default=1.0, gt=0, le=1000, description="share of the contended capacity")


class RackConfig(_Section):
    """One rack, one budget: the nodes share the CDU's heat capacity and the rack's power (agent/rack.py).

    Every node of the rack includes the same ``[rack]`` section. No members: not in a rack.
    """

    RELOAD: ClassVar[dict[str, Reload]] = {
        f: RESTART
        for f in (
            "members",
            "power_budget_w",
            "return_limit_c",
            "degraded_capacity_w",
            "floor_w",
            "max_node_power_w",
            "claim_lifetime_s",
            "dead_after_s",
            "backstop_factor",
            "split",
        )
    }

    members: list[RackMember] = Field(default_factory=list, description="the expected members, with weights")
    power_budget_w: float | None = Field(
        default=None, gt=0, le=10_000_000, description="the rack's GPU power"
    )
    return_limit_c: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="coolant capacity = CDU flow × cp × (return_limit_c − supply); unset: no coolant limit",
    )
    degraded_capacity_w: float = Field(
        default=0.0,
        ge=0,
        le=10_000_000,
        description="capacity that survives one pump lost at the warmest allowed supply; split by weight "
        "it is each node's fallback share",
    )
    floor_w: float = Field(default=0.0, ge=0, le=1_000_000, description="this node's floor (≤ its fallback)")
    max_node_power_w: float = Field(
        default=20_000.0, gt=0, le=1_000_000, description="a claim demanding more is absurd and rejected"
    )
    claim_lifetime_s: float = Field(
        default=3.0, gt=0, le=600, description="a claim older is stale; rack data older: fallback share"
    )
    dead_after_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="a silent peer's share (or one whose will came) is held this long, then its fallback: "
        "longer than a cut-off node takes to drain down to its fallback share",
    )
    backstop_factor: float = Field(
        default=0.8, gt=0, lt=1, description="per control period while the CDU removes more than it can"
    )
    split: Literal["coordinated", "static"] = Field(
        default="coordinated",
        description="coordinated: claims and the shared allocation; static: each node its weight's part",
    )

    def flow_fraction(self, node: str) -> float:
        """A member's part of the CDU's flow (its weight's part); 1 outside a rack."""
        total = sum(m.weight for m in self.members)
        mine = next((m.weight for m in self.members if m.name == node), total)
        return mine / total if total > 0 else 1.0

    @model_validator(mode="after")
    def _checks(self) -> RackConfig:
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError("two rack members have the same name")
        if self.members and self.power_budget_w is None and self.return_limit_c is None:
            raise ValueError("a rack needs power_budget_w or return_limit_c")
        if self.dead_after_s < self.claim_lifetime_s:
            raise ValueError("dead_after_s must be >= claim_lifetime_s")
        return self


class LogConfig(_Section):
    RELOAD: ClassVar[dict[str, Reload]] = {"level": LIVE, "format": LIVE}

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Config(_Section):
    node: NodeConfig = Field(default_factory=NodeConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    sensors: SensorsConfig = Field(default_factory=SensorsConfig)
    sim: SimConfig = Field(default_factory=SimConfig)
    coolant: CoolantConfig = Field(default_factory=CoolantConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    energy: EnergyConfig = Field(default_factory=EnergyConfig)
    commands: CommandsConfig = Field(default_factory=CommandsConfig)
    power_limits: PowerLimitsConfig = Field(default_factory=PowerLimitsConfig)
    rack: RackConfig = Field(default_factory=RackConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    actuators: ActuatorsConfig = Field(default_factory=ActuatorsConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _cross(self) -> Config:
        if self.telemetry.publish_period_s < self.sensors.poll_period_s:
            raise ValueError("telemetry.publish_period_s must be >= sensors.poll_period_s")
        if self.rack.members and self.node.name not in {m.name for m in self.rack.members}:
            raise ValueError(f"rack.members: this node ({self.node.name}) is not a member")
        if self.rack.return_limit_c is not None and not self.coolant.sensors:
            raise ValueError("rack.return_limit_c needs the CDU's coolant sensors (supply and flow)")
        return self

    def reload_modes(self) -> dict[str, Reload]:
        """``"section.field"`` → how SIGHUP applies it, for every field of every section."""
        out: dict[str, Reload] = {}
        for section, info in type(self).model_fields.items():
            model = info.annotation
            assert isinstance(model, type) and issubclass(model, _Section)
            for name in model.model_fields:
                out[f"{section}.{name}"] = model.RELOAD[name]
        return out

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data, safe to print (secrets are only paths)."""
        return self.model_dump(mode="json")


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``RACKGUARD_MQTT__PORT=1884`` → ``{"mqtt": {"port": "1884"}}``."""
    out: dict[str, Any] = {}
    for path, value in _env_paths(environ).values():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = value
    return out


def _env_paths(environ: Mapping[str, str]) -> dict[str, tuple[tuple[str, ...], str]]:
    """Each override variable → (its key path, its value)."""
    return {
        name: (tuple(name[len(ENV_PREFIX) :].lower().split("__")), value)
        for name, value in sorted(environ.items())
        if name.startswith(ENV_PREFIX) and "__" in name
    }


def _env_typos(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``RACKGUARD_MQTT_PORT`` (a section, then one ``_``): a mistyped override, which would be ignored.

    Other ``RACKGUARD_*`` variables (no section prefix) are left to whoever reads them.
    """
    out = []
    for name in sorted(environ):
        rest = name[len(ENV_PREFIX) :].lower()
        if not name.startswith(ENV_PREFIX) or "__" in rest:
            continue
        for section in Config.model_fields:
            key = rest.removeprefix(section + "_")
            if key != rest and key:
                fix = f"{ENV_PREFIX}{section.upper()}__{key.upper()}"
                out.append(
                    (
                        name,
                        f"not a config override (they are {ENV_PREFIX}<SECTION>__<KEY>); did you mean {fix}?",
                    )
                )
                break
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _models_in(tp: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's type can hold (through Optional, Annotated, list, dict, unions)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType, list, tuple, dict):
        return [m for arg in typing.get_args(tp) for m in _models_in(arg)]
    return []


def _tags(model: type[BaseModel]) -> tuple[Any, ...]:
    kind = model.model_fields.get("kind")
    return typing.get_args(kind.annotation) if kind is not None else ()


def _walk(loc: tuple[int | str, ...]) -> tuple[tuple[int | str, ...], list[str]]:
    """An error's location without union tags, and the valid keys beside its last part."""
    models: list[type[BaseModel]] = [Config]
    siblings: list[type[BaseModel]] = models
    clean: list[int | str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            clean.append(part)
            continue
        after_item = i > 0 and isinstance(loc[i - 1], int)
        tagged = [m for m in models if after_item and part in _tags(m) and part not in m.model_fields]
        if tagged:
            models = tagged  # a discriminated union's tag (e.g. coolant.sensors[0].leak): not a key
            continue
        clean.append(part)
        siblings = models
        models = [
            m
            for model in models
            if part in model.model_fields
            for m in _models_in(model.model_fields[part].annotation)
        ]
    return tuple(clean), sorted({f for m in siblings for f in m.model_fields})


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif parts:
            parts.append(f".{item}")
        else:
            parts.append(str(item))
    return "".join(parts) or "(root)"


def validate(data: Mapping[str, Any], *, env: Mapping[str, str] | None = None) -> Config:
    """Validate a plain dict; raise ConfigError naming every bad key.

    Args:
        data: The merged config.
        env: The environment its overrides came from; an error on an overridden key names the variable.
    """
    sources = _env_paths(env or {})
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc, siblings = _walk(
                tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
            )
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
                close = difflib.get_close_matches(str(loc[-1]), siblings, n=1, cutoff=0.6) if loc else []
                if close:
                    msg += f"; did you mean `{close[0]}`?"
            elif (
                "input" in err
                and not isinstance(err["input"], dict | list)
                and err["type"] != "missing"
                and not (isinstance(err["input"], str) and err["input"] and err["input"] in msg)
            ):
                msg = f"{msg} (got {err['input']!r})"
            for name, (path, value) in sources.items():
                n = min(len(path), len(loc))
                if tuple(map(str, loc[:n])) == path[:n]:
                    msg += f" (from the environment: {name}={value})"
            errors.append((_key_path(loc), msg))
        raise ConfigError(errors) from None
    except RecursionError:
        raise ConfigError([("(root)", "nested too deeply")]) from None


def _read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; any failure is a ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot read config file: {exc.strerror or exc}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [
                (
                    str(path),
                    f"not a UTF-8 text file (byte {raw[exc.start]:#04x} at offset {exc.start}); TOML is UTF-8",
                )
            ]
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([(str(path), f"invalid TOML: {exc}")]) from None
    except RecursionError:
        raise ConfigError([(str(path), "invalid TOML: arrays or tables nested too deeply")]) from None


def _anchor_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """A relative model file named in a config file is that file's neighbour, wherever the daemon runs.

    (Secrets are different: relative ones live in ``$CREDENTIALS_DIRECTORY``.)
    """
    control = data.get("control")
    if isinstance(control, dict):
        v = control.get("thermal_model_file")
        if isinstance(v, str) and v and not Path(v).is_absolute():
            control["thermal_model_file"] = str(base / v)
    return data


def load(path: Path | None = None, *, environ: Mapping[str, str] | None = None, **defaults: Any) -> Config:
    """Load and validate the config from a TOML file (or none) plus environment overrides.

    This is the one check both ``check-config`` and ``run`` (and SIGHUP) use: it parses the file,
    validates every key, and opens every secret and TLS file the agent will use.

    ``defaults`` are section dicts applied under the file (e.g. ``sensors={"backend": "sim"}``).
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = dict(defaults)
    if path is not None:
        data = _merge(data, _anchor_paths(_read_toml(path), path.parent))
    typos = _env_typos(environ)
    try:
        cfg = validate(_merge(data, env_overrides(environ)), env=environ)
    except ConfigError as exc:
        raise ConfigError(exc.errors + typos) from None
    if typos:
        raise ConfigError(typos)
    return cfg


def undeclared_reload_fields() -> list[str]:
    """Fields with no live/restart declaration (must be empty; a test checks)."""
    out = []
    for section, info in Config.model_fields.items():
        model = info.annotation
        if not (isinstance(model, type) and issubclass(model, _Section)):
            out.append(section)
            continue
        out += [f"{section}.{f}" for f in model.model_fields if f not in model.RELOAD]
        out += [f"{section}.{f} (no such field)" for f in model.RELOAD if f not in model.model_fields]
    return out


def split_reload(old: Config, new: Config) -> tuple[Config, list[str]]:
    """What SIGHUP applies: ``new`` with every changed restart field kept at its ``old`` value.

    Returns:
        The config to run with, and the changed fields that need a restart.
    """
    o, n = old.model_dump(), new.model_dump()
    kept = []
    for key, mode in old.reload_modes().items():
        section, field = key.split(".", 1)
        if mode == RESTART and o[section][field] != n[section][field]:
            kept.append(key)
            n[section][field] = o[section][field]
    return (Config.model_validate(n) if kept else new), kept

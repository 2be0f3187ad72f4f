"""Configuration: TOML validated by pydantic v2, unknown keys forbidden.

Load order: built-in defaults < TOML file < environment ``RACKGUARD_<SECTION>__<KEY>``
(e.g. ``RACKGUARD_MQTT__PORT=1884``). Values from the environment are strings;
pydantic coerces them to the field's type.

Secrets are never values in the file: they are paths (``mqtt.password_file``),
resolved against ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``) when
relative and that variable is set, and read only when needed.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from rackguard.physics import WATER_CP_J_PER_KG_K, WATER_DENSITY_KG_PER_L
from rackguard.sensors.coolant import CoolantSensor

ENV_PREFIX = "RACKGUARD_"
_TOPIC_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


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
    model_config = ConfigDict(extra="forbid", frozen=True)
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


def _readable_secret(path: Path | None) -> Path | None:
    if path is None:
        return None
    resolved = resolve_secret_path(path)
    try:
        with resolved.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read secret file {str(resolved)!r}: {exc.strerror or exc}") from None
    return resolved


def read_secret(path: Path) -> SecretStr:
    """Read a secret file (first line, stripped)."""
    text = path.read_text(encoding="utf-8")
    return SecretStr(text.splitlines()[0].strip() if text else "")


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

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        return _readable_secret(v)

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

    host: str = "localhost"
    port: int = Field(default=1883, ge=1, le=65535)
    keepalive_s: int = Field(default=15, ge=2, le=3600)
    username: str | None = None
    password_file: Path | None = None
    client_id: str | None = None
    topic_prefix: TopicSafe = "rackguard"
    tls: TlsConfig | None = None
    reconnect_min_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    publish_timeout_s: float = Field(default=10.0, gt=0, le=300)

    @field_validator("password_file")
    @classmethod
    def _password_readable(cls, v: Path | None) -> Path | None:
        return _readable_secret(v)

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
    seed: int = 0
    offered_concurrency: float = Field(default=256.0, ge=0)
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

    path: Path | None = Field(
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

    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535, description="0 disables the HTTP server")


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
    node_power_budget_w: float | None = Field(default=None, gt=0)
    min_cap: int = Field(default=1, ge=0)
    max_cap: int = Field(default=256, ge=1, le=100_000)
    safe_cap: int = Field(default=8, ge=0)
    leak_cap: int = Field(default=4, ge=0)
    cap_rise_per_s: float = Field(default=32.0, gt=0)

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

    subscribe: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
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
    """Energy per token (GPU energy counters over gate-reported tokens)."""

    RELOAD: ClassVar[dict[str, Reload]] = {"pue": LIVE}

    pue: float = Field(default=1.2, ge=1.0, le=5.0, description="facility power usage effectiveness")


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
        return _readable_secret(v)

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
    state_file: Path | None = Field(
        default=None,
        description="where the original limits are saved before the first write; relative paths (and the "
        "default, power_limits.json) live in $STATE_DIRECTORY, else /var/lib/rackguard",
    )
    node_power_budget_w: float | None = Field(
        default=None, gt=0, description="split evenly across the GPUs; default: control.node_power_budget_w"
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
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


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


def validate(data: Mapping[str, Any]) -> Config:
    """Validate a plain dict; raise ConfigError naming every bad key."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif "input" in err and not isinstance(err["input"], dict | list) and err["type"] != "missing":
                msg = f"{msg} (got {err['input']!r})"
            errors.append((_key_path(loc), msg))
        raise ConfigError(errors) from None


def load(path: Path | None = None, *, environ: Mapping[str, str] | None = None, **defaults: Any) -> Config:
    """Load and validate the config from a TOML file (or none) plus environment overrides.

    ``defaults`` are section dicts applied under the file (e.g. ``sensors={"backend": "sim"}``).
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = dict(defaults)
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = _merge(data, tomllib.load(f))
        except OSError as exc:
            raise ConfigError([(str(path), f"cannot read config file: {exc.strerror or exc}")]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([(str(path), f"invalid TOML: {exc}")]) from None
    data = _merge(data, env_overrides(environ))
    return validate(data)


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

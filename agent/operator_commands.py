"""Operator commands on ``.../cmd``, each answered on ``.../cmd/ack``.

A command is a JSON object discriminated on ``command``; unknown keys are
rejected. Every command carries an ``id`` (unique: it is the replay nonce) and
``t_s`` (wall-clock seconds; it must be within ``commands.max_skew_s`` of the
agent's clock)::

    {"command": "set_manual_ceiling", "id": "op-42", "t_s": 1764000000.0, "ceiling": 16}
    {"command": "clear_manual_ceiling", "id": "op-43", "t_s": 1764000001.0}
    {"command": "pause_mpc", "id": "op-44", "t_s": 1764000002.0}
    {"command": "resume_mpc", "id": "op-45", "t_s": 1764000003.0}
    {"command": "ack_leak", "id": "op-46", "t_s": 1764000004.0, "sensor": "leak-tray-1"}
    {"command": "rebirth", "id": "op-47", "t_s": 1764000005.0}

Signed form (required when ``commands.require_signature``): the command JSON as
a string, and the hex HMAC-SHA256 of exactly those UTF-8 bytes under the secret
in ``commands.hmac_secret_file``::

    {"signed": "{\\"command\\":\\"pause_mpc\\",\\"id\\":\\"op-44\\",\\"t_s\\":1764000002}", "sig": "<64 hex>"}

Bounds: no command can turn the safety layer off or raise a cap above
``control.max_cap``. The manual ceiling only ever lowers caps (the safety layer
applies it as a minimum); clearing it is allowed. Pausing holds the MPC's last
proposal; the safety layer keeps acting.

Order of checks: size, JSON, signature, schema, timestamp window, replayed id,
bounds, then the action. A forged command never consumes an id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import hmac
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from rackguard.agent import log as logmod
from rackguard.agent.config import CommandsConfig, Config

MAX_PAYLOAD_BYTES = 4096
MAX_REMEMBERED_IDS = 10_000  # ids inside the replay window; past this, new commands are refused
CommandId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


class _Cmd(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: CommandId
    t_s: float

    @field_validator("t_s")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("t_s must be finite")
        return v


class SetManualCeiling(_Cmd):
    """Cap every GPU at ``ceiling`` requests in flight (it only ever lowers caps)."""

    command: Literal["set_manual_ceiling"]
    ceiling: int = Field(ge=0)


class ClearManualCeiling(_Cmd):
    command: Literal["clear_manual_ceiling"]


class PauseMpc(_Cmd):
    """Hold the MPC's last proposal; the safety layer keeps acting."""

    command: Literal["pause_mpc"]


class ResumeMpc(_Cmd):
    command: Literal["resume_mpc"]


class AckLeak(_Cmd):
    """Acknowledge a leak latch (one detector, or all with ``sensor`` null)."""

    command: Literal["ack_leak"]
    sensor: str | None = Field(None, min_length=1, max_length=64)


class Rebirth(_Cmd):
    """Re-publish the birth message (``.../status``)."""

    command: Literal["rebirth"]


Command = Annotated[
    SetManualCeiling | ClearManualCeiling | PauseMpc | ResumeMpc | AckLeak | Rebirth,
    Field(discriminator="command"),
]
COMMAND: TypeAdapter[Command] = TypeAdapter(Command)
COMMAND_NAMES = frozenset(
    {"set_manual_ceiling", "clear_manual_ceiling", "pause_mpc", "resume_mpc", "ack_leak", "rebirth"}
)


class _Signed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    signed: str = Field(max_length=MAX_PAYLOAD_BYTES)
    sig: str = Field(pattern=r"^[0-9a-fA-F]{64}$")


def cmd_schema() -> dict[str, Any]:
    """JSON Schema of a message on ``.../cmd``: a command, or a signed envelope holding one."""
    schema = TypeAdapter(Command | _Signed).json_schema()
    schema["description"] = (
        "An operator command, discriminated on 'command', or {'signed': <the command JSON as a string>, "
        "'sig': <hex HMAC-SHA256 of those bytes>}. 'id' is unique (the replay nonce); 't_s' is the "
        "sender's wall clock and must be within commands.max_skew_s."
    )
    return schema


def sign(body: bytes, secret: str) -> str:
    """Hex HMAC-SHA256 of ``body`` under ``secret`` (what ``openssl dgst -sha256 -hmac`` prints)."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signed_payload(command: dict[str, Any], secret: str) -> bytes:
    """The signed wire form of a command (for operators' tools and tests)."""
    body = json.dumps(command, separators=(",", ":"))
    return json.dumps({"signed": body, "sig": sign(body.encode(), secret)}).encode()


@dataclass(frozen=True, slots=True)
class Actions:
    """What commands may do to the agent.

    Attributes:
        max_cap: ``control.max_cap``; a ceiling above it is out of bounds.
        set_manual_ceiling: Set (int) or clear (None) the operator's ceiling.
        set_mpc_paused: Pause (True) or resume (False) the MPC.
        rebirth: Re-publish the birth message.
        react: Apply the safety layer now and publish the cap; returns the cap total.
        ack_leak: The coolant monitor's ``acknowledge(sensor_id)``: returns the cleared
            detectors, raises KeyError for an unknown one. None: not available.
    """

    max_cap: int
    set_manual_ceiling: Callable[[int | None], None]
    set_mpc_paused: Callable[[bool], None]
    rebirth: Callable[[], None]
    react: Callable[[], int | None]
    ack_leak: Callable[[str | None], list[str]] | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to one message on ``.../cmd``."""

    id: str | None
    command: str | None
    accepted: bool
    reason: str
    cap_total: int | None = None


class Rejected(Exception):
    """A command that is not carried out; the message is the reason on ``cmd/ack``."""


class CommandProcessor:
    """Validates, authenticates and carries out operator commands.

    Args:
        cfg: The ``[commands]`` config section.
        actions: What commands may do.
        clock: Wall-clock seconds (tests pass their own).
    """

    def __init__(
        self, cfg: CommandsConfig, actions: Actions, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.cfg = cfg
        self.actions = actions
        self.clock = clock
        # Every accepted id whose t_s is still inside the window, and a heap to expire them.
        self._seen: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []
        self.log = logmod.get("commands")
        self._rl = logmod.RateLimitedLog(self.log, 60.0)

    def reconfigure(self, cfg: Config) -> None:
        """Reloaded ``commands.*`` (skew, signatures, key file) and the ``control.max_cap`` bound."""
        self.cfg = cfg.commands
        self.actions = dataclasses.replace(self.actions, max_cap=cfg.control.max_cap)

    def handle(self, payload: bytes) -> Outcome:
        """Process one message; never raises. Every command is logged (never the secret or signature)."""
        cid: str | None = None
        name: str | None = None
        signed = False
        try:
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise Rejected(f"malformed: payload over {MAX_PAYLOAD_BYTES} bytes")
            try:
                obj = json.loads(payload)
            except (ValueError, UnicodeDecodeError):
                raise Rejected("malformed: not JSON") from None
            if not isinstance(obj, dict):
                raise Rejected("malformed: not a JSON object")
            cid, name = _peek(obj.get("signed", "{}") if "signed" in obj else obj)
            body, signed = self._authenticate(obj)
            try:
                cmd = COMMAND.validate_json(body)
            except ValidationError as exc:
                raise Rejected(f"malformed: {_first_error(exc)}") from None
            cid, name = cmd.id, cmd.command
            self._check_fresh(cmd)
            outcome = self._execute(cmd)
            self._remember(cmd)
        except Rejected as exc:
            outcome = Outcome(cid, name, False, str(exc))
        except Exception as exc:  # an action failed: say so, never crash the MQTT handler
            self.log.exception("command_failed", id=cid, command=name)
            outcome = Outcome(cid, name, False, f"failed: {type(exc).__name__}: {exc}"[:200])
        else:
            outcome = Outcome(cid, name, True, outcome.reason, outcome.cap_total)
        if outcome.accepted:
            self.log.info(
                "command", id=outcome.id, command=outcome.command, reason=outcome.reason, signed=signed
            )
        else:
            self._rl.warning(
                "command_rejected",
                outcome.reason.split(":", 1)[0][:40],
                id=outcome.id,
                command=outcome.command,
                detail=outcome.reason,
                signed=signed,
            )
        return outcome

    def _authenticate(self, obj: dict[str, Any]) -> tuple[bytes, bool]:
        """The command's bytes, and whether they carried a valid signature."""
        if "signed" not in obj and "sig" not in obj:
            if self.cfg.require_signature:
                raise Rejected("unsigned: commands.require_signature is on")
            return json.dumps(obj).encode(), False
        try:
            env = _Signed.model_validate(obj)
        except ValidationError as exc:
            raise Rejected(f"malformed: signed envelope: {_first_error(exc)}") from None
        secret = self.cfg.secret()
        if secret is None:
            raise Rejected("unverifiable: signed, but commands.hmac_secret_file is not set")
        body = env.signed.encode()
        if not hmac.compare_digest(sign(body, secret.get_secret_value()), env.sig.lower()):
            raise Rejected("forged: bad signature")
        return body, True

    def _check_fresh(self, cmd: Command) -> None:
        now = self.clock()
        skew = self.cfg.max_skew_s
        if abs(now - cmd.t_s) > skew:
            raise Rejected(f"replayed or stale: t_s is {now - cmd.t_s:+.1f} s from now (window ±{skew:g} s)")
        self._expire(now - skew)
        if cmd.id in self._seen:
            raise Rejected(f"replayed: id {cmd.id!r} already used")
        if len(self._seen) >= MAX_REMEMBERED_IDS:
            # Forgetting an id still inside the window would let it be replayed: refuse instead.
            raise Rejected(
                f"overloaded: {MAX_REMEMBERED_IDS} commands within the ±{skew:g} s window; retry later"
            )

    def _expire(self, horizon_s: float) -> None:
        """Forget ids whose t_s can no longer pass the window (t_s < horizon)."""
        while self._expiry and self._expiry[0][0] < horizon_s:
            t_s, cid = heapq.heappop(self._expiry)
            if self._seen.get(cid) == t_s:
                del self._seen[cid]

    def _remember(self, cmd: Command) -> None:
        """Keep the id for as long as its t_s could pass the window."""
        self._seen[cmd.id] = cmd.t_s
        heapq.heappush(self._expiry, (cmd.t_s, cmd.id))

    def _execute(self, cmd: Command) -> Outcome:
        a = self.actions
        detail = "ok"
        if isinstance(cmd, SetManualCeiling):
            if cmd.ceiling > a.max_cap:
                raise Rejected(f"out of bounds: ceiling {cmd.ceiling} > control.max_cap {a.max_cap}")
            a.set_manual_ceiling(cmd.ceiling)
        elif isinstance(cmd, ClearManualCeiling):
            a.set_manual_ceiling(None)
        elif isinstance(cmd, PauseMpc | ResumeMpc):
            a.set_mpc_paused(isinstance(cmd, PauseMpc))
        elif isinstance(cmd, AckLeak):
            if a.ack_leak is None:
                raise Rejected("unavailable: no coolant monitor")
            try:
                cleared = a.ack_leak(cmd.sensor)
            except KeyError as exc:
                raise Rejected(f"unknown sensor: {exc.args[0] if exc.args else cmd.sensor}") from None
            detail = (
                f"ok: cleared {cleared}"
                if cleared
                else "ok: nothing cleared (still leaking, stale, or no latch)"
            )
        elif isinstance(cmd, Rebirth):
            a.rebirth()
            return Outcome(cmd.id, cmd.command, True, detail)
        # Everything else may change the cap: send it out now.
        return Outcome(cmd.id, cmd.command, True, detail, a.react())


def _peek(obj: Any) -> tuple[str | None, str | None]:
    """The id and command name of a payload that may not validate (for the ack)."""
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except ValueError:
            return None, None
    if not isinstance(obj, dict):
        return None, None

    def short(v: Any) -> str | None:
        return v[:64] if isinstance(v, str) else None

    return short(obj.get("id")), short(obj.get("command"))


def _first_error(exc: ValidationError) -> str:
    e = exc.errors()[0]
    loc = ".".join(str(x) for x in e["loc"]) or "(root)"
    msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
    return f"{loc}: {msg}"[:200]

"""``rackguard schema``: every topic's JSON Schema has ``$schema`` and a unique ``$id``; ``cmd`` has one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rackguard.agent.operator_commands import COMMAND_NAMES

REPO = Path(__file__).resolve().parents[2]


def test_every_schema_has_dialect_and_id_and_cmd_is_described() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rackguard.agent.cli", "schema"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    schemas = json.loads(out.stdout)
    assert set(schemas) == {
        "status",
        "telemetry",
        "cap",
        "alarm/<sensor>",
        "gate/<gate_id>",
        "cmd/ack",
        "cmd",
        "claim",
    }
    for name, s in schemas.items():
        assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        assert s["$id"].startswith("urn:rackguard:schema:"), name
        assert list(s)[:2] == ["$schema", "$id"]  # first, where a reader looks
    assert len({s["$id"] for s in schemas.values()}) == len(schemas)
    cmd = schemas["cmd"]
    mapping = cmd["anyOf"][0]["discriminator"]["mapping"]
    assert set(mapping) == COMMAND_NAMES
    ceiling = cmd["$defs"]["SetManualCeiling"]
    assert ceiling["additionalProperties"] is False and ceiling["properties"]["ceiling"]["minimum"] == 0
    assert set(ceiling["required"]) == {"id", "t_s", "command", "ceiling"}
    signed = cmd["anyOf"][1]
    signed = cmd["$defs"][signed["$ref"].rsplit("/", 1)[1]] if "$ref" in signed else signed
    assert signed["properties"]["sig"]["pattern"] == "^[0-9a-fA-F]{64}$"

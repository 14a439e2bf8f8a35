"""Generate the JSON Schemas in ``schemas/`` from the models: ``python -m events.schema_gen [--check]``.

Writes ``envelope.schema.json`` and ``payload.<type>.schema.json`` per touchpoint type; deterministic (sorted
keys, 2-space indent, trailing newline). Only files generated here are written; others are left alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from events.envelope import Envelope
from events.payloads import PAYLOAD_MODELS

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def payload_filename(type_: str) -> str:
    return f"payload.{type_}.schema.json"


def _dump(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generate() -> dict[str, str]:
    """File name -> file text of every schema this module owns."""
    out: dict[str, str] = {}
    for type_, model in sorted(PAYLOAD_MODELS.items()):
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = DIALECT
        schema["$id"] = payload_filename(type_)
        schema["title"] = f"{type_} payload"
        out[payload_filename(type_)] = _dump(schema)
    env = Envelope.model_json_schema(mode="validation")
    env["$schema"] = DIALECT
    env["$id"] = "envelope.schema.json"
    env["description"] = ("A leadledger touchpoint (schema_version 2). occurred_at/received_at carry an offset; "
                          "payload is validated by the per-type schema.")
    env["anyOf"] = [{"required": ["lead_id"]}, {"required": ["email"]}, {"required": ["anonymous_id"]}]
    env["allOf"] = [
        {"if": {"properties": {"type": {"const": t}}, "required": ["type"]},
         "then": {"properties": {"payload": {"$ref": payload_filename(t)}}}}
        for t in sorted(PAYLOAD_MODELS)
    ]
    out["envelope.schema.json"] = _dump(env)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    stale = []
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name, text in generate().items():
        path = SCHEMA_DIR / name
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(name)
        if not check:
            path.write_text(text, encoding="utf-8")
    if check and stale:
        print("stale schemas: " + ", ".join(stale), file=sys.stderr)
        return 1
    for name in stale:
        print(f"wrote schemas/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

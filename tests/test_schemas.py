"""The checked-in JSON Schemas in schemas/ must match the models (regenerate: python -m events.schema_gen)."""

from __future__ import annotations

import json

from events import schema_gen


def test_checked_in_schemas_match_models() -> None:
    generated = schema_gen.generate()
    assert "envelope.schema.json" in generated
    stale = [name for name, text in generated.items()
             if not (schema_gen.SCHEMA_DIR / name).exists()
             or (schema_gen.SCHEMA_DIR / name).read_text(encoding="utf-8") != text]
    assert not stale, f"schemas drifted from the models, run `python -m events.schema_gen`: {stale}"


def test_generation_is_deterministic_and_valid_json() -> None:
    a, b = schema_gen.generate(), schema_gen.generate()
    assert a == b
    for name, text in a.items():
        assert text.endswith("\n")
        assert json.loads(text)["$id"] == name


def test_required_payload_fields_in_schema() -> None:
    gen = schema_gen.generate()
    assert json.loads(gen["payload.page_viewed.schema.json"])["required"] == ["url"]
    assert json.loads(gen["payload.content_downloaded.schema.json"])["required"] == ["asset_id"]
    assert json.loads(gen["payload.stage_changed.schema.json"])["required"] == ["to"]
    env = json.loads(gen["envelope.schema.json"])
    assert set(env["required"]) == {"event_id", "type", "occurred_at"}

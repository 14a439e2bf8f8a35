"""Rule sets: the canonical format loads, typos and bad values fail with the path of the field, the book picks the
rule set in force by effective_from, the checked-in JSON Schema is in sync, the validate CLI."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from projections.rules import (CompiledRuleSet, RuleBook, RuleSet, RuleSetError, SCHEMA_PATH, load_rule_set,
                               load_rule_sets, parse_rule_sets, rules_schema_text, validate_main)

REPO = Path(__file__).resolve().parent.parent
CANONICAL = Path("/work/shared/examples/rules.yaml")
DEFAULT = REPO / "deploy" / "rules" / "default.yaml"

MINIMAL = """
version: v1
effective_from: "2025-12-01T00:00:00Z"
engagement: {half_life_days: 30, rules: []}
mql: {min_fit: 0, min_engagement: 0}
"""


def _errors(text: str) -> list[tuple[str, str]]:
    with pytest.raises(RuleSetError) as ei:
        parse_rule_sets(text)
    return ei.value.errors


def test_default_rules_are_the_canonical_example() -> None:
    if CANONICAL.exists():
        assert DEFAULT.read_text(encoding="utf-8") == CANONICAL.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", [DEFAULT, CANONICAL])
def test_canonical_rules_load(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} not present")
    rs = load_rule_set(path)
    assert rs.version == "2026-11-default"
    assert rs.effective_from == datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert rs.lead_attributes == ["name", "email", "company", "department", "title", "phone", "company_size"]
    assert [f.points for f in rs.fit] == [15, 10, 10, 5]
    assert rs.fit[1].in_ == ["it", "information systems", "dx", "finance", "accounting"]
    assert rs.fit[2].range is not None and (rs.fit[2].range.min, rs.fit[2].range.max) == (100, 5000)
    assert rs.engagement.half_life_days == 30
    assert len(rs.engagement.rules) == 9
    assert rs.engagement.rules[0].url_contains == ["/pricing"] and rs.engagement.rules[0].max_per_day == 2
    assert rs.engagement.rules[-1].points == -30
    assert rs.mql.min_fit == 20 and rs.mql.min_engagement == 40 and rs.mql.cooldown_days == 30
    assert rs.mql.require_qualification is False
    assert rs.intent_alerts[0].name == "document then product page"
    assert rs.intent_alerts[0].within_hours == 48
    c = CompiledRuleSet(rs)
    # dispatch by event type, in rule order; needles lower-cased; integral points kept as ints
    assert [e[0] for e in c.dispatch["page_viewed"]] == [0, 1, 7]
    assert c.dispatch["page_viewed"][0][1] == 8 and isinstance(c.dispatch["page_viewed"][0][1], int)
    assert c.fit_rules[0][3][-2:] == ("部長", "課長")
    assert c.h_s == 30 * 86400
    assert c.cooldown_s == 30 * 86400


def test_json_is_accepted_and_lists_of_rule_sets() -> None:
    doc = load_rule_set(DEFAULT).model_dump(mode="json", by_alias=True, exclude_none=True)
    rs = parse_rule_sets(json.dumps(doc))
    assert len(rs) == 1 and rs[0] == load_rule_set(DEFAULT)
    doc2 = dict(doc, version="v2", effective_from="2026-06-01T00:00:00+09:00")
    both = parse_rule_sets(json.dumps([doc, doc2]))
    assert [r.version for r in both] == ["2026-11-default", "v2"]
    multi = parse_rule_sets(MINIMAL + "\n---\n" + MINIMAL.replace("v1", "v2").replace("2025-12", "2026-02"))
    assert [r.version for r in multi] == ["v1", "v2"]


def test_error_names_the_path_of_the_bad_field() -> None:
    text = DEFAULT.read_text(encoding="utf-8").replace("      points: 10\n    - name: seminar attended",
                                                         "      points: ten\n    - name: seminar attended")
    errs = _errors(text)
    assert errs == [("engagement.rules[2].points", "Input should be a valid number, unable to parse string as a number")]
    msg = str(RuleSetError("f.yaml", errs))
    assert msg.startswith("f.yaml: engagement.rules[2].points: Input should be a valid number")


@pytest.mark.parametrize("patch, path, fragment", [
    ({"engagement": {"half_life_days": 30, "rules": [{"event": "page_viewed", "points": 1, "url_contain": "/x"}]}},
     "engagement.rules[0].url_contain", "Extra inputs are not permitted"),
    ({"engagement": {"half_life_days": 0, "rules": []}}, "engagement.half_life_days", "greater than 0"),
    ({"engagement": {"half_life_days": 30, "rules": [{"event": "page_viewed", "points": 1, "max_per_day": -1}]}},
     "engagement.rules[0].max_per_day", "greater than or equal to 0"),
    ({"fit": [{"attribute": "title", "points": 1}]}, "fit[0]", "exactly one condition"),
    ({"fit": [{"attribute": "title", "equals": "x", "in": ["y"], "points": 1}]}, "fit[0]", "exactly one condition"),
    ({"fit": [{"attribute": "size", "range": {"min": 10, "max": 1}, "points": 1}]}, "fit[0].range", "min must be"),
    ({"fit": [{"attribute": "size", "range": {}, "points": 1}]}, "fit[0].range", "needs min, max"),
    ({"mql": {"min_fit": 0, "min_engagement": 0, "cooldown_days": "soon"}}, "mql.cooldown_days", "valid number"),
    ({"mql": {"min_fit": 0, "typo": 1}}, "mql.typo", "Extra inputs"),
    ({"effective_from": "2026-01-01T00:00:00"}, "effective_from", "timezone"),
    ({"effective_from": "yesterday"}, "effective_from", "datetime"),
    ({"intent_alerts": [{"name": "a", "first": {"event": "x"}, "then": {"event": "y"}, "within_hours": 1},
                        {"name": "a", "first": {"event": "x"}, "then": {"event": "y"}, "within_hours": 1}]},
     "", "unique"),
    ({"intent_alerts": [{"name": "a", "first": {"event": "x", "url": "/p"}, "then": {"event": "y"},
                         "within_hours": 1}]}, "intent_alerts[0].first.url", "Extra inputs"),
    ({"stages": {"transitions": {"mql": ["salx"]}}}, "stages.transitions", "unknown stage"),
    ({"colour": "blue"}, "colour", "Extra inputs"),
])
def test_bad_values_fail_with_their_path(patch: dict, path: str, fragment: str) -> None:
    base = parse_rule_sets(MINIMAL)[0].model_dump(mode="json", by_alias=True, exclude_none=True)
    base.update(patch)
    errs = _errors(json.dumps(base))
    assert any(p == path and fragment in m for p, m in errs), errs


def test_missing_required_sections() -> None:
    errs = _errors('version: v\neffective_from: "2026-01-01T00:00:00Z"\n')
    assert ("engagement", "Field required") in errs and ("mql", "Field required") in errs


def test_bad_yaml_and_non_mapping() -> None:
    errs = _errors("version: [unclosed\n")
    assert errs[0][1].startswith("invalid YAML/JSON: line")
    assert "mapping" in _errors("just a string")[0][1]
    assert "empty" in _errors("")[0][1]


def test_yaml_scalars_are_not_guessed() -> None:
    # YAML 1.1 would read NO as false and an unquoted timestamp as a naive-able datetime
    text = MINIMAL.replace('"2025-12-01T00:00:00Z"', "2025-12-01T00:00:00Z") + (
        "fit:\n  - {attribute: country, in: [NO, yes, on], points: 1}\n")
    rs = parse_rule_sets(text)[0]
    assert rs.fit[0].in_ == ["NO", "yes", "on"]
    assert rs.effective_from.tzinfo is not None


def test_single_needle_or_list() -> None:
    text = MINIMAL.replace("rules: []", "rules: [{event: page_viewed, url_contains: /Pricing, points: 1},"
                                        " {event: content_downloaded, asset_in: [WP-1, 2], points: 1}]")
    rs = parse_rule_sets(text)[0]
    assert rs.engagement.rules[0].url_contains == ["/Pricing"]
    assert rs.engagement.rules[1].asset_in == ["WP-1", "2"]
    c = CompiledRuleSet(rs)
    assert c.dispatch["page_viewed"][0][3] == (("p", "url", 0, ("/pricing",)),)


def _book(*effs: str) -> RuleBook:
    return RuleBook([parse_rule_sets(MINIMAL.replace("v1", f"v{i}").replace("2025-12-01T00:00:00Z", e))[0]
                     for i, e in enumerate(effs)])


def test_in_force_is_latest_effective_from_not_after_t() -> None:
    book = _book("2026-03-01T00:00:00Z", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00+09:00")
    assert [r.version for r in book] == ["v1", "v2", "v0"]  # sorted by effective_from
    assert book.in_force("2025-12-31T23:59:59.999999+00:00") is None  # before the first: no rules
    assert book.in_force("2026-01-01T00:00:00+00:00").version == "v1"  # inclusive
    assert book.in_force("2026-01-31T14:59:59+00:00").version == "v1"
    assert book.in_force("2026-01-31T15:00:00+00:00").version == "v2"  # 2026-02-01T00:00+09:00
    assert book.in_force(datetime(2026, 3, 1, tzinfo=timezone.utc)).version == "v0"
    assert book.in_force(datetime(2027, 1, 1, tzinfo=timezone.utc).timestamp()).version == "v0"
    assert book.in_force(None) is None
    single = _book("2026-01-01T00:00:00Z")
    assert single.in_force(datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()).version == "v0"
    assert single.in_force(datetime(2025, 1, 1, tzinfo=timezone.utc).timestamp()) is None
    assert RuleBook().in_force(0.0) is None


def test_book_rejects_duplicate_versions_and_instants() -> None:
    a = parse_rule_sets(MINIMAL)[0]
    with pytest.raises(RuleSetError, match="duplicate rule-set version"):
        RuleBook([a, a.model_copy(update={"effective_from": datetime(2027, 1, 1, tzinfo=timezone.utc)})])
    with pytest.raises(RuleSetError, match="same effective_from"):
        RuleBook([a, a.model_copy(update={"version": "v9"})])


def test_checked_in_schema_is_in_sync() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == rules_schema_text(), \
        "schemas/rules.schema.json drifted: run python -c 'from projections.rules import write_rules_schema as w; w()'"
    schema = json.loads(rules_schema_text())
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"version", "effective_from", "engagement", "mql"}
    assert "in" in schema["$defs"]["FitRule"]["properties"]
    assert rules_schema_text() == rules_schema_text()


def test_validate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL, encoding="utf-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("min_fit: 0", "min_fit: lots"), encoding="utf-8")
    assert validate_main([str(good), str(DEFAULT)]) == 0
    out = capsys.readouterr().out
    assert out.count("OK ") == 2
    assert validate_main([str(good), str(bad), str(tmp_path / "missing.yaml")]) == 1
    out = capsys.readouterr().out
    assert f"OK {good}" in out
    assert f"{bad}: mql.min_fit: Input should be a valid number" in out
    assert "missing.yaml: cannot read" in out
    clash = tmp_path / "clash.yaml"
    clash.write_text(MINIMAL, encoding="utf-8")
    assert validate_main([str(good), str(clash)]) == 1
    assert "duplicate rule-set version" in capsys.readouterr().out
    assert validate_main([]) == 2


def test_load_rule_sets_and_from_paths(tmp_path: Path) -> None:
    p = tmp_path / "two.yaml"
    p.write_text(MINIMAL + "---\n" + MINIMAL.replace("v1", "v2").replace("2025-12-01", "2026-07-01"), encoding="utf-8")
    assert len(load_rule_sets(p)) == 2
    with pytest.raises(RuleSetError, match="exactly one"):
        load_rule_set(p)
    book = RuleBook.from_paths([p, DEFAULT])
    assert [r.version for r in book] == ["v1", "2026-11-default", "v2"]
    assert book.in_force("2026-03-01T00:00:00Z").version == "2026-11-default"
    assert isinstance(book.by_version["v2"].model, RuleSet)

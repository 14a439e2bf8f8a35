"""SQL projections: migrations (empty -> head, between revisions) and the idempotent apply step,
on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from projections import sql_schema
from projections.sql_writer import apply_batch, load_offsets, store_offsets
from tests.projections_support import T0, db_url, dump, handed, small_history, staged, touchpoint  # noqa: F401


def _tables(url: str) -> set[str]:
    engine = sql_schema.make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _indexes(url: str, table: str) -> set[str]:
    engine = sql_schema.make_engine(url)
    try:
        return {i["name"] for i in sa.inspect(engine).get_indexes(table)}
    finally:
        engine.dispose()


def _apply(url: str, records: list[dict]) -> dict:
    engine = sql_schema.make_engine(url)
    try:
        with engine.begin() as conn:
            return apply_batch(conn, records)
    finally:
        engine.dispose()


def _head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(sql_schema.alembic_config("sqlite://")).get_current_head()


def test_migrate_from_empty_matches_metadata(db_url: str) -> None:
    sql_schema.migrate(db_url)
    assert sql_schema.current_revision(db_url) == _head()
    assert {t.name for t in sql_schema.TABLES} <= _tables(db_url)
    engine = sql_schema.make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), sql_schema.metadata)
            views = set(sa.inspect(conn).get_view_names())
    finally:
        engine.dispose()
    # Only nullable/type nuances are tolerated; tables, columns and indexes must match exactly.
    structural = [d for d in diff if isinstance(d, tuple) and d[0] in
                  ("add_table", "remove_table", "add_column", "remove_column", "add_index", "remove_index")]
    assert structural == []
    assert set(sql_schema.VIEWS) <= views


def test_migrate_between_revisions(db_url: str) -> None:
    sql_schema.migrate(db_url, "0001")
    assert sql_schema.current_revision(db_url) == "0001"
    assert "ix_leads_score_lead" not in _indexes(db_url, "leads")
    sql_schema.migrate(db_url)
    assert sql_schema.current_revision(db_url) == _head()
    assert "ix_leads_score_lead" in _indexes(db_url, "leads")
    # data written at head survives a downgrade below the archive chain (0003) and the upgrade back, which
    # re-chains the archive exactly as the projector had
    _apply(db_url, small_history())
    before = dump(db_url)
    sql_schema.downgrade(db_url, "0002")
    sql_schema.migrate(db_url)
    assert dump(db_url) == before
    # from the previous heads: the funnel tables (0004 - 0006) are refilled from the stored history as kept live
    for rev in ("0003", "0004", "0005"):
        sql_schema.downgrade(db_url, rev)
        assert "funnel_monthly" not in _tables(db_url)
        sql_schema.migrate(db_url)
        assert dump(db_url) == before
    sql_schema.downgrade(db_url, "0001")
    assert "ix_leads_score_lead" not in _indexes(db_url, "leads")
    sql_schema.downgrade(db_url, "base")
    assert not ({t.name for t in sql_schema.TABLES} & _tables(db_url))


def test_migrate_main_cli(db_url: str, capsys) -> None:
    assert sql_schema.migrate_main(["--database-url", db_url]) == 0
    assert _head() in capsys.readouterr().out
    assert sql_schema.migrate_main(["--database-url", db_url]) == 0  # idempotent


def test_apply_batch_twice_is_identical(db_url: str) -> None:
    sql_schema.migrate(db_url)
    recs = small_history()
    first = _apply(db_url, recs)
    assert first["touchpoint_archive"] > 0 and first["handoffs"] == 3
    once = dump(db_url)
    again = _apply(db_url, recs)
    assert again == {"touchpoint_archive": 0, "lead_score_history": 0, "lead_stage_history": 0, "handoffs": 0}
    assert dump(db_url) == once
    # a batch holding the same event twice counts it once
    _apply(db_url, recs[:5] + recs[:5])
    assert dump(db_url) == once


def test_lead_state_and_handoff(db_url: str) -> None:
    sql_schema.migrate(db_url)
    _apply(db_url, small_history())
    engine = sql_schema.make_engine(db_url)
    try:
        with engine.connect() as conn:
            a = conn.execute(sa.select(sql_schema.leads).where(sql_schema.leads.c.lead == "a@x.com")).mappings().one()
            c = conn.execute(sa.select(sql_schema.leads).where(sql_schema.leads.c.lead == "c@x.com")).mappings().one()
            ho = {r.lead: r for r in conn.execute(sa.select(sql_schema.handoffs))}
            seqs = conn.execute(sa.select(sql_schema.touchpoint_archive.c.seq)
                                .where(sql_schema.touchpoint_archive.c.lead == "a@x.com")
                                .order_by(sql_schema.touchpoint_archive.c.seq)).scalars().all()
            hist = conn.execute(sa.select(sql_schema.lead_stage_history)
                                .where(sql_schema.lead_stage_history.c.lead == "a@x.com")
                                .order_by(sql_schema.lead_stage_history.c.n)).all()
    finally:
        engine.dispose()
    assert a["stage"] == "won" and a["owner"] == "sam" and a["handoffs"] == 1
    assert a["first_touch_at"] == T0 and a["first_source"] == "web" and a["first_campaign"] == "spring"
    assert a["cohort"] == "2026-01"
    assert a["mql_at"] == T0 + timedelta(days=4)
    assert a["attributes"] == {"name": "a", "title": "VP", "phone": "123"}
    assert a["score"] == 60.0 and a["rules_version"] == "v1"
    assert c["stage"] == "mql" and c["owner"] is None
    assert ho["a@x.com"].first_sales_touch_at == T0 + timedelta(days=4, hours=3)
    assert ho["a@x.com"].time_to_first_touch_s == 3 * 3600
    assert ho["c@x.com"].first_sales_touch_at is None
    assert seqs == list(range(1, len(seqs) + 1))
    assert [h.to_stage for h in hist] == ["known", "lead", "mql", "sal", "sql", "opportunity", "won"]
    assert all(h.left_at == nxt.at for h, nxt in zip(hist, hist[1:])) and hist[-1].left_at is None


def test_topic_interleaving_does_not_matter(db_url: str, tmp_path) -> None:
    """Derived topics and touchpoints arrive in any interleaving (per-topic order kept): same tables."""
    sql_schema.migrate(db_url)
    recs = small_history()
    _apply(db_url, recs)
    expected = dump(db_url)

    other = f"sqlite:///{tmp_path / 'shuffled.db'}"
    sql_schema.migrate(other)
    rng = random.Random(7)
    by_kind: dict[str, list[dict]] = {}
    for r in recs:
        by_kind.setdefault(r["type"] if r["type"].startswith("lead_") else "tp", []).append(r)
    queues = [list(v) for v in by_kind.values()]
    while any(queues):
        q = rng.choice([q for q in queues if q])
        k = rng.randint(1, 4)
        _apply(other, q[:k])
        del q[:k]
    assert dump(other) == expected


def test_late_handoff_finds_earlier_sales_touch(db_url: str) -> None:
    """The hand-off arrives after the call touchpoint (different topics): first_sales_touch_at still set."""
    sql_schema.migrate(db_url)
    at = T0 + timedelta(days=1)
    _apply(db_url, [touchpoint("z@x.com", "z1", "form_submitted", T0),
                    touchpoint("z@x.com", "z2", "call_logged", at + timedelta(minutes=5), source="inside_sales"),
                    touchpoint("z@x.com", "z0", "call_logged", T0 + timedelta(minutes=5), source="inside_sales")])
    _apply(db_url, [staged("z@x.com", 1, at, "known", "mql", "z1"), handed("z@x.com", 1, at, "z1")])
    engine = sql_schema.make_engine(db_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.select(sql_schema.handoffs)).one()
    finally:
        engine.dispose()
    assert row.first_sales_touch_at == at + timedelta(minutes=5)
    assert row.time_to_first_touch_s == 300


def test_offsets_roundtrip(db_url: str) -> None:
    sql_schema.migrate(db_url)
    engine = sql_schema.make_engine(db_url)
    try:
        with engine.begin() as conn:
            store_offsets(conn, "g", {("t", 0): 5, ("t", 1): 7})
        with engine.begin() as conn:
            store_offsets(conn, "g", {("t", 0): 9})
            store_offsets(conn, "h", {("t", 0): 1})
        with engine.connect() as conn:
            assert load_offsets(conn, "g") == {("t", 0): 9, ("t", 1): 7}
    finally:
        engine.dispose()


def test_values_beyond_plain_json_are_written_the_same(db_url: str, tmp_path) -> None:
    """PostgreSQL writes batches set-based (rows as JSON arrays); an integer beyond 64 bits cannot travel that way
    and takes the row-by-row path: the tables equal SQLite's either way, and a second apply changes nothing."""
    sql_schema.migrate(db_url)
    big = 2 ** 70
    recs = [touchpoint("b@x.com", "b1", "form_submitted", T0, payload={"fields": {"name": "B", "size": big}}),
            staged("b@x.com", 1, T0, "anonymous", "known", "b1"),
            handed("b@x.com", 1, T0, "b1")]
    recs[2]["explanation"] = {"fit": [], "engagement": [], "big": big}
    first = _apply(db_url, recs)
    assert first == {"touchpoint_archive": 1, "lead_score_history": 0, "lead_stage_history": 1, "handoffs": 1}
    ref = f"sqlite:///{tmp_path / 'ref.db'}"
    sql_schema.migrate(ref)
    _apply(ref, recs)
    assert dump(db_url) == dump(ref)
    assert _apply(db_url, recs) == {"touchpoint_archive": 0, "lead_score_history": 0, "lead_stage_history": 0,
                                    "handoffs": 0}
    assert dump(db_url) == dump(ref)


def test_left_at_with_unnumbered_transitions(db_url: str) -> None:
    """A transition id without a trailing number (n = null) is ordered as the database sorts nulls (PostgreSQL:
    last, SQLite: first): the set-based path gives way to the stored order."""
    sql_schema.migrate(db_url)
    lead = "u@x.com"
    odd = dict(staged(lead, 9, T0 + timedelta(days=3), "lead", "mql", "u3"), event_id=f"{lead}:stage:x")
    _apply(db_url, [staged(lead, 1, T0, "anonymous", "known", "u1")])
    _apply(db_url, [odd, staged(lead, 2, T0 + timedelta(days=1), "known", "lead", "u2")])
    engine = sql_schema.make_engine(db_url)
    try:
        with engine.connect() as conn:
            h = sql_schema.lead_stage_history
            rows = {r.event_id: r.left_at for r in conn.execute(sa.select(h.c.event_id, h.c.left_at))}
    finally:
        engine.dispose()
    if db_url.startswith("postgresql"):
        assert rows == {f"{lead}:stage:1": T0 + timedelta(days=1), f"{lead}:stage:2": T0 + timedelta(days=3),
                        f"{lead}:stage:x": None}
    else:
        assert rows == {f"{lead}:stage:x": T0, f"{lead}:stage:1": T0 + timedelta(days=1),
                        f"{lead}:stage:2": None}

"""Tamper evidence: the archive's per-lead hash chain on SQLite and the real PostgreSQL. Rows are altered,
deleted and reordered directly in SQL; `leadledger audit verify` must report exactly those records."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from projections import sql_schema
from projections.audit_chain import GENESIS, archive_id, canonical_bytes, record_hash
from projections.lead_log import resolution_record
from projections.sql_writer import apply_batch
from services.audit import verify, verify_main
from tests.projections_support import db_url, small_history  # noqa: F401

A = "a@x.com"


def _load(url: str, records: list[dict]) -> None:
    sql_schema.migrate(url)
    engine = sql_schema.make_engine(url)
    try:
        with engine.begin() as conn:
            apply_batch(conn, records)
    finally:
        engine.dispose()


def _sql(url: str, *stmts) -> None:
    engine = sql_schema.make_engine(url)
    try:
        with engine.begin() as conn:
            for s in stmts:
                conn.execute(sa.text(s[0]), s[1]) if isinstance(s, tuple) else conn.execute(s)
    finally:
        engine.dispose()


def _report(url: str) -> list[tuple]:
    _n, _leads, problems = verify(url)
    return [(p.kind, p.lead, p.seq, p.event_id) for p in problems]


def _row(url: str, lead: str, seq: int) -> dict:
    a = sql_schema.touchpoint_archive
    engine = sql_schema.make_engine(url)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(sa.select(a).where(a.c.lead == lead, a.c.seq == seq)).mappings().one())
    finally:
        engine.dispose()


@pytest.fixture
def archive(db_url):
    _load(db_url, small_history())
    return db_url


def test_intact_chain_verifies(archive, capsys) -> None:
    n, leads, problems = verify(archive)
    assert problems == [] and leads == 5 and n == 19
    first = _row(archive, A, 1)
    assert first["prev_hash"] == GENESIS and first["prev_event_id"] is None
    second = _row(archive, A, 2)
    assert second["prev_hash"] == first["hash"] and second["prev_event_id"] == first["event_id"]
    assert verify_main(["--database-url", archive]) == 0
    assert "verified 19 records of 5 leads: OK" in capsys.readouterr().out


def test_altered_content(archive, capsys) -> None:
    eid = _row(archive, A, 3)["event_id"]
    _sql(archive, ("UPDATE touchpoint_archive SET source = 'forged' WHERE event_id = :e", {"e": eid}))
    assert _report(archive) == [("altered", A, 3, eid)]
    assert verify_main(["--database-url", archive]) == 1
    assert f"altered lead={A} seq=3 event_id={eid}" in capsys.readouterr().out


def test_altered_envelope_and_time(archive) -> None:
    a = sql_schema.touchpoint_archive
    r2, r4 = _row(archive, A, 2), _row(archive, "b@x.com", 2)
    env = dict(r2["envelope"], payload={"attributes": {"phone": "999", "title": "Intern"}})
    _sql(archive, a.update().where(a.c.event_id == r2["event_id"]).values(envelope=env),
         a.update().where(a.c.event_id == r4["event_id"]).values(occurred_at=r4["occurred_at"].replace(year=2025)))
    assert _report(archive) == [("altered", A, 2, r2["event_id"]), ("altered", "b@x.com", 2, r4["event_id"])]


def test_altered_and_rehashed(archive) -> None:
    """The forger recomputes the row's own hash: its successor still holds the old one."""
    a = sql_schema.touchpoint_archive
    r = _row(archive, A, 2)
    r["source"] = "forged"
    _sql(archive, a.update().where(a.c.event_id == r["event_id"])
         .values(source="forged", hash=record_hash(r["prev_hash"], r)))
    assert _report(archive) == [("altered", A, 2, r["event_id"])]


def test_missing(archive) -> None:
    r3, r5 = _row(archive, A, 3), _row(archive, A, 5)
    _sql(archive, ("DELETE FROM touchpoint_archive WHERE event_id IN (:a, :b)",
                   {"a": r3["event_id"], "b": r5["event_id"]}))
    assert _report(archive) == [("missing", A, 3, r3["event_id"]), ("missing", A, 5, r5["event_id"])]


def test_missing_first_record(archive) -> None:
    r1 = _row(archive, "c@x.com", 1)
    _sql(archive, ("DELETE FROM touchpoint_archive WHERE event_id = :a", {"a": r1["event_id"]}))
    assert _report(archive) == [("missing", "c@x.com", 1, r1["event_id"])]


def test_reordered(archive) -> None:
    r2, r3 = _row(archive, A, 2), _row(archive, A, 3)
    q = "UPDATE touchpoint_archive SET seq = :s WHERE event_id = :e"
    _sql(archive, (q, {"s": -1, "e": r2["event_id"]}), (q, {"s": 2, "e": r3["event_id"]}),
         (q, {"s": 3, "e": r2["event_id"]}))
    assert _report(archive) == [("reordered", A, 2, r3["event_id"]), ("reordered", A, 3, r2["event_id"])]


def test_each_kind_at_once(archive) -> None:
    ra, rb, rc1, rc2 = _row(archive, A, 4), _row(archive, "b@x.com", 3), _row(archive, "d@x.com", 1), \
        _row(archive, "d@x.com", 2)
    q = "UPDATE touchpoint_archive SET seq = :s WHERE event_id = :e"
    _sql(archive, ("UPDATE touchpoint_archive SET type = 'page_viewed' WHERE event_id = :e", {"e": ra["event_id"]}),
         ("DELETE FROM touchpoint_archive WHERE event_id = :e", {"e": rb["event_id"]}),
         (q, {"s": -1, "e": rc1["event_id"]}), (q, {"s": 1, "e": rc2["event_id"]}),
         (q, {"s": 2, "e": rc1["event_id"]}))
    assert _report(archive) == [("altered", A, 4, ra["event_id"]), ("missing", "b@x.com", 3, rb["event_id"]),
                                ("reordered", "d@x.com", 1, rc2["event_id"]),
                                ("reordered", "d@x.com", 2, rc1["event_id"])]


def test_join_resolutions_are_archived_and_chained(db_url) -> None:
    """Resolution records of the lead-keyed log are archived in log order (replays need them), with the
    requesting event's times; a lead key long enough to overflow the id column is digested."""
    import orjson

    from tests.projections_support import touchpoint, T0

    lead = "x" * 200 + "@long.example"
    tp = touchpoint(lead, "e-join", "form_submitted", T0, payload={"form_id": "f", "fields": {"name": "N"}})
    tp["anonymous_id"] = "anon-1"
    res = orjson.loads(resolution_record(lead, "anon-1", "e-join", None))
    res["lead"] = lead
    _load(db_url, [tp, res, touchpoint(lead, "e-2", "page_viewed", T0, payload={"url": "/"})])
    assert _report(db_url) == []
    r = _row(db_url, lead, 2)
    assert r["event_id"] == archive_id(f"{lead}:resolve:e-join") and r["event_id"].startswith("sha256:")
    assert r["envelope"]["event_id"] == f"{lead}:resolve:e-join" and r["type"] == "_join_resolved"
    assert r["occurred_at"] == _row(db_url, lead, 1)["occurred_at"]
    # applying the same records again archives nothing twice
    _load(db_url, [tp, res])
    assert _report(db_url) == [] and _row(db_url, lead, 3)["event_id"] == "e-2"


def test_canonical_bytes_survive_number_normalisation() -> None:
    row = {"event_id": "e", "lead": "l", "type": "t", "occurred_at": "2026-01-01T00:00:00+00:00",
           "envelope": {"b": 5.0, "a": [1e20, 0.1, -0.0, True, None]}}
    same = dict(row, envelope={"a": [10 ** 20, 0.1, 0, True, None], "b": 5})
    assert canonical_bytes(row) == canonical_bytes(same)
    assert canonical_bytes(row) != canonical_bytes(dict(row, envelope={"a": [10 ** 20, 0.1, 0, 1, None], "b": 5}))

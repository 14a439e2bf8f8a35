"""Helpers shared by the projection tests: a fresh database per test (SQLite file or a PostgreSQL schema),
table dumps for equality checks, and a small hand-checkable history of derived events and touchpoints."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from projections import sql_schema


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """An empty database: a SQLite file, or a fresh schema of the real PostgreSQL (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'projections.db'}"
        return
    base = request.getfixturevalue("pg_dsn")
    yield from fresh_pg_schema(base)


def fresh_pg_schema(base: str):
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def dump(url: str, tables=None) -> dict[str, list[tuple]]:
    """Every row of every projection table (offsets excluded unless asked), sorted, JSON normalised."""
    import json

    names = tables or [t.name for t in sql_schema.TABLES if t.name != "projector_offsets"]
    engine = sql_schema.make_engine(url)
    out = {}
    try:
        with engine.connect() as conn:
            for name in names:
                t = sql_schema.metadata.tables[name]
                rows = conn.execute(sa.select(t)).all()
                norm = []
                for row in rows:
                    norm.append(tuple(json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
                                      for v in row))
                out[name] = sorted(norm, key=repr)
    finally:
        engine.dispose()
    return out


T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="microseconds")


def touchpoint(lead: str, event_id: str, type_: str, at: datetime, source="web", campaign=None, payload=None,
               email=None) -> dict:
    return {"lead": lead, "event_id": event_id, "type": type_, "occurred_at": iso(at),
            "received_at": iso(at + timedelta(seconds=1)), "lead_id": None, "anonymous_id": None,
            "email": email or lead, "source": source, "campaign": campaign, "payload": payload or {},
            "schema_version": 2}


def scored(lead: str, seq: int, at: datetime, fit: float, engagement: float, cause: str, version="v1") -> dict:
    return {"event_id": f"{lead}:scored:{seq}", "type": "lead_scored", "lead": lead, "at": iso(at),
            "cause_event_id": cause, "rules_version": version, "fit": fit, "engagement": engagement,
            "score": fit + engagement, "fit_before": 0.0, "engagement_before": 0.0,
            "explanation": {"fit": [{"rule": "title", "attribute": "title", "points": fit}],
                            "engagement": [{"rule": "download", "points": engagement, "events": [cause],
                                            "contribution": engagement}]}}


def staged(lead: str, n: int, at: datetime, frm, to: str, cause: str, by=None, reason=None) -> dict:
    return {"event_id": f"{lead}:stage:{n}", "type": "lead_stage_changed", "lead": lead, "at": iso(at),
            "cause_event_id": cause, "rules_version": "v1", "from": frm, "to": to, "reason": reason, "by": by}


def handed(lead: str, episode: int, at: datetime, cause: str, score=50.0) -> dict:
    return {"event_id": f"{lead}:handoff:{episode}", "type": "lead_handed_off", "lead": lead, "at": iso(at),
            "cause_event_id": cause, "rules_version": "v1", "episode": episode, "fit": 20.0,
            "engagement": score - 20.0, "score": score,
            "explanation": {"fit": [], "engagement": []},
            "top_touchpoints": [{"event_id": cause, "type": "content_downloaded", "rule": "download",
                                 "points": 10, "occurred_at": iso(at), "contribution": 10}],
            "attributes": {"email": lead}}


def journey(lead: str, start: datetime, path: list[str], source: str, campaign: str | None,
            step_days: float = 2.0, sales_call_after_h: float | None = 3.0) -> list[dict]:
    """One lead walking `path` (stages after `known`), a stage every `step_days` days.

    Returns touchpoints and derived events in the order a processor would emit them.
    """
    out: list[dict] = []
    tp = f"{lead}-tp-1"
    out.append(touchpoint(lead, tp, "form_submitted", start, source=source, campaign=campaign,
                          payload={"form_id": "f1", "fields": {"name": lead.split("@")[0], "title": "CTO"}}))
    out.append(scored(lead, 1, start, 20.0, 5.0, tp))
    out.append(staged(lead, 1, start, "anonymous", "known", tp, reason="identified"))
    prev, at, n, seq = "known", start, 1, 1
    for stage in path:
        at = at + timedelta(days=step_days)
        seq += 1
        n += 1
        tid = f"{lead}-tp-{seq}"
        if stage == "mql":
            out.append(touchpoint(lead, tid, "content_downloaded", at, source="web", campaign=campaign,
                                  payload={"asset_id": "a1"}))
            out.append(scored(lead, seq, at, 20.0, 40.0, tid))
            out.append(staged(lead, n, at, prev, stage, tid, reason="mql rule"))
            out.append(handed(lead, 1, at, tid))
            if sales_call_after_h is not None:
                seq += 1
                cid = f"{lead}-tp-{seq}"
                call_at = at + timedelta(hours=sales_call_after_h)
                out.append(touchpoint(lead, cid, "call_logged", call_at, source="inside_sales",
                                      payload={"note": "hi", "outcome": "reached"}))
                out.append(scored(lead, seq, call_at, 20.0, 40.0, cid))
        elif stage == "lead":
            out.append(touchpoint(lead, tid, "attribute_updated", at, source="crm",
                                  payload={"attributes": {"phone": "123", "title": "VP"}}))
            out.append(scored(lead, seq, at, 25.0, 5.0, tid))
            out.append(staged(lead, n, at, prev, stage, tid, reason="attributes complete"))
        else:
            out.append(touchpoint(lead, tid, "stage_changed", at, source="inside_sales",
                                  payload={"to": stage, "by": "sam"}))
            out.append(scored(lead, seq, at, 20.0, 40.0, tid))
            out.append(staged(lead, n, at, prev, stage, tid, by="sam", reason="sales"))
        prev = stage
    return out


def small_history() -> list[dict]:
    """Five leads, hand-checkable funnel (see tests/test_query_api.py::test_funnel_numbers)."""
    recs: list[dict] = []
    recs += journey("a@x.com", T0, ["lead", "mql", "sal", "sql", "opportunity", "won"], "web", "spring")
    recs += journey("b@x.com", T0 + timedelta(days=1), ["lead", "mql", "sal"], "web", "spring")
    recs += journey("c@x.com", T0 + timedelta(days=2), ["lead", "mql"], "form", None, sales_call_after_h=None)
    recs += journey("d@x.com", T0 + timedelta(days=40), ["lead"], "form", "summer")
    recs += journey("e@x.com", T0 + timedelta(days=41), [], "web", "summer")
    return recs

"""Apply decoded derived events and by-lead touchpoints to the SQL projections (idempotently).

``apply_batch(conn, records)`` runs inside the caller's transaction (the projector writes its consumed offsets in
the same one). A record is either

* a derived event dict (docs/design.md): ``lead_scored``, ``lead_stage_changed``, ``lead_handed_off``
  (``intent_alert`` / ``event_rejected`` are accepted and ignored), or
* a touchpoint wire dict from ``touchpoints-by-lead`` plus ``"lead"``: the Kafka key (the lead key).

Every history/archive row is keyed by its event id and written at most once; ``leads`` is changed only by rows
that were new, so applying a batch twice leaves every table unchanged. The ``leads`` columns are computed so
that the interleaving of the different topics does not matter (latest score by seq, stage by transition number,
first/last touch by event time, attributes in by-lead arrival order), which is what makes a rebuild from the log
identical to the live tables. Works on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from projections.audit_chain import archive_id, link
from projections.lead_log import RESOLVE_TYPE
from projections.sql_schema import (handoffs, lead_score_history, lead_stage_history, leads, projector_offsets,
                                    touchpoint_archive)

LEAD_SCORED = "lead_scored"
LEAD_STAGE_CHANGED = "lead_stage_changed"
LEAD_HANDED_OFF = "lead_handed_off"
IGNORED_DERIVED = frozenset({"intent_alert", "event_rejected"})
DERIVED = frozenset({LEAD_SCORED, LEAD_STAGE_CHANGED, LEAD_HANDED_OFF}) | IGNORED_DERIVED
#: touchpoints that count as the first sales touch after a hand-off
SALES_TOUCH_TYPES = ("call_logged", "stage_changed")
#: stage changes whose ``by`` names the lead's owner
SALES_STAGES = frozenset({"sal", "sql", "opportunity", "won", "lost"})
CHUNK = 500


def ts(value: Any) -> datetime | None:
    """RFC 3339 text (or datetime) -> aware UTC datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def id_seq(event_id: str) -> int | None:
    """The trailing number of a deterministic derived id (``{lead}:scored:{seq}`` -> seq)."""
    tail = str(event_id).rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def dialect_insert(conn: sa.Connection, table: sa.Table):
    """The dialect's INSERT (with ``on_conflict_do_nothing/update``) for SQLite and PostgreSQL."""
    name = conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"unsupported dialect {name}")


def _chunks(items: Sequence[Any], n: int = CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _existing_ids(conn: sa.Connection, table: sa.Table, ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for part in _chunks(list(ids)):
        found.update(conn.execute(sa.select(table.c.event_id).where(table.c.event_id.in_(part))).scalars())
    return found


def _new_only(conn: sa.Connection, table: sa.Table, recs: list[dict]) -> list[dict]:
    """Drop records seen before (in this batch or in the table): the idempotence step."""
    seen: set[str] = set()
    unique = []
    for r in recs:
        if r["event_id"] not in seen:
            seen.add(r["event_id"])
            unique.append(r)
    if not unique:
        return []
    old = _existing_ids(conn, table, [r["event_id"] for r in unique])
    return [r for r in unique if r["event_id"] not in old]


def touchpoint_lead(rec: dict) -> str:
    return rec.get("lead") or rec.get("lead_id") or rec.get("email") or rec.get("anonymous_id")


def _is_anonymous(rec: dict, key: str) -> bool:
    return not rec.get("lead_id") and not rec.get("email") and key == rec.get("anonymous_id")


def _envelope(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "lead"}


def apply_batch(conn: sa.Connection, records: Iterable[dict]) -> dict[str, int]:
    """Write `records` (in log order) into the projections; returns counts of new rows per table."""
    tps: list[dict] = []
    scored: list[dict] = []
    staged: list[dict] = []
    handed: list[dict] = []
    for r in records:
        t = r.get("type")
        if t == LEAD_SCORED:
            scored.append(r)
        elif t == LEAD_STAGE_CHANGED:
            staged.append(r)
        elif t == LEAD_HANDED_OFF:
            handed.append(r)
        elif t in IGNORED_DERIVED:
            continue
        else:
            tps.append(r)

    tps = _new_only(conn, touchpoint_archive, [_archivable(r) for r in tps])
    scored = _new_only(conn, lead_score_history, scored)
    staged = _new_only(conn, lead_stage_history, staged)
    handed = _new_only(conn, handoffs, handed)

    # -- touchpoint archive: seq per lead continues from the stored maximum, each row chained to the previous one
    #    (projections/audit_chain.py); join resolutions are archived too (replays need them)
    archived = len(tps)
    if tps:
        _archive(conn, tps)
    tps = [r for r in tps if r["type"] != RESOLVE_TYPE]

    if scored:
        conn.execute(dialect_insert(conn, lead_score_history).on_conflict_do_nothing(), [
            dict(event_id=r["event_id"], lead=r["lead"], seq=id_seq(r["event_id"]), at=ts(r["at"]),
                 fit=float(r.get("fit") or 0), engagement=float(r.get("engagement") or 0),
                 score=float(r.get("score") or 0), fit_before=r.get("fit_before"),
                 engagement_before=r.get("engagement_before"), explanation=r.get("explanation"),
                 cause_event_id=r.get("cause_event_id"), rules_version=r.get("rules_version"))
            for r in scored])

    if staged:
        conn.execute(dialect_insert(conn, lead_stage_history).on_conflict_do_nothing(), [
            dict(event_id=r["event_id"], lead=r["lead"], n=id_seq(r["event_id"]), from_stage=r.get("from"),
                 to_stage=r["to"], at=ts(r["at"]), left_at=None, cause_event_id=r.get("cause_event_id"),
                 rules_version=r.get("rules_version"), reason=r.get("reason"), by=r.get("by"))
            for r in staged])
        _fix_left_at(conn, sorted({r["lead"] for r in staged}))

    if handed:
        conn.execute(dialect_insert(conn, handoffs).on_conflict_do_nothing(), [
            dict(event_id=r["event_id"], lead=r["lead"], episode=int(r.get("episode") or id_seq(r["event_id"]) or 0),
                 at=ts(r["at"]), fit=r.get("fit"), engagement=r.get("engagement"), score=r.get("score"),
                 rules_version=r.get("rules_version"), cause_event_id=r.get("cause_event_id"),
                 explanation=r.get("explanation"), top_touchpoints=r.get("top_touchpoints"),
                 first_sales_touch_at=None, time_to_first_touch_s=None)
            for r in handed])

    sales_leads = {r["lead"] for r in handed} | {touchpoint_lead(r) for r in tps if r["type"] in SALES_TOUCH_TYPES}
    if sales_leads:
        _fix_first_sales_touch(conn, sorted(sales_leads))

    _update_leads(conn, tps, scored, staged, handed)
    return {"touchpoint_archive": archived, "lead_score_history": len(scored),
            "lead_stage_history": len(staged), "handoffs": len(handed)}


def _archivable(rec: dict) -> dict:
    """A by-lead record as archived: ids longer than the column (long join-resolution ids) are digested."""
    aid = archive_id(rec["event_id"])
    if aid == rec["event_id"]:
        return rec
    out = dict(rec)
    out["event_id"] = aid
    out["_envelope"] = _envelope(rec)
    return out


def _archive(conn: sa.Connection, tps: list[dict]) -> None:
    a = touchpoint_archive
    keys = sorted({touchpoint_lead(r) for r in tps})
    last: dict[str, tuple[int, str, str]] = {}  # lead -> (seq, hash, event_id) of its latest archived row
    for part in _chunks(keys):
        top = sa.select(a.c.lead, sa.func.max(a.c.seq).label("m")).where(a.c.lead.in_(part)) \
            .group_by(a.c.lead).subquery()
        rows = conn.execute(sa.select(a.c.lead, a.c.seq, a.c.hash, a.c.event_id)
                            .join(top, sa.and_(a.c.lead == top.c.lead, a.c.seq == top.c.m)))
        last.update({lead: (seq, h, eid) for lead, seq, h, eid in rows})
    # a join resolution takes the times of the event that asked for it (archived before it, same lead)
    times = {r["event_id"]: (r["occurred_at"], r.get("received_at")) for r in tps if r["type"] != RESOLVE_TYPE}
    wanted = sorted({r["request_id"] for r in tps if r["type"] == RESOLVE_TYPE and r.get("request_id")} - set(times))
    for part in _chunks(wanted):
        for eid, occ, ra in conn.execute(sa.select(a.c.event_id, a.c.occurred_at, a.c.received_at)
                                         .where(a.c.event_id.in_(part))):
            times[eid] = (occ, ra)
    rows_out = []
    prev_times: dict[str, tuple] = {}
    for r in tps:
        key = touchpoint_lead(r)
        seq, h, eid = last.get(key, (0, None, None))
        if r["type"] == RESOLVE_TYPE:
            occ, ra = times.get(r.get("request_id"), prev_times.get(key, (None, None)))
            if occ is None:
                occ = datetime(1970, 1, 1, tzinfo=timezone.utc)
        else:
            occ, ra = r["occurred_at"], r.get("received_at")
        row = dict(event_id=r["event_id"], lead=key, seq=seq + 1, type=r["type"], occurred_at=ts(occ),
                   received_at=ts(ra), source=r.get("source"), campaign=r.get("campaign"),
                   envelope=r["_envelope"] if "_envelope" in r else _envelope(r))
        link(row, (h, eid) if h is not None else None)
        last[key] = (seq + 1, row["hash"], row["event_id"])
        prev_times[key] = (occ, ra)
        rows_out.append(row)
    conn.execute(dialect_insert(conn, a).on_conflict_do_nothing(), rows_out)


def _fix_left_at(conn: sa.Connection, lead_keys: list[str]) -> None:
    """``left_at`` of a transition = ``at`` of the lead's next transition (by transition number)."""
    h = lead_stage_history
    for part in _chunks(lead_keys):
        rows = conn.execute(sa.select(h.c.event_id, h.c.lead, h.c.n, h.c.at, h.c.left_at)
                            .where(h.c.lead.in_(part)).order_by(h.c.lead, h.c.n, h.c.at, h.c.event_id)).all()
        updates = []
        for i, row in enumerate(rows):
            nxt = rows[i + 1] if i + 1 < len(rows) and rows[i + 1].lead == row.lead else None
            want = nxt.at if nxt is not None else None
            if want != row.left_at:
                updates.append({"b_id": row.event_id, "b_left": want})
        if updates:
            conn.execute(h.update().where(h.c.event_id == sa.bindparam("b_id"))
                         .values(left_at=sa.bindparam("b_left", type_=h.c.left_at.type)), updates)


def _fix_first_sales_touch(conn: sa.Connection, lead_keys: list[str]) -> None:
    """First ``call_logged`` / ``stage_changed`` touchpoint at or after each hand-off."""
    a, ho = touchpoint_archive, handoffs
    for part in _chunks(lead_keys):
        touches: dict[str, list[datetime]] = {}
        for lead, at in conn.execute(sa.select(a.c.lead, a.c.occurred_at)
                                     .where(a.c.lead.in_(part), a.c.type.in_(SALES_TOUCH_TYPES))):
            touches.setdefault(lead, []).append(at)
        updates = []
        for row in conn.execute(sa.select(ho.c.event_id, ho.c.lead, ho.c.at, ho.c.first_sales_touch_at)
                                .where(ho.c.lead.in_(part))):
            after = [t for t in touches.get(row.lead, ()) if t >= row.at]
            first = min(after) if after else None
            if first != row.first_sales_touch_at:
                updates.append({"b_id": row.event_id, "b_first": first,
                                "b_secs": (first - row.at).total_seconds() if first else None})
        if updates:
            conn.execute(ho.update().where(ho.c.event_id == sa.bindparam("b_id"))
                         .values(first_sales_touch_at=sa.bindparam("b_first", type_=ho.c.first_sales_touch_at.type),
                                 time_to_first_touch_s=sa.bindparam("b_secs")), updates)


_LEAD_COLS = [c.name for c in leads.columns]


def _blank_lead(key: str, at: datetime) -> dict:
    row = {c: None for c in _LEAD_COLS}
    row.update(lead=key, fit=0.0, engagement=0.0, score=0.0, attributes={}, handoffs=0, updated_at=at)
    return row


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _update_leads(conn: sa.Connection, tps: list[dict], scored: list[dict], staged: list[dict],
                  handed: list[dict]) -> None:
    keys = {r["lead"] for r in scored} | {r["lead"] for r in staged} | {r["lead"] for r in handed}
    for r in tps:
        key = touchpoint_lead(r)
        if not _is_anonymous(r, key):
            keys.add(key)
    if not keys:
        return
    state: dict[str, dict] = {}
    for part in _chunks(sorted(keys)):
        for row in conn.execute(sa.select(leads).where(leads.c.lead.in_(part))).mappings():
            state[row["lead"]] = dict(row)
    existing = set(state)

    def get(key: str, at: datetime) -> dict:
        if key not in state:
            state[key] = _blank_lead(key, at)
        return state[key]

    for r in tps:
        key = touchpoint_lead(r)
        if _is_anonymous(r, key):
            continue
        at = ts(r["occurred_at"])
        s = get(key, at)
        if s["first_touch_at"] is None or at < s["first_touch_at"]:
            s["first_touch_at"] = at
            s["first_source"] = r.get("source")
            s["first_campaign"] = r.get("campaign")
            s["cohort"] = at.strftime("%Y-%m")
        s["last_touch_at"] = _later(s["last_touch_at"], at)
        if r.get("email"):
            s["email"] = r["email"]
        payload = r.get("payload") or {}
        changes = None
        if r["type"] == "form_submitted":
            changes = payload.get("fields")
        elif r["type"] == "attribute_updated":
            changes = payload.get("attributes")
        if isinstance(changes, dict) and changes:
            attrs = dict(s["attributes"] or {})
            for name, value in changes.items():
                if value == "" or value is None:
                    attrs.pop(name, None)
                else:
                    attrs[name] = value
            s["attributes"] = attrs
        s["updated_at"] = _later(s["updated_at"], at)

    for r in scored:
        at = ts(r["at"])
        s = get(r["lead"], at)
        seq = id_seq(r["event_id"])
        if s["score_seq"] is None or seq is None or seq >= s["score_seq"]:
            s.update(fit=float(r.get("fit") or 0), engagement=float(r.get("engagement") or 0),
                     score=float(r.get("score") or 0), rules_version=r.get("rules_version"), score_seq=seq)
        s["updated_at"] = _later(s["updated_at"], at)

    for r in staged:
        at = ts(r["at"])
        s = get(r["lead"], at)
        n = id_seq(r["event_id"])
        if s["stage_seq"] is None or n is None or n >= s["stage_seq"]:
            s["stage"] = r["to"]
            s["stage_seq"] = n
            if r.get("by") and r["to"] in SALES_STAGES:
                s["owner"] = r["by"]
        if r["to"] == "mql":
            s["mql_at"] = _later(s["mql_at"], at)
        s["updated_at"] = _later(s["updated_at"], at)

    for r in handed:
        at = ts(r["at"])
        s = get(r["lead"], at)
        s["handoffs"] = (s["handoffs"] or 0) + 1
        s["updated_at"] = _later(s["updated_at"], at)

    new_rows = [s for k, s in state.items() if k not in existing]
    old_rows = [s for k, s in state.items() if k in existing]
    if new_rows:
        conn.execute(leads.insert(), new_rows)
    if old_rows:
        cols = [c for c in _LEAD_COLS if c != "lead"]
        stmt = leads.update().where(leads.c.lead == sa.bindparam("b_lead")).values(
            {c: sa.bindparam(f"b_{c}", type_=leads.c[c].type) for c in cols})
        conn.execute(stmt, [{f"b_{c}": s[c] for c in _LEAD_COLS} for s in old_rows])


# ---------------------------------------------------------------- offsets

def load_offsets(conn: sa.Connection, group: str) -> dict[tuple[str, int], int]:
    o = projector_offsets
    return {(t, p): n for t, p, n in conn.execute(
        sa.select(o.c.topic, o.c.partition, o.c.next_offset).where(o.c.consumer_group == group))}


def store_offsets(conn: sa.Connection, group: str, offsets: dict[tuple[str, int], int]) -> None:
    """Upsert the next offsets to consume (in the caller's transaction, beside the rows they produced)."""
    if not offsets:
        return
    ins = dialect_insert(conn, projector_offsets)
    stmt = ins.on_conflict_do_update(index_elements=["consumer_group", "topic", "partition"],
                                     set_={"next_offset": ins.excluded.next_offset})
    conn.execute(stmt, [dict(consumer_group=group, topic=t, partition=p, next_offset=n)
                        for (t, p), n in sorted(offsets.items())])

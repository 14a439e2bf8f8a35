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

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from projections.audit_chain import archive_id, link
from projections.lead_log import RESOLVE_TYPE
from projections.sql_schema import (DURATION_METRICS, FUNNEL_PAIRS, STAGES, UTCDateTime, funnel_daily,
                                    funnel_durations, funnel_handoffs, funnel_leads, funnel_monthly, handoffs, lead_score_history,
                                    lead_stage_history, leads, projector_offsets, touchpoint_archive)

_fromiso = datetime.fromisoformat

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
    if type(value) is str and value.endswith("+00:00"):   # the wire format: UTC already
        return _fromiso(value)
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


# ---------------------------------------------------------------- set-based primitives
#
# PostgreSQL: one statement per table and batch. Key lists travel as one array parameter (``= ANY(:keys)``); rows
# travel as one JSON array per column, zipped server-side (INSERT ... SELECT ... ON CONFLICT, UPDATE ... FROM): a
# C-level serialisation instead of a bind step per value. The stored values are those of a plain executemany:
# timestamps are sent with their offset (naive = UTC, as ``UTCDateTime``), a JSON column's None is the JSON ``null``
# (SQLAlchemy's ``none_as_null=False``), numbers and strings are JSON's. SQLite (embedded: no round trips) runs the
# equivalent statements as executemany.


def _is_pg(conn: sa.Connection) -> bool:
    return conn.dialect.name == "postgresql"


def _key_parts(conn: sa.Connection, keys: Iterable[Any]) -> Iterator[list]:
    """``keys`` in parts for ``_in``: all at once on PostgreSQL (one array parameter), chunks elsewhere."""
    keys = list(keys)
    if not keys:
        return
    if _is_pg(conn):
        yield keys
        return
    yield from _chunks(keys)


def _in(conn: sa.Connection, col: sa.Column, part: Sequence[Any]) -> Any:
    if _is_pg(conn):   # one JSON parameter (psycopg adapts a list element by element, escaping each in Python)
        keys = sa.bindparam(None, orjson.dumps(list(part)).decode(), type_=sa.Text, unique=True)
        return col.in_(sa.select(sa.func.json_array_elements_text(sa.cast(keys, postgresql.JSON))))
    return col.in_(part)


def _key_filters(conn: sa.Connection, col: sa.Column, keys: Iterable[Any]) -> Iterator[Any]:
    """WHERE clauses selecting the rows whose ``col`` is in ``keys``."""
    for part in _key_parts(conn, keys):
        yield _in(conn, col, part)


def _pg_type(col: sa.Column) -> str:
    t = col.type
    if isinstance(t, sa.JSON):
        return "jsonb"
    if isinstance(t, UTCDateTime):
        return "timestamptz"
    if isinstance(t, sa.Date):
        return "date"
    if isinstance(t, sa.Float):
        return "float8"
    if isinstance(t, sa.BigInteger):
        return "int8"
    if isinstance(t, sa.Integer):
        return "int4"
    if isinstance(t, (sa.String, sa.Text)):
        return "text"
    raise NotImplementedError(f"no PostgreSQL type for {col}")


def _pg_recordset(conn: sa.Connection, table: sa.Table, cols: Sequence[str], rows: Sequence[dict]) \
        -> tuple[list[str], str, dict] | None:
    """(value expression per column, FROM item, params) reading ``rows`` as records ``x``: one JSON array per column,
    zipped server-side by ``ROWS FROM (json_array_elements...)`` (several times cheaper to parse than a JSON array of
    objects). None when the rows are not plain JSON (the caller then falls back to executemany)."""
    params = {}
    try:
        for i, c in enumerate(cols):
            params[f"c{i}"] = orjson.dumps([r[c] for r in rows], option=orjson.OPT_NAIVE_UTC).decode()
    except TypeError:
        return None
    q = conn.dialect.identifier_preparer.quote
    types = [_pg_type(table.c[c]) for c in cols]
    # a JSON column keeps JSON null as the JSON value null (SQLAlchemy's none_as_null=False); others: SQL NULL
    srfs = ", ".join(f"json_array_elements{'' if t == 'jsonb' else '_text'}(%(c{i})s::json)"
                     for i, t in enumerate(types))
    exprs = [f"x.{q(c)}::{t}" for c, t in zip(cols, types)]
    return exprs, f"ROWS FROM ({srfs}) AS x({', '.join(q(c) for c in cols)})", params


def _pg_insert_sql(conn: sa.Connection, table: sa.Table, rows: list[dict], update_key: str | tuple | None,
                   add: Sequence[str] = ()) -> tuple[str, dict] | None:
    """The set-based INSERT of ``rows`` (see ``_insert_rows``), or None when they are not plain JSON."""
    cols = list(rows[0])
    rs = _pg_recordset(conn, table, cols, rows)
    if rs is None:
        return None
    q = conn.dialect.identifier_preparer.quote
    t = q(table.name)
    exprs, source, params = rs
    sql = f"INSERT INTO {t} ({', '.join(q(c) for c in cols)}) SELECT {', '.join(exprs)} FROM {source} "
    if update_key is None:
        sql += "ON CONFLICT DO NOTHING"
    else:
        keys = (update_key,) if isinstance(update_key, str) else tuple(update_key)
        sql += (f"ON CONFLICT ({', '.join(q(k) for k in keys)}) DO UPDATE SET "
                + ", ".join(f"{q(c)} = {t}.{q(c)} + EXCLUDED.{q(c)}" if c in add else f"{q(c)} = EXCLUDED.{q(c)}"
                            for c in cols if c not in keys))
    return sql, params


def _insert_rows(conn: sa.Connection, table: sa.Table, rows: list[dict], update_key: str | tuple | None = None,
                 add: Sequence[str] = ()) -> None:
    """INSERT ``rows`` (dicts with the same keys, distinct primary keys); a row whose key exists is skipped, or with
    ``update_key`` (an upsert: the key column or columns) the existing row takes the new values, except the ``add``
    columns, which are added to."""
    if not rows:
        return
    if _is_pg(conn):
        st = _pg_insert_sql(conn, table, rows, update_key, add)
        if st is not None:
            conn.exec_driver_sql(*st)
            return
    cols = list(rows[0])
    ins = dialect_insert(conn, table)
    if update_key is None:
        stmt = ins.on_conflict_do_nothing()
    else:
        keys = (update_key,) if isinstance(update_key, str) else tuple(update_key)
        stmt = ins.on_conflict_do_update(index_elements=list(keys), set_={
            c: table.c[c] + ins.excluded[c] if c in add else ins.excluded[c] for c in cols if c not in keys})
    conn.execute(stmt, rows)


def _insert_new(conn: sa.Connection, table: sa.Table, recs: list[dict], row: Any) -> list[dict]:
    """Insert ``row(r)`` for the records ``recs`` not seen before (in this batch or in the table); returns those.
    PostgreSQL: one INSERT ... ON CONFLICT DO NOTHING RETURNING tells which were new; elsewhere a lookup first."""
    if _is_pg(conn):
        recs = _unique(recs)
        rows = [row(r) for r in recs]
        st = _pg_insert_sql(conn, table, rows, None) if rows else None
        if st is not None:
            new = set(conn.exec_driver_sql(st[0] + " RETURNING event_id", st[1]).scalars())
            return [r for r in recs if r["event_id"] in new]
    recs = _new_only(conn, table, recs)
    _insert_rows(conn, table, [row(r) for r in recs])
    return recs


def _update_rows(conn: sa.Connection, table: sa.Table, key: str, rows: list[dict]) -> None:
    """UPDATE the rows of ``table`` named by ``key``: ``rows`` = dicts of the key and the new column values."""
    if not rows:
        return
    cols = list(rows[0])
    sets = [c for c in cols if c != key]
    rs = _pg_recordset(conn, table, cols, rows) if _is_pg(conn) else None
    if rs is not None:
        q = conn.dialect.identifier_preparer.quote
        t = q(table.name)
        exprs, source, params = rs
        sets_sql = ", ".join(f"{q(c)} = {e}" for c, e in zip(cols, exprs) if c != key)
        conn.exec_driver_sql(f"UPDATE {t} SET {sets_sql} FROM {source} WHERE {t}.{q(key)} = x.{q(key)}", params)
        return
    stmt = table.update().where(table.c[key] == sa.bindparam("b_" + key)).values(
        {c: sa.bindparam("b_" + c, type_=table.c[c].type) for c in sets})
    conn.execute(stmt, [{"b_" + c: r[c] for c in cols} for r in rows])


def _existing_ids(conn: sa.Connection, table: sa.Table, ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for where in _key_filters(conn, table.c.event_id, ids):
        found.update(conn.execute(sa.select(table.c.event_id).where(where)).scalars())
    return found


def _unique(recs: list[dict]) -> list[dict]:
    """The first record of each event id."""
    seen: set[str] = set()
    unique = []
    for r in recs:
        if r["event_id"] not in seen:
            seen.add(r["event_id"])
            unique.append(r)
    return unique


def _new_only(conn: sa.Connection, table: sa.Table, recs: list[dict]) -> list[dict]:
    """Drop records seen before (in this batch or in the table): the idempotence step."""
    unique = _unique(recs)
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
    staged = _new_only(conn, lead_stage_history, staged)

    # -- touchpoint archive: seq per lead continues from the stored maximum, each row chained to the previous one
    #    (projections/audit_chain.py); join resolutions are archived too (replays need them)
    archived = len(tps)
    if tps:
        _archive(conn, tps)
    tps = [r for r in tps if r["type"] != RESOLVE_TYPE]

    if scored:
        scored = _insert_new(conn, lead_score_history, scored, lambda r: dict(
            event_id=r["event_id"], lead=r["lead"], seq=id_seq(r["event_id"]), at=ts(r["at"]),
            fit=float(r.get("fit") or 0), engagement=float(r.get("engagement") or 0),
            score=float(r.get("score") or 0), fit_before=r.get("fit_before"),
            engagement_before=r.get("engagement_before"), explanation=r.get("explanation"),
            cause_event_id=r.get("cause_event_id"), rules_version=r.get("rules_version")))

    if staged:
        rows = [dict(event_id=r["event_id"], lead=r["lead"], n=id_seq(r["event_id"]), from_stage=r.get("from"),
                     to_stage=r["to"], at=ts(r["at"]), left_at=None, cause_event_id=r.get("cause_event_id"),
                     rules_version=r.get("rules_version"), reason=r.get("reason"), by=r.get("by"))
                for r in staged]
        later = _left_at_before_insert(conn, rows)
        _insert_rows(conn, lead_stage_history, rows)
        if later is not None:
            _update_rows(conn, lead_stage_history, "event_id", later)
        else:
            _fix_left_at(conn, sorted({r["lead"] for r in staged}))

    if handed:
        handed = _insert_new(conn, handoffs, handed, lambda r: dict(
            event_id=r["event_id"], lead=r["lead"], episode=int(r.get("episode") or id_seq(r["event_id"]) or 0),
            at=ts(r["at"]), fit=r.get("fit"), engagement=r.get("engagement"), score=r.get("score"),
            rules_version=r.get("rules_version"), cause_event_id=r.get("cause_event_id"),
            explanation=r.get("explanation"), top_touchpoints=r.get("top_touchpoints"),
            first_sales_touch_at=None, time_to_first_touch_s=None))

    sales_leads = {r["lead"] for r in handed} | {touchpoint_lead(r) for r in tps if r["type"] in SALES_TOUCH_TYPES}
    if sales_leads:
        _fix_first_sales_touch(conn, sorted(sales_leads))

    regrouped = _update_leads(conn, tps, scored, staged, handed)
    _update_funnel(conn, regrouped | {r["lead"] for r in staged})
    _update_funnel_handoffs(conn, regrouped | sales_leads)
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
    for where in _key_filters(conn, a.c.lead, keys):
        top = sa.select(a.c.lead, sa.func.max(a.c.seq).label("m")).where(where) \
            .group_by(a.c.lead).subquery()
        rows = conn.execute(sa.select(a.c.lead, a.c.seq, a.c.hash, a.c.event_id)
                            .join(top, sa.and_(a.c.lead == top.c.lead, a.c.seq == top.c.m)))
        last.update({lead: (seq, h, eid) for lead, seq, h, eid in rows})
    # a join resolution takes the times of the event that asked for it (archived before it, same lead)
    times = {r["event_id"]: (r["occurred_at"], r.get("received_at")) for r in tps if r["type"] != RESOLVE_TYPE}
    wanted = sorted({r["request_id"] for r in tps if r["type"] == RESOLVE_TYPE and r.get("request_id")} - set(times))
    for where in _key_filters(conn, a.c.event_id, wanted):
        for eid, occ, ra in conn.execute(sa.select(a.c.event_id, a.c.occurred_at, a.c.received_at).where(where)):
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
    _insert_rows(conn, a, rows_out)


def _left_at_before_insert(conn: sa.Connection, rows: list[dict]) -> list[dict] | None:
    """``left_at`` of new transitions set before they are inserted (no second write of a fresh row); returns the
    updates of stored transitions followed by a new one. None, changing nothing, when a lead's transitions are not
    numbered 1..n uniquely (then ``_fix_left_at`` orders them after the insert exactly as the database does)."""
    h = lead_stage_history
    by_lead: dict[str, list] = {}
    for r in rows:
        by_lead.setdefault(r["lead"], []).append((r["n"], r["at"], r))
    for where in _key_filters(conn, h.c.lead, sorted(by_lead)):
        for eid, lead, n, at, left_at in conn.execute(sa.select(h.c.event_id, h.c.lead, h.c.n, h.c.at, h.c.left_at)
                                                     .where(where)).all():
            by_lead[lead].append((n, at, (eid, left_at)))
    for items in by_lead.values():
        ns = {n for n, _at, _x in items}
        if None in ns or len(ns) != len(items):
            return None
    updates = []
    for items in by_lead.values():
        items.sort(key=lambda x: x[0])
        for i, (_n, _at, x) in enumerate(items):
            want = items[i + 1][1] if i + 1 < len(items) else None
            if type(x) is dict:
                x["left_at"] = want
            elif want != x[1]:
                updates.append({"event_id": x[0], "left_at": want})
    return updates


def _fix_left_at(conn: sa.Connection, lead_keys: list[str]) -> None:
    """``left_at`` of a transition = ``at`` of the lead's next transition (by transition number)."""
    h = lead_stage_history
    updates = []
    for where in _key_filters(conn, h.c.lead, lead_keys):
        rows = conn.execute(sa.select(h.c.event_id, h.c.lead, h.c.n, h.c.at, h.c.left_at)
                            .where(where).order_by(h.c.lead, h.c.n, h.c.at, h.c.event_id)).all()
        for i, row in enumerate(rows):
            nxt = rows[i + 1] if i + 1 < len(rows) and rows[i + 1].lead == row.lead else None
            want = nxt.at if nxt is not None else None
            if want != row.left_at:
                updates.append({"event_id": row.event_id, "left_at": want})
    _update_rows(conn, h, "event_id", updates)


def _fix_first_sales_touch(conn: sa.Connection, lead_keys: list[str]) -> None:
    """First ``call_logged`` / ``stage_changed`` touchpoint at or after each hand-off."""
    a, ho = touchpoint_archive, handoffs
    updates = []
    for part in _key_parts(conn, lead_keys):
        touches: dict[str, list[datetime]] = {}
        for lead, at in conn.execute(sa.select(a.c.lead, a.c.occurred_at)
                                     .where(_in(conn, a.c.lead, part), a.c.type.in_(SALES_TOUCH_TYPES))).all():
            touches.setdefault(lead, []).append(at)
        for row in conn.execute(sa.select(ho.c.event_id, ho.c.lead, ho.c.at, ho.c.first_sales_touch_at)
                                .where(_in(conn, ho.c.lead, part))).all():
            after = [t for t in touches.get(row.lead, ()) if t >= row.at]
            first = min(after) if after else None
            if first != row.first_sales_touch_at:
                updates.append({"event_id": row.event_id, "first_sales_touch_at": first,
                                "time_to_first_touch_s": (first - row.at).total_seconds() if first else None})
    _update_rows(conn, ho, "event_id", updates)


_LEAD_COLS = [str(c.name) for c in leads.columns]  # plain str keys (orjson refuses str subclasses)


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
                  handed: list[dict]) -> set[str]:
    """Update ``leads``; returns the leads whose funnel group (first touch, source, campaign) is new or changed."""
    keys = {r["lead"] for r in scored} | {r["lead"] for r in staged} | {r["lead"] for r in handed}
    for r in tps:
        key = touchpoint_lead(r)
        if not _is_anonymous(r, key):
            keys.add(key)
    if not keys:
        return set()
    state: dict[str, dict] = {}
    for where in _key_filters(conn, leads.c.lead, sorted(keys)):
        for row in conn.execute(sa.select(leads).where(where)).mappings().all():
            state[row["lead"]] = dict(row)
    before = {k: tuple(s[c] for c in _GROUP) for k, s in state.items()}

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

    # every touched lead, new or not, in one upsert of its final values for this batch
    _insert_rows(conn, leads, [{c: s[c] for c in _LEAD_COLS} for s in state.values()], update_key="lead")
    return {k for k, s in state.items() if before.get(k) != tuple(s[c] for c in _GROUP)}


# ---------------------------------------------------------------- the funnel (revision 0004)
#
# funnel_leads: per lead with a stage transition, its group (first touch day, source, campaign, cohort) and its
# first entry into each stage; funnel_durations: the values the medians are taken of (each completed stay, and per
# lead first touch -> MQL / won, MQL -> won, SQL -> won, in days); funnel_daily: per (day, source, campaign) bucket
# the counts GET /v1/funnel sums. A lead is recomputed from its stored transitions and its leads row whenever one
# of its transitions arrives or its first touch changes; only the rows that differ are written, and the buckets
# it left or joined are adjusted by the difference of its counts. So the tables depend only on the stored history
# and leads (never on batch boundaries or topic interleaving), and equal a recount (``rebuild_funnel``).

#: the lead columns that place a lead in the funnel's groups
_GROUP = ("first_touch_at", "first_source", "first_campaign", "cohort")
_COUNTS = ("leads", *[f"reached_{s}" for s in STAGES], *[f"conv_{a}_{b}" for a, b in FUNNEL_PAIRS],
           *[f"n_stay_{s}" for s in STAGES], *[f"n_{m}" for m in DURATION_METRICS[1:]])
_STAGE_SET = frozenset(STAGES)


def _days(a: datetime, b: datetime) -> float:
    """Days from a to b, computed as the query API always has: timedelta seconds / 86400."""
    return (b - a).total_seconds() / 86400.0


def _bucket(day: Any, source: Any, campaign: Any) -> str:
    return orjson.dumps([day.isoformat() if day is not None else None, source, campaign]).decode()


def funnel_rows(lead: str, group: tuple, history: list[tuple]) -> tuple[dict, list[dict]]:
    """(funnel_leads row, funnel_durations rows) of one lead from its group ``(first_touch_at, first_source,
    first_campaign, cohort)`` and its transitions ``[(event_id, to_stage, at, left_at)]``."""
    ft, source, campaign, cohort = group
    day = ft.astimezone(timezone.utc).date() if ft is not None else None
    bucket = _bucket(day, source, campaign)
    first: dict[str, datetime] = {}
    for _eid, stage, at, _left in history:
        if stage not in first or at < first[stage]:
            first[stage] = at
    base = {"lead": lead, "bucket": bucket, "day": day, "source": source, "campaign": campaign, "cohort": cohort}
    row = {**base, "first_touch_at": ft, **{f"at_{s}": first.get(s) for s in STAGES}}
    durs = [{**base, "metric": "stay", "key": eid, "stage": stage, "days": _days(at, left)}
            for eid, stage, at, left in history if left is not None]
    mql, won, sql_ = first.get("mql"), first.get("won"), first.get("sql")
    for metric, a, b, cond in (("touch_mql", ft, mql, True), ("touch_won", ft, won, True),
                               ("mql_won", mql, won, mql is not None and won is not None and won >= mql),
                               ("sql_won", sql_, won, sql_ is not None and won is not None and won >= sql_)):
        if a is not None and b is not None and cond:
            durs.append({**base, "metric": metric, "key": lead, "stage": "", "days": _days(a, b)})
    return row, durs


def _counts(row: dict, durs: Iterable[dict]) -> dict[str, int]:
    """A lead's share of its funnel_daily bucket."""
    c = dict.fromkeys(_COUNTS, 0)
    c["leads"] = 1
    for s in STAGES:
        if row[f"at_{s}"] is not None:
            c[f"reached_{s}"] = 1
    for a, b in FUNNEL_PAIRS:
        ta, tb = row[f"at_{a}"], row[f"at_{b}"]
        if ta is not None and tb is not None and tb >= ta:
            c[f"conv_{a}_{b}"] = 1
    for d in durs:
        if d["metric"] != "stay":
            c[f"n_{d['metric']}"] += 1
        elif d["stage"] in _STAGE_SET:
            c[f"n_stay_{d['stage']}"] += 1
    return c


def _add_counts(daily: dict[str, dict], row: dict, counts: dict[str, int], sign: int,
                monthly: dict[str, dict] | None = None) -> None:
    """Add ``sign`` x a lead's counts to its funnel_daily bucket (and its funnel_monthly bucket)."""
    d = daily.get(row["bucket"])
    if d is None:
        d = daily[row["bucket"]] = {"bucket": row["bucket"], "day": row["day"], "source": row["source"],
                                    "campaign": row["campaign"], "cohort": row["cohort"], **dict.fromkeys(_COUNTS, 0)}
    for k, v in counts.items():
        if v:
            d[k] += sign * v
    if monthly is not None:
        _add_month(monthly, d, counts, sign)


def _month_of(day: Any) -> str | None:
    return day.strftime("%Y-%m") if day is not None else None


def _add_month(monthly: dict[str, dict], d: dict, counts: dict[str, int], sign: int) -> None:
    """Add ``sign`` x ``counts`` to the funnel_monthly bucket of funnel_daily row ``d``."""
    month = _month_of(d["day"])
    key = orjson.dumps([month, d["cohort"], d["source"], d["campaign"]]).decode()
    m = monthly.get(key)
    if m is None:
        m = monthly[key] = {"bucket": key, "month": month, "source": d["source"], "campaign": d["campaign"],
                            "cohort": d["cohort"], **dict.fromkeys(_COUNTS, 0)}
    for k in _COUNTS:
        if counts[k]:
            m[k] += sign * counts[k]


def _write_deltas(conn: sa.Connection, table: sa.Table, deltas: dict[str, dict]) -> None:
    """Add the non-zero ``deltas`` to their buckets of ``table`` (funnel_daily / funnel_monthly); a bucket left with
    no lead is deleted. In bucket order: two projectors adding to shared buckets lock them in the same order."""
    changed = sorted((d for d in deltas.values() if any(d[k] for k in _COUNTS)), key=lambda d: d["bucket"])
    _insert_rows(conn, table, changed, update_key="bucket", add=_COUNTS)
    emptied = sorted({d["bucket"] for d in changed if d["leads"] < 0})
    for where in _key_filters(conn, table.c.bucket, emptied):
        conn.execute(table.delete().where(where, table.c.leads == 0))


def fill_funnel_monthly(conn: sa.Connection, chunk: int = 5000) -> int:
    """Refill funnel_monthly by rolling up funnel_daily (revision 0006's backfill); returns its row count."""
    conn.execute(funnel_monthly.delete())
    monthly: dict[str, dict] = {}
    cols = ["bucket", "day", "source", "campaign", "cohort", *_COUNTS]
    for r in conn.execute(sa.select(*[funnel_daily.c[c] for c in cols])).mappings():
        _add_month(monthly, r, {k: int(r[k]) for k in _COUNTS}, +1)
    rows = list(monthly.values())
    for i in range(0, len(rows), chunk):
        _insert_rows(conn, funnel_monthly, rows[i:i + chunk])
    return len(rows)


_FL_COLS = [str(c.name) for c in funnel_leads.columns]
_FD_COLS = [str(c.name) for c in funnel_durations.columns]


def _update_funnel(conn: sa.Connection, touched: set[str]) -> None:
    if not touched:
        return
    fl, fd, h = funnel_leads, funnel_durations, lead_stage_history
    history: dict[str, list[tuple]] = {}
    groups: dict[str, tuple] = {}
    old_rows: dict[str, dict] = {}
    old_durs: dict[str, dict[tuple, dict]] = {}
    for part in _key_parts(conn, sorted(touched)):
        for lead, eid, stage, at, left in conn.execute(
                sa.select(h.c.lead, h.c.event_id, h.c.to_stage, h.c.at, h.c.left_at).where(_in(conn, h.c.lead, part))
        ).all():
            history.setdefault(lead, []).append((eid, stage, at, left))
        for lead, *group in conn.execute(sa.select(leads.c.lead, *[leads.c[c] for c in _GROUP])
                                         .where(_in(conn, leads.c.lead, part))).all():
            groups[lead] = tuple(group)
        for r in conn.execute(sa.select(fl).where(_in(conn, fl.c.lead, part))).mappings().all():
            old_rows[r["lead"]] = {c: r[c] for c in _FL_COLS}
        for r in conn.execute(sa.select(fd).where(_in(conn, fd.c.lead, part))).mappings().all():
            old_durs.setdefault(r["lead"], {})[(r["metric"], r["key"])] = {c: r[c] for c in _FD_COLS}
    rows, durs, gone = [], [], []
    daily: dict[str, dict] = {}
    monthly: dict[str, dict] = {}
    for lead in sorted(history):
        row, new = funnel_rows(lead, groups.get(lead, (None, None, None, None)), history[lead])
        old_row, olds = old_rows.get(lead), old_durs.get(lead, {})
        news = {(d["metric"], d["key"]): d for d in new}
        if old_row != row:
            rows.append(row)
        durs += [d for k, d in news.items() if olds.get(k) != d]
        gone += [(lead, m, k) for m, k in olds if (m, k) not in news]
        if old_row is not None:
            _add_counts(daily, old_row, _counts(old_row, olds.values()), -1, monthly)
        _add_counts(daily, row, _counts(row, new), +1, monthly)
    _insert_rows(conn, fl, rows, update_key="lead")
    for lead, metric, key in gone:
        conn.execute(fd.delete().where(fd.c.lead == lead, fd.c.metric == metric, fd.c.key == key))
    _insert_rows(conn, fd, durs, update_key=("lead", "metric", "key"))
    _write_deltas(conn, funnel_daily, daily)
    _write_deltas(conn, funnel_monthly, monthly)


def _funnel_handoff_rows(conn: sa.Connection, where: Any) -> list[dict]:
    """funnel_handoffs rows of the hand-offs matching ``where`` (of leads that have a leads row, as the funnel)."""
    ho = handoffs
    out = []
    for eid, lead, secs, ft, source, campaign, cohort in conn.execute(
            sa.select(ho.c.event_id, ho.c.lead, ho.c.time_to_first_touch_s, leads.c.first_touch_at,
                      leads.c.first_source, leads.c.first_campaign, leads.c.cohort)
            .select_from(ho.join(leads, leads.c.lead == ho.c.lead)).where(where)).all():
        out.append({"event_id": eid, "lead": lead,
                    "day": ft.astimezone(timezone.utc).date() if ft is not None else None,
                    "source": source, "campaign": campaign, "cohort": cohort, "secs": secs})
    return out


def _update_funnel_handoffs(conn: sa.Connection, touched: set[str]) -> None:
    """Rewrite the funnel_handoffs rows of the leads whose hand-offs, first sales touch or group may have changed."""
    for part in _key_parts(conn, sorted(touched)):
        conn.execute(funnel_handoffs.delete().where(_in(conn, funnel_handoffs.c.lead, part)))
        _insert_rows(conn, funnel_handoffs, _funnel_handoff_rows(conn, _in(conn, handoffs.c.lead, part)))


def rebuild_funnel_handoffs(conn: sa.Connection, chunk: int = 5000) -> int:
    """Refill funnel_handoffs from handoffs and leads (revision 0005's backfill); returns its row count."""
    conn.execute(funnel_handoffs.delete())
    last, total = None, 0
    while True:
        q = sa.select(handoffs.c.event_id).order_by(handoffs.c.event_id).limit(chunk)
        if last is not None:
            q = q.where(handoffs.c.event_id > last)
        part = list(conn.execute(q).scalars())
        if not part:
            return total
        last = part[-1]
        rows = _funnel_handoff_rows(conn, _in(conn, handoffs.c.event_id, part))
        _insert_rows(conn, funnel_handoffs, rows)
        total += len(rows)


def rebuild_funnel(conn: sa.Connection, chunk: int = 5000, monthly_table: bool = True) -> int:
    """Recount the funnel tables from lead_stage_history and leads (revision 0004's backfill); returns the number
    of leads in the funnel."""
    fl, fd, h = funnel_leads, funnel_durations, lead_stage_history
    for t in ((funnel_monthly,) if monthly_table else ()) + (funnel_daily, fd, fl):
        conn.execute(t.delete())
    last, total = None, 0
    daily: dict[str, dict] = {}
    monthly: dict[str, dict] = {}
    while True:
        q = sa.select(h.c.lead).distinct().order_by(h.c.lead).limit(chunk)
        if last is not None:
            q = q.where(h.c.lead > last)
        part = list(conn.execute(q).scalars())
        if not part:
            break
        last = part[-1]
        history: dict[str, list[tuple]] = {}
        for lead, eid, stage, at, left in conn.execute(
                sa.select(h.c.lead, h.c.event_id, h.c.to_stage, h.c.at, h.c.left_at).where(_in(conn, h.c.lead, part))
        ).all():
            history.setdefault(lead, []).append((eid, stage, at, left))
        groups = {lead: tuple(g) for lead, *g in conn.execute(
            sa.select(leads.c.lead, *[leads.c[c] for c in _GROUP]).where(_in(conn, leads.c.lead, part))).all()}
        rows, durs = [], []
        for lead in part:
            row, d = funnel_rows(lead, groups.get(lead, (None, None, None, None)), history[lead])
            rows.append(row)
            durs.extend(d)
            _add_counts(daily, row, _counts(row, d), +1, monthly)
        for i in range(0, len(rows), chunk):
            _insert_rows(conn, fl, rows[i:i + chunk])
        for i in range(0, len(durs), chunk):
            _insert_rows(conn, fd, durs[i:i + chunk])
        total += len(rows)
    buckets = list(daily.values())
    for i in range(0, len(buckets), chunk):
        _insert_rows(conn, funnel_daily, buckets[i:i + chunk])
    months = list(monthly.values()) if monthly_table else []   # revision 0004 runs before funnel_monthly exists
    for i in range(0, len(months), chunk):
        _insert_rows(conn, funnel_monthly, months[i:i + chunk])
    return total


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

"""The query HTTP API for BI over the SQL projections (OpenAPI at /docs and /openapi.json).

``GET /v1/leads``          filter, sort, cursor-paginate (or ``format=csv`` to export every matching lead)
``GET /v1/leads/{lead}``   one lead: state, latest score with its explanation, stage history, hand-offs
``GET /v1/funnel``         conversion stage -> next stage, median days in stage, days first touch -> MQL / won,
                           by source, campaign or monthly cohort of first touch, within a first-touch date range
``GET /v1/forecast``       "to win N deals in D days, how many MQLs / SQLs do we need now?"

Bearer tokens come from ``LEADLEDGER_API_TOKENS`` (JSON ``{"token": "role"}``; roles bi, auditor, sales, admin).
``leadledger query-api`` -> :func:`main`.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import csv
import io
import json
import logging
import math
import os
import statistics
import sys
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Iterator, Literal, Optional

import orjson
import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from projections.sql_schema import DURATION_METRICS, FUNNEL_PAIRS, FUNNEL_PATH, STAGES, funnel_daily, \
    funnel_durations, funnel_monthly, handoffs, lead_score_history, lead_stage_history, leads, make_engine

log = logging.getLogger("leadledger.query_api")

#: development tokens, used only when LEADLEDGER_API_TOKENS is unset (never deploy with them)
DEV_TOKENS = {"dev-bi-token": "bi", "dev-admin-token": "admin"}
ROLES = ("bi", "auditor", "sales", "admin")
READ_ROLES = frozenset(ROLES)
MAX_LIMIT = 500
#: below these counts the forecast says the history is too thin to trust
THIN_MQLS = 30
THIN_WINS = 5

LEAD_FIELDS = ("lead", "email", "stage", "fit", "engagement", "score", "rules_version", "attributes",
               "first_touch_at", "last_touch_at", "first_source", "first_campaign", "cohort", "mql_at", "owner",
               "updated_at", "handoffs")
SORTS = {"score": leads.c.score, "updated_at": leads.c.updated_at, "mql_at": leads.c.mql_at}


def load_tokens(raw: str | None = None) -> dict[str, str]:
    raw = os.environ.get("LEADLEDGER_API_TOKENS") if raw is None else raw
    if not raw:
        log.warning("LEADLEDGER_API_TOKENS unset: using the development tokens")
        return dict(DEV_TOKENS)
    tokens = json.loads(raw)
    if not isinstance(tokens, dict) or not all(isinstance(k, str) and v in ROLES for k, v in tokens.items()):
        raise ValueError(f"LEADLEDGER_API_TOKENS must be a JSON object token -> one of {ROLES}")
    return tokens


def _bad(param: str, msg: str) -> HTTPException:
    return HTTPException(status_code=422, detail=[{"loc": ["query", param], "msg": msg, "type": "value_error"}])


def _iso(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.astimezone(timezone.utc).isoformat(timespec="microseconds")
    return v


def _lead_json(row) -> dict:
    return {f: _iso(row[f]) for f in LEAD_FIELDS}


def json_response(body: Any) -> Response:
    """The response as orjson writes it (FastAPI's generic encoder walks every value: 10x slower on 500 leads)."""
    return Response(orjson.dumps(body), media_type="application/json")


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def _encode_cursor(sort: str, direction: str, value: Any, lead: str) -> str:
    raw = orjson.dumps([sort, direction, _iso(value), lead])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, sort: str, direction: str) -> tuple[Any, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        s, d, value, lead = orjson.loads(raw)
        if s != sort or d != direction or not isinstance(lead, str):
            raise ValueError("cursor belongs to another sort order")
        if sort == "score":
            value = float(value)
        else:
            value = _utc(datetime.fromisoformat(value))
        return value, lead
    except Exception as exc:  # noqa: BLE001 - anything wrong with an opaque cursor is the client's
        raise _bad("cursor", f"invalid cursor ({exc.__class__.__name__})") from None


def _days(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds() / 86400.0


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def funnel_metrics(rows: list[tuple]) -> dict:
    """Funnel numbers from ``(lead, first_touch_at, to_stage, at, left_at)`` rows of one group.

    * conversion S -> N: of the leads that ever entered S, the share that entered N at or after their first
      entry into S (so SGLs entering at `sql` count for sql -> opportunity, not for mql -> sal);
    * median days in stage: over completed stays (entry to the lead's next transition);
    * median days first touch -> MQL / won: to the first entry into mql / won.
    """
    first: dict[str, dict[str, datetime]] = {}
    touch: dict[str, datetime | None] = {}
    stays: dict[str, list[float]] = {}
    for lead, first_touch_at, to_stage, at, left_at in rows:
        touch[lead] = first_touch_at
        f = first.setdefault(lead, {})
        if to_stage not in f or at < f[to_stage]:
            f[to_stage] = at
        if left_at is not None:
            stays.setdefault(to_stage, []).append(_days(at, left_at))
    conversion = []
    for s, n in zip(FUNNEL_PATH, FUNNEL_PATH[1:]):
        entered = [f for f in first.values() if s in f]
        converted = [f for f in entered if n in f and f[n] >= f[s]]
        conversion.append({"from": s, "to": n, "entered": len(entered), "converted": len(converted),
                           "rate": round(len(converted) / len(entered), 6) if entered else None})
    to_mql = [_days(touch[l], f["mql"]) for l, f in first.items() if "mql" in f and touch[l] is not None]
    to_won = [_days(touch[l], f["won"]) for l, f in first.items() if "won" in f and touch[l] is not None]
    mql_to_won = [_days(f["mql"], f["won"]) for f in first.values() if "mql" in f and "won" in f
                  and f["won"] >= f["mql"]]
    sql_to_won = [_days(f["sql"], f["won"]) for f in first.values() if "sql" in f and "won" in f
                  and f["won"] >= f["sql"]]
    return {
        "leads": len(first),
        "conversion": conversion,
        "median_days_in_stage": {s: _median(stays[s]) for s in STAGES if s in stays},
        "median_days_first_touch_to_mql": _median(to_mql),
        "median_days_first_touch_to_won": _median(to_won),
        "median_days_mql_to_won": _median(mql_to_won),
        "median_days_sql_to_won": _median(sql_to_won),
        "reached": {s: sum(1 for f in first.values() if s in f) for s in STAGES},
    }


# -- the funnel from the projector's aggregates (projections/sql_writer.py: funnel_leads / funnel_durations /
#    funnel_daily): the numbers of funnel_metrics over every transition, without reading the transitions

_COUNTS = ("leads", *[f"reached_{s}" for s in STAGES], *[f"conv_{a}_{b}" for a, b in FUNNEL_PAIRS],
           *[f"n_stay_{s}" for s in STAGES], *[f"n_{m}" for m in DURATION_METRICS[1:]])
_GROUP_COLS = {"source": "source", "campaign": "campaign", "cohort": "cohort"}


def _middles(conn, group_by: Optional[str], wanted: list[tuple], date_from, date_to) -> dict[tuple, list[float]]:
    """The middle value(s) ``{(g, metric, stage): [lower, upper]}`` of the funnel_durations of each wanted
    ``(g, metric, stage, n)`` (n = how many there are): the k-th smallest read through an ordered index on
    PostgreSQL, a window over the durations elsewhere."""
    d = funnel_durations
    out: dict[tuple, list[float]] = {}
    if not wanted:
        return out
    gname = _GROUP_COLS.get(group_by)
    ranges = []
    if date_from is not None:
        ranges.append("d.day >= :date_from")
    if date_to is not None:
        ranges.append("d.day <= :date_to")
    params: dict[str, Any] = {"date_from": date_from, "date_to": date_to}
    if conn.dialect.name == "postgresql":
        for null_group in (False, True):
            reqs = [{"i": i, "g": g, "metric": m, "stage": s, "off": (n + 1) // 2 - 1, "lim": 2 - n % 2}
                    for i, (g, m, s, n) in enumerate(wanted) if (g is None) == null_group]
            if not reqs:
                continue
            where = ["d.metric = v.metric", "d.stage = v.stage", *ranges]
            if gname is not None:
                where.append(f"d.{gname} IS NULL" if null_group else f"d.{gname} = v.g")
            q = sa.text(f"SELECT v.i, x.days FROM json_to_recordset(CAST(:reqs AS json)) "
                        f"AS v(i int, g text, metric text, stage text, off int, lim int) "
                        f"CROSS JOIN LATERAL (SELECT d.days FROM funnel_durations d WHERE {' AND '.join(where)} "
                        f"ORDER BY d.days OFFSET v.off LIMIT v.lim) x ORDER BY v.i, x.days")
            for i, days in conn.execute(q, {**params, "reqs": orjson.dumps(reqs).decode()}):
                g, m, s, _n = wanted[i]
                out.setdefault((g, m, s), []).append(days)
        return out
    g = f"d.{gname}" if gname is not None else "NULL"
    q = sa.text(f"SELECT g, metric, stage, days FROM (SELECT {g} AS g, d.metric, d.stage, d.days, "
                f"ROW_NUMBER() OVER (PARTITION BY {g}, d.metric, d.stage ORDER BY d.days) AS rn, "
                f"COUNT(*) OVER (PARTITION BY {g}, d.metric, d.stage) AS n FROM funnel_durations d"
                f"{' WHERE ' + ' AND '.join(ranges) if ranges else ''}) m "
                f"WHERE rn = (n + 1) / 2 OR rn = n / 2 + 1 ORDER BY g, metric, stage, rn")
    for g, m, s, days in conn.execute(q, params):
        out.setdefault((g, m, s), []).append(days)
    return out


def _median2(vals: Optional[list[float]]) -> float | None:
    """statistics.median from the middle value (odd count) or the two middle values (even count), rounded."""
    if not vals:
        return None
    return round(vals[0] if len(vals) == 1 else (vals[0] + vals[1]) / 2, 4)


def _month(d: date) -> str:
    return f"{d.year:04d}-{d.month:02d}"


def _sums_query(group_by: Optional[str], date_from: Optional[date], date_to: Optional[date]) -> Any:
    """The funnel counts per group for first touches in [date_from, date_to]: the whole months of the range from
    funnel_monthly, its edge days from funnel_daily (no range: funnel_monthly alone)."""
    m, f = funnel_monthly, funnel_daily
    gname = _GROUP_COLS.get(group_by)

    def part(t: sa.Table, *where: Any) -> Any:
        g = t.c[gname] if gname is not None else sa.literal(None, sa.String)
        return sa.select(g.label("g"), *[t.c[c] for c in _COUNTS]).where(*where)

    if date_from is None and date_to is None:
        parts = [part(m)]
    else:
        # whole months inside the range: [first, last] (None = unbounded on that side)
        first = None if date_from is None else (
            date_from if date_from.day == 1 else (date_from.replace(day=28) + timedelta(days=4)).replace(day=1))
        last = None if date_to is None else (
            date_to if (date_to + timedelta(days=1)).day == 1 else date_to.replace(day=1) - timedelta(days=1))
        whole = first is None or last is None or first <= last
        edge = [f.c.day.isnot(None)]
        if date_from is not None:
            edge.append(f.c.day >= date_from)
        if date_to is not None:
            edge.append(f.c.day <= date_to)
        parts = []
        if whole:
            mw = [m.c.month.isnot(None)]
            if first is not None:
                mw.append(m.c.month >= _month(first))
                edge_lo = f.c.day < first
            if last is not None:
                mw.append(m.c.month <= _month(last))
                edge_hi = f.c.day > (last.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)
            parts.append(part(m, *mw))
            outside = [c for c, on in ((edge_lo if first is not None else None, first is not None),
                                       (edge_hi if last is not None else None, last is not None)) if on]
            edge.append(sa.or_(*outside) if outside else sa.false())
        parts.append(part(f, *edge))
    u = (parts[0] if len(parts) == 1 else sa.union_all(*parts)).subquery("u")
    g = u.c.g if group_by is not None else sa.literal(None, sa.String).label("g")
    q = sa.select(g, *[sa.func.sum(u.c[c]).label(c) for c in _COUNTS])
    return q.group_by(u.c.g) if group_by is not None else q


def funnel_groups(conn, group_by: Optional[str], date_from: Optional[date], date_to: Optional[date],
                  side: Optional[tuple] = None) -> dict:
    """``{group: funnel numbers (as funnel_metrics, "reached" included)}`` for the leads whose first touch falls in
    [date_from, date_to] (UTC dates), from funnel_daily and funnel_durations."""
    sums = {r["g"]: r for r in conn.execute(_sums_query(group_by, date_from, date_to)).mappings().all()
            if r["leads"]}
    wanted = []
    for g, r in sums.items():
        wanted += [(g, "stay", s, int(r[f"n_stay_{s}"])) for s in STAGES if r[f"n_stay_{s}"]]
        wanted += [(g, m, "", int(r[f"n_{m}"])) for m in DURATION_METRICS[1:] if r[f"n_{m}"]]
    if side is not None and conn.dialect.name == "postgresql" and len(wanted) > 1:
        # on PostgreSQL the index walks are most of the time: half of them (by length) on a second connection
        pool, engine = side
        order = sorted(range(len(wanted)), key=lambda i: -wanted[i][3])
        halves: tuple[list, list] = ([], [])
        load = [0, 0]
        for i in order:
            k = 0 if load[0] <= load[1] else 1
            halves[k].append(wanted[i])
            load[k] += wanted[i][3]

        def other() -> dict:
            with engine.connect() as c:
                return _middles(c, group_by, halves[1], date_from, date_to)

        fut = pool.submit(other)
        try:
            mid = _middles(conn, group_by, halves[0], date_from, date_to)
        finally:
            mid.update(fut.result())
    else:
        mid = _middles(conn, group_by, wanted, date_from, date_to)
    out = {}
    for g, r in sums.items():
        conversion = []
        for a, b in FUNNEL_PAIRS:
            entered, converted = int(r[f"reached_{a}"]), int(r[f"conv_{a}_{b}"])
            conversion.append({"from": a, "to": b, "entered": entered, "converted": converted,
                               "rate": round(converted / entered, 6) if entered else None})
        out[g] = {
            "leads": int(r["leads"]),
            "conversion": conversion,
            "median_days_in_stage": {s: _median2(mid.get((g, "stay", s))) for s in STAGES if r[f"n_stay_{s}"]},
            "median_days_first_touch_to_mql": _median2(mid.get((g, "touch_mql", ""))),
            "median_days_first_touch_to_won": _median2(mid.get((g, "touch_won", ""))),
            "median_days_mql_to_won": _median2(mid.get((g, "mql_won", ""))),
            "median_days_sql_to_won": _median2(mid.get((g, "sql_won", ""))),
            "reached": {s: int(r[f"reached_{s}"]) for s in STAGES},
        }
    return out


def create_app(database_url: str, tokens: dict[str, str] | None = None) -> FastAPI:
    tokens = load_tokens() if tokens is None else dict(tokens)
    engine = make_engine(database_url)
    # threads for the parts of a request that run side by side on their own connections (the funnel's SLA section)
    _side_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="query-side")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        _side_pool.shutdown(wait=True)
        engine.dispose()

    app = FastAPI(title="leadledger query API", version="1.0", lifespan=lifespan,
                  description="Read-only BI access to the lead projections. Bearer token required.")
    app.state.engine = engine
    bearer = HTTPBearer(auto_error=False)

    def reader(creds: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> str:
        if creds is None or creds.scheme.lower() != "bearer" or creds.credentials not in tokens:
            raise HTTPException(status_code=401, detail="missing or invalid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        role = tokens[creds.credentials]
        if role not in READ_ROLES:
            raise HTTPException(status_code=403, detail=f"role {role!r} may not read")
        return role

    def _lead_filters(stage, min_score, source, campaign, owner, updated_since) -> list:
        conds = []
        if stage is not None:
            if stage not in STAGES:
                raise _bad("stage", f"unknown stage; one of {', '.join(STAGES)}")
            conds.append(leads.c.stage == stage)
        if min_score is not None:
            conds.append(leads.c.score >= min_score)
        if source is not None:
            conds.append(leads.c.first_source == source)
        if campaign is not None:
            conds.append(leads.c.first_campaign == campaign)
        if owner is not None:
            conds.append(leads.c.owner == owner)
        if updated_since is not None:
            conds.append(leads.c.updated_at >= _utc(updated_since))
        return conds

    def _page(conn, conds, sort, direction, after, limit):
        col = SORTS[sort]
        conds = list(conds)
        if sort == "mql_at":
            conds.append(col.isnot(None))
        if after is not None:
            # a row comparison: one index range scan (an OR of the two cases is not)
            value, lead = after
            key = sa.tuple_(col, leads.c.lead)
            bound = sa.tuple_(sa.bindparam(None, value, type_=col.type),
                              sa.bindparam(None, lead, type_=leads.c.lead.type))
            conds.append(key < bound if direction == "desc" else key > bound)
        order = (col.desc(), leads.c.lead.desc()) if direction == "desc" else (col.asc(), leads.c.lead.asc())
        q = sa.select(*[leads.c[f] for f in LEAD_FIELDS]).where(*conds).order_by(*order).limit(limit)
        return conn.execute(q).mappings().all()

    @app.get("/v1/leads", summary="list leads (filter, sort, cursor pagination, CSV export)")
    def list_leads(
        role: str = Depends(reader),
        stage: Optional[str] = Query(None, description="current stage"),
        min_score: Optional[float] = Query(None, description="score >= this"),
        source: Optional[str] = Query(None, description="source of the first touch"),
        campaign: Optional[str] = Query(None, description="campaign of the first touch"),
        owner: Optional[str] = Query(None, description="sales owner"),
        updated_since: Optional[datetime] = Query(None, description="RFC 3339; leads changed at or after"),
        sort: Literal["score", "updated_at", "mql_at"] = Query("score", description="mql_at lists MQLs only"),
        direction: Literal["asc", "desc"] = Query("desc"),
        limit: int = Query(100, ge=1, le=MAX_LIMIT),
        cursor: Optional[str] = Query(None, description="next_cursor of the previous page"),
        format: Literal["json", "csv"] = Query("json", description="csv exports every matching lead"),
    ):
        conds = _lead_filters(stage, min_score, source, campaign, owner, updated_since)
        after = _decode_cursor(cursor, sort, direction) if cursor else None
        if format == "csv":
            return StreamingResponse(_csv_rows(conds, sort, direction, after), media_type="text/csv",
                                     headers={"Content-Disposition": 'attachment; filename="leads.csv"'})
        with engine.connect() as conn:
            rows = _page(conn, conds, sort, direction, after, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        nxt = _encode_cursor(sort, direction, rows[-1][sort], rows[-1]["lead"]) if more else None
        return json_response({"items": [_lead_json(r) for r in rows], "next_cursor": nxt})

    def _csv_rows(conds, sort, direction, after) -> Iterator[str]:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(LEAD_FIELDS)
        yield buf.getvalue()
        while True:
            with engine.connect() as conn:
                rows = _page(conn, conds, sort, direction, after, 2000)
            if not rows:
                return
            buf = io.StringIO()
            w = csv.writer(buf)
            for r in rows:
                d = _lead_json(r)
                d["attributes"] = json.dumps(d["attributes"], sort_keys=True)
                w.writerow([d[f] for f in LEAD_FIELDS])
            yield buf.getvalue()
            after = (rows[-1][sort], rows[-1]["lead"])

    @app.get("/v1/leads/{lead}", summary="one lead: state, latest score explanation, stage history, hand-offs")
    def get_lead(lead: str = Path(..., max_length=255), role: str = Depends(reader)):
        with engine.connect() as conn:
            row = conn.execute(sa.select(*[leads.c[f] for f in LEAD_FIELDS]).where(leads.c.lead == lead)) \
                .mappings().first()
            if row is None:
                raise HTTPException(status_code=404, detail=f"no lead {lead!r}")
            sh = lead_score_history
            score = conn.execute(sa.select(sh).where(sh.c.lead == lead)
                                 .order_by(sh.c.seq.desc(), sh.c.at.desc()).limit(1)).mappings().first()
            hist = conn.execute(sa.select(lead_stage_history).where(lead_stage_history.c.lead == lead)
                                .order_by(lead_stage_history.c.n, lead_stage_history.c.at)).mappings().all()
            hos = conn.execute(sa.select(handoffs).where(handoffs.c.lead == lead).order_by(handoffs.c.episode)) \
                .mappings().all()
        out = _lead_json(row)
        out["latest_score"] = None if score is None else {
            k: _iso(score[k]) for k in ("event_id", "at", "fit", "engagement", "score", "fit_before",
                                        "engagement_before", "explanation", "cause_event_id", "rules_version")}
        out["stage_history"] = [{k: _iso(h[k]) for k in ("event_id", "from_stage", "to_stage", "at", "left_at",
                                                          "reason", "by", "cause_event_id")} for h in hist]
        out["handoffs_detail"] = [{k: _iso(h[k]) for k in ("event_id", "episode", "at", "score",
                                                            "first_sales_touch_at", "time_to_first_touch_s",
                                                            "top_touchpoints")} for h in hos]
        return json_response(out)

    def _check_range(date_from, date_to):
        if date_from is not None and date_to is not None and date_to < date_from:
            raise _bad("to", "must not be before 'from'")

    @app.get("/v1/funnel", summary="conversion and velocity per stage, by source / campaign / monthly cohort")
    def funnel(
        role: str = Depends(reader),
        group_by: Optional[Literal["source", "campaign", "cohort"]] = Query(None),
        date_from: Optional[date] = Query(None, alias="from", description="first touch on or after (UTC date)"),
        date_to: Optional[date] = Query(None, alias="to", description="first touch on or before (UTC date)"),
    ):
        _check_range(date_from, date_to)
        from services.alerts_store import sla_section  # issue #8: hand-off -> first sales touch SLA

        def sla_part() -> dict:
            with engine.connect() as c:
                return sla_section(c, group_by, date_from, date_to)

        # the SLA section on its own connection, side by side with the funnel (two database backends at once)
        sla_future = _side_pool.submit(sla_part)
        try:
            with engine.connect() as conn:
                groups = funnel_groups(conn, group_by, date_from, date_to, side=(_side_pool, engine))
        finally:
            sla = sla_future.result()
        out = []
        for g in sorted(groups, key=lambda x: (x is None, str(x))):
            m = groups[g]
            m.pop("reached")
            out.append({"group": g, **m})
        if not out and group_by is None:
            out.append({"group": None, **{k: v for k, v in funnel_metrics([]).items() if k != "reached"}})
        return json_response({"group_by": group_by, "from": date_from, "to": date_to,
                              "stage_path": list(FUNNEL_PATH), "groups": out, "sla": sla})

    @app.get("/v1/forecast", summary="MQLs and SQLs needed now to win N deals in D days, from measured rates")
    def forecast(
        role: str = Depends(reader),
        wins: int = Query(..., ge=1, le=1_000_000, description="deals to win"),
        days: int = Query(..., ge=1, le=3650, description="within this many days"),
        date_from: Optional[date] = Query(None, alias="from", description="history: first touch on or after"),
        date_to: Optional[date] = Query(None, alias="to", description="history: first touch on or before"),
    ):
        _check_range(date_from, date_to)
        with engine.connect() as conn:
            m = funnel_groups(conn, None, date_from, date_to, side=(_side_pool, engine)).get(None) \
                or funnel_metrics([])
        rate = {(c["from"], c["to"]): c["rate"] for c in m["conversion"]}

        def chain(start: str) -> float | None:
            p = 1.0
            path = FUNNEL_PATH[FUNNEL_PATH.index(start):]
            for s, n in zip(path, path[1:]):
                r = rate[(s, n)]
                if r is None:
                    return None
                p *= r
            return p

        notes = []
        p_mql, p_sql = chain("mql"), chain("sql")
        mqls = math.ceil(wins / p_mql) if p_mql else None
        sqls = math.ceil(wins / p_sql) if p_sql else None
        if not p_mql:
            notes.append("no measured MQL -> won conversion yet: MQLs needed unknown")
        if not p_sql:
            notes.append("no measured SQL -> won conversion yet: SQLs needed unknown")
        velocity = m["median_days_mql_to_won"]
        feasible = None if velocity is None else velocity <= days
        if feasible is False:
            notes.append(f"median MQL -> won takes {velocity} days, longer than {days}: "
                         "new MQLs are unlikely to close in time")
        thin = m["reached"].get("mql", 0) < THIN_MQLS or m["reached"].get("won", 0) < THIN_WINS
        if thin:
            notes.append(f"history too thin to trust: {m['reached'].get('mql', 0)} MQLs and "
                         f"{m['reached'].get('won', 0)} wins measured (want >= {THIN_MQLS} and >= {THIN_WINS})")
        return json_response({"wins": wins, "days": days, "mqls_needed": mqls, "sqls_needed": sqls,
                "mql_to_won_rate": None if p_mql is None else round(p_mql, 6),
                "sql_to_won_rate": None if p_sql is None else round(p_sql, 6),
                "median_days_mql_to_won": velocity, "median_days_sql_to_won": m["median_days_sql_to_won"],
                "feasible_in_days": feasible, "thin_history": thin,
                "measured": {"mqls": m["reached"].get("mql", 0), "sqls": m["reached"].get("sql", 0),
                             "wins": m["reached"].get("won", 0)},
                "conversion": m["conversion"], "notes": notes})

    from services.audit_api import add_history_route  # GET /v1/leads/{lead}/history (auditors, issue #7)

    add_history_route(app, engine, tokens)

    @app.get("/healthz", include_in_schema=False)
    def healthz():
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return {"ok": True}

    return app


def main(argv: list[str] | None = None) -> int:
    """``leadledger query-api``: serve the BI query API (uvicorn)."""
    import uvicorn

    p = argparse.ArgumentParser(prog="leadledger query-api", description="HTTP query API over the projections")
    p.add_argument("--database-url", default=os.environ.get("LEADLEDGER_DATABASE_URL", "sqlite:///leadledger.db"))
    p.add_argument("--host", default=os.environ.get("LEADLEDGER_QUERY_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("LEADLEDGER_QUERY_PORT", "8081")))
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("LEADLEDGER_LOG_LEVEL", "INFO"))
    app = create_app(a.database_url, load_tokens())
    uvicorn.run(app, host=a.host, port=a.port, log_level="info")
    return 0

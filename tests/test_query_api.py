"""The BI query API over the projections (SQLite and the real PostgreSQL): auth, filters, cursor pagination,
CSV export, bad parameters, and funnel / forecast numbers checked against a hand-computed history."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from projections import sql_schema
from projections.sql_writer import apply_batch
from services.query_api import create_app, load_tokens
from tests.projections_support import T0, db_url, iso, scored, small_history, touchpoint  # noqa: F401

TOKENS = {"t-bi": "bi", "t-audit": "auditor", "t-sales": "sales", "t-admin": "admin"}
BI = {"Authorization": "Bearer t-bi"}


def _load(url: str, records: list[dict]) -> None:
    sql_schema.migrate(url)
    engine = sql_schema.make_engine(url)
    with engine.begin() as conn:
        apply_batch(conn, records)
    engine.dispose()


@pytest.fixture
def client(db_url):
    _load(db_url, small_history())
    with TestClient(create_app(db_url, TOKENS)) as c:
        yield c


def _many(n: int) -> list[dict]:
    recs = []
    for i in range(n):
        lead = f"m{i:03d}@y.com"
        at = T0 + timedelta(hours=i)
        recs.append(touchpoint(lead, f"{lead}-1", "page_viewed", at, source="web" if i % 2 else "pixel",
                               payload={"url": "/"}))
        recs.append(scored(lead, 1, at, float(i % 5), 0.0, f"{lead}-1"))  # many equal scores: tie-break by lead
    return recs


def test_auth(client) -> None:
    assert client.get("/v1/leads").status_code == 401
    r = client.get("/v1/leads", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    for token in TOKENS:
        assert client.get("/v1/funnel", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/leads", "/v1/funnel", "/v1/forecast"}


def test_load_tokens() -> None:
    assert load_tokens("") == {"dev-bi-token": "bi", "dev-admin-token": "admin"}
    assert load_tokens('{"abc": "auditor"}') == {"abc": "auditor"}
    with pytest.raises(ValueError):
        load_tokens('{"abc": "root"}')


@pytest.mark.parametrize("query,param", [
    ("min_score=abc", "min_score"), ("limit=0", "limit"), ("limit=501", "limit"), ("stage=bogus", "stage"),
    ("sort=name", "sort"), ("direction=up", "direction"), ("cursor=%%%", "cursor"), ("format=xml", "format"),
    ("updated_since=yesterday", "updated_since"),
])
def test_bad_lead_parameters(client, query, param) -> None:
    r = client.get(f"/v1/leads?{query}", headers=BI)
    assert r.status_code == 422, r.text
    assert any(param in d["loc"] for d in r.json()["detail"])


@pytest.mark.parametrize("path,param", [
    ("/v1/funnel?group_by=country", "group_by"), ("/v1/funnel?from=2026-13-01", "from"),
    ("/v1/funnel?from=2026-02-01&to=2026-01-01", "to"), ("/v1/forecast?wins=0&days=10", "wins"),
    ("/v1/forecast?wins=3", "days"), ("/v1/forecast?wins=3&days=x", "days"),
])
def test_bad_funnel_parameters(client, path, param) -> None:
    r = client.get(path, headers=BI)
    assert r.status_code == 422, r.text
    assert any(param in d["loc"] for d in r.json()["detail"])


def test_lead_filters(client) -> None:
    def leads(q: str) -> list[str]:
        r = client.get(f"/v1/leads?{q}", headers=BI)
        assert r.status_code == 200, r.text
        return [x["lead"] for x in r.json()["items"]]

    assert sorted(leads("")) == ["a@x.com", "b@x.com", "c@x.com", "d@x.com", "e@x.com"]
    assert leads("stage=mql") == ["c@x.com"]
    assert sorted(leads("source=form")) == ["c@x.com", "d@x.com"]
    assert sorted(leads("campaign=summer")) == ["d@x.com", "e@x.com"]
    assert leads("owner=sam&sort=updated_at") == ["a@x.com", "b@x.com"]
    assert sorted(leads("min_score=50")) == ["a@x.com", "b@x.com", "c@x.com"]
    assert sorted(leads("updated_since=" + iso(T0 + timedelta(days=40)).replace("+", "%2B"))) == ["d@x.com", "e@x.com"]
    assert leads("sort=mql_at&direction=asc") == ["a@x.com", "b@x.com", "c@x.com"]
    one = client.get("/v1/leads/a@x.com", headers=BI).json()
    assert one["stage"] == "won" and one["latest_score"]["score"] == 60.0
    assert one["latest_score"]["explanation"]["engagement"][0]["rule"] == "download"
    assert [h["to_stage"] for h in one["stage_history"]][-1] == "won"
    assert one["handoffs_detail"][0]["time_to_first_touch_s"] == 10800
    assert client.get("/v1/leads/nobody", headers=BI).status_code == 404


@pytest.mark.parametrize("sort", ["score", "updated_at"])
@pytest.mark.parametrize("direction", ["asc", "desc"])
def test_cursor_pagination(db_url, sort, direction) -> None:
    _load(db_url, _many(23))
    with TestClient(create_app(db_url, TOKENS)) as c:
        full = c.get(f"/v1/leads?sort={sort}&direction={direction}&limit=500", headers=BI).json()
        assert full["next_cursor"] is None and len(full["items"]) == 23
        seen, cursor = [], None
        while True:
            q = f"/v1/leads?sort={sort}&direction={direction}&limit=5" + (f"&cursor={cursor}" if cursor else "")
            page = c.get(q, headers=BI).json()
            seen += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == full["items"]
        key = [(x[sort], x["lead"]) for x in seen]
        assert key == sorted(key, reverse=direction == "desc")
        # a cursor of one sort order is refused by another
        first = c.get(f"/v1/leads?sort={sort}&direction={direction}&limit=5", headers=BI).json()["next_cursor"]
        other = "asc" if direction == "desc" else "desc"
        assert c.get(f"/v1/leads?sort={sort}&direction={other}&cursor={first}", headers=BI).status_code == 422
        # CSV export: every matching lead
        r = c.get("/v1/leads?format=csv&source=web", headers=BI)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert len(rows) == 11 and {row["first_source"] for row in rows} == {"web"}


def _conv(group: dict) -> dict:
    return {(c["from"], c["to"]): (c["entered"], c["converted"]) for c in group["conversion"]}


def test_funnel_numbers(client, db_url) -> None:
    """Hand-computed from tests.projections_support.small_history (a stage every 2 days):
    a: known..won, b: ..sal, c: ..mql, d: ..lead, e: known only; a,b,e from web; c,d from form."""
    body = client.get("/v1/funnel", headers=BI).json()
    (g,) = body["groups"]
    assert g["leads"] == 5
    assert _conv(g) == {("known", "lead"): (5, 4), ("lead", "mql"): (4, 3), ("mql", "sal"): (3, 2),
                        ("sal", "sql"): (2, 1), ("sql", "opportunity"): (1, 1), ("opportunity", "won"): (1, 1)}
    assert [c["rate"] for c in g["conversion"]] == [0.8, 0.75, 0.666667, 0.5, 1.0, 1.0]
    assert g["median_days_in_stage"] == {s: 2.0 for s in ("known", "lead", "mql", "sal", "sql", "opportunity")}
    assert g["median_days_first_touch_to_mql"] == 4.0
    assert g["median_days_first_touch_to_won"] == 12.0

    # the SQL view agrees with the API
    engine = sql_schema.make_engine(db_url)
    with engine.connect() as conn:
        view = {(r.from_stage, r.to_stage): (r.entered, r.converted)
                for r in conn.execute(sa.text("SELECT * FROM funnel_conversion"))}
    engine.dispose()
    assert view == _conv(g)

    by_source = {x["group"]: x for x in client.get("/v1/funnel?group_by=source", headers=BI).json()["groups"]}
    assert set(by_source) == {"web", "form"}
    assert _conv(by_source["web"])[("known", "lead")] == (3, 2)
    assert _conv(by_source["form"])[("lead", "mql")] == (2, 1)
    assert _conv(by_source["form"])[("mql", "sal")] == (1, 0)
    assert by_source["form"]["conversion"][3]["rate"] is None  # nobody entered sal

    by_cohort = {x["group"]: x["leads"] for x in client.get("/v1/funnel?group_by=cohort", headers=BI).json()["groups"]}
    assert by_cohort == {"2026-01": 3, "2026-02": 2}
    by_campaign = {x["group"]: x["leads"]
                   for x in client.get("/v1/funnel?group_by=campaign", headers=BI).json()["groups"]}
    assert by_campaign == {"spring": 2, "summer": 2, None: 1}

    feb = client.get("/v1/funnel?from=2026-02-01&to=2026-02-28", headers=BI).json()["groups"][0]
    assert feb["leads"] == 2 and _conv(feb)[("known", "lead")] == (2, 1)


def test_forecast(client) -> None:
    r = client.get("/v1/forecast?wins=2&days=5", headers=BI).json()
    # mql->sal 2/3, sal->sql 1/2, sql->opp 1, opp->won 1: MQL->won 1/3, SQL->won 1
    assert r["mqls_needed"] == 6 and r["sqls_needed"] == 2
    assert r["median_days_mql_to_won"] == 8.0 and r["feasible_in_days"] is False
    assert r["thin_history"] is True and any("thin" in n for n in r["notes"])
    assert client.get("/v1/forecast?wins=2&days=30", headers=BI).json()["feasible_in_days"] is True
    empty = client.get("/v1/forecast?wins=2&days=30&from=2030-01-01", headers=BI).json()
    assert empty["mqls_needed"] is None and empty["thin_history"] is True


def _grouped_rows(url: str, group_by, date_from, date_to, cols: list, joined) -> dict:
    """Rows of `cols` from `joined` (a join with `leads`), grouped as the API groups and filtered by first touch."""
    from datetime import datetime, time, timezone

    from projections.sql_schema import leads

    gcol = {"source": leads.c.first_source, "campaign": leads.c.first_campaign, "cohort": leads.c.cohort,
            None: sa.literal(None)}[group_by]
    q = sa.select(gcol, *cols).select_from(joined)
    if date_from is not None:
        q = q.where(leads.c.first_touch_at >= datetime.combine(date_from, time(), timezone.utc))
    if date_to is not None:
        q = q.where(leads.c.first_touch_at < datetime.combine(date_to + timedelta(days=1), time(), timezone.utc))
    engine = sql_schema.make_engine(url)
    groups: dict = {}
    try:
        with engine.connect() as conn:
            for g, *row in conn.execute(q):
                groups.setdefault(g, []).append(tuple(row))
    finally:
        engine.dispose()
    return groups


def _reference_funnel(url: str, group_by, date_from, date_to) -> dict:
    """funnel_metrics over every transition, grouped as the API groups (the computation the aggregates replace)."""
    from projections.sql_schema import lead_stage_history as h, leads
    from services.query_api import funnel_metrics

    groups = _grouped_rows(url, group_by, date_from, date_to,
                           [h.c.lead, leads.c.first_touch_at, h.c.to_stage, h.c.at, h.c.left_at],
                           h.join(leads, leads.c.lead == h.c.lead))
    return {g: {k: v for k, v in funnel_metrics(rows).items() if k != "reached"} for g, rows in groups.items()}


def _reference_sla(url: str, group_by, date_from, date_to) -> dict:
    """The SLA section as it was defined before funnel_handoffs: every hand-off joined with its lead, in Python."""
    from projections.sql_schema import handoffs, leads
    from services.alerts_store import _sla_metrics, _sla_minutes

    groups = {g: [(secs, None) for (secs,) in rows] for g, rows in _grouped_rows(
        url, group_by, date_from, date_to, [handoffs.c.time_to_first_touch_s],
        handoffs.join(leads, leads.c.lead == handoffs.c.lead)).items()}
    sla_s = _sla_minutes() * 60
    out = {"sla_minutes": sla_s / 60, "source": "handoffs",
           **_sla_metrics([r for rs in groups.values() for r in rs], sla_s)}
    if group_by is not None:
        out["groups"] = [{"group": g, **_sla_metrics(groups[g], sla_s)}
                         for g in sorted(groups, key=lambda x: (x is None, str(x)))]
    return out


def test_funnel_equals_the_computation_over_every_transition(db_url) -> None:
    """Random journeys (recycling, repeated stages, ties, late first touches, null campaigns) applied in random
    batches: the funnel read from the projector's aggregates equals funnel_metrics over the raw transitions, and its
    SLA section equals _sla_metrics over every hand-off joined with its lead, for every grouping and date range,
    medians included (odd and even counts)."""
    import random
    from datetime import date

    from tests.projections_support import handed, staged

    rng = random.Random(5)
    recs: list[dict] = []
    stages = ["known", "lead", "mql", "sal", "sql", "opportunity", "won", "lost", "recycled"]
    for i in range(60):
        lead = f"r{i:02d}@z.com"
        start = T0 + timedelta(days=rng.randrange(80), hours=rng.randrange(24))
        prev, at = "anonymous", start
        for n in range(1, rng.randint(2, 9)):
            to = "known" if n == 1 else rng.choice(stages)
            at = at + timedelta(hours=rng.choice([0, 6, 12, 24, 36, 48, 49.5]))
            recs.append(staged(lead, n, at, prev, to, f"{lead}-c{n}"))
            if to == "mql":   # its hand-off, sometimes followed by a sales call (time to first touch)
                ep = sum(1 for r in recs if r.get("type") == "lead_handed_off" and r["lead"] == lead) + 1
                recs.append(handed(lead, ep, at, f"{lead}-c{n}"))
                if rng.random() < 0.6:
                    recs.append(touchpoint(lead, f"{lead}-call{n}", "call_logged",
                                           at + timedelta(minutes=rng.choice([5, 20, 90])), source="crm"))
            prev = to
        first = start + timedelta(hours=rng.choice([-30, -2, 0, 5]))
        recs.append(touchpoint(lead, f"{lead}-t1", "page_viewed", first, source=rng.choice(["web", "form", "pixel"]),
                               campaign=rng.choice([None, "spring", "summer"])))
        if rng.random() < 0.3:   # an earlier touch arriving later moves the lead to another day / source
            recs.append(touchpoint(lead, f"{lead}-t0", "page_viewed", first - timedelta(days=3), source="crm"))
    sql_schema.migrate(db_url)
    engine = sql_schema.make_engine(db_url)
    try:
        i = 0
        while i < len(recs):
            k = rng.randint(1, 40)
            with engine.begin() as conn:
                apply_batch(conn, recs[i:i + k])
            i += k
    finally:
        engine.dispose()
    with TestClient(create_app(db_url, TOKENS)) as c:
        for group_by in (None, "source", "campaign", "cohort"):
            for rng_ in ((None, None), (date(2026, 1, 20), None), (None, date(2026, 2, 10)),
                         (date(2026, 1, 25), date(2026, 3, 1)), (date(2026, 2, 3), date(2026, 2, 20)),
                         (date(2026, 2, 1), date(2026, 3, 31)), (date(2026, 1, 1), None), (None, date(2026, 2, 28)),
                         (date(2026, 1, 31), date(2026, 2, 1))):
                q = "/v1/funnel?" + "&".join(
                    [f"group_by={group_by}"] * (group_by is not None)
                    + [f"from={rng_[0]}"] * (rng_[0] is not None) + [f"to={rng_[1]}"] * (rng_[1] is not None))
                body = c.get(q, headers=BI).json()
                got = {g["group"]: {k: v for k, v in g.items() if k != "group"} for g in body["groups"]}
                assert body["sla"] == _reference_sla(db_url, group_by, *rng_), q
                want = _reference_funnel(db_url, group_by, *rng_)
                if not want and group_by is None:
                    assert got[None]["leads"] == 0
                    continue
                assert got == want, q
    # kept incrementally by the projector, the funnel tables equal a recount from the stored history
    from tests.projections_support import dump

    from projections.sql_writer import rebuild_funnel, rebuild_funnel_handoffs

    names = ["funnel_leads", "funnel_durations", "funnel_daily", "funnel_monthly", "funnel_handoffs"]
    kept = dump(db_url, names)
    assert kept["funnel_handoffs"] and any(r[-1] is not None for r in kept["funnel_handoffs"])
    engine = sql_schema.make_engine(db_url)
    try:
        with engine.begin() as conn:
            assert rebuild_funnel(conn, chunk=7) == 60
            assert rebuild_funnel_handoffs(conn, chunk=7) == len(kept["funnel_handoffs"])
    finally:
        engine.dispose()
    assert dump(db_url, names) == kept


def test_sla_section_in_sql_equals_the_python_definition(db_url) -> None:
    """The funnel's SLA section, counted and ranked in SQL, equals _sla_metrics over the hand-off rows (odd and
    even counts, ties, untouched hand-offs, with and without the alerts service's decisions), for every grouping and
    date range."""
    import random
    from datetime import date

    from projections.sql_writer import rebuild_funnel_handoffs
    from services import alerts_store as store

    rng = random.Random(8)
    sql_schema.migrate(db_url)
    lead_rows, ho_rows, sla_rows = [], [], []
    for i in range(75):
        lead = f"s{i:02d}@z.com"
        first = T0 + timedelta(days=rng.randrange(60), hours=rng.randrange(24))
        lead_rows.append({"lead": lead, "email": lead, "first_touch_at": first,
                          "first_source": rng.choice(["web", "form", "crm"]),
                          "first_campaign": rng.choice([None, "spring", "summer"]), "cohort": first.strftime("%Y-%m"),
                          "handoffs": 0, "attributes": {}, "updated_at": first})
        for ep in range(1, rng.choice([1, 1, 2, 3]) + 1):
            at = first + timedelta(days=ep)
            secs = rng.choice([None, 60.0, 600.0, 900.0, 901.0, 3600.0, rng.random() * 20000])
            eid = f"{lead}:handoff:{ep}"
            ho_rows.append({"event_id": eid, "lead": lead, "episode": ep, "at": at, "fit": 0.0, "engagement": 0.0,
                            "score": 0.0, "time_to_first_touch_s": secs,
                            "first_sales_touch_at": None if secs is None else at + timedelta(seconds=secs)})
            if rng.random() < 0.6:
                sla_rows.append(dict(handoff_event_id=eid, lead=lead, episode=ep, sla_minutes=15, handoff_at=at,
                                     due_at=at + timedelta(minutes=15),
                                     status=rng.choice(["open", "met", "breached"])))
    engine = store.engine_for(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sql_schema.leads.insert(), lead_rows)
            conn.execute(sql_schema.handoffs.insert(), ho_rows)
            assert rebuild_funnel_handoffs(conn, chunk=7) == len(ho_rows)

        def reference(conn, group_by, date_from, date_to) -> dict:
            has_sla = sa.inspect(conn).has_table("alert_sla")
            src = store._sla_source(conn, group_by, date_from, date_to, has_sla)
            groups: dict = {}
            for g, secs, status in conn.execute(sa.select(src.c.g, src.c.secs, src.c.status)):
                groups.setdefault(g, []).append((secs, status))
            sla_s = store._sla_minutes() * 60
            out = {"sla_minutes": sla_s / 60, "source": "alert_sla" if has_sla else "handoffs",
                   **store._sla_metrics([r for rs in groups.values() for r in rs], sla_s)}
            if group_by is not None:
                out["groups"] = [{"group": g, **store._sla_metrics(groups[g], sla_s)}
                                 for g in sorted(groups, key=lambda x: (x is None, str(x)))]
            return out

        for with_alerts in (False, True):
            if with_alerts:
                store.create_tables(engine)
                with engine.begin() as conn:
                    store.insert_sla(conn, sla_rows)
            with engine.connect() as conn:
                for group_by in (None, "source", "campaign", "cohort"):
                    for rng_ in ((None, None), (date(2026, 1, 20), None), (None, date(2026, 2, 10)),
                                 (date(2030, 1, 1), None)):
                        got = store.sla_section(conn, group_by, *rng_)
                        assert got == reference(conn, group_by, *rng_), (with_alerts, group_by, rng_)
                assert store.sla_section(conn)["handoffs"] == len(ho_rows)
    finally:
        engine.dispose()

"""Query API latency at scale: ``GET /v1/leads`` and ``GET /v1/funnel`` over 1,000,000 leads in PostgreSQL.

    python -m bench.bench_query [--leads 1000000] [--reload] [--requests 100] [--transport uvicorn|asgi]

Loads (once; ``--reload`` to redo) ``--leads`` leads and their stage history (~2.4 rows a lead: every lead is
``known``, fewer go on along known → lead → mql → sal → sql → opportunity → won, some are lost or recycled) into a
dedicated database (``leadledger_query_bench`` on the local PostgreSQL, migrated to the head revision) with COPY,
then measures request latencies through the real FastAPI app of ``services.query_api``:

* ``--transport uvicorn`` (default): ``leadledger query-api`` served by uvicorn in a child process, requests over
  loopback HTTP with httpx (what a BI client sees, JSON encoding and HTTP included);
* ``--transport asgi``: the app in this process through ``httpx.ASGITransport`` (no network, no second process).

Prints p50 / p99 / max per query (warm: a few untimed requests first) and per endpoint. Goals (issue): p99 of
``/v1/leads`` < 50 ms and of ``/v1/funnel`` < 500 ms at 1,000,000 leads. The tests' databases are not touched.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import orjson  # noqa: E402
import psycopg  # noqa: E402

from deploy import infra  # noqa: E402
from projections import sql_schema  # noqa: E402
from projections.sql_writer import rebuild_funnel, rebuild_funnel_handoffs  # noqa: E402

DB = "leadledger_query_bench"
TOKEN = "bench-bi-token"
SOURCES = ["web", "form", "pixel", "email", "crm", "import", "inside_sales"]
SOURCE_W = [30, 25, 20, 10, 8, 5, 2]
CAMPAIGNS = [None] + [f"campaign-{i:02d}" for i in range(30)]
CAMPAIGN_W = [20] + [max(1, 30 - i) for i in range(30)]
REPS = [f"rep-{i:02d}" for i in range(40)]
PATH = ["known", "lead", "mql", "sal", "sql", "opportunity", "won"]
#: probability of going on from each stage of PATH to the next
GO_ON = [0.35, 0.45, 0.6, 0.6, 0.55, 0.45]
START = datetime(2024, 11, 1, tzinfo=timezone.utc)
SPAN_DAYS = 730
VERSION = "2026-11-default"


def _lead_rows(n: int, seed: int):
    """(lead row, [stage history rows]) per lead, deterministic."""
    rng = random.Random(seed)
    for i in range(n):
        lead = f"lead{i:07d}@bench.example"
        first = START + timedelta(seconds=rng.random() * SPAN_DAYS * 86400)
        at = first
        hist = []
        stage, prev, n_tr, owner, mql_at = None, "anonymous", 0, None, None

        def move(to: str, when: datetime, by=None, reason=None):
            nonlocal stage, prev, n_tr
            n_tr += 1
            hist.append([f"{lead}:stage:{n_tr}", lead, n_tr, prev, to, when, None, f"{lead}-tp-{n_tr}", VERSION,
                         reason, by])
            prev = stage = to

        move("known", at, reason="identified")
        k = 0
        while k < len(GO_ON) and rng.random() < GO_ON[k]:
            k += 1
            at = at + timedelta(days=rng.expovariate(1 / 6.0), seconds=rng.randrange(86400))
            to = PATH[k]
            by = rng.choice(REPS) if to in ("sal", "sql", "opportunity", "won") else None
            if by:
                owner = by
            if to == "mql":
                mql_at = at
            move(to, at, by=by, reason="sales" if by else ("mql criteria met" if to == "mql" else "attributes"))
        if 2 <= k < len(GO_ON) and rng.random() < 0.25:   # rejected: recycled (from mql/sal/sql) or lost
            at = at + timedelta(days=rng.expovariate(1 / 10.0))
            if PATH[k] == "opportunity":
                owner = rng.choice(REPS)
                move("lost", at, by=owner, reason="sales")
            else:
                move("recycled", at, by=rng.choice(REPS), reason="not now")
        for j, row in enumerate(hist[:-1]):
            row[6] = hist[j + 1][5]   # left_at = the next transition's at
        fit = rng.choice([0, 5, 10, 15, 20, 25, 30, 35, 40])
        eng = round(rng.expovariate(1 / 12.0), 6)
        last = at + timedelta(hours=rng.random() * 48)
        campaign = rng.choices(CAMPAIGNS, CAMPAIGN_W)[0]
        row = (lead, lead, stage, float(fit), eng, fit + eng, VERSION,
               orjson.dumps({"name": f"Person {i}", "company": f"Co {i % 997}", "title": "Manager"}).decode(),
               first, last, rng.choices(SOURCES, SOURCE_W)[0], campaign, first.strftime("%Y-%m"), mql_at, owner,
               max(last, at), 1 if mql_at else 0, 10 + n_tr, n_tr)
        handoff = None
        if mql_at is not None:   # the hand-off of the MQL, touched by sales some minutes or hours later (or not yet)
            secs = rng.expovariate(1 / 5400.0) if rng.random() < 0.9 else None
            handoff = (f"{lead}:handoff:1", lead, 1, mql_at, float(fit), eng, fit + eng, VERSION,
                       f"{lead}-tp-mql", '{"fit": [], "engagement": []}', "[]",
                       mql_at + timedelta(seconds=secs) if secs is not None else None, secs)
        yield row, hist, handoff


LEAD_COLS = ("lead", "email", "stage", "fit", "engagement", "score", "rules_version", "attributes", "first_touch_at",
             "last_touch_at", "first_source", "first_campaign", "cohort", "mql_at", "owner", "updated_at", "handoffs",
             "score_seq", "stage_seq")
HIST_COLS = ("event_id", "lead", "n", "from_stage", "to_stage", "at", "left_at", "cause_event_id", "rules_version",
             "reason", "by")
HANDOFF_COLS = ("event_id", "lead", "episode", "at", "fit", "engagement", "score", "rules_version", "cause_event_id",
                "explanation", "top_touchpoints", "first_sales_touch_at", "time_to_first_touch_s")


def load(dsn: str, url: str, n: int, seed: int) -> None:
    t0 = time.perf_counter()
    with psycopg.connect(dsn) as c1, psycopg.connect(dsn) as c2, psycopg.connect(dsn) as c3:
        c1.execute("TRUNCATE leads, lead_stage_history, lead_score_history, handoffs, touchpoint_archive, "
                   "funnel_leads, funnel_durations, funnel_daily, funnel_handoffs, funnel_monthly")
        c1.commit()
        hist_n = ho_n = 0
        q = ", ".join(f'"{c}"' for c in HIST_COLS)
        # three COPY streams side by side (one connection each), so nothing is held in memory
        with c1.cursor().copy(f"COPY leads ({', '.join(LEAD_COLS)}) FROM STDIN") as cl, \
                c2.cursor().copy(f"COPY lead_stage_history ({q}) FROM STDIN") as ch, \
                c3.cursor().copy(f"COPY handoffs ({', '.join(HANDOFF_COLS)}) FROM STDIN") as co:
            for row, hist, handoff in _lead_rows(n, seed):
                cl.write_row(row)
                for h in hist:
                    ch.write_row(h)
                hist_n += len(hist)
                if handoff is not None:
                    co.write_row(handoff)
                    ho_n += 1
        c1.commit()
        c2.commit()
        c3.commit()
    print(f"loaded {n:,} leads, {hist_n:,} stage transitions, {ho_n:,} hand-offs in {time.perf_counter() - t0:.0f}s")
    t1 = time.perf_counter()
    engine = sql_schema.make_engine(url)
    try:
        with engine.begin() as conn:   # the funnel tables, exactly as the projector keeps them
            in_funnel = rebuild_funnel(conn)
            rebuild_funnel_handoffs(conn)
    finally:
        engine.dispose()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for t in ("leads", "lead_stage_history", "handoffs", "funnel_leads", "funnel_durations", "funnel_daily",
                  "funnel_handoffs", "funnel_monthly"):
            conn.execute(f"VACUUM ANALYZE {t}")
    print(f"funnel tables for {in_funnel:,} leads in {time.perf_counter() - t1:.0f}s")


def ensure_data(pg_port: int, n: int, seed: int, reload: bool) -> str:
    admin = f"postgresql://postgres@127.0.0.1:{pg_port}/postgres"
    with psycopg.connect(admin, autocommit=True) as c:
        if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB,)).fetchone():
            c.execute(f'CREATE DATABASE "{DB}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:{pg_port}/{DB}"
    sql_schema.migrate(url)
    dsn = f"postgresql://postgres@127.0.0.1:{pg_port}/{DB}"
    with psycopg.connect(dsn) as c:
        have = c.execute("SELECT count(*) FROM leads").fetchone()[0]
        funnel = c.execute("SELECT count(*) FROM funnel_leads").fetchone()[0]
    if reload or have != n or funnel == 0:
        load(dsn, url, n, seed)
    else:
        print(f"reusing {have:,} leads in database {DB} (--reload to regenerate)")
    return url


def queries() -> list[tuple[str, str, list[str]]]:
    """(endpoint, name, paths): each name is measured over its paths (a few parameter values), round-robin."""
    recent = quote((START + timedelta(days=SPAN_DAYS - 5)).isoformat())
    leads = [
        ("leads", "top scores (default)", ["/v1/leads"]),
        ("leads", "stage=mql by score", ["/v1/leads?stage=mql"]),
        ("leads", "stage filter by updated_at", [f"/v1/leads?stage={s}&sort=updated_at" for s in
                                                 ("won", "sal", "lead", "known", "recycled", "lost")]),
        ("leads", "stage + min_score by score asc", [f"/v1/leads?stage={s}&min_score=30&direction=asc" for s in
                                                     ("lead", "sql", "known")]),
        ("leads", "source by updated_at asc", [f"/v1/leads?source={s}&sort=updated_at&direction=asc"
                                               for s in SOURCES]),
        ("leads", "campaign by score", [f"/v1/leads?campaign=campaign-{i:02d}" for i in range(0, 30, 3)]),
        ("leads", "owner by score", [f"/v1/leads?owner={r}" for r in REPS[:10]]),
        ("leads", "owner + stage by updated_at", [f"/v1/leads?owner={r}&stage=won&sort=updated_at"
                                                  for r in REPS[:10]]),
        ("leads", "updated_since by updated_at", [f"/v1/leads?updated_since={recent}&sort=updated_at"]),
        ("leads", "mqls by mql_at", ["/v1/leads?sort=mql_at", "/v1/leads?sort=mql_at&direction=asc"]),
        ("leads", "limit=500", ["/v1/leads?limit=500", "/v1/leads?stage=known&limit=500&sort=updated_at"]),
    ]
    funnel = [
        ("funnel", "funnel (all)", ["/v1/funnel"]),
        ("funnel", "funnel by source", ["/v1/funnel?group_by=source"]),
        ("funnel", "funnel by campaign", ["/v1/funnel?group_by=campaign"]),
        ("funnel", "funnel by cohort", ["/v1/funnel?group_by=cohort"]),
        ("funnel", "funnel, a quarter", ["/v1/funnel?from=2025-04-01&to=2025-06-30",
                                         "/v1/funnel?group_by=source&from=2026-01-01&to=2026-03-31"]),
        ("funnel", "forecast", ["/v1/forecast?wins=20&days=60"]),
    ]
    return leads + funnel


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


async def measure(client: httpx.AsyncClient, n: int, pages: int, only: str | None = None) \
        -> dict[str, list[float]]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    by_endpoint: dict[str, list[float]] = {"leads": [], "funnel": []}
    print(f"{'query':42s} {'n':>5s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s}")

    async def get(path: str) -> tuple[float, dict]:
        t0 = time.perf_counter()
        r = await client.get(path, headers=headers)
        dt = (time.perf_counter() - t0) * 1000
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code} {r.text[:300]}")
        return dt, r.json()

    def report(name: str, xs: list[float]) -> None:
        print(f"{name:42s} {len(xs):5d} {statistics.median(xs):8.1f} {_pct(xs, 0.99):8.1f} {max(xs):8.1f}")

    for endpoint, name, paths in queries():
        if only and endpoint != only:
            continue
        reps = n if endpoint == "leads" else max(5, n // 5)
        for p in paths[:3]:
            await get(p)   # warm-up (plans, caches)
        xs = []
        for i in range(reps):
            dt, _ = await get(paths[i % len(paths)])
            xs.append(dt)
        report(name, xs)
        by_endpoint[endpoint] += xs
    # keyset pagination: follow next_cursor deep into a few listings
    for name, path in () if only == "funnel" else (("cursor pages: top scores", "/v1/leads?limit=100"),
                       ("cursor pages: stage=known by updated_at", "/v1/leads?stage=known&sort=updated_at"),
                       ("cursor pages: source=web asc", "/v1/leads?source=web&direction=asc")):
        xs = []
        cur = None
        for _ in range(pages):
            dt, body = await get(path + (f"&cursor={cur}" if cur else ""))
            xs.append(dt)
            cur = body["next_cursor"]
            if cur is None:
                break
        report(name + f" ({len(xs)} pages)", xs)
        by_endpoint["leads"] += xs
    return by_endpoint


def _serve(url: str, port: int) -> subprocess.Popen:
    env = dict(os.environ, LEADLEDGER_DATABASE_URL=url, LEADLEDGER_QUERY_PORT=str(port),
               LEADLEDGER_QUERY_HOST="127.0.0.1", LEADLEDGER_API_TOKENS=orjson.dumps({TOKEN: "bi"}).decode(),
               LEADLEDGER_LOG_LEVEL="WARNING")
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from services.query_api import main; "
                             "sys.exit(main([]))"], cwd=str(ROOT), env=env,
                            stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            err.seek(0)
            raise RuntimeError(f"query API exited: {err.read().decode()[-2000:]}")
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("query API did not start")


async def main_async(a: argparse.Namespace, url: str) -> dict[str, list[float]]:
    if a.transport == "asgi":
        from services.query_api import create_app

        app = create_app(url, {TOKEN: "bi"})
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as c:
                return await measure(c, a.requests, a.pages, a.only)
    proc = _serve(url, a.port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{a.port}", timeout=60) as c:
            return await measure(c, a.requests, a.pages, a.only)
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--leads", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--reload", action="store_true", help="regenerate the data even if the counts match")
    p.add_argument("--requests", type=int, default=100, help="timed requests per /v1/leads query (funnel: /5)")
    p.add_argument("--pages", type=int, default=30, help="cursor pages followed per listing")
    p.add_argument("--transport", choices=["uvicorn", "asgi"], default="uvicorn")
    p.add_argument("--port", type=int, default=8391)
    p.add_argument("--only", choices=["leads", "funnel"], help="measure one endpoint only")
    a = p.parse_args(argv)
    cfg = infra.InfraConfig.from_env()
    infra.pg_up(cfg)
    url = ensure_data(cfg.pg_port, a.leads, a.seed, a.reload)
    print(f"transport: {a.transport}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    res = asyncio.run(main_async(a, url))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for endpoint, goal in (("leads", 50.0), ("funnel", 500.0)):
        xs = res[endpoint]
        if not xs:
            continue
        p99 = _pct(xs, 0.99)
        print(f"/v1/{endpoint}: {len(xs)} requests, p50 {statistics.median(xs):.1f} ms, p99 {p99:.1f} ms "
              f"(goal p99 < {goal:.0f} ms: {'met' if p99 < goal else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

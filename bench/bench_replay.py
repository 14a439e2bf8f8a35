"""Replay latency of one lead among millions of archived events (issue #7): p50/p99 on the real PostgreSQL.

    python -m bench.bench_replay [--events 10000000] [--leads 500000] [--samples 400] [--reuse]

Fills ``touchpoint_archive`` of a dedicated database (``leadledger_bench`` on the local PostgreSQL, or
``--database-url``) with ``--events`` records spread over ``--leads`` leads (heavy-tailed: a few leads with
thousands of events), **interleaved in arrival order** as the projector writes them (a lead's rows are scattered
over the table, the unfavourable case for locality), with the production indexes (primary key on event_id, unique
(lead, seq)). Bulk load: COPY with the indexes dropped, then rebuilt. Hash columns are filled with a placeholder
(replay does not read them; chaining 10M rows would only slow the load down).

Then times ``services.audit.replay_lead`` — the index range scan of the lead's rows, the fold of every record
with derived events built, the per-step report — for ``--samples`` leads drawn uniformly, plus the largest lead,
with and without ``--explain``; then the auditors' HTTP route ``GET /v1/leads/{lead}/history?explain=true``
(the query API in-process: its default page of steps, JSON serialisation included) for the same leads, and the
largest lead's first and last pages. ``--reuse`` keeps an archive already loaded with at least that many events.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from projections import sql_schema  # noqa: E402
from projections.rules import RuleBook  # noqa: E402
from services.audit import replay_lead  # noqa: E402

DEFAULT_RULES = ROOT / "deploy" / "rules" / "default.yaml"
COLS = ("event_id", "lead", "seq", "type", "occurred_at", "received_at", "source", "campaign", "envelope",
        "prev_event_id", "prev_hash", "hash")
URLS = ["https://acme.example/pricing", "https://acme.example/product", "https://acme.example/blog/a",
        "https://acme.example/careers", "https://acme.example/docs", "https://acme.example/"]
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def lead_key(i: int) -> str:
    return f"user{i}@co{i % 97}.example"


def sizes(n_events: int, n_leads: int, rng: random.Random) -> list[int]:
    w = [rng.paretovariate(1.2) for _ in range(n_leads)]
    s = sum(w)
    out = [max(1, int(x / s * n_events)) for x in w]
    diff = n_events - sum(out)
    i = 0
    while diff != 0:
        j = i % n_leads
        if diff > 0:
            out[j] += 1
            diff -= 1
        elif out[j] > 1:
            out[j] -= 1
            diff += 1
        i += 1
    return out


def envelope(i: int, seq: int, eid: str, occ: str, rec: str, rng: random.Random) -> tuple[str, dict]:
    email = lead_key(i)
    if seq == 1:
        t, p = "form_submitted", {"form_id": "contact", "fields": {
            "name": "pii:v1:" + "0" * 32 + ":bench", "email": email, "company": f"Co {i % 97}", "department": "IT",
            "title": "IT Director", "phone": "pii:v1:" + "0" * 32 + ":bench", "company_size": 500}}
    else:
        r = rng.random()
        if r < 0.7:
            t, p = "page_viewed", {"url": URLS[rng.randrange(len(URLS))]}
        elif r < 0.8:
            t, p = "content_downloaded", {"asset_id": "wp-roi", "title": "Whitepaper"}
        elif r < 0.9:
            t, p = "email_opened", {"campaign": "spring"}
        elif r < 0.95:
            t, p = "email_clicked", {"url": URLS[0], "campaign": "spring"}
        else:
            t, p = "event_attended", {"event": "seminar"}
    return t, {"event_id": eid, "type": t, "occurred_at": occ, "received_at": rec, "lead_id": None,
               "anonymous_id": None, "email": email, "source": "web", "campaign": None, "payload": p,
               "schema_version": 2}


def load(url: str, n_events: int, n_leads: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    sql_schema.migrate(url)
    engine = sql_schema.make_engine(url)
    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE touchpoint_archive"))
        conn.execute(sa.text("ALTER TABLE touchpoint_archive DROP CONSTRAINT IF EXISTS touchpoint_archive_pkey"))
        conn.execute(sa.text("DROP INDEX IF EXISTS ux_touchpoint_archive_lead_seq"))
    size = sizes(n_events, n_leads, rng)
    order = [i for i, s in enumerate(size) for _ in range(s)]
    rng.shuffle(order)  # arrival order: leads interleaved
    seq = [0] * n_leads
    span = 240 * 86400.0
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        with cur.copy(f"COPY touchpoint_archive ({', '.join(COLS)}) FROM STDIN") as cp:
            for k, i in enumerate(order):
                seq[i] += 1
                s = seq[i]
                at = T0 + timedelta(seconds=span * k / n_events)
                occ = at.isoformat(timespec="microseconds")
                rec = (at + timedelta(seconds=1)).isoformat(timespec="microseconds")
                eid = f"b-{k}"
                t, env = envelope(i, s, eid, occ, rec, rng)
                cp.write_row((eid, lead_key(i), s, t, occ, rec, "web", None, orjson.dumps(env).decode(),
                              None, "0" * 64, "0" * 64))
                if k and k % 1_000_000 == 0:
                    print(f"  {k:,} rows in {time.perf_counter() - t0:.0f}s", flush=True)
        raw.commit()
    finally:
        raw.close()
    print(f"copied {n_events:,} rows in {time.perf_counter() - t0:.0f}s; building indexes", flush=True)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE touchpoint_archive ADD PRIMARY KEY (event_id)"))
        conn.execute(sa.text("CREATE UNIQUE INDEX ux_touchpoint_archive_lead_seq ON touchpoint_archive (lead, seq)"))
        conn.execute(sa.text("ANALYZE touchpoint_archive"))
    print(f"loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    engine.dispose()


def ensure_db(admin_url: str, name: str) -> str:
    eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        if not c.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--leads", type=int, default=500_000)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--reuse", action="store_true")
    a = ap.parse_args(argv)
    from deploy import infra

    cfg = infra.InfraConfig.from_env()
    url = a.database_url or ensure_db(f"postgresql+psycopg://postgres@127.0.0.1:{cfg.pg_port}/postgres",
                                      "leadledger_bench")
    engine = sql_schema.make_engine(url)
    have = 0
    if a.reuse:
        try:
            with engine.connect() as c:
                have = c.execute(sa.text("SELECT count(*) FROM touchpoint_archive")).scalar()
        except sa.exc.DBAPIError:
            have = 0
    if have < a.events:
        load(url, a.events, a.leads)
    with engine.connect() as c:
        total = c.execute(sa.text("SELECT count(*) FROM touchpoint_archive")).scalar()
        leads = c.execute(sa.text("SELECT count(DISTINCT lead) FROM touchpoint_archive")).scalar() if total < 3e6 \
            else a.leads
        big = c.execute(sa.text("SELECT lead, count(*) n FROM touchpoint_archive GROUP BY lead ORDER BY n DESC "
                                "LIMIT 1")).first()
        size = c.execute(sa.text("SELECT pg_size_pretty(pg_total_relation_size('touchpoint_archive'))")).scalar()
    print(f"archive: {total:,} events over ~{leads:,} leads, {size}; largest lead {big[0]} with {big[1]:,} events")
    book = RuleBook.from_paths([DEFAULT_RULES])
    rng = random.Random(7)
    sample = [lead_key(rng.randrange(a.leads)) for _ in range(a.samples)]
    for explain in (False, True):
        times, counts = [], []
        for lead in sample:
            t0 = time.perf_counter()
            out = replay_lead(engine, lead, book, explain=explain)
            times.append(time.perf_counter() - t0)
            counts.append(out["records"] if out else 0)
        t0 = time.perf_counter()
        out = replay_lead(engine, big[0], book, explain=explain)
        tbig = time.perf_counter() - t0
        print(f"replay{' --explain' if explain else ''}: {len(times)} leads (median {statistics.median(counts):.0f}, "
              f"max {max(counts)} events): p50 {pct(times, 50) * 1e3:.1f} ms, p90 {pct(times, 90) * 1e3:.1f} ms, "
              f"p99 {pct(times, 99) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms; "
              f"largest lead ({out['records']:,} events): {tbig * 1e3:.0f} ms")
    engine.dispose()
    del out  # the largest lead's report: millions of objects that the cyclic GC would walk during the route's timing
    gc.collect()
    _time_history_route(url, sample, big[0])
    return 0


def _time_history_route(url: str, sample: list[str], big: str) -> None:
    """The history route as an auditor's client sees it (in-process ASGI: no network, JSON included)."""
    from fastapi.testclient import TestClient

    from services.query_api import create_app

    auth = {"Authorization": "Bearer bench-auditor"}
    with TestClient(create_app(url, {"bench-auditor": "auditor"})) as c:
        def get(lead: str, **params) -> tuple[float, dict, int]:
            t0 = time.perf_counter()
            r = c.get(f"/v1/leads/{lead}/history", params={"explain": "true", **params}, headers=auth)
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                raise SystemExit(f"history of {lead}: HTTP {r.status_code} {r.text[:200]}")
            return dt, r.json(), len(r.content)

        times = [get(lead)[0] for lead in sample]
        print(f"history API (explain, default page): {len(times)} leads: p50 {pct(times, 50) * 1e3:.1f} ms, "
              f"p90 {pct(times, 90) * 1e3:.1f} ms, p99 {pct(times, 99) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms")
        dt, first, size = get(big)
        line = (f"history API, largest lead ({first['records']:,} records): first page of {len(first['steps']):,} "
                f"steps {dt * 1e3:.0f} ms ({size / 1e6:.1f} MB)")
        if first["next_from_seq"] is not None:
            dt, last, size = get(big, from_seq=first["records"] - len(first["steps"]) + 1)
            line += f", last page {dt * 1e3:.0f} ms ({size / 1e6:.1f} MB)"
        print(line)


if __name__ == "__main__":
    sys.exit(main())

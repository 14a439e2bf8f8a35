"""The README demo: three B2B journeys sent through the running ingest service, then what the processor made of them.

1. Aiko (anonymous visitor → lead → MQL): pixel page views and a whitepaper download under a cookie, a form that
   identifies her (the anonymous history joins her lead), pricing views, a seminar and a meeting → hand-off.
2. Ben (a list entry): a form without the full attribute set → stays `known`.
3. Chie (sales-generated lead): a CRM stage change straight to `sql`, and an illegal one that is rejected.

Then, from the immutable sources (issue #7): Aiko's history replayed from the archive with the rules and points
behind every change, the archive's hash chains verified, and a back-test over the Kafka log of a candidate rule
set (deploy/rules/candidate.yaml) against the rules in force (published on the `rules` topic first).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx

from services.config import RULES_DIR, Settings, settings as load_settings

API_KEY = os.environ.get("LEADLEDGER_DEMO_API_KEY", "dev-crm-key")


def _ts(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat()


def journeys(run: str, now: datetime) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """(pixel hits, batch envelopes) of the three journeys; `run` makes ids unique per demo run."""
    cookie = f"demo-{run}-aiko"
    t0 = now - timedelta(hours=3)
    pixel = [
        {"type": "page_viewed", "url": "https://example.jp/product", "aid": cookie, "eid": f"{run}-p1",
         "ts": _ts(t0)},
        {"type": "content_downloaded", "url": "https://example.jp/wp/dx-guide", "aid": cookie, "eid": f"{run}-p2",
         "ts": _ts(t0 + timedelta(minutes=2)), "asset_id": "wp-dx-guide", "title": "DX guide"},
        {"type": "page_viewed", "url": "https://example.jp/product/features", "aid": cookie, "eid": f"{run}-p3",
         "ts": _ts(t0 + timedelta(minutes=5))},
    ]
    aiko = f"aiko.tanaka+{run}@example.jp"
    ben = f"ben.ito+{run}@example.jp"
    chie = f"chie.mori+{run}@example.jp"
    full = {"name": "Aiko Tanaka", "email": aiko, "company": "Tanaka Seiki", "department": "IT",
            "title": "IT Manager", "phone": "+81-3-0000-0000", "company_size": "800", "industry": "manufacturing"}

    def ev(i: str, type_: str, at: datetime, **kw: Any) -> dict[str, Any]:
        return {"event_id": f"{run}-{i}", "type": type_, "occurred_at": _ts(at), **kw}

    batch = [
        ev("a1", "form_submitted", t0 + timedelta(minutes=10), email=aiko, anonymous_id=cookie,
           payload={"form_id": "whitepaper", "fields": full}),
        ev("a2", "page_viewed", t0 + timedelta(minutes=20), email=aiko, payload={"url": "https://example.jp/pricing"}),
        ev("a3", "page_viewed", t0 + timedelta(minutes=25), email=aiko,
           payload={"url": "https://example.jp/product/pricing"}),
        ev("a4", "event_attended", t0 + timedelta(minutes=60), email=aiko, payload={"event": "DX seminar Tokyo"}),
        ev("a5", "meeting_booked", t0 + timedelta(minutes=90), email=aiko, payload={"slot": "next Tuesday 10:00"}),
        ev("b1", "form_submitted", t0 + timedelta(minutes=30), email=ben,
           payload={"form_id": "newsletter", "fields": {"name": "Ben Ito", "email": ben}}),
        ev("b2", "page_viewed", t0 + timedelta(minutes=31), email=ben, payload={"url": "https://example.jp/blog"}),
        ev("c1", "attribute_updated", t0 + timedelta(minutes=40), email=chie,
           payload={"attributes": {"name": "Chie Mori", "company": "Mori Trading", "title": "Director"}}),
        ev("c2", "stage_changed", t0 + timedelta(minutes=41), email=chie,
           payload={"to": "sql", "reason": "met at trade show", "by": "sales:kato"}),
        ev("c3", "stage_changed", t0 + timedelta(minutes=42), email=ben,
           payload={"to": "won", "reason": "typo in CRM", "by": "sales:kato"}),
    ]
    return pixel, batch


async def send(base_url: str, run: str) -> list[str]:
    pixel, batch = journeys(run, datetime.now(timezone.utc))
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        for hit in pixel:
            r = await client.get("/t.gif", params=hit)
            r.raise_for_status()
        r = await client.post("/v1/events", json={"events": batch}, headers={"X-API-Key": API_KEY})
        r.raise_for_status()
        results = r.json()["results"]
    bad = [x for x in results if x["status"] != "accepted"]
    if bad:
        raise RuntimeError(f"demo events not accepted: {bad}")
    return [e["email"] for e in batch if e["event_id"].endswith(("a1", "b1", "c1"))]


async def show(cfg: Settings, leads: list[str], timeout: float = 60.0) -> int:
    from services.derived_reader import latest_by_lead, read_topic

    t = cfg.topics
    deadline = asyncio.get_running_loop().time() + timeout
    handoffs: list[dict[str, Any]] = []
    while asyncio.get_running_loop().time() < deadline:
        handoffs = [h for h in await read_topic(cfg.bootstrap, t.handoffs) if h.get("lead") in leads]
        if handoffs:
            break
        await asyncio.sleep(0.5)
    scores = latest_by_lead(await read_topic(cfg.bootstrap, t.scores))
    stages = latest_by_lead(await read_topic(cfg.bootstrap, t.stages))
    rejected = [r for r in await read_topic(cfg.bootstrap, t.rejected)
                if (r.get("event") or {}).get("email") in leads]
    alerts = [a for a in await read_topic(cfg.bootstrap, t.intent_alerts) if a.get("lead") in leads]
    print("\n== leads ==")
    print(f"{'lead':<42} {'stage':<10} {'fit':>5} {'engagement':>11}")
    for lead in leads:
        s, st = scores.get(lead, {}), stages.get(lead, {})
        print(f"{lead:<42} {st.get('to', 'known'):<10} {s.get('fit', 0):>5} {s.get('engagement', 0):>11.2f}")
    print("\n== hand-offs (topic lead-handoffs) ==")
    for h in handoffs:
        print(f"{h['lead']}: episode {h['episode']}, score {h['score']:.1f} under rules {h['rules_version']}")
        for tp in h.get("top_touchpoints", [])[:5]:
            print(f"    {tp['rule']:<22} {tp['type']:<20} {tp['contribution']:6.2f}  ({tp['event_id']})")
    print("\n== intent alerts ==")
    for a in alerts:
        print(f"{a['lead']}: {a['rule']} ({a['first_event_id']} → {a['then_event_id']})")
    print("\n== rejected ==")
    for r in rejected:
        print(f"{r['event']['event_id']}: {r['reason']}")
    if not handoffs:
        print("no hand-off arrived in time: is the processor running?", file=sys.stderr)
        return 1
    await show_projections(leads)
    await show_audit(cfg, leads)
    return 0


async def show_projections(leads: list[str], timeout: float = 30.0) -> None:
    """The same leads as BI sees them: the SQL projections through the query API (when the stack runs it)."""
    base = os.environ.get("LEADLEDGER_QUERY_URL",
                          f"http://127.0.0.1:{os.environ.get('LEADLEDGER_QUERY_PORT', '8081')}")
    auth = {"Authorization": f"Bearer {os.environ.get('LEADLEDGER_DEMO_BI_TOKEN', 'dev-bi-token')}"}
    rows: dict[str, dict[str, Any]] = {}
    async with httpx.AsyncClient(base_url=base, headers=auth, timeout=10) as client:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            try:
                for lead in leads:
                    r = await client.get(f"/v1/leads/{lead}")
                    if r.status_code == 200:
                        rows[lead] = r.json()
            except httpx.HTTPError:
                pass
            if len(rows) == len(leads) and rows[leads[0]].get("stage") == "mql":
                break
            await asyncio.sleep(0.5)
        if not rows:
            print(f"\n(query API at {base} not reachable: start `leadledger projector` and `leadledger query-api`)")
            return
        print(f"\n== the same leads in the SQL projections ({base}/v1/leads/{{id}}, role bi) ==")
        for lead in leads:
            row = rows.get(lead, {})
            score = row.get("score")
            score = f"{score:.1f}" if isinstance(score, (int, float)) else score
            print(f"{lead:<42} {str(row.get('stage')):<10} score {score}  mql_at {row.get('mql_at')}")
        r = await client.get("/v1/funnel")
        if r.status_code == 200:
            print(f"\nfunnel: GET {base}/v1/funnel → {str(r.json())[:300]}…")
    board = f"http://127.0.0.1:{os.environ.get('LEADLEDGER_ALERTS_PORT', '8082')}/board"
    print(f"hot-lead board for inside sales: {board} (token dev-sales-token)")


CANDIDATE = os.path.join(RULES_DIR, "candidate.yaml")


async def show_audit(cfg: Settings, leads: list[str], timeout: float = 30.0) -> None:
    """Issue #7 on the demo's leads: Aiko replayed from the archive (`leadledger replay --explain`), the archive's
    hash chains (`leadledger audit verify`), and `leadledger backtest --rules deploy/rules/candidate.yaml` over the
    log against the rules in force, which are published on the `rules` topic first (`leadledger rules publish`)."""
    from projections import sql_schema
    from projections.rules import RuleBook, RuleSetError
    from services import audit, backtest_log
    from services.rules_log import book_from_log, load_book, publish, rules_topic

    db = os.environ.get("LEADLEDGER_DATABASE_URL")
    if not db:
        print("\n(no LEADLEDGER_DATABASE_URL: the archive's replay and audit are shown by `leadledger stack --demo`)")
        return
    book = load_book(None)  # the processor's rule files (LEADLEDGER_RULES)
    engine = sql_schema.make_engine(db)
    try:
        # the projector archives the lead-keyed log as it arrives: wait until Aiko's hand-off is in the archive
        deadline = asyncio.get_running_loop().time() + timeout
        out = None
        while asyncio.get_running_loop().time() < deadline:
            out = await asyncio.to_thread(audit.replay_lead, engine, leads[0], book, None, True)
            if out is not None and out["state"]["handoffs"] >= 1:
                break
            await asyncio.sleep(0.5)
    finally:
        engine.dispose()
    if out is None:
        print(f"\n(no archived record of {leads[0]} yet: is the projector running?)")
        return
    print(f"\n== {leads[0]} replayed from the archive (leadledger replay --lead KEY --explain) ==")
    print(audit.replay_text(out, True))
    records, n_leads, problems = await asyncio.to_thread(audit.verify, db)
    print("\n== the archive's hash chains (leadledger audit verify) ==")
    print(f"{records} archived records of {n_leads} leads: "
          + ("every chain intact" if not problems else f"{len(problems)} problem(s), e.g. {problems[0]}"))
    try:
        published = await publish(cfg.bootstrap, [rs.model for rs in book.sets])
    except RuleSetError as e:  # a rule file edited without a new version: the log keeps what was in force
        print(f"\n(back-test skipped: {e})")
        return
    baseline = await book_from_log(cfg.bootstrap)
    candidate = RuleBook.from_paths([CANDIDATE])
    result = await asyncio.to_thread(backtest_log.run, cfg.bootstrap, cfg.topics, candidate, baseline, None, None, 1)
    print("\n== back-test over the Kafka log (leadledger backtest --rules deploy/rules/candidate.yaml) ==")
    print(f"rules in force (topic {rules_topic()}"
          + (f", just published: {', '.join(published)}" if published else "") + f"): "
          f"{', '.join(result['baseline']['rules_versions'])}; candidate: "
          f"{', '.join(result['candidate']['rules_versions'])}")
    log = result["log"]
    print(f"the whole log: {log['touchpoints']} touchpoints, {log['leads']} leads; MQL hand-offs "
          f"{result['mqls']['baseline']} -> {result['mqls']['candidate']}; leads {result['leads']}")
    for row in result["differences"]:
        if row["lead"] in leads:
            delta = row["delta_days"]
            when = f", {abs(delta) * 1440:.0f} minutes {'earlier' if delta < 0 else 'later'}" if delta != "" else ""
            print(f"  {row['lead']}: {row['change']} (MQL at {row['baseline_mql_at'] or '-'} -> "
                  f"{row['candidate_mql_at'] or '-'}{when})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="leadledger demo")
    p.add_argument("--ingest-url", default=os.environ.get("LEADLEDGER_INGEST_URL", "http://127.0.0.1:8080"))
    a = p.parse_args(argv or [])
    run = uuid.uuid4().hex[:6]
    # the derived topics' leaders are unknown for a moment after the stack created them: aiokafka logs each
    # (retried) offset lookup as an error, which would only clutter the demo's output
    logging.getLogger("aiokafka.consumer.fetcher").setLevel(logging.CRITICAL)

    async def go() -> int:
        leads = await send(a.ingest_url, run)
        print(f"sent 3 journeys (run {run}) through {a.ingest_url}")
        return await show(load_settings(), leads)

    return asyncio.run(go())

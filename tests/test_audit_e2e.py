"""Audit and replay end to end on the real broker and PostgreSQL (issue #7).

One run: a generated history is produced in two phases around an instant T (the live state at T is recorded from
the derived topics once the real processor caught up with phase 1), then phase 2 and three journeys sent through
the ingest service with PII sealing on; the projector archives the lead-keyed log into PostgreSQL. Then:

* replay as of T equals the live state recorded at T, for every lead; the full replay equals the final live state;
* explanation totals equal the scores;
* the back-test over the log with the rules in force (published on the rules topic) reproduces the live MQLs
  exactly, and a looser candidate only moves MQLs earlier or adds new ones;
* the hash chain verifies;
* PII never reaches Kafka in clear; ``forget`` erases it wherever the product reveals it (replay, history API,
  projections, derived topics), and changes nothing else (projection tables, scores, stages, other leads, chain).
"""

from __future__ import annotations

import asyncio
import csv
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from bench.gen_history import generate
from projections import pii, sql_schema
from projections.fold import normalise_email
from projections.replay import explanation_totals
from projections.rules import RuleBook, load_rule_sets
from services import audit, backtest_log
from services.config import RULES_DIR, default_rules_paths
from services.demo import API_KEY, journeys
from services.derived_reader import read_log, read_topic
from services.ingest import IngestConfig, create_app as ingest_app
from services.keystore import Keystore, reveal_records
from services.kafka_io import ensure_topics, make_producer
from services.projector import Projector
from services.query_api import create_app as query_app
from services.rules_log import book_from_log, publish
from tests.projections_support import dump, fresh_pg_schema
from tests.streaming import Worker, settings_for, topic_env, wait_caught_up

pytestmark = pytest.mark.infra

N_EVENTS, N_LEADS = 2500, 100
NOTE = "Prefers her mobile, 090-1234-5678; husband is Kenji"
TOKENS = {"t-audit": "auditor", "t-bi": "bi"}


async def _produce(bootstrap: str, topic: str, events: list[dict]) -> None:
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        futs = [await producer.send(topic, orjson.dumps(e),
                                    key=(e["lead_id"] or e["email"] or e["anonymous_id"]).encode()) for e in events]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def _live(bootstrap: str, cfg) -> dict[str, tuple]:
    """Per lead, as the live system shows it on its derived topics: (fit, engagement, stage, hand-offs)."""
    t = cfg.topics
    scores: dict[str, dict] = {}
    for s in await read_topic(bootstrap, t.scores):
        scores[s["lead"]] = s
    stages: dict[str, str] = {}
    for s in await read_topic(bootstrap, t.stages):
        stages[s["lead"]] = s["to"]
    handoffs: dict[str, int] = {}
    for h in await read_topic(bootstrap, t.handoffs):
        handoffs[h["lead"]] = handoffs.get(h["lead"], 0) + 1
    leads = set(scores) | set(stages)
    return {k: (scores[k]["fit"] if k in scores else 0, round(scores[k]["engagement"], 9) if k in scores else 0.0,
                stages.get(k), handoffs.get(k, 0)) for k in leads}


def _replayed(r: dict) -> tuple:
    s = r["state"]
    return (s["fit"], round(s["engagement"], 9), s["stage"], s["handoffs"])


async def _raw_bytes(bootstrap: str, topics: list[str]) -> bytes:
    out = []
    for topic in topics:
        out.append(await _raw_topic(bootstrap, topic))
    return b"\n".join(out)


async def _raw_topic(bootstrap: str, topic: str) -> bytes:
    out = [m.value async for m in read_log(bootstrap, topic, read_committed=False)]
    assert out, topic
    return b"\n".join(out)


@pytest.fixture(scope="module")
async def run(kafka_bootstrap, pg_dsn, tmp_path_factory) -> Any:
    unique = uuid.uuid4().hex[:10]
    tmp = tmp_path_factory.mktemp("audit")
    env = topic_env(unique)
    cfg = settings_for(env, kafka_bootstrap)
    rules_topic = f"rules-{unique}"
    await ensure_topics(kafka_bootstrap, cfg.topics.all(), cfg.partitions)
    book = RuleBook.from_paths(default_rules_paths())
    assert await publish(kafka_bootstrap, [rs for p in default_rules_paths() for rs in load_rule_sets(p)],
                         topic=rules_topic) == ["2026-11-default"]

    events = generate(N_EVENTS, N_LEADS, seed=23)
    for e in events:
        e["email"] = normalise_email(e["email"])
    cut = int(len(events) * 0.6)
    as_of = events[cut - 1]["received_at"]
    phase1, phase2 = events[:cut], events[cut:]
    assert phase2[0]["received_at"] > as_of

    keystore_url = f"sqlite:///{tmp / 'keys.db'}"
    pg = fresh_pg_schema(pg_dsn)
    db_url = next(pg)
    sql_schema.migrate(db_url)
    worker = Worker(env, kafka_bootstrap, tmp / "worker.log")
    worker.start()
    group = env["LEADLEDGER_PROCESSOR_ID"]
    t = cfg.topics
    try:
        await _produce(kafka_bootstrap, t.touchpoints, phase1)
        await wait_caught_up(kafka_bootstrap, group, [t.touchpoints, t.by_anon, t.by_lead], timeout=180)
        worker.check_alive()
        at_t = await _live(kafka_bootstrap, cfg)

        await _produce(kafka_bootstrap, t.touchpoints, phase2)
        run_id = unique
        pixel, batch = journeys(run_id, datetime.now(timezone.utc))
        aiko = batch[0]["email"]
        batch.append({"event_id": f"{run_id}-a6", "type": "call_logged", "occurred_at": batch[4]["occurred_at"],
                      "email": aiko, "payload": {"note": NOTE, "outcome": "reached",
                                                 "qualification": {"timing": "this quarter"}}})
        os.environ["LEADLEDGER_KEYSTORE_URL"] = keystore_url
        try:
            app = ingest_app(cfg, IngestConfig.from_env())
        finally:
            del os.environ["LEADLEDGER_KEYSTORE_URL"]
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as c:
                for hit in pixel:
                    assert (await c.get("/t.gif", params=hit)).status_code == 200
                r = await c.post("/v1/events", json={"events": batch}, headers={"X-API-Key": API_KEY})
                assert r.status_code == 200 and r.json()["accepted"] == len(batch)
        finally:
            await app.state.ingest.close()
            app.state.ingest.pii.close()
        await wait_caught_up(kafka_bootstrap, group, [t.touchpoints, t.by_anon, t.by_lead], timeout=180)
        worker.check_alive()
    finally:
        worker.stop()
    final = await _live(kafka_bootstrap, cfg)
    projector = Projector(kafka_bootstrap, db_url, topics=t, group=f"proj-{unique}")
    try:
        await projector.replay_to_end()
    finally:
        projector.close()
    engine = sql_schema.make_engine(db_url)
    try:
        yield {"cfg": cfg, "db": db_url, "engine": engine, "book": book, "as_of": as_of, "at_t": at_t,
               "group": f"proj-{unique}",
               "final": final, "keystore": keystore_url, "rules_topic": rules_topic, "aiko": aiko,
               "ben": batch[5]["email"], "events": events, "tmp": tmp}
    finally:
        engine.dispose()
        try:
            next(pg)
        except StopIteration:
            pass


async def test_replay_as_of_equals_live_state_at_that_time(run) -> None:
    at_t, book = run["at_t"], run["book"]
    assert len(at_t) > 50 and any(v[3] for v in at_t.values())
    as_of = datetime.fromisoformat(run["as_of"])
    for lead, live in sorted(at_t.items()):
        r = await asyncio.to_thread(audit.replay_lead, run["engine"], lead, book, as_of)
        assert r is not None, lead
        assert _replayed(r) == live, lead
        assert r["replayed"] <= r["records"]
    # and with no instant: the final live state
    changed = 0
    for lead, live in sorted(run["final"].items()):
        r = await asyncio.to_thread(audit.replay_lead, run["engine"], lead, book)
        assert _replayed(r) == live, lead
        changed += live != at_t.get(lead)
    assert changed > 10  # phase 2 moved many leads: the as-of cut is doing real work


async def test_explain_totals_equal_the_score(run) -> None:
    as_of = datetime.fromisoformat(run["as_of"])
    for lead in sorted(run["final"])[:40]:
        for t in (as_of, None):
            r = await asyncio.to_thread(audit.replay_lead, run["engine"], lead, run["book"], t, True)
            s = r["state"]
            fit, eng = explanation_totals(s["explanation"])
            assert fit == s["fit"] and eng == pytest.approx(s["engagement"], abs=1e-9), lead
            for st in r["steps"]:  # every step explains its change: fit rules gained/lost, engagement per rule
                why = st["why"]
                d_fit = sum(f["points"] for f in why["fit_rules_added"]) - sum(
                    f["points"] for f in why["fit_rules_removed"])
                if not why["rules_version_changed"]:
                    assert st["after"]["fit"] - st["before"]["fit"] == d_fit, (lead, st["seq"])
                    d_eng = sum(e["contribution"] for e in why["engagement_rules"]) + why["decay"]
                    assert st["after"]["engagement"] - st["before"]["engagement"] == pytest.approx(d_eng, abs=1e-9)


async def test_backtest_of_rules_in_force_reproduces_live_mqls(run, tmp_path: Path) -> None:
    cfg, bootstrap = run["cfg"], run["cfg"].bootstrap
    live = {(h["lead"], h["episode"], h["at"], h["cause_event_id"])
            for h in await read_topic(bootstrap, cfg.topics.handoffs)}
    assert len(live) > 5
    baseline = await book_from_log(bootstrap, run["rules_topic"])
    assert [r.version for r in baseline.sets] == ["2026-11-default"]
    folded = await asyncio.to_thread(backtest_log.fold_log, bootstrap, cfg.topics, [baseline])
    got = {(lead, ep, backtest_log._iso(at), cause) for lead, ep, at, cause in folded["mqls"][0]}
    assert got == live
    assert folded["short_joins"] == [0]
    # sharded over the lead-keyed partitions in two processes: the same MQLs
    sharded = await asyncio.to_thread(backtest_log.fold_books, bootstrap, cfg.topics, [baseline], 2)
    assert sorted(sharded["mqls"][0]) == sorted(folded["mqls"][0])
    assert sharded["records"] == folded["records"] and sharded["leads"] == folded["leads"]

    # a looser candidate over a window: MQLs only earlier or new, never later or lost; CSV of the differences
    loose = Path(RULES_DIR) / "candidate.yaml"  # the default with min_engagement 25
    out_csv = tmp_path / "diff.csv"
    env = {**os.environ, "LEADLEDGER_TOPIC_RULES": run["rules_topic"]}
    # the window covers the whole history: a looser rule can then only make a lead's first MQL earlier (or new);
    # with a later window start its first MQL could fall before the window and show as "later"/"never"
    args = ["--rules", str(loose), "--from", "2026-01-01", "--to", "2026-12-31", "--csv", str(out_csv),
            "--bootstrap", bootstrap]
    old = dict(os.environ)
    os.environ.update(env)
    os.environ.update({f"LEADLEDGER_TOPIC_{k}": v for k, v in {
        "TOUCHPOINTS": cfg.topics.touchpoints, "BY_LEAD": cfg.topics.by_lead}.items()})
    try:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert await asyncio.to_thread(backtest_log.main, args) == 0
    finally:
        os.environ.clear()
        os.environ.update(old)
    summary = orjson.loads(buf.getvalue())
    ch = summary["leads"]
    assert ch["later"] == 0 and ch["never"] == 0 and ch["earlier"] + ch["new"] > 0
    assert summary["mqls"]["candidate"] >= summary["mqls"]["baseline"]
    weeks = summary["weeks"]
    assert sum(w["baseline"] for w in weeks) == summary["mqls"]["baseline"]
    assert all("2025-12-29" <= w["start"] <= "2026-12-28" for w in weeks)
    # the live hand-offs as baseline give the same comparison (they are what the re-fold reproduces)
    live_base = await asyncio.to_thread(backtest_log.run, bootstrap, cfg.topics, RuleBook.from_paths([str(loose)]),
                                        None, datetime(2026, 1, 1, tzinfo=timezone.utc),
                                        datetime(2026, 12, 31, tzinfo=timezone.utc))
    assert live_base["leads"] == ch and live_base["weeks"] == weeks
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == ch["earlier"] + ch["new"] == summary["csv"]["rows"]
    assert all("@" in r["lead"] or r["lead"].startswith("crm-") for r in rows)
    for r in rows:
        assert r["change"] in ("earlier", "new") and r["candidate_mql_at"]


async def test_chain_verifies(run) -> None:
    n, leads, problems = await asyncio.to_thread(audit.verify, run["db"])
    assert problems == [] and n >= N_EVENTS * 0.5 and leads > 50
    a = sql_schema.touchpoint_archive
    with run["engine"].connect() as conn:
        joins = conn.execute(sa.select(sa.func.count()).where(a.c.type == "_join_resolved")).scalar()
    assert joins > 10


async def test_forget_erases_pii_everywhere_and_nothing_else(run) -> None:
    cfg, bootstrap, engine = run["cfg"], run["cfg"].bootstrap, run["engine"]
    aiko, ben, ks_url = run["aiko"], run["ben"], run["keystore"]
    t = cfg.topics
    raw = await _raw_bytes(bootstrap, [t.touchpoints, t.by_lead, t.by_anon, t.handoffs, t.scores])
    for secret in (b"Aiko Tanaka", NOTE.encode(), b"Ben Ito", b"Chie Mori"):
        assert secret not in raw  # sealed before it was produced
    form = [orjson.loads(line) for line in raw.split(b"\n") if b'"form_id":"whitepaper"' in line][0]
    fields = form["payload"]["fields"]
    assert all(pii.token_key_id(fields[k]) for k in ("name", "email", "phone"))
    assert fields["title"] == "IT Manager" and fields["company_size"] == "800"  # fit attributes stay in clear

    def replay(lead):
        return audit.replay_lead(engine, lead, run["book"], keystore_url=ks_url)

    before = await asyncio.to_thread(replay, aiko)
    attrs = before["state"]["attributes"]
    assert attrs["name"] == "Aiko Tanaka" and attrs["phone"] == "+81-3-0000-0000" and attrs["email"] == aiko
    assert attrs["title"] == "IT Manager"
    assert NOTE in [s.get("payload", {}).get("note") for s in before["steps"]]
    assert before["state"]["handoffs"] == 1
    tables_before = dump(run["db"])

    out = await asyncio.to_thread(audit.forget, run["db"], ks_url, aiko)
    assert out["keys_destroyed"] >= 1

    after = await asyncio.to_thread(replay, aiko)
    attrs = after["state"]["attributes"]
    assert attrs["name"] == attrs["phone"] == attrs["email"] == pii.ERASED
    assert attrs["title"] == "IT Manager" and attrs["company"] == "Tanaka Seiki"  # not PII: kept
    notes = [s["payload"]["note"] for s in after["steps"] if s.get("payload", {}).get("note")]
    assert notes == [pii.ERASED]
    assert orjson.dumps(after).find(b"Aiko Tanaka") == -1
    # nothing else changed: scores, stages, hand-offs, every projection table, the chain, other leads
    strip = lambda r: [(s["seq"], s["before"], s["after"], s["changes"]) for s in r["steps"]]  # noqa: E731
    assert strip(after) == strip(before)
    assert after["state"]["email"] == pii.ERASED  # the email attribute (the lead key itself stays: docs/audit.md)
    assert {k: v for k, v in after["state"].items() if k not in ("attributes", "email")} == \
        {k: v for k, v in before["state"].items() if k not in ("attributes", "email")}
    assert dump(run["db"]) == tables_before
    assert (await asyncio.to_thread(audit.verify, run["db"]))[2] == []
    assert (await asyncio.to_thread(replay, ben))["state"]["attributes"]["name"] == "Ben Ito"

    ks = Keystore(ks_url)
    try:
        # projections and derived topics, read through the product's reveal path
        with engine.connect() as conn:
            row = conn.execute(sa.select(sql_schema.leads.c.attributes)
                               .where(sql_schema.leads.c.lead == aiko)).scalar_one()
        assert reveal_records([row], ks)[0]["name"] == pii.ERASED
        handoffs = [h for h in await read_topic(bootstrap, t.handoffs) if h["lead"] == aiko]
        assert handoffs and reveal_records(handoffs, ks)[0]["attributes"]["phone"] == pii.ERASED
        ben_row = [h for h in reveal_records(await read_topic(bootstrap, t.by_lead), ks)
                   if h.get("email") == ben and h["type"] == "form_submitted"]
        assert ben_row[0]["payload"]["fields"]["name"] == "Ben Ito"
    finally:
        ks.close()

    # the auditor's history endpoint shows the same; other roles may not read it
    os.environ["LEADLEDGER_KEYSTORE_URL"] = ks_url
    try:
        app = query_app(run["db"], TOKENS)
    finally:
        del os.environ["LEADLEDGER_KEYSTORE_URL"]
    with TestClient(app) as c:
        r = c.get(f"/v1/leads/{aiko}/history", params={"explain": "true"}, headers={"Authorization": "Bearer t-audit"})
        assert r.status_code == 200
        assert r.json()["state"]["attributes"]["name"] == pii.ERASED and r.json()["state"]["handoffs"] == 1
        assert c.get(f"/v1/leads/{aiko}/history", headers={"Authorization": "Bearer t-bi"}).status_code == 403
        r = c.get(f"/v1/leads/{ben}/history", params={"as_of": run["as_of"]},
                  headers={"Authorization": "Bearer t-audit"})
        assert r.status_code == 200  # Ben's events all arrived after the as-of instant: nothing folded yet
        assert r.json()["replayed"] == 0 and r.json()["state"]["stage"] is None
        assert c.get("/v1/leads/nobody@x.example/history", headers={"Authorization": "Bearer t-audit"}) \
            .status_code == 404


async def test_rules_publish_is_idempotent_and_versions_are_immutable(kafka_bootstrap, unique, tmp_path,
                                                                      capsys) -> None:
    from services.rules_log import publish_main, read_rule_events

    topic = f"rules-{unique}"
    rules = default_rules_paths()[0]
    args = ["--bootstrap", kafka_bootstrap, "--topic", topic]
    assert await asyncio.to_thread(publish_main, [rules, *args]) == 0
    assert "published 1 rule set(s): 2026-11-default" in capsys.readouterr().out
    assert await asyncio.to_thread(publish_main, [rules, *args]) == 0
    assert "already on the log" in capsys.readouterr().out
    changed = tmp_path / "changed.yaml"
    changed.write_text(Path(rules).read_text().replace("min_fit: 20", "min_fit: 25"))
    assert await asyncio.to_thread(publish_main, [str(changed), *args]) == 1
    assert "immutable" in capsys.readouterr().err
    spring = tmp_path / "spring.yaml"
    spring.write_text(Path(rules).read_text().replace('version: "2026-11-default"', 'version: "2026-spring"')
                      .replace('effective_from: "2026-01-01T00:00:00Z"', 'effective_from: "2026-04-01T00:00:00Z"'))
    assert await asyncio.to_thread(publish_main, [str(spring), *args]) == 0
    evs = await read_rule_events(kafka_bootstrap, topic)
    assert [e["version"] for e in evs] == ["2026-11-default", "2026-spring"]
    book = await book_from_log(kafka_bootstrap, topic)
    assert book.in_force("2026-03-01T00:00:00Z").version == "2026-11-default"
    assert book.in_force("2026-05-01T00:00:00Z").version == "2026-spring"


async def test_verify_against_the_log_catches_what_the_chain_cannot(run) -> None:
    """Deleting a lead's latest record, or altering one and recomputing the chain to its end, leaves a valid
    chain; the lead-keyed log (up to the projector's stored progress) is the anchor that catches both.
    Runs last: it tampers with the shared archive."""
    from projections.audit_chain import link

    db, cfg = run["db"], run["cfg"]
    n, problems = await asyncio.to_thread(audit.verify_against_log, db, cfg.bootstrap, cfg.topics.by_lead,
                                          run["group"])
    assert problems == [] and n > N_EVENTS * 0.5
    a = sql_schema.touchpoint_archive
    with run["engine"].begin() as conn:
        la, lb = conn.execute(sa.select(a.c.lead).group_by(a.c.lead).having(sa.func.count() >= 5)
                              .order_by(a.c.lead).limit(2)).scalars().all()
        rows_a = [dict(r) for r in conn.execute(sa.select(a).where(a.c.lead == la).order_by(a.c.seq)).mappings()]
        rows_b = [dict(r) for r in conn.execute(sa.select(a).where(a.c.lead == lb).order_by(a.c.seq)).mappings()]
        conn.execute(a.delete().where(a.c.event_id == rows_a[-1]["event_id"]))
        rows_b[1]["source"] = "forged"
        prev = (rows_b[0]["hash"], rows_b[0]["event_id"])
        for r in rows_b[1:]:
            link(r, prev)
            prev = (r["hash"], r["event_id"])
            conn.execute(a.update().where(a.c.event_id == r["event_id"])
                         .values(source=r["source"], prev_hash=r["prev_hash"], hash=r["hash"]))
    assert (await asyncio.to_thread(audit.verify, db))[2] == []  # the chain alone sees nothing
    _n, problems = await asyncio.to_thread(audit.verify_against_log, db, cfg.bootstrap, cfg.topics.by_lead,
                                           run["group"])
    assert [(p.kind, p.lead, p.seq, p.event_id) for p in problems] == [
        ("missing", la, rows_a[-1]["seq"], rows_a[-1]["event_id"]), ("altered", lb, 2, rows_b[1]["event_id"])]

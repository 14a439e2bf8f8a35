"""SLA from hand-off to first sales touch, in event time, on the real broker: a breach fires exactly once at the due
time, a touch in time is met; a restart resumes from the stored positions (no duplicate alert, open SLAs kept,
context warmed up again); the SLA section of GET /v1/funnel."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import httpx
import orjson
import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer
from fastapi.testclient import TestClient

from projections import sql_schema
from projections.sql_writer import apply_batch
from services import alerts_store as store
from services.alerts import AlertsConfig
from services.derived_reader import topic_partitions
from services.query_api import create_app as create_query_app
from tests.alerts_support import AUTH, T0, Feed, SseEvent, alerts_service, config_for, minutes, sse_events, ts
from tests.conftest import wait_for
from tests.projections_support import db_url, small_history  # noqa: F401

pytestmark = pytest.mark.infra


async def caught_up(cfg: AlertsConfig) -> bool:
    """True when the alerts service stored the end offset of every partition it reads (a sync point)."""
    t = cfg.topics
    consumer = AIOKafkaConsumer(bootstrap_servers=cfg.settings.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [tp for name in (t.handoffs, t.intent_alerts, t.by_lead, t.scores, t.stages)
               for tp in await topic_partitions(consumer, name)]
        end = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    engine = store.engine_for(cfg.database_url)
    try:
        with engine.connect() as conn:
            stored = store.load_offsets(conn, cfg.group)
    finally:
        engine.dispose()
    return all(end[tp] == 0 or stored.get((tp.topic, tp.partition), -1) >= end[tp] for tp in tps)


def sla_rows(url: str) -> dict[str, dict]:
    engine = store.engine_for(url)
    try:
        with engine.connect() as conn:
            return {r["handoff_event_id"]: dict(r) for r in conn.execute(sa.select(store.alert_sla)).mappings()}
    finally:
        engine.dispose()


async def test_breach_fires_once_at_event_time_and_touch_in_time_is_met(kafka_bootstrap: str, unique: str,
                                                                        tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'sla.db'}"
    cfg = replace(config_for(kafka_bootstrap, unique, url), offsets_every_s=0.1)
    a, b, c = (f"{x}-{unique}@example.jp" for x in "abc")
    async with alerts_service(cfg) as (base, _app), httpx.AsyncClient(base_url=base, headers=AUTH) as http, \
            Feed(kafka_bootstrap, cfg.topics) as feed:

        async def alerts() -> list[dict]:
            return (await http.get("/v1/alerts", params={"limit": 1000})).json()["items"]

        async def settle() -> list[dict]:
            await wait_for(lambda: caught_up(cfg), timeout=20, what="alerts service caught up")
            return await alerts()

        await feed.handoff(a, T0)
        await feed.handoff(b, T0)
        await feed.touch(b, "b-call", "call_logged", T0 + minutes(10), note="reached", outcome="interested")
        await feed.touch(c, "c-1", "page_viewed", T0 + minutes(14), url="/x")
        await feed.touch(c, "c-2", "page_viewed", T0 + minutes(15), url="/x")  # clock == due: not past it
        got = await settle()
        assert sorted(x["kind"] for x in got) == ["handoff", "handoff", "sla_met"]
        met = next(x for x in got if x["kind"] == "sla_met")
        assert met["alert_id"] == f"{b}:sla-met:1" and met["at"] == ts(T0 + minutes(10))
        assert met["sla"]["time_to_first_touch_s"] == 600.0 and met["sla"]["first_touch_event_id"] == "b-call"

        await feed.touch(c, "c-3", "page_viewed", T0 + minutes(15.5), url="/x")  # past due for a, event time
        await wait_for(lambda: _has(alerts, "sla_breached"), timeout=20, what="the breach")
        # later: a's late call, the hand-off again (a duplicated derived event), more clock: nothing new
        await feed.touch(a, "a-call", "call_logged", T0 + minutes(20))
        await feed.handoff(a, T0)
        await feed.touch(c, "c-4", "page_viewed", T0 + minutes(60), url="/x")
        got = await settle()
        breaches = [x for x in got if x["kind"] == "sla_breached"]
        assert len(breaches) == 1 and len(got) == 4
        [br] = breaches
        assert br["alert_id"] == f"{a}:sla:1" and br["lead"] == a
        assert br["at"] == ts(T0 + minutes(15))  # the due time, not when the clock noticed
        assert br["sla"]["decided_by"] == "clock" and br["sla"]["handoff_id"] == f"{a}:handoff:1"
        assert br["attributes"]["company"] == "ACME KK" and br["score"]["after"] == 60.0  # the hand-off's context
        rows = sla_rows(url)
        assert rows[f"{a}:handoff:1"]["status"] == "breached"
        assert rows[f"{a}:handoff:1"]["breached_at"] == T0 + minutes(15)
        assert rows[f"{b}:handoff:1"]["status"] == "met" and rows[f"{b}:handoff:1"]["time_to_first_touch_s"] == 600


async def _has(alerts, kind: str) -> bool:
    return any(x["kind"] == kind for x in await alerts())


async def test_restart_resumes_without_duplicates_keeps_open_slas_and_warms_up(kafka_bootstrap: str, unique: str,
                                                                               tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'restart.db'}"
    cfg = replace(config_for(kafka_bootstrap, unique, url), offsets_every_s=0.1)
    a, b, c = (f"{x}-{unique}@example.jp" for x in "abc")
    async with Feed(kafka_bootstrap, cfg.topics) as feed:
        async with alerts_service(cfg) as (base, _app), httpx.AsyncClient(base_url=base, headers=AUTH) as http:
            await feed.handoff(a, T0)
            await feed.scored(c, 7, T0, 25.0, 20.0, 25.0, 12.0, "c-7")  # context consumed before the restart
            await feed.stage(c, 2, T0, "known", "lead", "c-6")
            await wait_for(lambda: caught_up(cfg), timeout=20, what="caught up before the restart")
            [ho] = (await http.get("/v1/alerts")).json()["items"]
            assert ho["alert_id"] == f"{a}:handoff:1"
        # while the service is down
        await feed.handoff(a, T0)                                   # duplicate
        await feed.handoff(b, T0 + minutes(10))                     # new
        await feed.handoff(c, T0 + minutes(10), cause="c-8")        # its score before comes from the warm-up
        await feed.touch(c, "c-x", "page_viewed", T0 + minutes(16), url="/x")  # a's SLA is past due
        async with alerts_service(cfg) as (base, _app), httpx.AsyncClient(base_url=base, headers=AUTH) as http:
            resumed: list[SseEvent] = []
            await wait_for(lambda: caught_up(cfg), timeout=20, what="caught up after the restart")
            await sse_events(http, "/v1/alerts/stream", {"Last-Event-ID": str(ho["id"])}, resumed,
                             stop=lambda: len(resumed) >= 3)
            got = (await http.get("/v1/alerts")).json()["items"]
        assert [x["id"] for x in got] == sorted(x["id"] for x in got)
        assert sorted(x["alert_id"] for x in got) == sorted([f"{a}:handoff:1", f"{b}:handoff:1", f"{c}:handoff:1",
                                                             f"{a}:sla:1"])
        assert sorted(e.data["alert_id"] for e in resumed) == sorted([f"{b}:handoff:1", f"{c}:handoff:1",
                                                                      f"{a}:sla:1"])
        hc = next(x for x in got if x["lead"] == c)
        assert hc["score"]["before"] == 45.0 and hc["stage"] == {"from": "lead", "to": "mql"}
        rows = sla_rows(url)
        assert rows[f"{a}:handoff:1"]["status"] == "breached" and rows[f"{b}:handoff:1"]["status"] == "open"


def test_funnel_reports_the_sla_section(db_url, monkeypatch) -> None:  # noqa: F811
    sql_schema.migrate(db_url)
    engine = sql_schema.make_engine(db_url)
    with engine.begin() as conn:
        apply_batch(conn, small_history())
    engine.dispose()
    tokens = {"t-bi": "bi"}
    bi = {"Authorization": "Bearer t-bi"}
    # a and b: first sales touch 3 h after the hand-off; c: never touched. No alerts service on this database yet.
    with TestClient(create_query_app(db_url, tokens)) as client:
        sla = client.get("/v1/funnel", headers=bi).json()["sla"]
    assert sla == {"sla_minutes": 15.0, "source": "handoffs", "handoffs": 3, "touched": 2, "met": 0, "breached": 2,
                   "open": 1, "breach_rate": round(2 / 3, 6), "median_s_to_first_touch": 10800.0,
                   "p90_s_to_first_touch": 10800.0}
    monkeypatch.setenv("LEADLEDGER_SLA_MINUTES", "240")
    # the alerts service decided c's episode in event time
    engine = store.engine_for(db_url)
    store.create_tables(engine)
    with engine.begin() as conn:
        at = conn.execute(sa.select(sql_schema.handoffs.c.at).where(sql_schema.handoffs.c.lead == "c@x.com")).scalar()
        store.insert_sla(conn, [dict(handoff_event_id="c@x.com:handoff:1", lead="c@x.com", episode=1,
                                     sla_minutes=240, handoff_at=at, due_at=at + timedelta(hours=4), status="open")])
        assert store.decide_sla(conn, "c@x.com:handoff:1", "breached", "clock", None, None, None,
                                at + timedelta(hours=4))
        assert not store.decide_sla(conn, "c@x.com:handoff:1", "met", "touch", at, "x", 0.0, None)  # only once
    engine.dispose()
    with TestClient(create_query_app(db_url, tokens)) as client:
        body = client.get("/v1/funnel?group_by=source", headers=bi).json()
    sla = body["sla"]
    assert (sla["source"], sla["sla_minutes"], sla["met"], sla["breached"], sla["open"]) == ("alert_sla", 240, 2, 1, 0)
    assert {g["group"]: (g["handoffs"], g["met"], g["breached"]) for g in sla["groups"]} == \
        {"web": (2, 2, 0), "form": (1, 0, 1)}
    assert [g["group"] for g in body["groups"]] == ["form", "web"]  # the funnel itself is unchanged
    assert orjson.loads(orjson.dumps(body)) == body

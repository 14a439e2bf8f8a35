"""The SSE stream on a real server: resume with Last-Event-ID after disconnects while alerts keep coming (no gap,
no duplicate; from the in-memory tail and from the database), filters, backlog, heartbeats, auth."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import httpx
import pytest

from tests.alerts_support import AUTH, T0, Feed, SseEvent, alerts_service, config_for, minutes, sse_events
from tests.conftest import wait_for
from tests.projections_support import fresh_pg_schema

pytestmark = pytest.mark.infra


@pytest.fixture(params=[("sqlite", 5000), ("postgresql", 3)], ids=["sqlite-tail", "postgresql-db-path"])
def db_and_tail(request, tmp_path):
    kind, tail = request.param
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'alerts.db'}", tail
        return
    for url in fresh_pg_schema(request.getfixturevalue("pg_dsn")):
        yield url, tail


async def test_resume_after_disconnects_has_no_gap_and_no_duplicate(kafka_bootstrap: str, unique: str,
                                                                    db_and_tail) -> None:
    url, tail = db_and_tail
    cfg = replace(config_for(kafka_bootstrap, unique, url), sse_tail=tail)
    n = 40
    async with alerts_service(cfg) as (base, _app), httpx.AsyncClient(base_url=base, headers=AUTH) as c:
        async with Feed(kafka_bootstrap, cfg.topics) as feed:
            async def produce() -> None:
                for i in range(n):
                    await feed.handoff(f"l{i:03d}-{unique}@example.jp", T0 + minutes(i), score=50 + i)
                    await asyncio.sleep(0.03)  # pacing: a steady trickle, so disconnects fall between alerts

            got: list[SseEvent] = []
            first: list[SseEvent] = []
            await asyncio.wait_for(sse_events(c, "/v1/alerts/stream?backlog=0", {}, first, stop=lambda: True), 10)
            assert first == []
            producer = asyncio.create_task(produce())
            last: str | None = None
            reconnects = 0
            while len(got) < n:
                batch: list[SseEvent] = []
                headers = {"Last-Event-ID": last} if last else {}
                params = "" if last else "?backlog=100"
                await asyncio.wait_for(sse_events(c, "/v1/alerts/stream" + params, headers, batch,
                                                  stop=lambda: len(batch) >= 3 or len(got) + len(batch) >= n), 30)
                got.extend(batch)
                if batch:
                    last = batch[-1].id
                reconnects += 1
            await producer
        ids = [int(e.id) for e in got]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        # every alert exactly once (leads on different partitions: the log orders them as they were consumed)
        assert sorted(e.data["lead"] for e in got) == [f"l{i:03d}-{unique}@example.jp" for i in range(n)]
        log = (await c.get("/v1/alerts", params={"limit": 1000})).json()["items"]
        assert [str(i["id"]) for i in log] == [e.id for e in got]  # no gap: the stream is the log
        assert all(e.event == "handoff" == e.data["kind"] for e in got)
        assert reconnects >= 3  # (a chunk may carry several alerts, so not exactly n / 3)

        # a late reader resuming from the very start reads the whole log once, in order
        everything: list[SseEvent] = []
        await asyncio.wait_for(sse_events(c, "/v1/alerts/stream", {"Last-Event-ID": "0"}, everything,
                                          stop=lambda: len(everything) >= n), 30)
        assert [e.id for e in everything] == [e.id for e in got]


async def test_filters_backlog_heartbeats_and_auth(kafka_bootstrap: str, unique: str, tmp_path) -> None:
    cfg = replace(config_for(kafka_bootstrap, unique, f"sqlite:///{tmp_path / 'a.db'}"), heartbeat_s=0.3)
    a, b = f"a-{unique}@example.jp", f"b-{unique}@example.jp"
    async with alerts_service(cfg) as (base, _app), httpx.AsyncClient(base_url=base, headers=AUTH) as c:
        async with Feed(kafka_bootstrap, cfg.topics) as feed:
            await feed.stage(b, 1, T0, "mql", "sal", "s1", by="sales:kato")
            await feed.handoff(a, T0, score=40)
            await feed.handoff(b, T0, score=80)
            await feed.intent(b, T0 + minutes(2), "d1", "p1")
            await feed.intent(a, T0 + minutes(3), "d2", "p2")

            async def four() -> bool:
                return len((await c.get("/v1/alerts")).json()["items"]) == 4

            await wait_for(four, timeout=20, what="four alerts on the log")

        async def read(query: str, count: int, headers: dict | None = None) -> list[SseEvent]:
            out: list[SseEvent] = []
            await asyncio.wait_for(sse_events(c, "/v1/alerts/stream" + query, headers or {}, out,
                                              stop=lambda: len(out) >= count), 10)
            return out

        # (alerts of different leads / topics are logged in the order they were consumed: compare as sets)
        assert sorted((e.event, e.data["lead"]) for e in await read("?backlog=10&kind=intent", 2)) == \
            [("intent", a), ("intent", b)]
        assert [e.data["alert_id"] for e in await read("?backlog=10&min_score=60", 1)] == [f"{b}:handoff:1"]
        assert sorted((e.event, e.data["owner"]) for e in await read("?backlog=10&owner=sales:kato", 2)) == \
            [("handoff", "sales:kato"), ("intent", "sales:kato")]
        log = (await c.get("/v1/alerts", params={"after": 0})).json()["items"]  # the JSON listing: the same log
        assert len(log) == 4 and [i["id"] for i in log] == sorted(i["id"] for i in log)
        last_two = await read("?backlog=2&kind=handoff,intent", 2)
        assert [(e.id, e.data["alert_id"]) for e in last_two] == [(str(i["id"]), i["alert_id"]) for i in log[-2:]]
        listing = (await c.get("/v1/alerts", params={"kind": "handoff", "after": 0})).json()
        assert sorted(i["lead"] for i in listing["items"]) == [a, b]

        # heartbeats while idle
        comments: list[str] = []
        events: list[SseEvent] = []
        await asyncio.wait_for(sse_events(c, "/v1/alerts/stream", {}, events, comments,
                                          stop=lambda: sum(x.startswith(": heartbeat") for x in comments) >= 2), 10)
        assert events == []

        anon = httpx.AsyncClient(base_url=base)
        try:
            assert (await anon.get("/v1/alerts/stream")).status_code == 401
            r = await anon.get("/v1/alerts/stream", headers={"Authorization": "Bearer bi-token-for-tests"})
            assert r.status_code == 403
            admin = {"Authorization": "Bearer admin-token-for-tests"}
            assert (await anon.get("/v1/alerts", headers=admin)).status_code == 200
        finally:
            await anon.aclose()
        # an id from the future (a restored database) continues from the end of the log instead of hanging
        future: list[SseEvent] = []
        opened: list[str] = []
        async with Feed(kafka_bootstrap, cfg.topics) as feed:
            reader = asyncio.create_task(sse_events(c, "/v1/alerts/stream", {"Last-Event-ID": "999999"}, future,
                                                    opened, stop=lambda: len(future) >= 1))
            await wait_for(lambda: any(x.startswith(": stream from") for x in opened), timeout=10, what="stream")
            await feed.intent(a, T0 + minutes(4), "d3", "p3")
            await asyncio.wait_for(reader, 20)
        assert [e.data["alert_id"] for e in future] == [f"{a}:intent:doc-then-product:d3"]
        r = await c.get("/v1/alerts/stream", headers={"Last-Event-ID": "yesterday"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["header", "Last-Event-ID"]
        r = await c.get("/v1/alerts/stream", params={"kind": "gossip"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "kind"]
        metrics = (await c.get("/metrics")).text
        assert 'leadledger_alerts_total{kind="handoff"} 2.0' in metrics


"""Webhooks on real loopback receivers: signed deliveries, filters, retries with back-off on 500s and time-outs,
dead letters with the reason, re-drive from the CLI, and isolation of a dead or slow receiver."""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace

import httpx
import orjson
import pytest

from services import alerts as alerts_mod
from services.webhooks import verify
from tests.alerts_support import AUTH, T0, Feed, Receiver, alerts_service, config_for, dead_url, minutes, serve
from tests.conftest import wait_for
from tests.projections_support import fresh_pg_schema

pytestmark = pytest.mark.infra


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'alerts.db'}"
        return
    yield from fresh_pg_schema(request.getfixturevalue("pg_dsn"))


@pytest.fixture
def sqlite_db(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'alerts.db'}"


async def _subscribe(c: httpx.AsyncClient, url: str, **kw) -> dict:
    r = await c.post("/v1/webhooks", json={"url": url, **kw})
    assert r.status_code == 201, r.text
    return r.json()


async def _deliveries(c: httpx.AsyncClient, sub_id: str, status: str | None = None) -> list[dict]:
    r = await c.get(f"/v1/webhooks/{sub_id}/deliveries", params={"status": status} if status else {})
    assert r.status_code == 200
    return r.json()["items"]


async def test_signed_delivery_with_filters(kafka_bootstrap: str, unique: str, any_db: str) -> None:
    cfg = config_for(kafka_bootstrap, unique, any_db)
    hot, picky, intents = Receiver(), Receiver(), Receiver()
    async with serve(hot) as hot_url, serve(picky) as picky_url, serve(intents) as intent_url, \
            alerts_service(cfg) as (base, _app), httpx.AsyncClient(base_url=base, headers=AUTH) as c:
        sub = await _subscribe(c, hot_url + "/hook", description="CRM")
        assert sub["secret"].startswith("whsec_") and sub["kinds"] == ["handoff", "intent", "sla_breached"]
        high = await _subscribe(c, picky_url + "/hook", min_score=90, secret="a-long-enough-secret-0001")
        only_intent = await _subscribe(c, intent_url + "/hook", kinds=["intent"])
        listed = (await c.get("/v1/webhooks")).json()["items"]
        assert {s["id"] for s in listed} == {sub["id"], high["id"], only_intent["id"]}
        assert all("secret" not in s and s["secret_hint"].startswith("…") for s in listed)

        lead = f"aiko-{unique}@example.jp"
        async with Feed(kafka_bootstrap, cfg.topics) as feed:
            await feed.handoff(lead, T0, score=60.0)
            await feed.intent(lead, T0 + minutes(1), "d1", "p1")
            await feed.handoff(lead, T0, score=60.0)  # a duplicated derived event (processor crash): one alert
            await feed.handoff(f"vip-{unique}@example.jp", T0, score=95.0)
        await wait_for(lambda: len(hot.requests) >= 3 and len(picky.requests) >= 1 and len(intents.requests) >= 1,
                       timeout=20, what="deliveries at three receivers")

        kinds = sorted(orjson.loads(r.body)["alert_id"] for r in hot.requests)
        assert kinds == sorted([f"{lead}:handoff:1", f"{lead}:intent:doc-then-product:d1",
                                f"vip-{unique}@example.jp:handoff:1"])
        for req in hot.requests:
            alert = orjson.loads(req.body)
            assert verify(sub["secret"], req.body, req.headers["x-leadledger-signature"])
            assert not verify(sub["secret"], req.body + b" ", req.headers["x-leadledger-signature"])
            want = hashlib.sha256(f"{sub['id']}\x00{alert['alert_id']}".encode()).hexdigest()
            assert req.headers["x-leadledger-delivery"] == want
            assert req.headers["x-leadledger-event"] == alert["kind"]
            assert req.headers["x-leadledger-alert-id"] == alert["alert_id"]
            assert req.headers["content-type"] == "application/json"
        h = next(orjson.loads(r.body) for r in hot.requests if orjson.loads(r.body)["alert_id"] == f"{lead}:handoff:1")
        assert h["attributes"]["company"] == "ACME KK" and h["score"]["after"] == 60.0
        assert h["reasons"][0]["rule"] == "pricing page" and h["rules_version"] == "v-test"
        assert h["links"]["history"].endswith("/history")
        assert [orjson.loads(r.body)["lead"] for r in picky.requests] == [f"vip-{unique}@example.jp"]
        assert [r.headers["x-leadledger-event"] for r in intents.requests] == ["intent"]
        assert verify("a-long-enough-secret-0001", picky.requests[0].body,
                      picky.requests[0].headers["x-leadledger-signature"])

        async def all_delivered() -> bool:
            ds = await _deliveries(c, sub["id"])
            return len(ds) == 3 and all(d["status"] == "delivered" and d["attempts"] == 1 for d in ds)

        await wait_for(all_delivered, timeout=10, what="delivery rows marked delivered")
        # the same alerts on the log (the duplicated hand-off is one alert)
        items = (await c.get("/v1/alerts")).json()["items"]
        assert sorted(i["alert_id"] for i in items) == sorted({*kinds})
        assert len(hot.requests) == 3

        # unsubscribing stops deliveries; unknown ids are 404; a bad URL is 422 naming the field
        assert (await c.delete(f"/v1/webhooks/{high['id']}")).status_code == 204
        assert (await c.get(f"/v1/webhooks/{high['id']}")).status_code == 404
        r = await c.post("/v1/webhooks", json={"url": "ftp://example.jp/x"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "url"]
        r = await c.post("/v1/webhooks", json={"url": "http://x.jp", "kinds": ["nope"]})
        assert r.status_code == 422
        bi = await httpx.AsyncClient(base_url=base).get("/v1/webhooks",
                                                        headers={"Authorization": "Bearer bi-token-for-tests"})
        assert bi.status_code == 403


async def test_retries_with_backoff_on_500_and_timeout(kafka_bootstrap: str, unique: str, sqlite_db: str) -> None:
    cfg = config_for(kafka_bootstrap, unique, sqlite_db)
    cfg = replace(cfg, webhook=replace(cfg.webhook, timeout_s=0.5, backoff_base_s=0.2, backoff_max_s=1.0))
    # 1st: 500, 2nd: answers too late (time-out), 3rd: 200
    rec = Receiver(behaviour=lambda n: [(500, 0.0), (200, 1.5), (200, 0.0)][min(n, 2)])
    async with serve(rec) as rurl, alerts_service(cfg) as (base, _app), \
            httpx.AsyncClient(base_url=base, headers=AUTH) as c:
        sub = await _subscribe(c, rurl + "/hook")
        async with Feed(kafka_bootstrap, cfg.topics) as feed:
            await feed.handoff(f"ben-{unique}@example.jp", T0)

        async def delivered() -> bool:
            ds = await _deliveries(c, sub["id"])
            return bool(ds) and ds[0]["status"] == "delivered"

        await wait_for(delivered, timeout=20, what="delivery after two failures")
        assert len(rec.requests) == 3
        [d] = await _deliveries(c, sub["id"])
        assert d["attempts"] == 3 and d["last_status"] == 200 and d["last_error"] is None
        assert len({r.headers["x-leadledger-delivery"] for r in rec.requests}) == 1  # stable id across retries
        assert len({r.body for r in rec.requests}) == 1
        for r in rec.requests:
            assert verify(sub["secret"], r.body, r.headers["x-leadledger-signature"])
        t = [r.t for r in rec.requests]
        # retry 1 after the 500: delay in [base/2, base]; retry 2 after the 0.5 s time-out: delay in [base, 2*base]
        assert 0.1 <= t[1] - t[0] < 5.0
        assert 0.5 + 0.2 <= t[2] - t[1] < 6.0


async def test_dead_letter_with_reason_then_redrive_from_cli(kafka_bootstrap: str, unique: str, sqlite_db: str,
                                                             capsys) -> None:
    cfg = config_for(kafka_bootstrap, unique, sqlite_db)
    failing = {"on": True}
    rec = Receiver(behaviour=lambda n: (500, 0.0) if failing["on"] else (200, 0.0))
    async with serve(rec) as rurl, alerts_service(cfg) as (base, _app), \
            httpx.AsyncClient(base_url=base, headers=AUTH) as c:
        sub = await _subscribe(c, rurl + "/hook")
        async with Feed(kafka_bootstrap, cfg.topics) as feed:
            await feed.handoff(f"chie-{unique}@example.jp", T0)

        async def dead() -> bool:
            return bool(await _deliveries(c, sub["id"], "dead"))

        await wait_for(dead, timeout=20, what="dead-lettered delivery")
        [d] = await _deliveries(c, sub["id"], "dead")
        assert len(rec.requests) == cfg.webhook.max_attempts == d["attempts"]
        assert d["last_status"] == 500
        assert d["last_error"].startswith(f"dead after {cfg.webhook.max_attempts} attempts; last: HTTP 500")

        assert alerts_mod.main(["dead-letters", "--database-url", sqlite_db]) == 0
        [line] = capsys.readouterr().out.strip().splitlines()
        assert orjson.loads(line)["id"] == d["id"]

        failing["on"] = False
        assert alerts_mod.main(["redrive", "--database-url", sqlite_db, "--subscription", sub["id"]]) == 0
        assert "re-queued 1 dead-lettered delivery" in capsys.readouterr().out

        async def delivered() -> bool:
            ds = await _deliveries(c, sub["id"])
            return ds[0]["status"] == "delivered"

        await wait_for(delivered, timeout=10, what="redriven delivery")
        assert len(rec.requests) == cfg.webhook.max_attempts + 1
        assert rec.requests[-1].headers["x-leadledger-delivery"] == d["id"]
        assert alerts_mod.main(["redrive", "--database-url", sqlite_db]) == 0
        assert "re-queued 0" in capsys.readouterr().out


async def test_dead_and_slow_receivers_do_not_delay_a_healthy_one(kafka_bootstrap: str, unique: str,
                                                                  sqlite_db: str) -> None:
    cfg = config_for(kafka_bootstrap, unique, sqlite_db)
    cfg = replace(cfg, webhook=replace(cfg.webhook, timeout_s=10.0, max_attempts=3))
    healthy = Receiver()
    slow = Receiver(behaviour=lambda n: (200, 30.0))  # hangs: every attempt runs into the 10 s time-out
    dead, keep = dead_url()
    n = 20
    try:
        async with serve(healthy) as hurl, serve(slow) as surl, alerts_service(cfg) as (base, _app), \
                httpx.AsyncClient(base_url=base, headers=AUTH) as c:
            await _subscribe(c, dead)
            await _subscribe(c, surl + "/hook")
            await _subscribe(c, hurl + "/hook")
            async with Feed(kafka_bootstrap, cfg.topics) as feed:
                t0 = time.monotonic()
                for i in range(n):
                    await feed.handoff(f"lead{i}-{unique}@example.jp", T0)
            await wait_for(lambda: len(healthy.requests) >= n, timeout=20, what="all deliveries at the healthy one")
            took = max(r.t for r in healthy.requests) - t0
            # behind a shared queue the first delivery alone would wait for a 10 s time-out (and 20 alerts for
            # five waves of them); with one lane per subscription the healthy receiver is not held up at all
            assert took < 8.0, took
            assert len(slow.requests) <= cfg.webhook.concurrency  # the slow lane is still stuck in its first wave
    finally:
        keep.close()


async def test_pii_sealed_at_ingest_is_revealed_on_the_way_out_only(kafka_bootstrap: str, unique: str,
                                                                   sqlite_db: str, tmp_path) -> None:
    from projections import pii
    from services.keystore import Keystore
    from tests.alerts_support import handoff_event

    ks_url = f"sqlite:///{tmp_path / 'keys.db'}"
    cfg = replace(config_for(kafka_bootstrap, unique, sqlite_db), keystore_url=ks_url, keystore_cache_s=0)
    lead = f"dana-{unique}@example.jp"
    ks = Keystore(ks_url)
    kid, key = ks.key_for(lead)
    h = handoff_event(lead, T0)
    h["attributes"] = {**h["attributes"], **{k: pii.seal(h["attributes"][k], kid, key) for k in pii.PII_ATTRIBUTES}}
    rec = Receiver()
    try:
        async with serve(rec) as rurl, alerts_service(cfg) as (base, _app), \
                httpx.AsyncClient(base_url=base, headers=AUTH) as c:
            sub = await _subscribe(c, rurl + "/hook")
            async with Feed(kafka_bootstrap, cfg.topics) as feed:
                await feed.send(cfg.topics.handoffs, lead, h)
            await wait_for(lambda: rec.requests, timeout=20, what="the delivery")
            body = orjson.loads(rec.requests[0].body)
            assert body["attributes"]["name"] == f"Name of {lead}" and body["attributes"]["phone"] == "+81-3-0000-0000"
            assert verify(sub["secret"], rec.requests[0].body, rec.requests[0].headers["x-leadledger-signature"])
            [item] = (await c.get("/v1/alerts")).json()["items"]
            assert item["attributes"]["name"] == f"Name of {lead}"
            import sqlalchemy as sa

            from services import alerts_store as store

            engine = store.engine_for(sqlite_db)
            with engine.connect() as conn:
                stored = conn.execute(sa.select(store.alerts.c.payload)).scalar()
            engine.dispose()
            assert "Name of" not in stored and "+81-3" not in stored and pii.PREFIX in stored  # ciphertext at rest
            ks.destroy(subjects=[lead])  # leadledger forget
            [item] = (await c.get("/v1/alerts")).json()["items"]
            assert item["attributes"]["name"] == pii.ERASED and item["attributes"]["company"] == "ACME KK"
    finally:
        ks.close()

"""The ingest service against the real broker: pixel, batch API, forms, limits, broker-down behaviour."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import socket
import time
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import AsyncIterator

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from events.wire import decode
from services.config import Settings, Topics
from services.ingest import IngestConfig, create_app

pytestmark = pytest.mark.infra

KEYS = {"crm-key": {"source": "crm", "types": "*"},
        "web-key": {"source": "web", "types": ["page_viewed", "content_downloaded"]}}
FORMS = {"contact": b"s3cret"}


def make_settings(bootstrap: str, unique: str) -> Settings:
    names = {f.name: f"{f.name}-{unique}" for f in dataclasses.fields(Topics)}
    return Settings(bootstrap=bootstrap, partitions=3, topics=Topics(**names))


@asynccontextmanager
async def client(settings: Settings, **cfg) -> AsyncIterator[httpx.AsyncClient]:
    config = IngestConfig(api_keys=IngestConfig.parse_api_keys(KEYS), form_secrets=FORMS, **cfg)
    app = create_app(settings, config)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as c:
            yield c
    finally:
        await app.state.ingest.close()


async def read_topic(bootstrap: str, topic: str, timeout: float = 20.0) -> list[tuple[bytes, dict]]:
    """Every record of ``topic`` up to its current end offsets (partition order), as (key, decoded value)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(3)]  # make_settings: 3 partitions
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        out: list[tuple[bytes, dict]] = []
        deadline = time.monotonic() + timeout
        async def behind() -> bool:
            return any([await consumer.position(tp) < end[tp] for tp in parts])

        while await behind():
            assert time.monotonic() < deadline, "timed out reading the topic"
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                out.extend((r.key, decode(r.value)) for r in records)
        return out
    finally:
        await consumer.stop()


def ev(event_id: str, type_: str = "page_viewed", **kw) -> dict:
    d = {"event_id": event_id, "type": type_, "occurred_at": "2026-03-01T09:00:00+00:00",
         "email": "jane@example.com", "payload": {"url": "https://example.com/pricing"}}
    d.update(kw)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_pixel_hit_with_cookie(kafka_bootstrap: str, unique: str) -> None:
    s = make_settings(kafka_bootstrap, unique)
    async with client(s) as c:
        r = await c.get("/t.gif", params={"url": "https://example.com/pricing", "eid": "px-1", "ref": "g",
                                          "campaign": "spring"}, headers={"cookie": "ll_aid=anon-abc"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/gif"
        assert r.content.startswith(b"GIF89a") and "no-store" in r.headers["cache-control"]
        assert "ll_aid" not in r.headers.get("set-cookie", "")
        # no cookie: one is set, long-lived, SameSite=Lax, and used as the anonymous id
        r2 = await c.get("/t.gif", params={"url": "https://example.com/", "eid": "px-2"})
        cookie = r2.headers["set-cookie"]
        assert cookie.startswith("ll_aid=") and "samesite=lax" in cookie.lower() and "max-age=" in cookie.lower()
        new_aid = cookie.split(";")[0].split("=", 1)[1]
        # bad input: still the GIF, counted, nothing written
        r3 = await c.get("/t.gif", params={"type": "stage_changed", "to": "won"}, headers={"cookie": "ll_aid=anon-abc"})
        assert r3.status_code == 200 and r3.content.startswith(b"GIF89a")
        r4 = await c.get("/t.gif", params={"url": "/x", "ts": "2026-03-01T09:00:00"}, headers={"cookie": "ll_aid=a"})
        assert r4.status_code == 200
        metrics = (await c.get("/metrics")).text
        assert 'leadledger_ingest_pixel_errors_total{reason="type"} 1.0' in metrics
        assert 'leadledger_ingest_pixel_errors_total{reason="invalid"} 1.0' in metrics
        assert 'leadledger_ingest_events_total{endpoint="pixel",status="accepted",type="page_viewed"} 2.0' in metrics
    records = {v["event_id"]: (k, v) for k, v in await read_topic(kafka_bootstrap, s.topics.touchpoints)}
    assert set(records) == {"px-1", "px-2"}
    key, v = records["px-1"]
    assert key == b"anon-abc" and v["anonymous_id"] == "anon-abc" and v["source"] == "pixel"
    assert v["payload"] == {"url": "https://example.com/pricing", "referrer": "g"} and v["campaign"] == "spring"
    assert v["received_at"] is not None and v["schema_version"] == 2
    assert records["px-2"][1]["anonymous_id"] == new_aid


async def test_beacon_and_snippet(kafka_bootstrap: str, unique: str) -> None:
    s = make_settings(kafka_bootstrap, unique)
    async with client(s) as c:
        js = await c.get("/t.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert b"sendBeacon" in js.content and b"new Image" in js.content
        r = await c.post("/t", content=b"type=content_downloaded&asset_id=wp-1&eid=b-1&aid=anon-9",
                         headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 204
    [(key, v)] = await read_topic(kafka_bootstrap, s.topics.touchpoints)
    assert key == b"anon-9" and v["type"] == "content_downloaded" and v["payload"] == {"asset_id": "wp-1"}


async def test_batch_mixed_results(kafka_bootstrap: str, unique: str) -> None:
    s = make_settings(kafka_bootstrap, unique)
    future = (datetime.now(timezone.utc) + timedelta(minutes=10)).isoformat()
    batch = [
        ev("b-1"),
        ev("b-2", payload={}),                                  # page_viewed without url
        ev("b-1"),                                              # duplicate of index 0
        ev("b-3", occurred_at="2026-03-01T09:00:00"),           # naive timestamp
        ev("b-4", occurred_at=future),                          # too far in the future
        ev("b-5", "stage_changed", lead_id="L-7", email=None, payload={"to": "sal", "by": "bob"}, source="spoof"),
        ev("b-6", email="not-an-email"),
        "not an object",
        ev("b-7", "content_downloaded", email=" Jane@Example.COM ", payload={"asset_id": "wp", "x-extra": 1}),
        {"event_id": "b-8", "type": "page_viewed", "timestamp": "2026-02-01T10:00:00+01:00", "anonymous_id": "an-1",
         "payload": {"url": "/p", "utm_campaign": "winter"}, "schema_version": 1},   # v1 from an old client
    ]
    async with client(s) as c:
        r = await c.post("/v1/events", json={"events": batch}, headers={"X-API-Key": "crm-key"})
        assert r.status_code == 200, r.text
        res = r.json()["results"]
    assert [x["index"] for x in res] == list(range(len(batch)))
    assert [x["status"] for x in res] == ["accepted", "rejected", "duplicate", "rejected", "rejected", "accepted",
                                          "rejected", "rejected", "accepted", "accepted"]
    assert res[1]["field"] == "payload.url" and res[1]["event_id"] == "b-2"
    assert res[3]["field"] == "occurred_at"
    assert res[4] == {"index": 4, "event_id": "b-4", "status": "rejected", "field": "occurred_at",
                      "reason": "more than 5 minutes in the future"}
    assert res[6]["field"] == "email"
    assert res[7]["event_id"] is None
    got = await read_topic(kafka_bootstrap, s.topics.touchpoints)
    by_id = {v["event_id"]: (k, v) for k, v in got}
    assert len(got) == 4 and set(by_id) == {"b-1", "b-5", "b-7", "b-8"}
    assert by_id["b-5"][0] == b"L-7" and by_id["b-5"][1]["source"] == "crm"
    assert by_id["b-7"][0] == b"jane@example.com" and by_id["b-7"][1]["payload"]["x-extra"] == 1
    assert by_id["b-8"][1]["campaign"] == "winter" and by_id["b-8"][1]["occurred_at"].startswith("2026-02-01T09")
    stamps = [by_id[i][1]["received_at"] for i in ("b-1", "b-5", "b-7", "b-8")]
    assert stamps == sorted(stamps) and len(set(stamps)) == 4  # strictly increasing in request order


async def test_auth_and_allowed_types(kafka_bootstrap: str, unique: str) -> None:
    s = make_settings(kafka_bootstrap, unique)
    async with client(s) as c:
        body = {"events": [ev("a-1")]}
        assert (await c.post("/v1/events", json=body)).status_code == 401
        assert (await c.post("/v1/events", json=body, headers={"X-API-Key": "nope"})).status_code == 401
        only_bad = {"events": [ev("a-2", "stage_changed", payload={"to": "sal"})]}
        r = await c.post("/v1/events", json=only_bad, headers={"X-API-Key": "web-key"})
        assert r.status_code == 403
        assert r.json()["results"][0]["reason"] == "type not allowed for this key"
        mixed = {"events": [ev("a-3"), ev("a-4", "call_logged", payload={})]}
        r = await c.post("/v1/events", json=mixed, headers={"X-API-Key": "web-key"})
        assert r.status_code == 200
        assert [x["status"] for x in r.json()["results"]] == ["accepted", "rejected"]
        assert r.json()["results"][1]["field"] == "type"
    got = await read_topic(kafka_bootstrap, s.topics.touchpoints)
    assert [v["event_id"] for _, v in got] == ["a-3"] and got[0][1]["source"] == "web"


async def test_forms_signature(kafka_bootstrap: str, unique: str) -> None:
    s = make_settings(kafka_bootstrap, unique)
    body = orjson.dumps({"email": "Ann@Corp.io", "anonymous_id": "anon-5", "event_id": "f-1",
                         "fields": {"name": "Ann", "company": "Corp", "company_size": 120}})
    sig = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    hdr = {"content-type": "application/json"}
    async with client(s) as c:
        assert (await c.post("/v1/forms/contact", content=body, headers=hdr)).status_code == 401
        bad = "sha256=" + hmac.new(b"wrong", body, hashlib.sha256).hexdigest()
        assert (await c.post("/v1/forms/contact", content=body, headers={**hdr, "X-Signature": bad})).status_code == 401
        assert (await c.post("/v1/forms/other", content=body, headers={**hdr, "X-Signature": sig})).status_code == 404
        r = await c.post("/v1/forms/contact", content=body, headers={**hdr, "X-Signature": sig})
        assert r.status_code == 200 and r.json() == {"event_id": "f-1", "status": "accepted"}
        nomail = orjson.dumps({"fields": {}})
        sig2 = "sha256=" + hmac.new(b"s3cret", nomail, hashlib.sha256).hexdigest()
        r = await c.post("/v1/forms/contact", content=nomail, headers={**hdr, "X-Signature": sig2})
        assert r.status_code == 422 and r.json()["field"] == "email"
    [(key, v)] = await read_topic(kafka_bootstrap, s.topics.touchpoints)
    assert key == b"ann@corp.io" and v["type"] == "form_submitted" and v["source"] == "form"
    assert v["anonymous_id"] == "anon-5" and v["payload"]["form_id"] == "contact"
    assert v["payload"]["fields"]["company_size"] == 120


async def test_limits_and_malformed(kafka_bootstrap: str, unique: str) -> None:
    s = make_settings(kafka_bootstrap, unique)
    key = {"X-API-Key": "crm-key"}
    async with client(s, max_body_bytes=2000) as c:
        big = {"events": [ev(f"l-{i}") for i in range(30)]}
        assert (await c.post("/v1/events", json=big, headers=key)).status_code == 413

        async def chunks():  # no Content-Length: the limit holds on the actual read
            for _ in range(10):
                yield b" " * 500
        r = await c.post("/v1/events", content=chunks(), headers={**key, "content-type": "application/json"})
        assert r.status_code == 413
        assert (await c.post("/v1/events", content=b"{nope", headers=key)).status_code == 422
        r = await c.post("/v1/events", json={"evnts": []}, headers=key)
        assert r.status_code == 422 and r.json()["field"] == "events"
        assert (await c.post("/v1/events", json={"events": []}, headers=key)).json()["results"] == []
    async with client(s) as c:
        many = {"events": [{"event_id": str(i)} for i in range(1001)]}
        assert (await c.post("/v1/events", json=many, headers=key)).status_code == 413
    assert await read_topic(kafka_bootstrap, s.topics.touchpoints) == []


async def test_broker_down_is_503_never_accepted(unique: str) -> None:
    s = make_settings(f"127.0.0.1:{free_port()}", unique)
    body = orjson.dumps({"email": "a@b.co"})
    sig = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    async with client(s, produce_timeout=3.0) as c:
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/readyz")).status_code == 503
        for _ in range(2):  # the first call tries to connect, the second hits the back-off
            r = await c.post("/v1/events", json={"events": [ev("d-1"), ev("d-2")]}, headers={"X-API-Key": "crm-key"})
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            assert b"accepted" not in r.content
        r = await c.get("/t.gif", params={"url": "/x"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        r = await c.post("/v1/forms/contact", content=body, headers={"X-Signature": sig})
        assert r.status_code == 503 and b"accepted" not in r.content
        # invalid input is still answered as such while the broker is down
        r = await c.post("/v1/events", json={"events": [ev("d-3", payload={})]}, headers={"X-API-Key": "crm-key"})
        assert r.status_code == 200 and r.json()["results"][0]["status"] == "rejected"


async def test_readyz_and_metrics(kafka_bootstrap: str, unique: str) -> None:
    s = make_settings(kafka_bootstrap, unique)
    async with client(s) as c:
        assert (await c.get("/readyz")).status_code == 200
        await c.post("/v1/events", json={"events": [ev("m-1"), ev("m-2", payload={})]},
                     headers={"X-API-Key": "crm-key"})
        text = (await c.get("/metrics")).text
    assert 'leadledger_ingest_events_total{endpoint="batch",status="accepted",type="page_viewed"} 1.0' in text
    assert 'leadledger_ingest_events_total{endpoint="batch",status="rejected",type="page_viewed"} 1.0' in text
    assert "leadledger_ingest_produce_seconds_count 1.0" in text


def test_partition_for_matches_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from services.kafka_io import partition_for
    for i in range(500):
        key = f"lead-{i}@example.com".encode()
        for n in (1, 3, 12):
            assert partition_for(key, n) == DefaultPartitioner()(key, list(range(n)), list(range(n)))

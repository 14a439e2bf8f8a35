"""The live processor on the real broker: a journey through the ingest API ends in a hand-off on the topic."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from projections.fold import Ledger
from projections.rules import RuleBook
from services.demo import API_KEY, journeys
from services.derived_reader import latest_by_lead, read_topic
from services.ingest import IngestConfig, create_app
from services.kafka_io import MAX_RECORD_BYTES, ensure_topics, make_producer, produce_events, topic_settings
from services.processor import default_rules_paths
from tests.conftest import wait_for
from tests.streaming import Worker, settings_for, topic_env, wait_caught_up

pytestmark = pytest.mark.infra


async def test_journey_through_ingest_ends_with_handoff(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    env = topic_env(unique)
    cfg = settings_for(env, kafka_bootstrap)
    await ensure_topics(kafka_bootstrap, cfg.topics.all(), cfg.partitions)
    worker = Worker(env, kafka_bootstrap, tmp_path / "worker.log")
    worker.start()
    try:
        pixel, batch = journeys(unique, datetime.now(timezone.utc))
        app = create_app(cfg, IngestConfig.from_env())
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as c:
                for hit in pixel:
                    assert (await c.get("/t.gif", params=hit)).status_code == 200
                r = await c.post("/v1/events", json={"events": batch}, headers={"X-API-Key": API_KEY})
                assert r.status_code == 200
                assert {x["status"] for x in r.json()["results"]} == {"accepted"}
        finally:
            await app.state.ingest.close()
        aiko = batch[0]["email"]
        ben = batch[5]["email"]
        chie = batch[7]["email"]

        handoffs: list[dict] = []

        async def handed_off() -> bool:
            worker.check_alive()
            handoffs[:] = await read_topic(kafka_bootstrap, cfg.topics.handoffs)
            return bool(handoffs)

        await wait_for(handed_off, timeout=90, what="a lead_handed_off on the topic")
        assert [h["lead"] for h in handoffs] == [aiko]
        h = handoffs[0]
        assert h["event_id"] == f"{aiko}:handoff:1" and h["episode"] == 1 and h["type"] == "lead_handed_off"
        assert h["rules_version"] == "2026-11-default"
        assert h["fit"] >= 20 and h["engagement"] >= 40
        # the explanation names the rules and touchpoints, including the anonymous download joined by the form
        rules = {e["rule"] for e in h["explanation"]["engagement"]}
        # fit 40; engagement crosses 40 at the seminar (a4): 10 (download) + 16 (pricing) + 15 + page views
        assert rules == {"whitepaper download", "seminar attended", "pricing page", "any page view"}
        assert f"{unique}-p2" in {tp["event_id"] for tp in h["top_touchpoints"]}
        assert h["cause_event_id"] == f"{unique}-a4"

        async def settled() -> bool:
            stages = latest_by_lead(await read_topic(kafka_bootstrap, cfg.topics.stages))
            return stages.get(chie, {}).get("to") == "sql" and bool(
                await read_topic(kafka_bootstrap, cfg.topics.rejected))

        await wait_for(settled, timeout=60, what="chie at sql and ben's bad stage change rejected")
        stages = latest_by_lead(await read_topic(kafka_bootstrap, cfg.topics.stages))
        assert stages[aiko]["to"] == "mql"
        assert stages[ben]["to"] == "known"
        rejected = await read_topic(kafka_bootstrap, cfg.topics.rejected)
        assert [r["event"]["event_id"] for r in rejected] == [f"{unique}-c3"]
        assert "won" in rejected[0]["reason"]
        alerts = await read_topic(kafka_bootstrap, cfg.topics.intent_alerts)
        assert [(a["lead"], a["first_event_id"]) for a in alerts] == [(aiko, f"{unique}-p2")]
    finally:
        worker.stop()


def _touchpoint(eid: str, etype: str, at: datetime, **fields: Any) -> dict[str, Any]:
    ts = at.isoformat(timespec="microseconds")
    return {"event_id": eid, "type": etype, "occurred_at": ts, "received_at": ts, "lead_id": None,
            "anonymous_id": None, "email": None, "source": "test", "campaign": None, "payload": {},
            "schema_version": 2, **fields}


async def test_poison_records_are_dead_lettered_and_change_nothing(kafka_bootstrap: str, unique: str,
                                                                   tmp_path: Path) -> None:
    """Records no ingest would accept, written straight to the topics by another producer: each one lands on
    `rejected` with the field and the reason, the worker keeps running, and the lead's state is exactly the fold of
    the good events (no event id marked seen, no sequence number used by a record that failed)."""
    env = topic_env(unique)
    cfg = settings_for(env, kafka_bootstrap)
    await ensure_topics(kafka_bootstrap, cfg.topics.all(), cfg.partitions)
    email, cookie = f"poison-{unique}@example.com", f"cookie-{unique}"
    t0 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)
    good = [
        _touchpoint(f"{unique}-g1", "page_viewed", t0, anonymous_id=cookie, payload={"url": "/pricing"}),
        _touchpoint(f"{unique}-g2", "form_submitted", t0 + timedelta(minutes=5), anonymous_id=cookie, email=email,
                    payload={"form_id": "contact", "fields": {"name": "P", "company": "Acme", "title": "CTO"}}),
        _touchpoint(f"{unique}-g3", "page_viewed", t0 + timedelta(minutes=9), email=email,
                    payload={"url": "/pricing"}),
    ]
    bad_anon = _touchpoint(f"{unique}-b1", "page_viewed", t0, anonymous_id=cookie)
    bad_anon["occurred_at"] = "yesterday"
    bad_lead = _touchpoint(f"{unique}-b2", "page_viewed", t0 + timedelta(minutes=7), email=email)
    bad_lead["received_at"] = "2026-11-02T09:07:00"  # no offset
    bad_direct = _touchpoint(f"{unique}-b3", "page_viewed", t0 + timedelta(minutes=8), email=email)
    bad_direct["occurred_at"] = "garbage"
    producer = make_producer(kafka_bootstrap)
    await producer.start()
    try:
        for ev in (good[0], bad_anon, good[1], bad_lead, good[2]):
            await producer.send_and_wait(cfg.topics.touchpoints, orjson.dumps(ev),
                                         key=(ev["email"] or ev["anonymous_id"]).encode())
        await producer.send_and_wait(cfg.topics.touchpoints, b"{not json", key=email.encode())
        # straight onto the lead-keyed log, past stage 1's check
        await producer.send_and_wait(cfg.topics.by_lead, orjson.dumps(bad_direct), key=email.encode())
    finally:
        await producer.stop()
    worker = Worker(env, kafka_bootstrap, tmp_path / "worker.log")
    worker.start()
    try:
        await wait_caught_up(kafka_bootstrap, f"proc-{unique}",
                             [cfg.topics.touchpoints, cfg.topics.by_anon, cfg.topics.by_lead], workers=(worker,))
        rejected = await read_topic(kafka_bootstrap, cfg.topics.rejected)
        by_id = {r["event"]["event_id"] if isinstance(r["event"], dict) else r["event"]: r for r in rejected}
        assert set(by_id) == {f"{unique}-b1", f"{unique}-b2", f"{unique}-b3", "{not json"}, by_id
        assert by_id[f"{unique}-b1"]["field"] == "occurred_at"
        assert by_id[f"{unique}-b1"]["event_id"] == f"rejected:{unique}-b1" and by_id[f"{unique}-b1"]["lead"] == cookie
        assert by_id[f"{unique}-b1"]["reason"] == \
            "invalid touchpoint: occurred_at: not an RFC 3339 timestamp: 'yesterday'"
        assert by_id[f"{unique}-b2"]["field"] == "received_at"
        assert by_id[f"{unique}-b2"]["reason"].startswith("invalid touchpoint: received_at: an offset is required")
        assert by_id[f"{unique}-b3"]["field"] == "occurred_at"
        assert by_id[f"{unique}-b3"]["reason"] == "invalid touchpoint: occurred_at: not an RFC 3339 timestamp: 'garbage'"
        assert by_id[f"{unique}-b3"]["event_id"] == f"rejected:{unique}-b3" and by_id[f"{unique}-b3"]["lead"] == email
        assert by_id["{not json"]["field"] is None
        assert by_id["{not json"]["reason"].startswith("invalid touchpoint: undecodable: ")
        assert worker.restarts == 0
        expected = Ledger(RuleBook.from_paths(default_rules_paths()), emit=True)
        want = [d for ev in good for d in expected.apply(ev) if d["type"] == "lead_scored"]
        scored = [s for s in await read_topic(kafka_bootstrap, cfg.topics.scores) if s["lead"] == email]
        assert [(s["event_id"], s["score"]) for s in scored] == [(d["event_id"], d["score"]) for d in want]
        worker.check_alive()
    finally:
        worker.stop()


async def test_input_partitions_wait_for_the_flow_to_resume() -> None:
    """faust resumes the input partitions before it seeks them and then empties the stream queues: records fetched
    in between would be dropped unacked. The processor's consumer keeps input partitions back until `resume_flow`
    (after that clear); changelog partitions resume at once. No broker needed: the consumer is never started."""
    from faust.types import TP

    from services.processor import create_app

    app = create_app(app_id=f"proc-unit-{uuid.uuid4().hex[:8]}")
    consumer = app.consumer
    changelog = TP(app.tables["leads"].changelog_topic.get_topic_name(), 0)
    inputs = {TP("touchpoints", 0), TP("touchpoints", 1)}
    consumer._thread.assignment = lambda: inputs | {changelog}  # as assigned; the real thread is not started
    consumer.pause_partitions(inputs | {changelog})
    consumer.resume_partitions(inputs | {changelog})
    assert consumer._active_partitions == {changelog}
    assert inputs <= consumer._paused_partitions
    consumer.pause_partitions({TP("touchpoints", 1)})  # a pause while held back wins
    consumer.resume_flow()
    assert consumer._active_partitions == {changelog, TP("touchpoints", 0)}
    assert consumer._paused_partitions == {TP("touchpoints", 1)}
    consumer.resume_flow()  # nothing held back any more: no change
    assert consumer._active_partitions == {changelog, TP("touchpoints", 0)}


def test_an_empty_active_set_is_not_every_partition() -> None:
    """aiokafka's `fetched_records` returns every buffered partition for an empty set; the processor's consumer hands
    it a live view of faust's active partitions that stays "none" when empty."""
    from faust.types import TP

    from services.faust_consumer import NeverAll

    live: set[TP] = {TP("touchpoints", 0)}
    view = NeverAll(live)
    assert view and TP("touchpoints", 0) in view
    live.clear()  # faust empties its set while a fetch waits
    assert view and TP("touchpoints", 0) not in view


async def test_a_started_delivery_is_finished_as_awaiting_it_would() -> None:
    """The processor's fetch loop runs faust's per-record callback directly and hands it to a task (faust's
    `wait_first`) only when it suspends: `Resumed` must continue it from there, results and cancellation alike."""
    from services.faust_consumer import Resumed

    loop = asyncio.get_running_loop()
    seen: list[Any] = []

    async def deliver(fut: asyncio.Future) -> int:
        seen.append("started")
        try:
            v = await fut
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        await asyncio.sleep(0)
        return v * 2

    room = loop.create_future()
    coro = deliver(room)
    task = asyncio.ensure_future(Resumed(coro, coro.send(None)))
    await asyncio.sleep(0)
    assert not task.done() and seen == ["started"]  # not run a second time from the start
    room.set_result(21)
    assert await task == 42

    never = loop.create_future()
    coro = deliver(never)
    task = asyncio.ensure_future(Resumed(coro, coro.send(None)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["started", "started", "cancelled"]


async def test_the_fetch_loops_wait_runs_a_delivery_in_place_and_a_waiting_one_as_faust_does() -> None:
    """faust's fetch loop waits on `wait_first(callback(message), suspend_flow.wait())` for every record. The
    processor's consumer runs a callback that need not wait in place (no tasks); one that waits is finished in a
    task that the suspend flag still abandons. No broker needed: the consumer is never started."""
    import gc
    import warnings

    from services.processor import create_app

    consumer = create_app(app_id=f"proc-unit-{uuid.uuid4().hex[:8]}").consumer
    loop = asyncio.get_running_loop()
    flow_suspended = asyncio.Event()
    seen: list[str] = []

    async def deliver(room: asyncio.Future | None) -> str:
        seen.append("started")
        if room is not None:
            try:
                return await room
            except asyncio.CancelledError:
                seen.append("abandoned")
                raise
        return "queued"

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        loop.call_soon(seen.append, "the loop ran")
        r = await consumer.wait_first(deliver(None), flow_suspended.wait())
        assert r.results == ["queued"] and not r.stopped
        assert seen == ["started"]  # delivered without giving the event loop a turn: no task, no asyncio.wait
        await asyncio.sleep(0)
        seen.remove("the loop ran")
        gc.collect()
    assert not [w for w in warned if "never awaited" in str(w.message)]  # the unstarted flag wait was closed

    room = loop.create_future()
    waiting = asyncio.ensure_future(consumer.wait_first(deliver(room), flow_suspended.wait()))
    await asyncio.sleep(0)
    assert not waiting.done()
    room.set_result("queued later")
    assert (await waiting).results == ["queued later"]

    never = loop.create_future()
    waiting = asyncio.ensure_future(consumer.wait_first(deliver(never), flow_suspended.wait()))
    await asyncio.sleep(0)
    flow_suspended.set()
    r = await waiting
    await asyncio.sleep(0)
    assert r.results == [True] and seen == ["started", "started", "started", "abandoned"]


async def test_a_lead_state_over_a_mebibyte_is_stored(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    """Two attribute updates the ingest API accepts (200 attributes of up to 4,000 characters each) make a lead's
    state ≈ 1.4 MiB, one record on the `leads` changelog: over Kafka's default limit of 1 MiB the worker stopped on
    every restart. It is stored, and the lead goes on being scored."""
    env = topic_env(unique)
    cfg = settings_for(env, kafka_bootstrap)
    await ensure_topics(kafka_bootstrap, cfg.topics.all(), cfg.partitions)
    lead = f"big-{unique}"
    t0 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)
    events = [_touchpoint(f"{unique}-a{i}", "attribute_updated", t0 + timedelta(minutes=i), lead_id=lead,
                          payload={"attributes": {f"note_{i}_{j}": chr(97 + j % 26) * 3600 for j in range(200)}})
              for i in range(2)]
    events.append(_touchpoint(f"{unique}-p", "page_viewed", t0 + timedelta(minutes=5), lead_id=lead,
                              payload={"url": "/pricing"}))
    await produce_events(kafka_bootstrap, cfg.topics.touchpoints, events)
    worker = Worker(env, kafka_bootstrap, tmp_path / "worker.log")
    worker.start()
    try:
        await wait_caught_up(kafka_bootstrap, f"proc-{unique}",
                             [cfg.topics.touchpoints, cfg.topics.by_anon, cfg.topics.by_lead], workers=(worker,))
        expected = Ledger(RuleBook.from_paths(default_rules_paths()), emit=True)
        want = [d for ev in events for d in expected.apply(ev) if d["type"] == "lead_scored"]
        assert [d["event_id"] for d in want] == [f"{lead}:scored:3"]
        scored = [s for s in await read_topic(kafka_bootstrap, cfg.topics.scores) if s["lead"] == lead]
        assert [(s["event_id"], s["score"]) for s in scored] == [(d["event_id"], d["score"]) for d in want]
        assert worker.restarts == 0
        worker.check_alive()
        # the tables' changelogs are compacted (a recovery reads the latest state per key) and take whole states
        names = [f"proc-{unique}-{table}-changelog" for table in ("identity", "leads")]
        configs = await topic_settings(kafka_bootstrap, names)
        for n in names:
            assert configs[n]["cleanup.policy"] == "compact"
            assert int(configs[n]["max.message.bytes"]) == MAX_RECORD_BYTES
    finally:
        worker.stop()

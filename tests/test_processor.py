"""The live processor on the real broker: a journey through the ingest API ends in a hand-off on the topic."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from services.demo import API_KEY, journeys
from services.derived_reader import latest_by_lead, read_topic
from services.ingest import IngestConfig, create_app
from services.kafka_io import ensure_topics
from tests.conftest import wait_for
from tests.streaming import Worker, settings_for, topic_env

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

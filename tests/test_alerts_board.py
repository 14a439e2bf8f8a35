"""End to end in a real headless Chromium: journeys sent through the ingest API, folded by a real processor, reach
the open hot-lead board (and a signed webhook) through the alerts service; the SLA clock turns red on the breach."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import httpx
import orjson
import pytest

from services.alerts import AlertsConfig
from services.demo import API_KEY, journeys
from services.ingest import IngestConfig, create_app as create_ingest_app
from services.kafka_io import ensure_topics
from services.webhooks import WebhookConfig, verify
from tests.alerts_support import (AUTH, CHROMIUM_ARGS, SALES, Receiver, alerts_service, chromium_executable,
                                  serve)
from tests.conftest import wait_for
from tests.streaming import Worker, settings_for, topic_env

pytestmark = pytest.mark.infra


async def test_handoff_through_ingest_appears_on_the_open_board(kafka_bootstrap: str, unique: str,
                                                                tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    executable = chromium_executable()
    env = topic_env(unique)
    settings = replace(settings_for(env, kafka_bootstrap), database_url=f"sqlite:///{tmp_path / 'alerts.db'}")
    await ensure_topics(kafka_bootstrap, settings.topics.all(), settings.partitions)
    worker = Worker(env, kafka_bootstrap, tmp_path / "worker.log")
    worker.start()
    cfg = AlertsConfig(settings=settings, group=f"alerts-{unique}", start="earliest", sla_minutes=15,
                       sla_grace_s=60, links_base="http://127.0.0.1:8081",
                       webhook=WebhookConfig(backoff_base_s=0.2, backoff_max_s=1, poll_s=0.2))
    rec = Receiver()
    ingest = create_ingest_app(settings, IngestConfig.from_env())
    try:
        async with serve(rec) as rurl, alerts_service(cfg) as (base, _app), \
                httpx.AsyncClient(base_url=base, headers=AUTH) as c, async_playwright() as pw:
            sub = (await c.post("/v1/webhooks", json={"url": rurl + "/crm"})).json()
            browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                await page.goto(base + "/board")
                await page.fill("#token", "not-a-token")
                await page.click("#signin")
                await page.wait_for_selector("#login-error:has-text('unknown token')")
                await page.fill("#token", SALES)
                await page.click("#signin")
                await page.wait_for_selector("#status.live", timeout=15000)

                # the journeys go in only now: the page is open and live
                pixel, batch = journeys(unique, datetime.now(timezone.utc))
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=ingest), base_url="http://in") as ic:
                    for hit in pixel:
                        assert (await ic.get("/t.gif", params=hit)).status_code == 200
                    r = await ic.post("/v1/events", json={"events": batch}, headers={"X-API-Key": API_KEY})
                    assert {x["status"] for x in r.json()["results"]} == {"accepted"}
                aiko = batch[0]["email"]

                card = page.locator("li.alert.kind-handoff", has_text="Aiko Tanaka")
                worker.check_alive()
                await card.wait_for(timeout=90000)
                assert await card.locator(".company").inner_text() == "Tanaka Seiki · IT Manager · IT"
                reasons = await card.locator(".why li").all_inner_texts()
                assert len(reasons) == 3 and any("seminar attended" in x for x in reasons)
                assert await card.locator(".rules").inner_text() == "2026-11-default"
                assert await card.locator(".stage").inner_text() == "lead → mql"
                assert int(await card.locator(".score").evaluate("e => parseInt(e.firstChild.textContent)")) >= 60
                assert (await card.locator(".since").inner_text()).startswith("handed off 2h")
                href = await card.locator("a.history").get_attribute("href")
                assert href == f"http://127.0.0.1:8081/v1/leads/{quote(aiko, safe='')}/history"
                # the lead kept browsing after the hand-off without a sales touch: the SLA clock is red, breached
                await card.locator(".sla.breached").wait_for(timeout=30000)
                assert (await card.locator(".sla").inner_text()).startswith("SLA overdue")
                # the intent alert (download, then the product page) is on the board too, newest first
                intent = page.locator("li.alert.kind-intent", has_text="Aiko Tanaka")
                await intent.wait_for(timeout=30000)
                kinds = await page.locator("#alerts > li").evaluate_all("els => els.map(e => e.className)")
                assert len(kinds) == 2  # the breach marked the hand-off's card instead of adding one
                await page.screenshot(path=str(tmp_path / "board.png"), full_page=True)

                await wait_for(lambda: len(rec.requests) >= 3, timeout=30, what="three webhook deliveries")
                got = {r.headers["x-leadledger-event"]: orjson.loads(r.body) for r in rec.requests}
                assert set(got) == {"handoff", "intent", "sla_breached"}
                assert all(verify(sub["secret"], r.body, r.headers["x-leadledger-signature"]) for r in rec.requests)
                assert got["handoff"]["alert_id"] == f"{aiko}:handoff:1"
                assert got["sla_breached"]["sla"]["decided_by"] == "lead_activity"
            finally:
                await browser.close()
    finally:
        await ingest.state.ingest.close()
        worker.stop()

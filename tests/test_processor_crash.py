"""Exactly once in effect: SIGKILL the worker mid-stream on the real broker, restart, compare with a clean run.

Also: the live result equals a replay of the lead-keyed log through the same pure code (`projections.lead_log`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from bench.gen_history import generate
from projections import lead_log
from projections.fold import normalise_email
from projections.rules import RuleBook
from services.derived_reader import read_topic, topic_partitions
from services.kafka_io import ensure_topics, make_producer
from services.processor import default_rules_paths
from tests.conftest import wait_for
from tests.streaming import Worker, read_all, settings_for, topic_env, wait_caught_up

pytestmark = pytest.mark.infra

N_EVENTS, N_LEADS = 8000, 250


def history() -> list[dict[str, Any]]:
    events = generate(N_EVENTS, N_LEADS, seed=11)
    for e in events:  # as the ingest service writes them: normalised email
        e["email"] = normalise_email(e["email"])
    return events


async def produce(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        futs = [await producer.send(topic, orjson.dumps(e),
                                    key=(e["lead_id"] or e["email"] or e["anonymous_id"]).encode())
                for e in events]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def final_state(bootstrap: str, cfg) -> dict[str, Any]:
    t = cfg.topics
    scores: dict[str, dict] = {}
    for s in await read_topic(bootstrap, t.scores):  # deduped on id; one lead's records are in log order
        scores[s["lead"]] = s
    stages: dict[str, str] = {}
    for s in await read_topic(bootstrap, t.stages):
        stages[s["lead"]] = s["to"]
    raw_handoffs = await read_all(bootstrap, t.handoffs)
    return {"scores": {k: (v["fit"], round(v["engagement"], 9)) for k, v in scores.items()},
            "stages": stages, "handoffs": raw_handoffs}


async def replay_by_lead(bootstrap: str, topic: str, book: RuleBook) -> dict[str, tuple]:
    """Fold the lead-keyed log, partition by partition, with the pure code the processor uses."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    states: dict[str, lead_log.LeadLogState] = {}
    try:
        tps = await topic_partitions(consumer, topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        for tp in tps:
            while await consumer.position(tp) < end[tp]:
                for m in (await consumer.getmany(tp, timeout_ms=2000)).get(tp, []):
                    key = m.key.decode()
                    states[key], _ = lead_log.apply(states.get(key), key, orjson.loads(m.value), book)
    finally:
        await consumer.stop()
    return {k: (s.lead.fit, round(s.lead.eng, 9)) for k, s in states.items() if s.lead.seq}


async def run_to_end(bootstrap: str, env: dict[str, str], cfg, log: Path, kill_at: int | None) -> int:
    """Run a worker over the topic set; with `kill_at`, SIGKILL it once that many scores are out, restart."""
    worker = Worker(env, bootstrap, log)
    worker.start()
    kills = 0
    try:
        if kill_at is not None:
            async def enough() -> bool:
                worker.check_alive()
                return len(await read_all(bootstrap, cfg.topics.scores)) >= kill_at

            await wait_for(enough, timeout=120, interval=0.02, what=f"{kill_at} scores before the kill")
            worker.kill()
            kills += 1
            worker.start()
        group = env["LEADLEDGER_PROCESSOR_ID"]
        t = cfg.topics
        await wait_caught_up(bootstrap, group, [t.touchpoints, t.by_anon, t.by_lead], timeout=180)
    finally:
        worker.stop()
    return kills


async def test_sigkill_mid_stream_equals_clean_run(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    events = history()
    book = RuleBook.from_paths(default_rules_paths())
    clean_env, crash_env = topic_env(f"{unique}a"), topic_env(f"{unique}b")
    clean, crash = settings_for(clean_env, kafka_bootstrap), settings_for(crash_env, kafka_bootstrap)
    for cfg in (clean, crash):
        await ensure_topics(kafka_bootstrap, cfg.topics.all(), cfg.partitions)
        await produce(kafka_bootstrap, cfg.topics.touchpoints, events)

    await run_to_end(kafka_bootstrap, clean_env, clean, tmp_path / "clean.log", kill_at=None)
    expected = await final_state(kafka_bootstrap, clean)
    n_scores = len(await read_all(kafka_bootstrap, clean.topics.scores))
    assert len(expected["scores"]) > 100 and expected["handoffs"]

    kills = await run_to_end(kafka_bootstrap, crash_env, crash, tmp_path / "crash.log", kill_at=n_scores // 3)
    got = await final_state(kafka_bootstrap, crash)
    assert kills == 1

    # same final scores and stages for every lead
    assert got["scores"] == expected["scores"]
    assert got["stages"] == expected["stages"]
    # one hand-off per MQL episode: same ids; a copy written again after the crash is byte-identical
    ids = lambda hs: {h["event_id"] for h in hs}  # noqa: E731
    assert ids(got["handoffs"]) == ids(expected["handoffs"])
    assert Counter(h["event_id"] for h in expected["handoffs"]).most_common(1)[0][1] == 1
    first: dict[str, dict] = {}
    for h in got["handoffs"]:
        assert first.setdefault(h["event_id"], h) == h
    # the lead-keyed log replays to the live state exactly
    replayed = await replay_by_lead(kafka_bootstrap, crash.topics.by_lead, book)
    assert {k: replayed[k] for k in got["scores"]} == got["scores"]
    assert {k for k, v in replayed.items() if v != (0, 0.0)} <= set(got["scores"])

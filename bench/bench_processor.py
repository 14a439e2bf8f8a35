"""Processor benchmark on the real broker, every figure from one run:

1. raw aiokafka consumer that only reads the touchpoints topic (events/s);
2. a bare faust agent that only iterates the same topic (events/s) — faust's own ceiling;
3. the processor, one worker: touchpoints in → derived events out (events/s, from the first derived record's
   broker timestamp to the last), and the ratio to (2) (goal ≥ 40 %);
4. the processor, two worker processes on a copy of the topic (goal: ≥ 50 % more than one);
5. hand-off latency: touchpoints through the ingest app at a steady ~1,000 events/s, from the ingest
   acknowledgement of the decisive touchpoint to the `lead_handed_off` visible to a read_committed consumer.

Run: .venv/bin/python -m bench.bench_processor [--events 60000] [--partitions 8] [--latency-seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer

from bench.gen_history import generate
from projections.fold import normalise_email
from services.derived_reader import topic_partitions
from services.ingest import IngestConfig, create_app
from services.kafka_io import ensure_topics, produce_events
from tests.streaming import Worker, settings_for, topic_env, wait_caught_up

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = os.environ.get("LEADLEDGER_KAFKA_BOOTSTRAP", "127.0.0.1:9092")


def history(n: int) -> list[dict[str, Any]]:
    events = generate(n, max(200, n // 40), seed=5)
    for e in events:
        e["email"] = normalise_email(e["email"])
    return events


async def raw_read(topic: str, n: int) -> float:
    c = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False, auto_offset_reset="earliest",
                         max_partition_fetch_bytes=4 << 20, fetch_max_bytes=32 << 20)
    await c.start()
    try:
        tps = await topic_partitions(c, topic)
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        got = 0
        t0 = time.perf_counter()
        while got < n:
            batch = await c.getmany(timeout_ms=1000, max_records=10000)
            got += sum(len(v) for v in batch.values())
        return got / (time.perf_counter() - t0)
    finally:
        await c.stop()


def bare_faust(topic: str, n: int) -> float:
    env = {**os.environ, "BARE_TOPIC": topic, "BARE_COUNT": str(n), "BARE_BOOTSTRAP": BOOTSTRAP}
    out = subprocess.run([sys.executable, "-m", "bench.faust_bare", "worker", "--without-web", "-l", "warn"],
                         cwd=ROOT, env=env, capture_output=True, timeout=600)
    text = out.stdout.decode() + out.stderr.decode()  # faust routes stdout through its logger
    found = re.findall(r'\{"events":\d+,"seconds":[0-9.e-]+\}', text)
    if not found:
        raise RuntimeError(text[-3000:])
    r = orjson.loads(found[-1])
    return r["events"] / r["seconds"]


async def output_span(topic: str) -> tuple[int, float]:
    """(records, seconds between the first and the last broker timestamp) of a derived topic."""
    c = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False, auto_offset_reset="earliest",
                         isolation_level="read_committed")
    await c.start()
    try:
        tps = await topic_partitions(c, topic)
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        end = await c.end_offsets(tps)
        first, last, n = float("inf"), 0.0, 0
        pending = {tp for tp in tps if end[tp]}
        while pending:
            for tp, msgs in (await c.getmany(*pending, timeout_ms=2000, max_records=10000)).items():
                for m in msgs:
                    first, last, n = min(first, m.timestamp), max(last, m.timestamp), n + 1
                if await c.position(tp) >= end[tp]:
                    pending.discard(tp)
        return n, (last - first) / 1000.0
    finally:
        await c.stop()


async def processor_rate(events: list[dict], partitions: int, workers: int, logdir: Path) -> float:
    suffix = f"bench{uuid.uuid4().hex[:8]}"
    env = topic_env(suffix, partitions)
    cfg = settings_for(env, BOOTSTRAP)
    await ensure_topics(BOOTSTRAP, cfg.topics.all(), cfg.partitions)
    ws = [Worker(env, BOOTSTRAP, logdir / f"{suffix}-{i}.log") for i in range(workers)]
    for w in ws:
        w.start()
    try:
        await produce_events(BOOTSTRAP, cfg.topics.touchpoints, events)
        t = cfg.topics
        await wait_caught_up(BOOTSTRAP, env["LEADLEDGER_PROCESSOR_ID"], [t.touchpoints, t.by_anon, t.by_lead],
                             timeout=900, workers=tuple(ws))
    finally:
        for w in ws:
            w.stop()
    n, secs = await output_span(cfg.topics.scores)
    return len(events) / secs


async def handoff_latency(partitions: int, seconds: float, logdir: Path) -> list[float]:
    suffix = f"lat{uuid.uuid4().hex[:8]}"
    env = topic_env(suffix, partitions)
    cfg = settings_for(env, BOOTSTRAP)
    await ensure_topics(BOOTSTRAP, cfg.topics.all(), cfg.partitions)
    worker = Worker(env, BOOTSTRAP, logdir / f"{suffix}.log")
    worker.start()
    app = create_app(cfg, IngestConfig.from_env())
    acked: dict[str, float] = {}
    arrived: dict[str, float] = {}
    stop = asyncio.Event()

    async def watch() -> None:
        c = AIOKafkaConsumer(cfg.topics.handoffs, bootstrap_servers=BOOTSTRAP, isolation_level="read_committed",
                             auto_offset_reset="earliest", enable_auto_commit=False)
        await c.start()
        try:
            while not stop.is_set():
                for msgs in (await c.getmany(timeout_ms=50)).values():
                    now = time.perf_counter()
                    for m in msgs:
                        arrived.setdefault(orjson.loads(m.value)["lead"], now)
        finally:
            await c.stop()

    def ev(i: str, type_: str, email: str, at: datetime, payload: dict) -> dict:
        return {"event_id": f"{suffix}-{i}", "type": type_, "occurred_at": at.isoformat(), "email": email,
                "payload": payload}

    try:
        watcher = asyncio.create_task(watch())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as c:
            post = lambda evs: c.post("/v1/events", json={"events": evs},  # noqa: E731
                                      headers={"X-API-Key": "dev-crm-key"})
            # warm-up: the worker joins its group and is folding before we start the clock
            r = await post([ev("warm", "page_viewed", "warm@x.example", datetime.now(timezone.utc),
                               {"url": "https://x.example/"})])
            r.raise_for_status()
            while not await _scored(cfg.topics.scores):
                worker.check_alive()
                await asyncio.sleep(0.2)
            t_end = time.perf_counter() + seconds
            k = 0
            while time.perf_counter() < t_end:
                tick = time.perf_counter()
                now = datetime.now(timezone.utc) - timedelta(seconds=1)
                email = f"lat{k}@{suffix}.example"
                fields = {"name": "N", "email": email, "company": "C", "department": "IT", "title": "IT Manager",
                          "phone": "1", "company_size": "800"}
                noise = [ev(f"n{k}-{j}", "page_viewed", f"noise{(k * 97 + j) % 5000}@{suffix}.example", now,
                            {"url": "https://x.example/blog"}) for j in range(97)]
                prep = [ev(f"f{k}", "form_submitted", email, now, {"form_id": "f", "fields": fields}),
                        ev(f"m{k}", "meeting_booked", email, now, {"slot": "x"})]
                (await post(noise + prep)).raise_for_status()
                decisive = ev(f"s{k}", "event_attended", email, now, {"event": "seminar"})
                r = await post([decisive])
                r.raise_for_status()
                acked[email] = time.perf_counter()
                k += 1
                await asyncio.sleep(max(0.0, 0.1 - (time.perf_counter() - tick)))  # ~100 events per 0.1 s
            deadline = time.perf_counter() + 30
            while len(arrived.keys() & acked.keys()) < len(acked) and time.perf_counter() < deadline:
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await app.state.ingest.close()
        worker.stop()
        await watcher
    return sorted((arrived[e] - acked[e]) * 1000 for e in acked if e in arrived)


async def _scored(topic: str) -> bool:
    n, _ = await output_span(topic)
    return n > 0


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


async def main_async(a: argparse.Namespace) -> None:
    logdir = Path(tempfile.mkdtemp(prefix="bench-processor-"))
    events = history(a.events)
    topic = f"bench-raw-{uuid.uuid4().hex[:8]}"
    await ensure_topics(BOOTSTRAP, [topic], a.partitions)
    await produce_events(BOOTSTRAP, topic, events)
    raw = await raw_read(topic, len(events))
    bare = bare_faust(topic, len(events))
    one = await processor_rate(events, a.partitions, 1, logdir)
    two = await processor_rate(events, a.partitions, 2, logdir)
    lat = await handoff_latency(a.partitions, a.latency_seconds, logdir)
    print(f"events: {len(events)} over {a.partitions} partitions (worker logs in {logdir})")
    print(f"raw aiokafka consumer (read only):   {raw:10.0f} events/s")
    print(f"bare faust agent (iterate only):     {bare:10.0f} events/s   ({bare / raw:.1%} of raw)")
    print(f"processor, 1 worker (end to end):    {one:10.0f} events/s   ({one / bare:.1%} of bare faust; goal ≥ 40%)")
    print(f"processor, 2 workers:                {two:10.0f} events/s   ({two / one - 1:+.1%} vs 1 worker; goal ≥ +50%)")
    print(f"hand-off latency (ingest ack → read_committed hand-off), {len(lat)} hand-offs at ~1,000 events/s: "
          f"p50 {pct(lat, 50):.0f} ms, p99 {pct(lat, 99):.0f} ms, max {max(lat, default=float('nan')):.0f} ms")
    if lat:
        print(f"  mean {statistics.fmean(lat):.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=60000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--latency-seconds", type=float, default=20.0)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()

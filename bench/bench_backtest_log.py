"""Back-test throughput over the Kafka log (issue #7): events of history per second, beside a raw aiokafka read.

    python -m bench.bench_backtest_log [--events 200000] [--leads 10000] [--jobs 1,2] [--rounds 1]

Generates a history (bench.gen_history), writes it to fresh ``touchpoints`` topics and the lead-keyed log the
identity stage would write for it (``tests.test_replay.lead_keyed_log``: join resolutions included) to a fresh
``touchpoints-by-lead``, then times on the same broker in the same run:

1. a raw aiokafka consumer reading both topics (``getmany`` batches, a ``ConsumerRecord`` per message, no
   decoding): the floor as the consumer API gives it;
2. the back-test's own reader over both topics (``services.backtest_log.scan_log``: fetch requests through the
   consumer's client, records walked with aiokafka's C parser, no decoding): the floor of the back-test;
3. the back-test's fold of both topics under one book (baseline only = ``--baseline-live``), also with each
   ``--jobs`` above 1;
4. the full back-test: baseline + candidate books, ``--jobs 1`` (one process) and ``--jobs 2`` (two processes, each
   folding both books over half of the lead-keyed partitions).

Throughput = touchpoints in the history / wall seconds (CPU seconds of this process shown beside it); every line
also gives its ratio to the raw aiokafka read of the same run. ``--rounds N`` times the back-test lines N times,
round by round (each round every configuration once, so a slower or faster stretch of the machine falls on all of
them), and ends with each one's median, lowest and highest.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gen_history import generate  # noqa: E402
from projections.fold import normalise_email  # noqa: E402
from projections.rules import RuleBook  # noqa: E402
from services.backtest_log import fold_books, read_log, scan_log  # noqa: E402
from services.config import Topics  # noqa: E402
from services.derived_reader import topic_partitions  # noqa: E402
from services.kafka_io import ensure_topics, make_producer  # noqa: E402
from tests.test_replay import lead_keyed_log  # noqa: E402

DEFAULT = ROOT / "deploy" / "rules" / "default.yaml"
CANDIDATE = ROOT / "deploy" / "rules" / "candidate.yaml"


async def produce(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> None:
    p = make_producer(bootstrap, linger_ms=20)
    await p.start()
    try:
        futs = []
        for k, v in items:
            futs.append(await p.send(topic, v, key=k))
            if len(futs) >= 20000:
                await asyncio.gather(*futs)
                futs = []
        await asyncio.gather(*futs)
    finally:
        await p.stop()


async def consumer_read(bootstrap: str, topic: str) -> int:
    """Every message of ``topic`` through the plain consumer API (``getmany``, one ``ConsumerRecord`` each), as the
    back-test read the log before it had its own reader; returns the number of messages."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed", auto_offset_reset="earliest",
                                max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
    await consumer.start()
    n = 0
    try:
        tps = await topic_partitions(consumer, topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        remaining = {tp for tp in tps if end[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000, max_records=5000)
            for tp, msgs in batch.items():
                n += sum(1 for m in msgs if m.offset < end[tp])
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
                    consumer.pause(tp)
    finally:
        await consumer.stop()
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--leads", type=int, default=10_000)
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--jobs", default="1,2")
    ap.add_argument("--reuse", metavar="ID", help="reuse the topics bench-tp-ID / bench-bylead-ID of an earlier run "
                                                  "(no generation, no production)")
    ap.add_argument("--skip-raw", action="store_true", help="skip the raw read")
    ap.add_argument("--rounds", type=int, default=1, help="time the back-test configurations this many times")
    a = ap.parse_args(argv)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.reuse:
        u = a.reuse
        topics = Topics(touchpoints=f"bench-tp-{u}", by_lead=f"bench-bylead-{u}")
        return _time_runs(a, topics, None)
    t0 = time.perf_counter()
    events = generate(a.events, a.leads, seed=5)
    for e in events:
        e["email"] = normalise_email(e["email"])
    log = lead_keyed_log(events)
    print(f"generated {len(events):,} touchpoints and {len(log):,} lead-log records in {time.perf_counter() - t0:.0f}s")
    u = uuid.uuid4().hex[:8]
    topics = Topics(touchpoints=f"bench-tp-{u}", by_lead=f"bench-bylead-{u}")

    async def setup() -> None:
        await ensure_topics(a.bootstrap, [topics.touchpoints, topics.by_lead], a.partitions)
        await produce(a.bootstrap, topics.touchpoints,
                      [((e["lead_id"] or e["email"] or e["anonymous_id"]).encode(), orjson.dumps(e)) for e in events])
        await produce(a.bootstrap, topics.by_lead,
                      [(r["lead"].encode(), orjson.dumps({k: v for k, v in r.items() if k != "lead"})) for r in log])

    t0 = time.perf_counter()
    asyncio.run(setup())
    print(f"produced to {topics.touchpoints} / {topics.by_lead} in {time.perf_counter() - t0:.0f}s (--reuse {u})")
    n = len(events)
    # the generated history is not needed any more: kept, it would make every cyclic-GC pass of the timed reads
    # re-scan ≈ 600k objects (the raw consumer read measured 2x slower in a fresh run than with --reuse)
    del events, log
    gc.collect()
    return _time_runs(a, topics, n)


def _time_runs(a: argparse.Namespace, topics: Topics, n: int | None) -> int:
    async def raw() -> int:
        return await consumer_read(a.bootstrap, topics.touchpoints) + await consumer_read(a.bootstrap, topics.by_lead)

    async def scan() -> int:
        count = [0]

        def on(_p: int, recs: list) -> None:
            count[0] += len(recs)
        await scan_log(a.bootstrap, topics.touchpoints, on)
        await scan_log(a.bootstrap, topics.by_lead, on)
        return count[0]

    if n is None:
        async def count() -> int:
            c = [0]

            def on(m) -> None:
                c[0] += 1
            await read_log(a.bootstrap, topics.touchpoints, on)
            return c[0]
        n = asyncio.run(count())
        print(f"{topics.touchpoints}: {n:,} touchpoints")
    raw_rate = None
    if not a.skip_raw:
        for label, f in (("raw aiokafka consumer read, both topics:", raw),
                         ("back-test reader alone, both topics:", scan)):
            t0, c0 = time.perf_counter(), time.process_time()
            msgs = asyncio.run(f())
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            raw_rate = raw_rate or n / dt
            print(f"{label:<42} {n / dt:>10,.0f} history events/s  = {n / dt / raw_rate:.2f} x raw  ({msgs:,} "
                  f"messages, {dt:.2f}s wall, {cpu:.2f}s CPU)")
    base = RuleBook.from_paths([DEFAULT])
    loose = RuleBook.from_paths([CANDIDATE])  # the default with min_engagement 25
    jobs = [int(x) for x in a.jobs.split(",") if x]
    runs = [("back-test fold, one book:", [base], 1)]
    runs += [(f"back-test fold, one book, --jobs {j}:", [base], j) for j in jobs if j > 1]
    runs += [(f"back-test, two books, --jobs {j}:", [base, loose], j) for j in jobs]
    rates: dict[str, list[float]] = {}
    for r in range(a.rounds):
        if a.rounds > 1:
            print(f"round {r + 1} of {a.rounds}")
        for label, books, jobs in runs:
            gc.collect()  # the previous run's garbage is not this one's to collect
            t0, c0 = time.perf_counter(), time.process_time()
            out = fold_books(a.bootstrap, topics, books, jobs)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            mq = [len(m) for m in out["mqls"]]
            ratio = f" = {n / dt / raw_rate:.2f} x raw" if raw_rate else ""
            print(f"{label:<42} {n / dt:>10,.0f} history events/s{ratio}  ({dt:.2f}s wall, {cpu:.2f}s CPU in this "
                  f"process; MQLs {mq})")
            rates.setdefault(label, []).append(n / dt)
    if a.rounds > 1:
        print(f"over {a.rounds} rounds (history events/s):")
        for label, rs in rates.items():
            print(f"{label:<42} median {statistics.median(rs):>10,.0f}  lowest {min(rs):>10,.0f}  highest "
                  f"{max(rs):>10,.0f}  ({sum(x >= 100_000 for x in rs)} of {len(rs)} at 100,000 or more)")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Projector throughput into PostgreSQL and SQLite beside a raw aiokafka consumer, same broker, same run.

    python bench/bench_projector.py [--leads 2000] [--batch 2000]

Generates journeys (touchpoints + derived events, ~12 records per lead), produces them to fresh topics, then
times (1) a raw read_committed aiokafka consumer reading every message, (2) the projector's replay path
(``Projector.replay_to_end``: the same batched transaction as live mode) into a fresh PostgreSQL schema and a
fresh SQLite file. Prints records/s and the ratio projector/raw.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiokafka import AIOKafkaConsumer  # noqa: E402

from deploy import infra  # noqa: E402
from projections import sql_schema  # noqa: E402
from services.kafka_io import ensure_topics, make_producer  # noqa: E402
from services.projector import Projector, projector_topics  # noqa: E402
from tests.projections_support import T0, fresh_pg_schema, journey  # noqa: E402
from tests.test_projector import _route, _topics  # noqa: E402

PATHS = [["lead", "mql", "sal", "sql", "opportunity", "won"], ["lead", "mql"], ["lead"], [], ["lead", "mql", "sal"]]


def history(n: int) -> list[dict]:
    out = []
    for i in range(n):
        out += journey(f"lead{i}@bench.io", T0 + timedelta(minutes=i), PATHS[i % len(PATHS)],
                       ["web", "form", "pixel"][i % 3], f"c{i % 7}")
    return out


async def raw_read(bootstrap: str, topics, total: int) -> float:
    c = AIOKafkaConsumer(*projector_topics(topics), bootstrap_servers=bootstrap, group_id=None,
                         auto_offset_reset="earliest", enable_auto_commit=False, isolation_level="read_committed",
                         max_partition_fetch_bytes=4 * 1024 * 1024)
    await c.start()
    n, t0 = 0, time.perf_counter()
    try:
        while n < total:
            batch = await c.getmany(timeout_ms=1000, max_records=2000)
            n += sum(len(v) for v in batch.values())
    finally:
        await c.stop()
    return time.perf_counter() - t0


async def project(bootstrap: str, topics, url: str, batch: int) -> tuple[int, float]:
    sql_schema.migrate(url)
    p = Projector(bootstrap, url, topics=topics, group=f"bench-{uuid.uuid4().hex[:6]}", batch_max=batch)
    t0 = time.perf_counter()
    try:
        n = await p.replay_to_end()
    finally:
        p.close()
    return n, time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--leads", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=2000)
    a = ap.parse_args()
    cfg = infra.InfraConfig.from_env()
    infra.kafka_up(cfg)
    infra.pg_up(cfg)
    bootstrap = cfg.bootstrap
    topics = _topics("bench" + uuid.uuid4().hex[:8])
    await ensure_topics(bootstrap, projector_topics(topics), partitions=12)
    recs = history(a.leads)
    prod = make_producer(bootstrap)
    await prod.start()
    try:
        futs = [await prod.send(*_route(topics, r)[:1], _route(topics, r)[2], key=_route(topics, r)[1])
                for r in recs]
        await asyncio.gather(*futs)
    finally:
        await prod.stop()
    total = len(recs)
    print(f"{total} records ({a.leads} leads) on 4 topics x 12 partitions")
    raw = await raw_read(bootstrap, topics, total)
    print(f"raw aiokafka consumer : {total / raw:>10.0f} records/s")
    gen = fresh_pg_schema(f"postgresql+psycopg://postgres@127.0.0.1:{cfg.pg_port}/leadledger_test")
    pg_url = next(gen)
    try:
        n, secs = await project(bootstrap, topics, pg_url, a.batch)
        print(f"projector -> PostgreSQL: {n / secs:>10.0f} records/s  ({n / secs / (total / raw):.2f} x raw)")
    finally:
        for _ in gen:
            pass
    with tempfile.TemporaryDirectory() as d:
        n, secs = await project(bootstrap, topics, f"sqlite:///{d}/bench.db", a.batch)
        print(f"projector -> SQLite    : {n / secs:>10.0f} records/s  ({n / secs / (total / raw):.2f} x raw)")


if __name__ == "__main__":
    asyncio.run(main())

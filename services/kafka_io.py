"""Thin aiokafka helpers shared by every service: topic creation, producers, readiness.

Keys are raw UTF-8 strings hashed with murmur2 (aiokafka's and Java's default partitioner), so any producer of
ours lands a subject on the same partition as the broker-side tools would.
"""

from __future__ import annotations

import asyncio
from typing import Iterable, Optional

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError


async def ensure_topics(bootstrap: str, names: Iterable[str], partitions: int,
                        compacted: Iterable[str] = ()) -> None:
    """Create the topics that do not exist yet (infinite retention; compaction where asked)."""
    compacted = set(compacted)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(name, num_partitions=partitions, replication_factor=1,
                     topic_configs={"retention.ms": "-1",
                                    "cleanup.policy": "compact" if name in compacted else "delete"})
            for name in names if name not in existing
        ]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


async def record_offsets(bootstrap: str, topic: str, partition: int, start: int, end: int,
                         timeout_s: float = 10.0) -> Optional[set[int]]:
    """The offsets in [start, end) of the partition that hold records, read uncommitted (as a consumer that does
    not use transactions sees them); the others are transaction markers or were compacted away. None when the
    broker did not answer within the timeout (callers treat it as "records there"). Not `derived_reader.read_log`:
    that one takes a fetch that returns nothing for the end of the log, which here would read as "no records"."""
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, start)
        found: set[int] = set()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            for m in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                if m.offset >= end:
                    return found
                found.add(m.offset)
            if await consumer.position(tp) >= end:
                return found
        return None
    finally:
        await consumer.stop()


async def _ready(bootstrap: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await admin.start()
        await admin.describe_cluster()
        return True
    except Exception:
        return False
    finally:
        try:
            await admin.close()
        except Exception:
            pass


def broker_ready(bootstrap: str) -> bool:
    """True when a broker answers a metadata request (synchronous, for scripts)."""
    return asyncio.run(_ready(bootstrap))


async def broker_ready_async(bootstrap: str) -> bool:
    return await _ready(bootstrap)


async def produce_events(bootstrap: str, topic: str, events: Iterable[dict]) -> int:
    """Write wire-format touchpoints to `topic` keyed by their subject, as the ingest service does (imports,
    benchmarks, tests). Returns the number written; every one was acknowledged."""
    import orjson

    producer = make_producer(bootstrap)
    await producer.start()
    try:
        futs = [await producer.send(topic, orjson.dumps(e),
                                    key=(e.get("lead_id") or e.get("email") or e["anonymous_id"]).encode())
                for e in events]
        await asyncio.gather(*futs)
        return len(futs)
    finally:
        await producer.stop()


def make_producer(bootstrap: str, **overrides) -> AIOKafkaProducer:
    """An idempotent producer (acks=all): a retried send never writes a message twice."""
    opts = dict(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", linger_ms=5,
                max_batch_size=262144, request_timeout_ms=10000, compression_type=None)
    opts.update(overrides)
    return AIOKafkaProducer(**opts)

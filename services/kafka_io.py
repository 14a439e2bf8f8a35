"""Thin aiokafka helpers shared by every service: topic creation, producers, readiness.

Keys are raw UTF-8 strings hashed with murmur2 (aiokafka's and Java's default partitioner), so any producer of
ours lands a subject on the same partition as the broker-side tools would.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import AsyncIterator, Iterable, Optional

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder

# The largest record any topic of ours takes (each topic's max.message.bytes, the processor's producer request limit).
# A lead's state is one record on the `leads` changelog, an anonymous visitor's on `identity`'s and in a join answer
# on the lead-keyed log: it holds the attributes (200 a touchpoint, values up to 4,000 characters), a day's capped
# contributions per active day and rule, and the records a lead holds back while its join is answered. Kafka's
# default of 1 MiB was reached by a lead of two attribute updates, and by one of ~11,600 events during a catch-up;
# over it the worker stopped on every restart.
MAX_RECORD_BYTES = 16 * 1024 * 1024


def topic_configs(compacted: bool = False) -> dict[str, str]:
    """The settings of every topic we create: kept forever (or compacted), records up to MAX_RECORD_BYTES."""
    return {"retention.ms": "-1", "max.message.bytes": str(MAX_RECORD_BYTES),
            "cleanup.policy": "compact" if compacted else "delete"}


@contextlib.asynccontextmanager
async def admin_client(bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client, closed on the way out."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def ensure_topics(bootstrap: str, names: Iterable[str], partitions: int,
                        compacted: Iterable[str] = ()) -> list[str]:
    """Create the topics that do not exist yet (``topic_configs``: compaction where asked); returns their names."""
    compacted = set(compacted)
    async with admin_client(bootstrap) as admin:
        existing = set(await admin.list_topics())
        new = [NewTopic(name, num_partitions=partitions, replication_factor=1,
                        topic_configs=topic_configs(name in compacted))
               for name in names if name not in existing]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
        return [t.name for t in new]


async def ensure_changelogs(bootstrap: str, names: list[str], partitions: int) -> list[str]:
    """Table changelogs: created compacted (``ensure_topics``), and an existing one that is not compacted or takes
    smaller records is given ``topic_configs(compacted=True)``, which replaces its topic-level settings (a changelog
    is ours alone; older versions let the broker auto-create them with its defaults). Returns the names changed."""
    created = await ensure_topics(bootstrap, names, partitions, compacted=names)
    # only the ones that were there: a new topic has its settings, and a broker may not describe it for a moment yet
    older = [n for n in names if n not in created]
    have = await topic_settings(bootstrap, older) if older else {}
    stale = [n for n in older if have.get(n) and (have[n].get("cleanup.policy") != "compact"
                                                  or int(have[n].get("max.message.bytes", 0)) < MAX_RECORD_BYTES)]
    if stale:
        want = topic_configs(compacted=True)
        async with admin_client(bootstrap) as admin:
            for a in await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, n, configs=want)
                                                for n in stale]):
                for code, message, _type, name in a.resources:
                    if code:
                        raise RuntimeError(f"changelog {name}: settings not changed: error {code} {message}")
    return stale


async def topic_settings(bootstrap: str, names: list[str]) -> dict[str, dict[str, str]]:
    """Each topic's settings as the broker reports them (its own and the broker's defaults); a topic the broker does
    not describe (unknown to it) is left out."""
    async with admin_client(bootstrap) as admin:
        answers = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
        return {res[3]: {c[0]: c[1] for c in res[4]} for a in answers for res in a.resources if res[0] == 0}


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
    benchmarks, tests). Returns the number written; every one was acknowledged.

    Records go into one batch per partition through aiokafka's batch API, in event order; when a partition's batch
    is full, every partition's batch is submitted, as the producer's accumulator drains its lingering batches
    while it waits for a full one. The order across partitions is therefore the one a ``send`` per record gives,
    at a fifth of the CPU (no coroutine, future and pure-Python murmur2 per record)."""
    import orjson

    from events.wire import subject_key

    producer = make_producer(bootstrap)
    await producer.start()
    try:
        n = len(await producer.partitions_for(topic))
        batches: dict[int, BatchBuilder] = {}
        futs: list[asyncio.Future] = []

        async def submit() -> None:
            for p, b in batches.items():
                futs.append(await producer.send_batch(b, topic, partition=p))
            batches.clear()

        count = 0
        for e in events:
            key = subject_key(e).encode()
            value = orjson.dumps(e)
            p = partition_for(key, n)
            b = batches.get(p)
            if b is None:
                b = batches[p] = producer.create_batch()
            if b.append(key=key, value=value, timestamp=None) is None:  # full
                await submit()
                b = batches[p] = producer.create_batch()
                b.append(key=key, value=value, timestamp=None)  # an empty batch takes any record
            count += 1
        await submit()
        await asyncio.gather(*futs)
        return count
    finally:
        await producer.stop()


@functools.lru_cache(maxsize=1 << 16)
def partition_for(key: bytes, partitions: int) -> int:
    """aiokafka's / Java's default partitioner (murmur2), memoised: subjects repeat, murmur2 is pure Python."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def make_producer(bootstrap: str, **overrides) -> AIOKafkaProducer:
    """An idempotent producer (acks=all): a retried send never writes a message twice."""
    opts = dict(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", linger_ms=5,
                max_batch_size=262144, request_timeout_ms=10000, compression_type=None,
                max_request_size=MAX_RECORD_BYTES)
    opts.update(overrides)
    return AIOKafkaProducer(**opts)

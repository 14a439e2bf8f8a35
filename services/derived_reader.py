"""Reading a derived topic from the beginning to its current end, as a read_committed consumer sees it.

Derived events may appear twice after a processor crash (same deterministic id; see README "Exactly once"):
`read_topic` dedupes on `event_id` unless asked for the raw log.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition


async def read_log(bootstrap: str, topic: str, *, read_committed: bool = True,
                   timeout_ms: int = 2000) -> AsyncIterator[ConsumerRecord]:
    """Every record of `topic` from the beginning to its end as of the call, partition by partition, in log order.

    The one way we re-read a topic (rule sets, derived events, tests). Nothing is committed; a missing topic yields
    nothing.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                                isolation_level="read_committed" if read_committed else "read_uncommitted")
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic)
        if not tps:
            return
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        for tp in tps:
            while (pos := await consumer.position(tp)) < end[tp]:
                msgs = (await consumer.getmany(tp, timeout_ms=timeout_ms)).get(tp, [])
                for m in msgs:
                    if m.offset < end[tp]:
                        yield m
                if not msgs and await consumer.position(tp) == pos:
                    break  # nothing more to fetch below the end (aborted or compacted tail)
    finally:
        await consumer.stop()


async def read_topic(bootstrap: str, topic: str, dedupe: bool = True, timeout_ms: int = 2000) -> list[dict[str, Any]]:
    """The decoded records of a derived topic (deduped on `event_id` unless asked for the raw log)."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    async for m in read_log(bootstrap, topic, timeout_ms=timeout_ms):
        d = orjson.loads(m.value)
        if dedupe:
            eid = d.get("event_id")
            if eid in seen:
                continue
            seen.add(eid)
        out.append(d)
    return out


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The topic's partitions, asking the broker when the consumer's metadata does not know the topic yet."""
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(parts)]


def latest_by_lead(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record per lead in log order (one lead lives in one partition, so its order is total)."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        out[r.get("lead")] = r
    return out

"""Reading a derived topic from the beginning to its current end, as a read_committed consumer sees it.

Derived events may appear twice after a processor crash (same deterministic id; see README "Exactly once"):
`read_topic` dedupes on `event_id` unless asked for the raw log.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition


async def read_topic(bootstrap: str, topic: str, dedupe: bool = True, timeout_ms: int = 2000) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed",
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic)
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        pending = {tp for tp in tps if end[tp] > 0}
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=timeout_ms)
            if not batch:
                break
            for tp, msgs in batch.items():
                for m in msgs:
                    d = orjson.loads(m.value)
                    if dedupe:
                        eid = d.get("event_id")
                        if eid in seen:
                            continue
                        seen.add(eid)
                    out.append(d)
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
        return out
    finally:
        await consumer.stop()


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

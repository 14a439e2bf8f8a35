"""services.kafka_io on the real broker: produce_events writes every event once, under its subject key, on the
partition the default partitioner gives that key, each partition in event order — also across full batches;
ensure_changelogs compacts a changelog the broker auto-created with its defaults."""

from __future__ import annotations

import orjson
from aiokafka.admin import NewTopic

from services.derived_reader import read_log
from services.kafka_io import (MAX_RECORD_BYTES, admin_client, ensure_changelogs, ensure_topics, partition_for,
                               produce_events, topic_settings)


async def test_produce_events_writes_each_subject_in_event_order_on_its_partition(kafka_bootstrap: str,
                                                                                  unique: str) -> None:
    topic = f"produce-{unique}"
    await ensure_topics(kafka_bootstrap, [topic], partitions=3)
    pad = "x" * 400  # ≈ 600 bytes a record: each partition's 256 KiB batch fills several times
    events = []
    for i in range(3000):
        subject = {0: {"lead_id": f"L{i % 11}"}, 1: {"email": f"p{i % 13}@x.example"},
                   2: {"anonymous_id": f"anon-{i % 17}"}}[i % 3]
        events.append({"event_id": f"e{i}", "type": "page_viewed", **subject, "payload": {"pad": pad}})
    assert await produce_events(kafka_bootstrap, topic, events) == 3000

    got: dict[int, list[tuple[bytes, str]]] = {}
    async for m in read_log(kafka_bootstrap, topic):
        got.setdefault(m.partition, []).append((m.key, orjson.loads(m.value)["event_id"]))
    want: dict[int, list[tuple[bytes, str]]] = {}
    for e in events:
        key = (e.get("lead_id") or e.get("email") or e["anonymous_id"]).encode()
        want.setdefault(partition_for(key, 3), []).append((key, e["event_id"]))
    assert got == want
    assert all(len(v) > 600 for v in got.values())  # more than one full batch in every partition


async def test_ensure_changelogs_compacts_one_made_with_the_broker_defaults(kafka_bootstrap: str, unique: str) -> None:
    old, new = f"proc-{unique}-leads-changelog", f"proc-{unique}-identity-changelog"
    async with admin_client(kafka_bootstrap) as admin:
        await admin.create_topics([NewTopic(old, num_partitions=3, replication_factor=1)])  # as auto-created
    before = await topic_settings(kafka_bootstrap, [old])
    assert before[old]["cleanup.policy"] == "delete" and int(before[old]["max.message.bytes"]) < MAX_RECORD_BYTES

    assert await ensure_changelogs(kafka_bootstrap, [old, new], 3) == [old]  # the new one is created right
    after = await topic_settings(kafka_bootstrap, [old, new])
    for name in (old, new):
        assert after[name]["cleanup.policy"] == "compact"
        assert int(after[name]["max.message.bytes"]) == MAX_RECORD_BYTES
    assert await ensure_changelogs(kafka_bootstrap, [old, new], 3) == []  # nothing left to change

"""The local stack is real: the broker answers Kafka requests and PostgreSQL answers SQL."""

from __future__ import annotations

import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from deploy import infra
from services.kafka_io import ensure_topics, record_offsets


async def test_broker_round_trip(kafka_bootstrap: str, unique: str) -> None:
    topic = f"infra-{unique}"
    await ensure_topics(kafka_bootstrap, [topic], partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        md = await producer.send_and_wait(topic, b"hello", key=b"lead-1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=10000)
        values = [(m.key, m.value, m.partition) for msgs in batch.values() for m in msgs]
    finally:
        await consumer.stop()
    assert values == [(b"lead-1", b"hello", md.partition)]


def test_postgres_answers(pg_dsn: str) -> None:
    engine = sa.create_engine(pg_dsn)
    with engine.connect() as conn:
        assert conn.execute(sa.text("select current_database()")).scalar() == "leadledger_test"
        assert conn.execute(sa.text("show server_version")).scalar().startswith("15")


def test_second_start_reuses_the_cache(infra_cfg: infra.InfraConfig, kafka_bootstrap: str) -> None:
    # The broker is up, so its jars were fetched; fetching again must be a no-op (no Maven run).
    assert (infra_cfg.kafka_libs / ".complete").exists()
    assert infra.fetch_kafka(infra_cfg) == infra_cfg.kafka_libs
    assert infra.status(infra_cfg)["kafka"]["listening"] is True


async def test_record_offsets_tells_records_from_transaction_markers(kafka_bootstrap: str, unique: str) -> None:
    """The processor's commit guard asks the log which offsets it was not handed hold records: a transaction's
    commit marker takes an offset but is no record, so it must not count as one."""
    topic = f"infra-gap-{unique}"
    await ensure_topics(kafka_bootstrap, [topic], partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"tx-{unique}")
    await producer.start()
    try:
        offsets = []
        for value in (b"a", b"b", b"c"):
            async with producer.transaction():
                offsets.append((await producer.send_and_wait(topic, value, partition=0)).offset)
    finally:
        await producer.stop()
    assert offsets == [offsets[0], offsets[0] + 2, offsets[0] + 4]  # a commit marker after each record
    first = offsets[0]
    assert await record_offsets(kafka_bootstrap, topic, 0, first, first + 5) == set(offsets)
    assert await record_offsets(kafka_bootstrap, topic, 0, first + 1, first + 2) == set()
    assert await record_offsets(kafka_bootstrap, topic, 0, first + 1, first + 4) == {first + 2}


def test_cluster_ids_never_read_as_an_option() -> None:
    """1 random id in 64 starts with "-" in base64url, which the storage tool's parser took for an option: `format`
    failed and CI with it. Every id made here is a 16-byte UUID in Kafka's form and starts with something else."""
    import base64

    ids = [infra.kafka_cluster_id() for _ in range(5000)]
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 and len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)
    assert len(set(ids)) == len(ids)

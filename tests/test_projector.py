"""The projector on the real broker: rows equal a direct apply, restarts and redelivery never duplicate,
the database decides progress, a database outage loses nothing, a rebuild equals the live tables."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
from datetime import timedelta

import orjson
import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer

from projections import sql_schema
from projections.sql_writer import apply_batch, store_offsets
from services import projector as projector_mod
from services.config import Topics
from services.kafka_io import ensure_topics
from services.projector import Projector, projector_topics, rebuild
from tests.conftest import wait_for
from tests.projections_support import T0, db_url, dump, fresh_pg_schema, journey, small_history  # noqa: F401

pytestmark = pytest.mark.infra


def _topics(unique: str) -> Topics:
    return Topics(touchpoints=f"tp-{unique}", by_lead=f"bylead-{unique}", scores=f"scores-{unique}",
                  stages=f"stages-{unique}", handoffs=f"handoffs-{unique}", intent_alerts=f"intent-{unique}",
                  rejected=f"rejected-{unique}")


def _route(topics: Topics, rec: dict) -> tuple[str, bytes, bytes]:
    """Where the processor would write `rec`: (topic, key, value)."""
    if rec["type"] == "lead_scored":
        return topics.scores, rec["lead"].encode(), orjson.dumps(rec)
    if rec["type"] == "lead_stage_changed":
        return topics.stages, rec["lead"].encode(), orjson.dumps(rec)
    if rec["type"] == "lead_handed_off":
        return topics.handoffs, rec["lead"].encode(), orjson.dumps(rec)
    wire = {k: v for k, v in rec.items() if k != "lead"}
    return topics.by_lead, rec["lead"].encode(), orjson.dumps(wire)


async def _produce(bootstrap: str, topics: Topics, records: list[dict], unique: str) -> None:
    """Write like an exactly-once processor: one Kafka transaction (leaves commit markers in the log)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"test-{unique}",
                                enable_idempotence=True, acks="all")
    await producer.start()
    try:
        async with producer.transaction():
            for rec in records:
                topic, key, value = _route(topics, rec)
                await producer.send(topic, value, key=key)
    finally:
        await producer.stop()


def _reference(tmp_path, records: list[dict], name: str = "ref.db") -> dict:
    url = f"sqlite:///{tmp_path / name}"
    sql_schema.migrate(url)
    engine = sql_schema.make_engine(url)
    with engine.begin() as conn:
        apply_batch(conn, records)
    engine.dispose()
    return dump(url)


def _count(url: str, table: str = "touchpoint_archive") -> int:
    engine = sql_schema.make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar()
    except sa.exc.DBAPIError:
        return -1
    finally:
        engine.dispose()


@contextlib.asynccontextmanager
async def running(projector: Projector):
    task = asyncio.create_task(projector.run())
    try:
        yield task
    finally:
        projector.stop()
        await asyncio.wait_for(task, 30)
        projector.close()


async def _setup(kafka_bootstrap: str, unique: str) -> Topics:
    topics = _topics(unique)
    await ensure_topics(kafka_bootstrap, projector_topics(topics), partitions=3)
    return topics


async def test_projector_rows_restart_and_redelivery(kafka_bootstrap, db_url, unique, tmp_path) -> None:
    topics = await _setup(kafka_bootstrap, unique)
    sql_schema.migrate(db_url)
    first = small_history()
    second = journey("f@x.com", T0 + timedelta(days=50), ["lead", "mql"], "web", "fall")
    await _produce(kafka_bootstrap, topics, first, unique)
    group = f"proj-{unique}"

    expected_first = _reference(tmp_path, first, "ref1.db")
    p1 = Projector(kafka_bootstrap, db_url, topics=topics, group=group, batch_max=7)
    async with running(p1):
        await wait_for(lambda: dump(db_url) == expected_first, timeout=60, what="first history projected")
    assert p1.records == len(first)

    # restart with more events: only the new ones are read (offsets from the database)
    await _produce(kafka_bootstrap, topics, second, unique + "b")
    expected_all = _reference(tmp_path, first + second, "ref2.db")
    p2 = Projector(kafka_bootstrap, db_url, topics=topics, group=group)
    async with running(p2):
        await wait_for(lambda: dump(db_url) == expected_all, timeout=60, what="second history projected")
        await wait_for(lambda: p2.records == len(second), timeout=10, what="only new records read")

    # redelivery of everything (offsets lost): idempotent, nothing duplicated
    engine = sql_schema.make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sql_schema.projector_offsets.delete())
    engine.dispose()
    p3 = Projector(kafka_bootstrap, db_url, topics=topics, group=group)
    async with running(p3):
        await wait_for(lambda: p3.records == len(first) + len(second), timeout=60, what="full redelivery")
    assert dump(db_url) == expected_all


async def test_crash_between_write_and_commit(kafka_bootstrap, unique, tmp_path) -> None:
    """A projector wrote rows + offsets for some messages, then died before any Kafka commit:
    the next one starts exactly after them (DB offsets), so nothing is read twice or skipped."""
    topics = await _setup(kafka_bootstrap, unique)
    url = f"sqlite:///{tmp_path / 'crash.db'}"
    sql_schema.migrate(url)
    records = small_history()
    await _produce(kafka_bootstrap, topics, records, unique)
    group = f"proj-{unique}"

    # the "crashed" projector: one batch through the same transaction, no Kafka commit
    from aiokafka import AIOKafkaConsumer
    consumer = AIOKafkaConsumer(*projector_topics(topics), bootstrap_servers=kafka_bootstrap, group_id=None,
                                isolation_level="read_committed", auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=10000, max_records=20)
    finally:
        await consumer.stop()
    crashed = Projector(kafka_bootstrap, url, topics=topics, group=group)
    recs, offsets = crashed._collect(batch)
    assert recs
    crashed._write(recs, offsets)
    crashed.close()

    p = Projector(kafka_bootstrap, url, topics=topics, group=group)
    async with running(p):
        await wait_for(lambda: p.records == len(records) - len(recs), timeout=60, what="the rest projected")
    assert dump(url) == _reference(tmp_path, records)


class _Proxy:
    """A TCP forwarder to PostgreSQL that we can start late: 'nothing listens here' until start()."""

    def __init__(self, target_port: int) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.target_port = target_port
        self.server = None

    async def _pipe(self, reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader, writer):
        r2, w2 = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, w2), self._pipe(r2, writer))

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self):
        if self.server:
            self.server.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_database_outage_loses_nothing(kafka_bootstrap, unique, tmp_path, kind, request) -> None:
    topics = await _setup(kafka_bootstrap, unique)
    records = small_history()
    expected = _reference(tmp_path, records)
    group = f"proj-{unique}"
    cleanup = None
    if kind == "sqlite":
        path = tmp_path / "outage.db"
        real_url = f"sqlite:///{path}"
        sql_schema.migrate(real_url)
        projector_url = f"{real_url}?timeout=0.1"
        locker = sqlite3.connect(path, timeout=0.1, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # outage: nobody else can read or write

        async def recover():
            locker.execute("ROLLBACK")
            locker.close()
    else:
        gen = fresh_pg_schema(request.getfixturevalue("pg_dsn"))
        real_url = next(gen)
        cleanup = gen
        sql_schema.migrate(real_url)
        proxy = _Proxy(int(sa.engine.make_url(real_url).port))
        projector_url = real_url.replace(f":{sa.engine.make_url(real_url).port}/", f":{proxy.port}/")
        recover = proxy.start
    try:
        await _produce(kafka_bootstrap, topics, records, unique)
        p = Projector(kafka_bootstrap, projector_url, topics=topics, group=group, retry_initial=0.05,
                      retry_max=0.3)
        async with running(p):
            await wait_for(lambda: p.db_errors >= 3, timeout=30, what="retries during the outage")
            assert p.records == 0
            await recover()
            await wait_for(lambda: dump(real_url) == expected, timeout=60, what="catch-up after the outage")
        assert p.records == len(records)
        if kind == "postgresql":
            await proxy.stop()
    finally:
        if cleanup is not None:
            with contextlib.suppress(StopIteration):
                next(cleanup)


async def test_rebuild_equals_live(kafka_bootstrap, db_url, unique, tmp_path, monkeypatch) -> None:
    topics = await _setup(kafka_bootstrap, unique)
    sql_schema.migrate(db_url)
    records = small_history() + journey("f@x.com", T0 + timedelta(days=50), ["lead", "mql"], "web", "fall")
    await _produce(kafka_bootstrap, topics, records, unique)
    group = f"proj-{unique}"
    expected = _reference(tmp_path, records)
    p = Projector(kafka_bootstrap, db_url, topics=topics, group=group)
    async with running(p):
        await wait_for(lambda: dump(db_url) == expected, timeout=60, what="live projection")
    everything = [t.name for t in sql_schema.TABLES]
    live = dump(db_url, everything)

    # rebuild over the live database itself (drop + migrate + replay), through the CLI entry
    for attr, name in vars(topics).items():
        monkeypatch.setenv(f"LEADLEDGER_TOPIC_{'BY_LEAD' if attr == 'by_lead' else attr.upper()}", name)
    assert await asyncio.to_thread(projector_mod.rebuild_main,
                                   ["--database-url", db_url, "--bootstrap", kafka_bootstrap, "--group", group]) == 0
    assert dump(db_url, everything) == live

    # and into a fresh SQLite file: the same rows, row for row
    other = f"sqlite:///{tmp_path / 'rebuilt.db'}"
    n = await rebuild(kafka_bootstrap, other, topics=topics, group=group, batch_max=5)
    assert n == len(records)
    assert dump(other, everything) == live

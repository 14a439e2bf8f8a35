"""The projector: derived topics + ``touchpoints-by-lead`` -> SQL projections, exactly once in effect.

Each ``getmany`` batch becomes ONE database transaction that writes the projection rows *and* the next offsets
of the consumed partitions into ``projector_offsets``. On (re)assignment every partition is positioned at the
offset stored in the database, so the database alone decides progress: a crash between the write and a Kafka
commit neither loses nor repeats a row (and the rows are keyed by event id anyway). When the database is down
the batch is retried with exponential back-off and the offsets do not move; the projector catches up after.

``leadledger projector``                   -> :func:`main`
``leadledger projections rebuild``         -> :func:`rebuild_main` (drop + migrate, replay the log to the end
                                             offsets captured at start, same batched write path)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from typing import Iterable

import orjson
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from projections import sql_schema
from projections.sql_writer import apply_batch, load_offsets, store_offsets
from services.config import Settings, Topics

log = logging.getLogger("leadledger.projector")

GROUP = "leadledger-projector"


def projector_topics(topics: Topics) -> list[str]:
    """The topics the projector reads: touchpoints by lead and the derived scores / stages / hand-offs."""
    return [topics.by_lead, topics.scores, topics.stages, topics.handoffs]


def decode_message(topic: str, key: bytes | None, value: bytes, by_lead_topic: str) -> dict | None:
    """A Kafka message -> the record dict ``apply_batch`` expects (None for an undecodable message)."""
    try:
        rec = orjson.loads(value)
    except orjson.JSONDecodeError:
        log.warning("skipping undecodable message on %s", topic)
        return None
    if not isinstance(rec, dict) or "event_id" not in rec or "type" not in rec:
        log.warning("skipping malformed message on %s", topic)
        return None
    if topic == by_lead_topic and key:
        rec["lead"] = key.decode("utf-8")
    return rec


class _Listener(ConsumerRebalanceListener):
    def __init__(self, projector: "Projector", consumer: AIOKafkaConsumer) -> None:
        self.projector = projector
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked) -> None:
        # wait for the batch in flight: its rows and offsets commit (or not) as one transaction
        async with self.projector.lock:
            self.projector.generation += 1

    async def on_partitions_assigned(self, assigned) -> None:
        async with self.projector.lock:
            self.projector.generation += 1
            await self.projector.seek_from_db(self.consumer, list(assigned))
            # records fetched while we were seeking belong to the old positions: the main loop drops them
            self.projector.generation += 1


class Projector:
    """One projector instance (run several with the same group to share the partitions)."""

    def __init__(self, bootstrap: str, database_url: str, topics: Topics | None = None, group: str = GROUP,
                 batch_max: int = 2000, retry_initial: float = 0.2, retry_max: float = 5.0,
                 poll_timeout_ms: int = 500) -> None:
        self.bootstrap = bootstrap
        self.database_url = database_url
        self.topics = topics or Topics()
        self.group = group
        self.batch_max = batch_max
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.poll_timeout_ms = poll_timeout_ms
        self.engine = sql_schema.make_engine(database_url)
        self.lock = asyncio.Lock()
        self.generation = 0
        self.batches = 0
        self.records = 0
        self.db_errors = 0
        self.stop_event = asyncio.Event()

    # -- database side (synchronous, run in a worker thread)

    def _write(self, records: list[dict], offsets: dict[tuple[str, int], int]) -> None:
        with self.engine.begin() as conn:
            apply_batch(conn, records)
            store_offsets(conn, self.group, offsets)

    def _load_offsets(self) -> dict[tuple[str, int], int]:
        with self.engine.connect() as conn:
            return load_offsets(conn, self.group)

    async def _retrying(self, fn, *args):
        """Run `fn` in a thread; on a database error retry with exponential back-off until it works or stop."""
        delay = self.retry_initial
        while True:
            try:
                return await asyncio.to_thread(fn, *args)
            except sa.exc.DBAPIError as exc:
                transient = isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)) \
                    or exc.connection_invalidated
                if not transient:
                    raise  # a real bug (constraint, syntax): do not spin on it
                self.db_errors += 1
                log.warning("database unavailable (%s); retrying in %.1fs", type(exc.orig).__name__, delay)
                if self.stop_event.is_set():
                    raise
                try:
                    await asyncio.wait_for(self.stop_event.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, self.retry_max)

    async def seek_from_db(self, consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition]) -> None:
        partitions = list(partitions)
        if not partitions:
            return
        stored = await self._retrying(self._load_offsets)
        fresh = []
        for tp in partitions:
            if (tp.topic, tp.partition) in stored:
                consumer.seek(tp, stored[(tp.topic, tp.partition)])
            else:
                fresh.append(tp)
        if fresh:
            await consumer.seek_to_beginning(*fresh)
        log.info("assigned %d partitions (%d from stored offsets)", len(partitions), len(partitions) - len(fresh))

    def _consumer(self, **kw) -> AIOKafkaConsumer:
        opts = dict(bootstrap_servers=self.bootstrap, enable_auto_commit=False, isolation_level="read_committed",
                    auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024)
        opts.update(kw)
        return AIOKafkaConsumer(**opts)

    def _collect(self, batch) -> tuple[list[dict], dict[tuple[str, int], int]]:
        records: list[dict] = []
        offsets: dict[tuple[str, int], int] = {}
        for tp, msgs in batch.items():
            for m in msgs:
                rec = decode_message(tp.topic, m.key, m.value, self.topics.by_lead)
                if rec is not None:
                    records.append(rec)
                offsets[(tp.topic, tp.partition)] = m.offset + 1
        return records, offsets

    # -- live mode

    async def _write_and_commit(self, consumer: AIOKafkaConsumer, records: list[dict],
                                offsets: dict[tuple[str, int], int]) -> None:
        """One batch: its database transaction, then (best effort) the Kafka commit. The caller holds ``lock``."""
        try:
            await self._retrying(self._write, records, offsets)
            self.batches += 1
            self.records += len(records)
        finally:
            self.lock.release()
        # best effort, for lag monitoring only: the database is the source of truth
        try:
            await consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        except Exception:  # noqa: BLE001 - a rebalance or a slow broker must not stop the projector
            pass

    async def run(self) -> None:
        """Consume until :meth:`stop` (the caller ensures the schema exists, e.g. with ``migrate``).

        While a batch is written (in a worker thread) the next one is fetched and decoded; the writes themselves
        stay strictly one after the other, each holding ``lock`` (so a rebalance waits for the write in flight).
        """
        consumer = self._consumer(group_id=self.group)
        consumer.subscribe(projector_topics(self.topics), listener=_Listener(self, consumer))
        await consumer.start()
        inflight: asyncio.Task | None = None
        try:
            while not self.stop_event.is_set():
                gen = self.generation
                batch = await consumer.getmany(timeout_ms=self.poll_timeout_ms, max_records=self.batch_max)
                if inflight is not None and inflight.done():
                    task, inflight = inflight, None
                    if await self._settled(task):
                        break
                if not batch:
                    continue
                records, offsets = self._collect(batch)   # decoded while the previous batch is written
                if inflight is not None:
                    task, inflight = inflight, None
                    if await self._settled(task):
                        break
                await self.lock.acquire()
                if gen != self.generation:
                    # a rebalance happened while this batch was fetched: drop it and position every
                    # partition at the offset the database holds (the batch will be fetched again)
                    try:
                        await self.seek_from_db(consumer, consumer.assignment())
                    finally:
                        self.lock.release()
                    continue
                inflight = asyncio.create_task(self._write_and_commit(consumer, records, offsets))
        finally:
            if inflight is not None:
                with contextlib.suppress(Exception):
                    await inflight
            await consumer.stop()

    async def _settled(self, task: asyncio.Task) -> bool:
        """Wait for a batch write; True when it failed because the projector is stopping (else its error raises)."""
        try:
            await task
        except Exception:
            if self.stop_event.is_set():
                return True
            raise
        return False

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        self.engine.dispose()

    # -- rebuild mode

    async def _partitions(self, names: list[str]) -> dict[str, list[int]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10000)
        await admin.start()
        try:
            described = await admin.describe_topics(names)
        finally:
            await admin.close()
        out: dict[str, list[int]] = {}
        for d in described:
            if d.get("error_code", 0) == 0 and d.get("partitions"):
                out[d["topic"]] = sorted(p["partition"] for p in d["partitions"])
        return out

    async def replay_to_end(self) -> int:
        """Read every projector topic from the beginning up to the end offsets captured now; returns records."""
        consumer = self._consumer(group_id=None)
        await consumer.start()
        total = 0
        inflight: asyncio.Task | None = None   # the batch being written while the next one is fetched
        try:
            names = projector_topics(self.topics)
            parts = [TopicPartition(t, p) for t, ps in (await self._partitions(names)).items() for p in ps]
            if not parts:
                return 0
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            end = await consumer.end_offsets(parts)
            start = await consumer.beginning_offsets(parts)
            remaining = {tp for tp in parts if end[tp] > start[tp]}
            idle_since = time.monotonic()
            while remaining and not self.stop_event.is_set():
                batch = await consumer.getmany(*remaining, timeout_ms=self.poll_timeout_ms,
                                               max_records=self.batch_max)
                batch = {tp: [m for m in msgs if m.offset < end[tp]] for tp, msgs in batch.items()}
                batch = {tp: msgs for tp, msgs in batch.items() if msgs}
                if batch:
                    records, offsets = self._collect(batch)   # decoded while the previous batch is written
                    if inflight is not None:
                        task, inflight = inflight, None
                        await task
                    inflight = asyncio.create_task(self._retrying(self._write, records, offsets))
                    total += len(records)
                    idle_since = time.monotonic()
                for tp in list(remaining):
                    pos = await consumer.position(tp)
                    if pos >= end[tp]:
                        remaining.discard(tp)
                        consumer.pause(tp)
                if remaining and time.monotonic() - idle_since > 10:
                    # only transaction markers / aborted records left before the captured end
                    log.info("no more records before the captured end offsets on %d partitions", len(remaining))
                    if inflight is not None:
                        task, inflight = inflight, None
                        await task
                    await self._retrying(self._write, [], {(tp.topic, tp.partition): end[tp] for tp in remaining})
                    break
            if inflight is not None:
                task, inflight = inflight, None
                await task
        finally:
            if inflight is not None:
                with contextlib.suppress(Exception):
                    await inflight
            await consumer.stop()
        return total


def _common_args(p: argparse.ArgumentParser) -> None:
    s = Settings()
    p.add_argument("--database-url", default=s.database_url, help="SQLAlchemy URL (env LEADLEDGER_DATABASE_URL)")
    p.add_argument("--bootstrap", default=s.bootstrap, help="Kafka bootstrap (env LEADLEDGER_KAFKA_BOOTSTRAP)")
    p.add_argument("--group", default=os.environ.get("LEADLEDGER_PROJECTOR_GROUP", GROUP),
                   help="consumer group, also the key of the stored offsets (env LEADLEDGER_PROJECTOR_GROUP)")
    p.add_argument("--batch-max", type=int, default=int(os.environ.get("LEADLEDGER_PROJECTOR_BATCH", "2000")),
                   help="max records per transaction (env LEADLEDGER_PROJECTOR_BATCH)")


async def _run_until_signal(projector: Projector) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, projector.stop)
        except (NotImplementedError, RuntimeError):
            pass
    await projector.run()


def main(argv: list[str] | None = None) -> int:
    """``leadledger projector``: migrate the database to head, then project until SIGINT/SIGTERM."""
    p = argparse.ArgumentParser(prog="leadledger projector", description="derived topics -> SQL projections")
    _common_args(p)
    p.add_argument("--no-migrate", action="store_true", help="do not upgrade the schema on start")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("LEADLEDGER_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not a.no_migrate:
        sql_schema.migrate(a.database_url)
    projector = Projector(a.bootstrap, a.database_url, group=a.group, batch_max=a.batch_max)
    try:
        asyncio.run(_run_until_signal(projector))
    finally:
        projector.close()
    return 0


async def rebuild(bootstrap: str, database_url: str, topics: Topics | None = None, group: str = GROUP,
                  batch_max: int = 2000, drop: bool = True) -> int:
    """Drop and re-create the projections, then replay the log up to the end offsets captured at start."""
    if drop:
        await asyncio.to_thread(sql_schema.drop_all, database_url)
    await asyncio.to_thread(sql_schema.migrate, database_url)
    projector = Projector(bootstrap, database_url, topics=topics, group=group, batch_max=batch_max)
    try:
        return await projector.replay_to_end()
    finally:
        projector.close()


def rebuild_main(argv: list[str] | None = None) -> int:
    """``leadledger projections rebuild``: stop the projector first; it resumes where the rebuild ended."""
    p = argparse.ArgumentParser(prog="leadledger projections rebuild",
                                description="drop the SQL projections and rebuild them from the Kafka log")
    _common_args(p)
    p.add_argument("--keep", action="store_true", help="do not drop the tables first (replay is idempotent)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("LEADLEDGER_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.monotonic()
    n = asyncio.run(rebuild(a.bootstrap, a.database_url, group=a.group, batch_max=a.batch_max, drop=not a.keep))
    print(f"rebuilt projections from {n} records in {time.monotonic() - t0:.1f}s")
    return 0

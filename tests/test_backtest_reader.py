"""The back-test's own log reader (services.backtest_log.scan_log / read_log) against the real broker: what a
read_committed consumer sees, in partition order — aborted transactions and transaction markers skipped, the
captured end respected, also in the middle of a batch; partitions waiting for room in full fetch responses read,
one held by an open transaction given up. Then the back-test over that reader (fold_books, one process and
several) against the in-memory fold, and the sorting of touchpoints into a cookie's anonymous events."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, NamedTuple

from aiokafka import AIOKafkaProducer, TopicPartition

from services.backtest_log import read_log, scan_log
from services.derived_reader import read_log as consumer_read_log
from services.kafka_io import ensure_topics, make_producer


@contextlib.asynccontextmanager
async def _producers(bootstrap: str, topic: str, partitions: int) -> AsyncIterator[tuple[Any, AIOKafkaProducer]]:
    """``topic`` created, and a plain and a transactional producer for it, started (stopped on the way out)."""
    await ensure_topics(bootstrap, [topic], partitions=partitions)
    plain = make_producer(bootstrap)
    tx = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"tx-{topic}")
    await plain.start()
    await tx.start()
    try:
        yield plain, tx
    finally:
        await tx.stop()
        await plain.stop()


async def _consumer_view(bootstrap: str, topic: str) -> dict[int, list[tuple[int, bytes, bytes]]]:
    out: dict[int, list] = {}
    async for m in consumer_read_log(bootstrap, topic):
        out.setdefault(m.partition, []).append((m.offset, m.key, m.value))
    return out


async def test_scan_log_reads_what_a_read_committed_consumer_reads(kafka_bootstrap: str, unique: str) -> None:
    topic = f"bt-reader-{unique}"
    async with _producers(kafka_bootstrap, topic, 3) as (plain, tx):
        for i in range(300):  # batched records, several per batch
            await plain.send(topic, b"plain-%d" % i, key=b"k%d" % (i % 7), partition=i % 3)
        await plain.flush()
        for n, commit in enumerate((True, False, True, False, True)):
            await tx.begin_transaction()
            for p in range(3):
                for j in range(4):
                    await tx.send(topic, b"tx%d-%d-%d" % (n, p, j), key=b"t", partition=p)
            if commit:
                await tx.commit_transaction()
            else:
                await tx.abort_transaction()
        for i in range(10):
            await plain.send(topic, b"tail-%d" % i, key=b"z", partition=0)
        await plain.flush()

    expected = await _consumer_view(kafka_bootstrap, topic)
    assert not any(b"tx1-" in v or b"tx3-" in v for recs in expected.values() for _o, _k, v in recs)  # aborted
    got: dict[int, list] = {}
    await scan_log(kafka_bootstrap, topic, lambda p, recs: got.setdefault(p, []).extend(
        (r.offset, r.key, r.value) for r in recs))
    assert got == expected

    # read_log: one call per record, up to a captured end (here: mid-way through partition 0, nothing of 2)
    cut = expected[0][60][0]  # inside a batch of the plain producer
    ends = {TopicPartition(topic, 0): cut, TopicPartition(topic, 1): expected[1][-1][0] + 1,
            TopicPartition(topic, 2): 0}
    seen: list = []
    n = await read_log(kafka_bootstrap, topic, lambda m: seen.append((m.offset, m.value)), ends)
    want = [(o, v) for o, _k, v in expected[0] if o < cut] + [(o, v) for o, _k, v in expected[1]]
    assert n == len(want) and sorted(seen) == sorted(want)


def test_fold_books_over_the_log_equals_the_in_memory_fold(kafka_bootstrap: str, unique: str, monkeypatch) -> None:
    """fold_books over Kafka — one process, and shards in forked processes (this test's process has no other
    thread) or spawned ones — gives the MQLs of LogFold over the same log in memory."""
    import asyncio
    import threading

    import orjson

    from bench.gen_history import generate
    from projections.fold import normalise_email, subject_of
    from projections.log_fold import LogFold
    from services import backtest_log
    from services.backtest_log import fold_books
    from services.config import Topics
    from tests.test_replay import BOOK, lead_keyed_log

    events = generate(3000, 150, seed=11)
    for e in events:
        e["email"] = normalise_email(e["email"])
    log = lead_keyed_log(events)
    topics = Topics(touchpoints=f"bt-tp-{unique}", by_lead=f"bt-bylead-{unique}")
    # records the live stages dead-letter unfolded (events.wire.check_envelope): a joining cookie's anonymous event
    # with a bad timestamp ahead of its history, and a lead's record with a naive timestamp on the lead-keyed log;
    # poison records the lead stage dead-letters (undecodable, not an object, an empty value) in that lead's log
    joined = {subject_of(e)[1] for e in events if all(subject_of(e))}
    first_anon = next(e for e in events if subject_of(e)[0] is None and subject_of(e)[1] in joined)
    bad_anon = {**first_anon, "event_id": f"{first_anon['event_id']}-bad", "occurred_at": "yesterday"}
    bad_lead = {k: v for k, v in log[0].items() if k != "lead"}
    bad_lead.update(event_id="bad-lead-record", type="page_viewed", occurred_at="2026-01-01T00:00:00")

    async def produce() -> None:
        await ensure_topics(kafka_bootstrap, [topics.touchpoints, topics.by_lead], partitions=4)
        p = make_producer(kafka_bootstrap)
        await p.start()
        try:
            for e in [bad_anon, *events]:
                await p.send(topics.touchpoints, orjson.dumps(e),
                             key=(e["lead_id"] or e["email"] or e["anonymous_id"]).encode())
            await p.send(topics.by_lead, orjson.dumps(bad_lead), key=log[0]["lead"].encode())
            for poison in (b'{"event_id": "x", not json', b"[1, 2]", b""):
                await p.send(topics.by_lead, poison, key=log[0]["lead"].encode())
            for r in log:
                await p.send(topics.by_lead, orjson.dumps({k: v for k, v in r.items() if k != "lead"}),
                             key=r["lead"].encode())
            await p.flush()
        finally:
            await p.stop()

    asyncio.run(produce())
    anon: dict[str, list[dict]] = {}
    for ev in events:
        lead, aid = subject_of(ev)
        if lead is None:
            anon.setdefault(aid, []).append(ev)
    mem = LogFold(BOOK, anon)
    for r in log:
        mem.apply(r["lead"], {k: v for k, v in r.items() if k != "lead"})
    assert mem.mqls
    forked = threading.active_count() == 1
    # also folded in chunks of 257 records (a log larger than CHUNK: leads folded in parts, in order; in forked
    # processes the children inherit the setting)
    for jobs, chunk in ((1, None), (2, None), (3, None), (1, 257), (2, 257)):
        if chunk is not None:
            monkeypatch.setattr(backtest_log, "CHUNK", chunk)
        out = fold_books(kafka_bootstrap, topics, [BOOK, BOOK], jobs)
        assert out["touchpoints"] == len(events) + 1 and out["records"] == len(log) + 4, (jobs, forked)
        assert out["left_out"] == 4  # the naive timestamp and the three poison records
        assert out["leads"] == len(mem.states) and out["short_joins"] == [0, 0]
        assert sorted(out["mqls"][0]) == sorted(out["mqls"][1]) == sorted(mem.mqls), (jobs, chunk, forked)


def touchpoint_cases() -> list[tuple[bytes, Any]]:
    """(key, value) touchpoint records for the sorting of anonymous events: every way a record can look (keyed by
    its cookie or not, member names spelled otherwise, nested names, undecodable, dead-lettered, a tombstone), then a
    generated history keyed as ingest keys it."""
    import orjson

    from bench.gen_history import generate

    base = {"event_id": "e", "type": "page_viewed", "occurred_at": "2026-03-01T09:00:00.000001+00:00",
            "received_at": "2026-03-01T09:00:01.000001+00:00", "lead_id": None, "anonymous_id": "c1", "email": None,
            "source": "web", "campaign": None, "payload": {"url": "/pricing"}, "schema_version": 2}

    def ev(i: int, **kw: object) -> dict:
        return {**base, "event_id": f"e{i}", **kw}

    cases: list[tuple[bytes, Any]] = [
        (b"c1", orjson.dumps(ev(1))),                                                     # as ingest writes it
        (b"a@x.example", orjson.dumps(ev(2, email="a@x.example"))),                       # identified: no
        (b"a@x.example", orjson.dumps(ev(3, email="a@x.example", anonymous_id=None))),    # no cookie
        (b"c1", orjson.dumps(ev(4, payload={"anonymous_id": None}))),                     # a nested null member
        (b"c1", orjson.dumps(ev(5, payload={"field": "anonymous_id"}))),                  # the name as a value
        (b"elsewhere", orjson.dumps(ev(6))),                                              # keyed by another key
        (b"c2", orjson.dumps(ev(7, anonymous_id="c2")).replace(b"anonymous_id", b"anonymous\\u005fid")),
        (b"c3", orjson.dumps(ev(8, anonymous_id="c3")).replace(b'"anonymous_id":', b'"anonymous_id" : ')),
        (b"c1", b'{"anonymous_id":"c1", not json'),                                       # undecodable
        (b"c1", b'["anonymous_id", "c1"]'),                                               # not an object
        (b"c1", orjson.dumps(ev(9, occurred_at="yesterday"))),                            # dead-lettered live
        (b'c1","x', orjson.dumps(ev(10))),                                                # a key with a quote
        (b"c4", orjson.dumps({k: v for k, v in ev(11, anonymous_id="c4").items() if k != "schema_version"}
                             | {"schema_version": 1})),                                   # upcast on decoding
        (b"c1", None),                                                                    # a tombstone
        (b"c5", orjson.dumps(ev(12, anonymous_id="c5", payload={"note": 'say "hi"'}))),   # escapes elsewhere
    ]
    history = generate(2000, 80, seed=3)
    return cases + [((e["lead_id"] or e["email"] or e["anonymous_id"]).encode(), orjson.dumps(e)) for e in history]


class Rec(NamedTuple):
    key: bytes
    value: Any


def test_collect_anonymous_keeps_exactly_the_foldable_anonymous_only_events() -> None:
    """The byte-level sorting of touchpoints (projections.log_fold.collect_anonymous) keeps, per cookie and in log
    order, exactly the events the identity stage folds as anonymous: decoded, anonymous-only, a valid envelope —
    whatever the record's key, the member names' spelling or what the payload holds."""
    from events.wire import check_envelope, decode
    from projections.fold import subject_of
    from projections.log_fold import anonymous_event, collect_anonymous

    recs = [Rec(k, v) for k, v in touchpoint_cases()]
    want: dict[str, list[dict]] = {}
    for r in recs:
        try:
            d = decode(r.value)
        except Exception:  # noqa: BLE001 - what the identity stage dead-letters
            continue
        if subject_of(d)[0] is None and d.get("anonymous_id") and check_envelope(d) is None:
            want.setdefault(d["anonymous_id"], []).append(d)
    anon: dict[str, list] = {}
    collect_anonymous(recs[:7], anon)
    collect_anonymous(recs[7:], anon)
    got = {aid: [e if isinstance(e, dict) else anonymous_event(e, aid) for e in evs] for aid, evs in anon.items()}
    got = {aid: [e for e in evs if e is not None] for aid, evs in got.items()}
    assert {aid: evs for aid, evs in got.items() if evs} == want
    assert [e["event_id"] for e in want["c1"][:4]] == ["e1", "e4", "e5", "e6"]
    assert {"c2", "c3", "c4", "c5"} <= set(want)
    assert sum(isinstance(e, bytes) for evs in anon.values() for e in evs) > 100  # most kept raw, not decoded


async def test_a_reader_stopped_right_after_it_started_stops_cleanly(kafka_bootstrap: str) -> None:
    """A process that claims no partition opens no reader; one that does may stop it at once: aiokafka's consumer
    raised CancelledError from stop() right after start() (aiokafka issue #647) until the reader let it settle."""
    from services.backtest_log import _reader

    for _ in range(50):
        async with _reader(kafka_bootstrap) as consumer:
            assert consumer is not None


async def test_a_partition_left_out_of_full_fetch_responses_is_read_not_given_up(kafka_bootstrap: str, unique: str,
                                                                                 monkeypatch) -> None:
    """A fetch response has a size limit: the broker fills it partition by partition in the order asked, so the
    others wait their turn. Waiting for room is not the stall the reader gives up on (a partition held below its
    end by an open transaction): with tiny responses and no patience at all, every record is still read."""
    from services import backtest_log

    topic = f"bt-starve-{unique}"
    await ensure_topics(kafka_bootstrap, [topic], partitions=4)
    p = make_producer(kafka_bootstrap)
    await p.start()
    try:
        for i in range(800):
            await p.send(topic, b"%d:" % i + b"x" * 400, key=b"k", partition=i % 4)
        await p.flush()
    finally:
        await p.stop()
    monkeypatch.setattr(backtest_log, "FETCH_BYTES", 4096)
    monkeypatch.setattr(backtest_log, "PARTITION_BYTES", 4096)
    monkeypatch.setattr(backtest_log, "STALL_S", 0.0)
    got: dict[int, int] = {}

    def on(partition: int, recs: list) -> None:
        got[partition] = got.get(partition, 0) + len(recs)

    await scan_log(kafka_bootstrap, topic, on)
    assert got == {0: 200, 1: 200, 2: 200, 3: 200}


async def test_a_partition_held_by_an_open_transaction_is_given_up_with_what_was_committed(
        kafka_bootstrap: str, unique: str, monkeypatch) -> None:
    """The end offsets a read captures include an open transaction's records; read_committed stops below them. The
    reader returns what was committed and gives that partition up once it has made no progress for STALL_S."""
    from services import backtest_log

    topic = f"bt-open-tx-{unique}"
    async with _producers(kafka_bootstrap, topic, 2) as (plain, tx):
        for i in range(20):
            await plain.send(topic, b"c%d" % i, partition=i % 2)
        await plain.flush()
        await tx.begin_transaction()
        await tx.send(topic, b"open", partition=0)
        await tx.flush()  # on the log, not committed
        monkeypatch.setattr(backtest_log, "STALL_S", 0.5)
        got: list[bytes] = []
        await scan_log(kafka_bootstrap, topic, lambda _p, recs: got.extend(r.value for r in recs))
        assert sorted(got) == sorted(b"c%d" % i for i in range(20))
        await tx.abort_transaction()


def test_jobs_default_to_the_usable_cpus_at_most_four(monkeypatch) -> None:
    import os

    from services.backtest_log import MAX_DEFAULT_JOBS, default_jobs

    monkeypatch.delenv("LEADLEDGER_BACKTEST_JOBS", raising=False)
    usable = len(os.sched_getaffinity(0))
    assert default_jobs() == max(1, min(MAX_DEFAULT_JOBS, usable)) and MAX_DEFAULT_JOBS == 4
    monkeypatch.setenv("LEADLEDGER_BACKTEST_JOBS", "7")
    assert default_jobs() == 7

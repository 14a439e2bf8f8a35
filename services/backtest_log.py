"""Back-test a rule set over real history: the Kafka log, the pure fold, no faust (issue #7).

``leadledger backtest --rules NEW.yaml [--rules ...] [--from T1] [--to T2] [--csv DIFF.csv] [--json]``
``leadledger backtest --rules R.yaml --events EVENTS.jsonl``  (the offline file form: projections.backtest, as is)

What is folded, and why it reproduces the live system exactly
------------------------------------------------------------
The live processor folds each lead's *lead-keyed log* (``touchpoints-by-lead``): the lead's own events in log
order, anonymous events forwarded after a join, and the identity stage's join resolutions, whose anonymous state
holds the visitor's events folded *before* the join (how many depends on timing: the resolution says, ``state.q``).
The back-test reads that log batch by batch (aiokafka ``getmany``) and folds it with the same pure code
(``projections.fold``), with one change per rule book: a join's anonymous state is rebuilt by folding, under the
book being tested, the first ``q`` anonymous-only events of that anonymous id from the ``touchpoints`` log (its
partition order — the order the identity stage folded them in). Under the rule sets that were in force this is
the live computation record for record, so the baseline's MQLs are the live MQLs; under NEW rules it is the same
history with only the rules changed.

Baseline = the rule sets published on the ``rules`` topic (``leadledger rules publish``; "in force at t" = latest
``effective_from ≤ t``), or ``--baseline-rules FILE`` for logs without published rules, or ``--baseline-live``: the
hand-offs the live processor emitted (``lead-handoffs``), which equal the re-fold under the rules in force (tested)
and cost no second fold. Candidate = ``--rules``
files as written; ``--always`` makes the earliest candidate rule set in force from the beginning of time.

Output: a JSON summary on stdout — MQL hand-offs per ISO week (Monday) in [--from, --to) before/after, and per
lead the first MQL in the window under each book: ``earlier``, ``later``, ``same``, ``never`` (an MQL under the
baseline, none under the candidate) or ``new`` (the converse); ``--csv`` writes the leads that differ
(``lead`` = the lead key, i.e. lead_id or normalised email). The whole log is folded (history before --from
builds state); only MQLs whose evaluation time falls in the window are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date, datetime, timedelta, timezone
from typing import Any, AsyncIterator, Callable, Optional

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as Errors
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.control_record import ABORT_MARKER, ControlRecord
from aiokafka.record.memory_records import MemoryRecords

from projections import fold as core
from projections.backtest import gc_off
from projections.log_fold import LogFold, collect_anonymous, lead_records, merge_anonymous
from projections.rules import RuleBook, RuleSet, RuleSetError, load_rule_sets
from services.config import Settings, Topics
from services.derived_reader import topic_partitions

_EPOCH0 = datetime(1970, 1, 1, tzinfo=timezone.utc)
READ_COMMITTED = 1   # FetchRequest isolation level
CHUNK = 200_000   # lead-keyed records decoded and grouped by lead before they are folded


# ---------------------------------------------------------------------------------------------------- reading

FETCH_BYTES = 16 * 1024 * 1024      # per fetch request (one in flight while the previous response is folded)
PARTITION_BYTES = 4 * 1024 * 1024   # per partition and fetch
STALL_S = 10.0                      # a partition held this long below its end by an open transaction is given up


async def scan_log(bootstrap: str, topic: str, on_records: Callable[[int, list], None],
                   ends: Optional[dict] = None) -> None:
    """Feed every committed record of ``topic`` up to ``ends`` (default: the end offsets now) to
    ``on_records(partition, records)``: each partition's records in log order, in runs (``records``: a list of
    aiokafka's C record objects, ``.offset``/``.key``/``.value`` as bytes). Partitions interleave.

    The consumer's own fetch loop builds a ``ConsumerRecord`` dataclass per record (≈ 3–5 µs each here, as much as
    decoding the JSON); this loop sends the fetch requests itself through the consumer's client and walks the
    returned record batches (aiokafka's C parser, CRCs checked, ``read_committed``: control batches and aborted
    transactions skipped as aiokafka's ``PartitionRecords`` does). The next fetch is in flight while the records of
    the previous one are handed out, so the broker works beside this process."""
    async with _reader(bootstrap) as consumer:
        tps = await topic_partitions(consumer, topic)
        end = ends if ends is not None else (await consumer.end_offsets(tps) if tps else {})
        await _scan(consumer, topic, [tp for tp in tps if end.get(tp, 0) > 0], end, on_records)


@contextlib.asynccontextmanager
async def _reader(bootstrap: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer whose client ``_scan`` sends its fetch requests through."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    # let the consumer's background task take its first step: a stop() right after start() would otherwise raise
    # CancelledError from awaiting that task (aiokafka issue #647)
    await asyncio.sleep(0)
    try:
        yield consumer
    finally:
        await consumer.stop()


async def _scan(consumer: AIOKafkaConsumer, topic: str, tps: list, end: dict,
                on_records: Callable[[int, list], None]) -> None:
    """``scan_log``'s fetch loop over partitions ``tps`` of ``topic`` from their beginning up to ``end``, through
    ``consumer``. One partition alone is fetched up to FETCH_BYTES at a time."""
    if tps:
        begin = await consumer.beginning_offsets(tps)
        pos = {tp: begin[tp] for tp in tps if begin[tp] < end[tp]}
        part_bytes = PARTITION_BYTES if len(tps) > 1 else FETCH_BYTES
        client = consumer._client
        last_progress = {tp: time.monotonic() for tp in pos}
        last_ok = [time.monotonic()]   # the last fetch answered

        async def fetch(active: list) -> list:
            by_node: dict[Any, list] = {}
            for tp in active:
                by_node.setdefault(client.cluster.leader_for_partition(tp), []).append(tp)
            try:
                if None in by_node or -1 in by_node:
                    raise Errors.LeaderNotAvailableError(f"no leader known for a partition of {topic}")
                reqs = [client.send(node, FetchRequest(500, 1, FETCH_BYTES, READ_COMMITTED,
                                                       [(topic, [(tp.partition, pos[tp], part_bytes)
                                                                 for tp in ps])]))
                        for node, ps in by_node.items()]
                return list(await asyncio.gather(*reqs))
            except Errors.KafkaError:  # the broker away or moving: retried, for STALL_S at most
                if time.monotonic() - last_ok[0] > STALL_S:
                    raise
                await asyncio.sleep(0.2)
                await client.force_metadata_update()
                return []

        pending = asyncio.ensure_future(fetch(list(pos)))
        try:
            while pending is not None:
                responses = await pending
                pending = None
                if responses:
                    last_ok[0] = time.monotonic()
                runs: list[tuple[int, Any, int, int, int]] = []   # (partition, batch, its base, from, to offset)
                served: list[TopicPartition] = []
                stale = False
                now = time.monotonic()
                for resp in responses:
                    for _topic, parts in resp.topics:
                        for partition, code, _hw, *pd in parts:
                            tp = TopicPartition(topic, partition)
                            if tp not in pos:
                                continue
                            err = Errors.for_code(code)
                            if err is not Errors.NoError:
                                if err.retriable and now - last_progress[tp] <= STALL_S:
                                    stale = True
                                    continue
                                raise err(f"fetch {tp}")
                            start, stop = pos[tp], end[tp]
                            nxt = _walk(MemoryRecords(pd[-1]), pd[-2] if resp.API_VERSION < 11 else pd[2],
                                        partition, start, stop, runs)
                            if nxt > start:
                                pos[tp] = nxt
                                last_progress[tp] = now
                                served.append(tp)
                            elif resp.API_VERSION >= 4 and pd[0] > start:
                                # committed records beyond our position (last stable offset), none in this
                                # response: it was full before this partition's turn. Waiting, not stalled
                                last_progress[tp] = now
                            if nxt >= stop:
                                del pos[tp]
                for tp in [tp for tp in pos if now - last_progress[tp] > STALL_S and now - last_ok[0] < 1.0]:
                    del pos[tp]   # answered, yet no progress: only an open transaction left below the captured end
                for tp in served:  # the broker fills a response in the order asked: the partitions just served last
                    if tp in pos:
                        pos[tp] = pos.pop(tp)
                if stale:
                    await client.force_metadata_update()
                if pos:
                    pending = asyncio.ensure_future(fetch(list(pos)))
                for partition, batch, base, lo, hi in runs:
                    if base >= lo and batch.next_offset <= hi:
                        on_records(partition, list(batch))
                    else:
                        on_records(partition, [r for r in batch if lo <= r.offset < hi])
        finally:
            if pending is not None:
                pending.cancel()


def _walk(records: MemoryRecords, aborted: Optional[list], partition: int, start: int, stop: int,
          runs: list) -> int:
    """Append the data batches of one partition's fetched records that hold offsets in [start, stop) to ``runs``;
    returns the next offset to fetch. read_committed, as aiokafka's ``PartitionRecords._unpack_records``."""
    aborted = sorted(aborted or [], key=lambda x: x[1])
    aborted_producers: set = set()
    nxt = start
    while records.has_next():
        b = records.next_batch()
        if not b.validate_crc():
            raise Errors.CorruptRecordException(f"invalid CRC in partition {partition} after offset {nxt}")
        pid = b.producer_id
        if pid is not None:
            while aborted and aborted[0][1] <= b.base_offset:
                aborted_producers.add(aborted.pop(0)[0])
            if b.is_control_batch:
                if ControlRecord.parse(next(b).key) == ABORT_MARKER:
                    aborted_producers.discard(pid)
                nxt = max(nxt, b.next_offset)
                continue
            if b.is_transactional and pid in aborted_producers:
                nxt = max(nxt, b.next_offset)
                continue
        elif b.is_control_batch:
            nxt = max(nxt, b.next_offset)
            continue
        base = getattr(b, "base_offset", -1)  # none on legacy (v0/v1) batches: trimmed record by record
        if b.next_offset > start and base < stop:
            runs.append((partition, b, base, start, stop))
        nxt = max(nxt, b.next_offset)
    return nxt


async def read_log(bootstrap: str, topic: str, on_message: Callable[[Any], None],
                   ends: Optional[dict] = None) -> int:
    """``on_message(record)`` for every committed record of ``topic`` up to ``ends`` (default: the end offsets now),
    each partition in log order (``record.key``, ``.value``, ``.offset``). Returns the number of records."""
    n = [0]

    def on_records(_p: int, recs: list) -> None:
        n[0] += len(recs)
        for m in recs:
            on_message(m)

    await scan_log(bootstrap, topic, on_records, ends)
    return n[0]


async def end_offsets(bootstrap: str, topic: str) -> dict:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic)
        return await consumer.end_offsets(tps) if tps else {}
    finally:
        await consumer.stop()


# ---------------------------------------------------------------------------------------------------- the fold

async def read_anonymous(bootstrap: str, topic: str, ends: Optional[dict] = None) -> tuple[int, dict[str, list]]:
    """The anonymous-only events of the ``touchpoints`` log per cookie, in partition order (joins rebuild their
    anonymous state from them); returns (touchpoints read, {anonymous id: [event dict, or its raw bytes]}).
    ``ends``: the partitions to read and their end offsets (0 = not this one; default: all of the log)."""
    anon: dict[str, list] = {}
    n_tp = [0]

    def on_touchpoints(_p: int, recs: list) -> None:
        n_tp[0] += len(recs)
        collect_anonymous(recs, anon)

    if ends is None or any(ends.values()):
        await scan_log(bootstrap, topic, on_touchpoints, ends)
    return n_tp[0], anon


async def fold_lead_log(bootstrap: str, topic: str, books: list[RuleBook], anon: dict[str, list],
                        ends: dict, claim: Optional[Callable[[], Optional[tuple[TopicPartition, int]]]] = None) -> dict:
    """Fold the lead-keyed log up to ``ends`` under each book; returns ``{"mqls": [[...] per book], "records",
    "leads", "short_joins", "left_out"}`` (``left_out``: records the live lead stage dead-letters unfolded). Then,
    with ``claim``, the partitions ``claim()`` hands out with their end offsets, one at a time until it returns None,
    each read and folded before the next is claimed (``fold_books``: the processes' last partitions)."""
    folds = [LogFold(b, anon) for b in books]
    # The lead-keyed records are grouped by lead (raw key and value bytes) as they arrive; every CHUNK records the
    # groups are decoded and folded lead by lead, each book in turn. Leads are independent and each keeps its log
    # order, so this is the fold in log order, only faster: a lead's state and its records stay in the CPU caches
    # while they are decoded and folded, and no per-record object outlives its group.
    groups: dict[bytes, list[bytes]] = {}
    queued = [0, 0, 0]   # records in the groups, records read, records left out

    def flush() -> None:
        for key, raw in groups.items():
            recs, left_out = lead_records(raw)
            queued[2] += left_out
            lead = key.decode()
            for f in folds:
                f.apply_many(lead, recs)
        groups.clear()
        queued[0] = 0

    def on_records(_p: int, recs: list) -> None:
        get = groups.get
        for r in recs:
            k = r.key
            g = get(k)
            if g is None:
                groups[k] = [r.value]
            else:
                g.append(r.value)
        queued[0] += len(recs)
        queued[1] += len(recs)
        if queued[0] >= CHUNK:
            flush()

    if any(ends.values()):
        await scan_log(bootstrap, topic, on_records, ends)
    flush()
    got = claim() if claim is not None else None
    if got is not None:
        async with _reader(bootstrap) as consumer:
            while got is not None:
                tp, end = got
                await _scan(consumer, topic, [tp], {tp: end}, on_records)
                flush()
                got = claim()
    return {"records": queued[1], "mqls": [f.mqls for f in folds], "leads": len(folds[0].states) if folds else 0,
            "short_joins": [f.short_joins for f in folds], "left_out": queued[2]}


def _balanced_ends(ends: dict, shards: int) -> list[dict]:
    """The lead-keyed partitions dealt to ``shards`` shards, each (largest first, by end offset) to the least
    loaded one; returns the ends each shard reads (0 = not its partition). Any split of the partitions gives the
    same result (leads are independent); a balanced one finishes sooner."""
    load = [0] * shards
    owner = {}
    for tp in _largest_first(ends):
        i = min(range(shards), key=lambda j: (load[j], j))
        owner[tp] = i
        load[i] += ends[tp]
    return [{tp: (n if owner.get(tp) == i else 0) for tp, n in ends.items()} for i in range(shards)]


def fold_log(bootstrap: str, topics: Topics, books: list[RuleBook], ends: Optional[dict] = None) -> dict:
    """Fold the log under each book; returns ``{"mqls": [[...] per book], "touchpoints", "records", ...}``.
    ``ends``: the lead-keyed log's partitions and end offsets to fold (0 = not this shard's; default: all of it)."""
    async def run() -> dict:
        lead_ends = ends if ends is not None else await end_offsets(bootstrap, topics.by_lead)
        n_tp, anon = await read_anonymous(bootstrap, topics.touchpoints)
        out = await fold_lead_log(bootstrap, topics.by_lead, books, anon, lead_ends)
        out["touchpoints"] = n_tp
        return out

    with gc_off():
        return asyncio.run(run())


def _fold_shard(bootstrap: str, topics: dict, books: list[list[dict]], ends: dict) -> dict:
    """Spawned worker entry (a process per shard of the lead-keyed partitions): rule sets travel as JSON."""
    return fold_log(bootstrap, Topics(**topics), [RuleBook([RuleSet.model_validate(s) for s in b]) for b in books],
                    ends=ends)


def _fold_child(conn: Any, bootstrap: str, topics: Topics, books: list[RuleBook], tp_ends: dict,
                ends: dict, claim: Callable[[], Optional[tuple[TopicPartition, int]]]) -> None:
    """Forked worker: read its share of the ``touchpoints`` partitions, swap the anonymous events with the parent
    (it sends its share, receives the others'), fold its share of the lead-keyed partitions and those it claims,
    and send the result (or the error) back; exit without the interpreter's teardown (freeing every lead state one
    by one would only cost time)."""
    try:
        try:
            n_tp, mine = asyncio.run(read_anonymous(bootstrap, topics.touchpoints, tp_ends))
            conn.send(("anonymous", mine))
            others = conn.recv()
            anon = merge_anonymous([mine, *others])
            result = asyncio.run(fold_lead_log(bootstrap, topics.by_lead, books, anon, ends, claim))
            result["touchpoints"] = n_tp
            out: tuple = ("ok", result)
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
            import traceback

            out = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        conn.send(out)
        conn.close()
    finally:
        os._exit(0)


def _largest_first(ends: dict) -> list[TopicPartition]:
    """The partitions with records in ``ends``, the largest (end offset) first."""
    return sorted((tp for tp, n in ends.items() if n > 0), key=lambda tp: (-ends[tp], tp.partition))


def _claims(items: list, taken: Any) -> Callable[[], Any]:
    """``claim()`` over ``items`` shared by forked processes: each call hands out the next item not yet handed out to
    any of them (``taken``: a ``multiprocessing.Value`` counter made before the fork), then None."""
    def claim() -> Any:
        with taken.get_lock():
            i = taken.value
            taken.value = i + 1
        return items[i] if i < len(items) else None
    return claim


def _from_child(conn: Any, want: str) -> Any:
    """The child's next message, which must be ``want``; its error (or its death) raised here."""
    try:
        status, out = conn.recv()
    except EOFError:
        status, out = "error", "the worker exited without a result"
    if status != want:
        raise RuntimeError(f"back-test worker failed: {out}")
    return out


def fold_books(bootstrap: str, topics: Topics, books: list[RuleBook], jobs: int = 1) -> dict:
    """``fold_log`` in ``jobs`` processes, each folding every book over a part of the lead-keyed partitions; results
    are merged in process order.

    This process forks ``jobs - 1`` children and folds beside them: the children inherit the rule books and the
    interpreter (no start-up, no re-import: ≈ 1 s per process on this machine). Every process reads a share of the
    ``touchpoints`` partitions (balanced by size, ``_balanced_ends``) for the anonymous events that joins rebuild,
    and the shares are swapped through pipes, so that serial read is split too. The lead-keyed partitions: the
    largest are dealt out the same way (each process reads its share in one pipelined scan), the smallest two per
    process are then claimed one by one by whichever process is free first. When this process has other threads
    (forking them is unsafe), every shard runs in a spawned process that reads the whole touchpoints log itself
    and folds a fixed share of the lead-keyed partitions."""
    if jobs <= 1:
        return fold_log(bootstrap, topics, books)
    import multiprocessing
    import threading

    if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("fork")
        with gc_off():
            async def prepare() -> tuple[dict, dict]:
                return await end_offsets(bootstrap, topics.by_lead), await end_offsets(bootstrap, topics.touchpoints)

            ends, tp_ends = asyncio.run(prepare())
            # the smallest lead-keyed partitions are claimed, not dealt out: a process slower than the other (its
            # leads cost more, or the machine gives it less CPU) then does not leave the other waiting for it at the
            # end (the parent had waited 0.1-0.5 s of ≈ 2 s). Each claimed partition is read on its own, without the
            # pipelined fetch of a share: claiming them all had cost as much as it saved
            order = _largest_first(ends)
            pool = order[len(order) - min(len(order) // 2, 2 * jobs):]
            split = _balanced_ends({tp: (0 if tp in pool else n) for tp, n in ends.items()}, jobs)
            tp_split = _balanced_ends(tp_ends, jobs)
            claim = _claims([(tp, ends[tp]) for tp in pool], ctx.Value("i", 0))
            children = []
            for shard in range(1, jobs):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=_fold_child, daemon=True,
                                   args=(theirs, bootstrap, topics, books, tp_split[shard], split[shard], claim))
                proc.start()
                theirs.close()
                children.append((proc, mine))
            try:
                n_tp, own = asyncio.run(read_anonymous(bootstrap, topics.touchpoints, tp_split[0]))
                shares = [own] + [_from_child(conn, "anonymous") for _proc, conn in children]
                for i, (_proc, conn) in enumerate(children, start=1):
                    conn.send(shares[:i] + shares[i + 1:])
                anon = merge_anonymous(shares)
                del shares
                parts = [asyncio.run(fold_lead_log(bootstrap, topics.by_lead, books, anon, split[0], claim))]
                parts[0]["touchpoints"] = n_tp
                for proc, conn in children:
                    parts.append(_from_child(conn, "ok"))
                    proc.join()
            finally:
                for proc, _conn in children:
                    if proc.is_alive():
                        proc.kill()
                        proc.join()
        touchpoints = sum(p["touchpoints"] for p in parts)  # each process read a share
    else:
        docs = [[rs.model.model_dump(mode="json", by_alias=True, exclude_none=True) for rs in b.sets] for b in books]
        tdict = {k: getattr(topics, k) for k in Topics.__dataclass_fields__}
        split = _balanced_ends(asyncio.run(end_offsets(bootstrap, topics.by_lead)), jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            parts = list(ex.map(_fold_shard, [bootstrap] * jobs, [tdict] * jobs, [docs] * jobs, split))
        touchpoints = parts[0]["touchpoints"]  # each spawned shard read the whole log
    return {"touchpoints": touchpoints, "records": sum(p["records"] for p in parts),
            "left_out": sum(p["left_out"] for p in parts),
            "leads": sum(p["leads"] for p in parts),
            "mqls": [[m for p in parts for m in p["mqls"][i]] for i in range(len(books))],
            "short_joins": [sum(p["short_joins"][i] for p in parts) for i in range(len(books))]}


# ---------------------------------------------------------------------------------------------------- comparison

def _iso(x: float) -> str:
    return core.iso_from_epoch(x)


def week_of(x: float) -> date:
    d = datetime.fromtimestamp(x, timezone.utc).date()
    return d - timedelta(days=d.weekday())


def compare(base: list[tuple], cand: list[tuple], t1: Optional[float], t2: Optional[float]) -> dict:
    def inside(m: tuple) -> bool:
        return (t1 is None or m[2] >= t1) and (t2 is None or m[2] < t2)

    base = [m for m in base if inside(m)]
    cand = [m for m in cand if inside(m)]
    weeks: dict[date, list[int]] = {}
    for i, ms in enumerate((base, cand)):
        for m in ms:
            weeks.setdefault(week_of(m[2]), [0, 0])[i] += 1
    first: list[dict[str, tuple]] = [{}, {}]
    count: list[dict[str, int]] = [{}, {}]
    for i, ms in enumerate((base, cand)):
        for m in ms:
            if m[0] not in first[i] or m[2] < first[i][m[0]][2]:
                first[i][m[0]] = m
            count[i][m[0]] = count[i].get(m[0], 0) + 1
    changes = {"earlier": 0, "later": 0, "same": 0, "never": 0, "new": 0}
    rows = []
    for lead in sorted(set(first[0]) | set(first[1])):
        b, c = first[0].get(lead), first[1].get(lead)
        if b and c:
            kind = "earlier" if c[2] < b[2] else "later" if c[2] > b[2] else "same"
        else:
            kind = "never" if b else "new"
        changes[kind] += 1
        if kind != "same":
            rows.append({"lead": lead, "change": kind,
                         "baseline_mql_at": _iso(b[2]) if b else "", "candidate_mql_at": _iso(c[2]) if c else "",
                         "delta_days": round((c[2] - b[2]) / 86400.0, 6) if b and c else "",
                         "baseline_mqls": count[0].get(lead, 0), "candidate_mqls": count[1].get(lead, 0),
                         "baseline_cause": b[3] if b else "", "candidate_cause": c[3] if c else ""})
    return {"mqls": {"baseline": len(base), "candidate": len(cand)},
            "weeks": [{"week": f"{w.isocalendar()[0]}-W{w.isocalendar()[1]:02d}", "start": w.isoformat(),
                       "baseline": v[0], "candidate": v[1]} for w, v in sorted(weeks.items())],
            "leads": changes, "differences": rows}


CSV_FIELDS = ("lead", "change", "baseline_mql_at", "candidate_mql_at", "delta_days", "baseline_mqls",
              "candidate_mqls", "baseline_cause", "candidate_cause")


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)


def always(sets: list[RuleSet]) -> list[RuleSet]:
    """The candidate with its earliest rule set in force from the beginning of time."""
    if not sets:
        return sets
    first = min(sets, key=lambda r: r.effective_from)
    return [r.model_copy(update={"effective_from": _EPOCH0}) if r is first else r for r in sets]


async def live_mqls(bootstrap: str, topic: str) -> list[tuple[str, int, float, str]]:
    """The hand-offs the live processor actually emitted (deduped by id), as fold_log reports MQLs."""
    from services.derived_reader import read_topic

    out = []
    for h in await read_topic(bootstrap, topic):
        if h.get("type") == "lead_handed_off":
            out.append((h["lead"], int(h["episode"]), core.parse_ts(h["at"]), h.get("cause_event_id") or ""))
    return out


def run(bootstrap: str, topics: Topics, candidate: RuleBook, baseline: Optional[RuleBook], t1: Optional[datetime],
        t2: Optional[datetime], jobs: int = 1) -> dict:
    """Back-test ``candidate`` against ``baseline`` (None: the live hand-offs on the lead-handoffs topic)."""
    t0 = time.perf_counter()
    if baseline is None:
        folded = fold_books(bootstrap, topics, [candidate], jobs)
        base = asyncio.run(live_mqls(bootstrap, topics.handoffs))
        cand = folded["mqls"][0]
        folded["short_joins"] = [None, *folded["short_joins"]]
    else:
        folded = fold_books(bootstrap, topics, [baseline, candidate], jobs)
        base, cand = folded["mqls"]
    out = compare(base, cand, t1.timestamp() if t1 else None, t2.timestamp() if t2 else None)
    dt = time.perf_counter() - t0
    n = folded["touchpoints"]
    out.update(window={"from": t1.isoformat() if t1 else None, "to": t2.isoformat() if t2 else None},
               baseline={"rules_versions": [r.version for r in baseline.sets]} if baseline is not None
               else {"live_handoffs": topics.handoffs},
               candidate={"rules_versions": [r.version for r in candidate.sets]},
               log={"touchpoints": n, "lead_log_records": folded["records"],
                    "lead_log_records_left_out": folded["left_out"], "leads": folded["leads"],
                    "joins_short_of_events": folded["short_joins"]},
               elapsed_s=round(dt, 3), events_per_s=round(n / dt) if dt > 0 else None)
    return out


def _time(s: str) -> datetime:
    dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = datetime.fromisoformat(s + "T00:00:00+00:00") if len(s) == 10 else dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


MAX_DEFAULT_JOBS = 4   # every process holds the whole anonymous-event index: more only when asked for


def default_jobs() -> int:
    """``LEADLEDGER_BACKTEST_JOBS``, else the CPUs this process may run on (at most MAX_DEFAULT_JOBS)."""
    env = os.environ.get("LEADLEDGER_BACKTEST_JOBS")
    if env:
        return int(env)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # macOS
    return max(1, min(MAX_DEFAULT_JOBS, usable))


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--events" or a.startswith("--events=") for a in argv):
        from projections import backtest

        return backtest.main(argv)  # the offline file form, unchanged
    p = argparse.ArgumentParser(prog="leadledger backtest",
                                description="back-test rules over the Kafka log against the rules that were in force "
                                            "(or, with --events FILE, fold a JSONL file offline)")
    p.add_argument("--rules", action="append", required=True, metavar="NEW.yaml", help="candidate rule set file(s)")
    p.add_argument("--from", dest="t1", type=_time, help="window start (RFC 3339 or YYYY-MM-DD, inclusive)")
    p.add_argument("--to", dest="t2", type=_time, help="window end (exclusive)")
    p.add_argument("--baseline-rules", action="append", metavar="FILE",
                   help="baseline rule sets (default: those published on the rules topic)")
    p.add_argument("--baseline-live", action="store_true",
                   help="baseline = the hand-offs the live processor emitted (lead-handoffs topic) instead of a "
                        "re-fold under the published rules: one fold instead of two")
    p.add_argument("--always", action="store_true", help="the candidate applies from the beginning of time")
    p.add_argument("--csv", metavar="FILE", help="write the leads whose MQL changed")
    p.add_argument("--jobs", type=int, default=default_jobs(),
                   help="processes, each folding a shard of the lead-keyed partitions (env LEADLEDGER_BACKTEST_JOBS; "
                        f"default: the CPUs this process may use, at most {MAX_DEFAULT_JOBS})")
    p.add_argument("--bootstrap", default=None, help="Kafka (env LEADLEDGER_KAFKA_BOOTSTRAP)")
    a = p.parse_args(argv)
    s = Settings()
    bootstrap = a.bootstrap or s.bootstrap
    try:
        cand_sets = [rs for f in a.rules for rs in load_rule_sets(f)]
        candidate = RuleBook(always(cand_sets) if a.always else cand_sets)
        baseline: Optional[RuleBook]
        if a.baseline_live:
            baseline = None
        elif a.baseline_rules:
            baseline = RuleBook.from_paths(a.baseline_rules)
        else:
            from services.rules_log import book_from_log

            baseline = asyncio.run(book_from_log(bootstrap))
            if not baseline.sets:
                print("leadledger backtest: no rule set on the rules topic; publish the rules in force with "
                      "`leadledger rules publish FILE` or give --baseline-rules", file=sys.stderr)
                return 2
    except RuleSetError as e:
        print(str(e), file=sys.stderr)
        return 1
    out = run(bootstrap, s.topics, candidate, baseline, a.t1, a.t2, a.jobs)
    rows = out.pop("differences")
    if a.csv:
        write_csv(a.csv, rows)
        out["csv"] = {"path": a.csv, "rows": len(rows)}
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    print(f"backtest: {out['log']['touchpoints']} touchpoints, {out['log']['lead_log_records']} lead-log records in "
          f"{out['elapsed_s']}s ({out['events_per_s']} events/s); MQLs {out['mqls']['baseline']} -> "
          f"{out['mqls']['candidate']}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

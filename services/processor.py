"""The live stream processor on faust-streaming: identity (stage 1), then the lead fold (stage 2).

Stage 1 (`identity` agent) reads `touchpoints` (keyed by the subject as sent) and `touchpoints-by-anon` (join
requests keyed by anonymous id). It owns the table anonymous id → (its lead, or the anonymous subject's compact
fold state). A lead's own events (lead id or email) go straight to `touchpoints-by-lead`, keeping their log order;
one that also carries an anonymous id sends a join request to `touchpoints-by-anon`, decided where that id's table
partition lives: the first join wins and sends the anonymous state to the lead as a merge record
(`projections.lead_log`). Anonymous-only events are folded into the anonymous state, or forwarded to their lead
once joined. Stage 2 (`leads` agent) reads `touchpoints-by-lead` — one ordered log per lead, also the input of
replays — and folds it with the pure code of `projections.lead_log`/`projections.fold`, writing derived events
keyed by lead to topics with the same partition count (co-partitioned).

Exactly once *in effect*, by construction rather than by faust's transactions (see README):
- each batch: fold in memory → send derived events and await their acknowledgement → write each touched
  table entry once and await its changelog record's acknowledgement; only then does the agent take the next
  batch, whose taking acks this one, and faust commits acked offsets only (at_least_once);
- redelivered input is recognised by its event id (each lead remembers its last 1,000–2,000 ids; a join
  resolution is applied only while the lead waits for it), so a replayed batch changes nothing;
- faust's commits are checked: one that would move past an input record no batch of ours completed (faust can
  drop fetched records around a rebalance) stops the worker instead (`_guard_commits`);
- derived events carry deterministic ids, so the only possible effect of a crash between "derived sent" and
  "state stored" is the same derived event written again with the same id; every consumer of ours dedupes on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sys
from typing import Any, AsyncIterator

import faust
import orjson
from faust.types import TP

from events.upcast import upcast
from events.wire import check_envelope, decode
from projections import fold as core
from projections import lead_log
from projections.rules import RuleBook
from services import faust_consumer, kafka_io, runtime
from services.config import Settings, default_rules_paths, settings as load_settings

log = logging.getLogger("leadledger.processor")

RESTART_EXIT = 70  # exit status of a worker that stopped on purpose and asks its supervisor for a restart



LEAD_CACHE_SIZE = int(os.environ.get("LEADLEDGER_LEAD_CACHE", "20000"))  # decoded lead states kept

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class QuietWorker(faust.Worker):
    """faust's worker draws a terminal spinner at levels >= WARN and, for it, sets the root logger to DEBUG: every
    debug call in faust and aiokafka (several per record sent) then builds a LogRecord that only the spinner looks
    at — ~8 % of a busy worker's CPU. No spinner here: the root logger keeps the level asked for."""

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        self.spinner = None


def create_app(cfg: Settings | None = None, rules: RuleBook | None = None, app_id: str | None = None,
               batch_size: int | None = None) -> faust.App:
    cfg = cfg or load_settings()
    # the most records per batch; a batch is what is ready (`faust_consumer.ready_batches`)
    batch_size = batch_size or int(os.environ.get("LEADLEDGER_BATCH_SIZE", "500"))
    os.makedirs(os.path.join(ROOT, "var", "processor"), exist_ok=True)
    book = rules or RuleBook.from_paths(list(cfg.rules_paths) or default_rules_paths())
    t = cfg.topics
    app = faust.App(
        app_id or os.environ.get("LEADLEDGER_PROCESSOR_ID", "leadledger-processor"),
        broker=[f"kafka://{b}" for b in cfg.bootstrap.split(",")],
        store=os.environ.get("LEADLEDGER_PROCESSOR_STORE", "memory://"),
        datadir=os.environ.get("LEADLEDGER_PROCESSOR_DATADIR", os.path.join(ROOT, "var", "processor", "{conf.name}")),
        processing_guarantee="at_least_once",
        topic_partitions=cfg.partitions,
        topic_replication_factor=1,
        topic_allow_declare=True,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        web_host="127.0.0.1",
        web_in_thread=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=float(os.environ.get("LEADLEDGER_SESSION_TIMEOUT", "10")),
        broker_heartbeat_interval=float(os.environ.get("LEADLEDGER_HEARTBEAT_INTERVAL", "1")),
        broker_commit_interval=float(os.environ.get("LEADLEDGER_COMMIT_INTERVAL", "0.5")),
        table_standby_replicas=0,
        producer_acks=-1,
        # one record batch per partition and produce request holds a whole agent batch's records (lead states are
        # a few KiB each): the producer keeps one request in flight per broker, so 16 KiB batches queued behind
        # each other cost a broker round trip each
        producer_max_batch_size=256 * 1024,
        producer_max_request_size=kafka_io.MAX_RECORD_BYTES,  # a lead's state is one record (kafka_io says why)
        stream_wait_empty=False,
        Worker=QuietWorker,
    )
    # before the consumer exists (created lazily)
    app.transport.Consumer = faust_consumer.FetchConsumer  # type: ignore[misc]

    def topic(name: str) -> faust.TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                         partitions=cfg.partitions)

    by_anon_name = t.by_anon
    by_anon = topic(by_anon_name)
    by_lead = topic(t.by_lead)
    stage1_in = app.topic(t.touchpoints, by_anon_name, key_type=bytes, value_type=bytes, key_serializer="raw",
                          value_serializer="raw", partitions=cfg.partitions)
    out_topics = {
        "lead_scored": topic(t.scores),
        "lead_stage_changed": topic(t.stages),
        "lead_handed_off": topic(t.handoffs),
        "intent_alert": topic(t.intent_alerts),
        "event_rejected": topic(t.rejected),
    }
    # bytes keys and values with the app's raw serializers; use_partitioner: written once per batch
    # their changelog records are whole states (`main` creates the changelogs with these settings before faust)
    changelog_settings = kafka_io.topic_configs(compacted=True)
    identity = app.Table("identity", default=None, key_type=bytes, value_type=bytes, partitions=cfg.partitions,
                         use_partitioner=True, extra_topic_configs=changelog_settings)
    leads = app.Table("leads", default=None, key_type=bytes, value_type=bytes, partitions=cfg.partitions,
                      use_partitioner=True, extra_topic_configs=changelog_settings)
    rejected = out_topics["event_rejected"]

    out_names = {k: v.get_topic_name() for k, v in out_topics.items()}
    by_lead_name, rejected_name = by_lead.get_topic_name(), rejected.get_topic_name()

    async def produce(sends: list[tuple[str, bytes, bytes]]) -> list[Any]:
        """Send every record and wait until the broker acknowledged each (acks=all); a failure raises.

        Straight to the transport's aiokafka producer, not through faust's `Topic.send` (or, for tables, its
        `send_soon` buffer, which is drained one record per event-loop round and whose flush gives up after
        0.1 s with records still queued): appending does not yield to the event loop, so a batch's records
        leave in a few produce requests instead of about one each. The partition is chosen by the producer's
        default partitioner, which faust's tables with `use_partitioner=True` and the ingest service use too."""
        if not sends:
            return []
        prod = app.producer._ensure_producer()
        futs = []
        for topic, k, v in sends:
            part = partition_of.get((topic, k))
            futs.append(await prod.send(topic, value=v, key=k, partition=part))
            if part is None and len(partition_of) < 200_000:
                partition_of[(topic, k)] = prod._partition(topic, None, None, None, k, None)
        return await asyncio.gather(*futs)

    async def warm_up() -> None:
        """Learn every output topic's partitions before the first batch: otherwise the first record to each topic
        waits for a metadata round trip of its own, and the first hand-off after a start waited ~1 s for them.
        (Each agent calls it; once the metadata is known, the second call returns at once.)"""
        prod = app.producer._ensure_producer()
        names = [*out_names.values(), by_lead_name, by_anon_name, identity.changelog_topic.get_topic_name(),
                 leads.changelog_topic.get_topic_name()]
        await asyncio.gather(*(prod.partitions_for(n) for n in names))

    # the default partitioner's choice per (topic, key): a pure-Python murmur2 per record otherwise. Partition
    # counts are fixed (co-partitioning depends on it); a key is looked up once the topic's metadata is known
    partition_of: dict[tuple[str, bytes], int] = {}

    async def store(table: Any, items: dict[bytes, bytes]) -> None:
        """Write each touched table entry once: the local store, and its changelog record, acknowledged.

        What `table[k] = v` does (faust's `on_key_set` + the at_least_once branch of `_on_changelog_sent`), with
        the changelog record awaited here rather than queued in faust's producer buffer."""
        if not items:
            return
        table.raw_update(items)  # the local store, without faust's per-key changelog send
        changelog = table.changelog_topic.get_topic_name()
        metas = await produce([(changelog, k, v) for k, v in items.items()])
        last: dict[int, int] = {}
        for m in metas:
            last[m.partition] = max(m.offset, last.get(m.partition, -1))
        for partition, offset in last.items():  # a persistent store resumes recovery after these
            table.data.set_persisted_offset(TP(changelog, partition), offset)

    done_upto: dict[Any, int] = {}  # per input partition: 1 + the highest offset whose batch completed here
    stall_after = float(os.environ.get("LEADLEDGER_STALL_SECONDS", "60"))
    watch_every = max(1.0, stall_after / 6)
    probe_timeout = min(5.0, watch_every)  # a probe of the broker that takes longer counts as no progress
    watched = {t.touchpoints, by_anon_name, t.by_lead}
    stalled_since: dict[Any, tuple[int, float]] = {}  # partitions with a backlog: (offset at, since when)
    quiet: dict[str, Any] = {}  # while the watchdog skips: why, since when, recovery progress, last log
    generation = [None]  # the consumer generation the watchdog's records belong to

    def stuck_for(tp: Any, at: int, backlog: bool, now: float) -> float:
        """How long `tp` has stayed at offset `at` with a backlog (0 when it moved or has none)."""
        if not backlog:
            stalled_since.pop(tp, None)
            return 0.0
        first = stalled_since.setdefault(tp, (at, now))
        if first[0] != at:
            stalled_since[tp] = (at, now)
            return 0.0
        return now - first[1]

    def skipping(why: str, progress_mark: Any, now: float) -> None:
        """The watchdog cannot judge partitions now (a rebalance, a table recovery). That is a stall too when it
        lasts: log why it is quiet once per stall window, and stop once it lasted twice the window (a recovery
        that still reads its changelogs restarts the clock)."""
        if quiet.get("why") != why:
            quiet.clear()
            quiet.update(why=why, since=now, mark=progress_mark, logged=now)
            return
        if quiet["mark"] != progress_mark:  # the recovery read more of its changelogs: not stuck
            quiet.update(since=now, mark=progress_mark)
            return
        lasted = now - quiet["since"]
        if lasted >= 2 * stall_after:
            _stop_hard(f"{why} for {lasted:.0f}s (more than twice LEADLEDGER_STALL_SECONDS={stall_after:g}) "
                       f"[{_fetch_state(app, watched)}]")
        if now - quiet["logged"] >= stall_after:
            quiet["logged"] = now
            log.warning("stall watchdog quiet: %s for %.0fs; stops the worker at %.0fs", why, lasted,
                        2 * stall_after)

    @app.timer(interval=watch_every)
    async def stall_watchdog() -> None:
        """Input that is on the broker but does not get done stops the worker loudly, so its supervisor restarts
        it: nothing is lost, input is re-read from the committed offsets and deduplicated by event id. Nothing here
        touches faust's state.

        Progress is measured where it matters, not at the fetcher: per assigned input partition, the committed
        offset (faust commits every LEADLEDGER_COMMIT_INTERVAL what was acked, and the commit guard refuses any
        commit past a record whose batch did not complete here; before a partition's first commit, the offset past
        the batches completed here). A partition whose broker end offset is beyond it and whose commit does not move
        for LEADLEDGER_STALL_SECONDS (and whose gap the log confirms holds records, not only transaction markers)
        is stalled — whether the fetch stopped, an agent hangs, or faust read records and dropped them without
        acking them: its fetch position is then at the end and its commits stop below the hole. The previous check
        compared fetch positions with the end and stayed silent for minutes in that case.

        The watchdog itself cannot hang: each broker probe has a timeout, and a probe that does not answer counts as
        no progress. While a rebalance or a table recovery is under way it skips the partitions, and stops the worker
        when that lasts more than twice the stall window."""
        consumer = app.consumer
        now = asyncio.get_running_loop().time()
        recovery = app.tables.recovery
        if not recovery.completed.is_set():
            stalled_since.clear()
            skipping("table recovery has not completed", sum(recovery.active_offsets.values()), now)
            return
        if app.rebalancing:
            stalled_since.clear()
            skipping("rebalancing has stayed set", None, now)
            return
        quiet.clear()
        if generation[0] != app.consumer_generation_id:  # a new assignment: start over from faust's commits
            generation[0] = app.consumer_generation_id
            stalled_since.clear()
            done_upto.clear()
        assigned = [tp for tp in consumer.assignment() if tp.topic in watched]
        if not assigned:
            return
        try:
            ends: dict[Any, int] | None = dict(await asyncio.wait_for(consumer.highwaters(*assigned),
                                                                       timeout=probe_timeout))
        except asyncio.TimeoutError:
            ends = None
            log.warning("stall watchdog: the end offsets of %d partition(s) did not come within %.0fs",
                        len(assigned), probe_timeout)
        committed = getattr(consumer, "_committed_offset", {})
        for tp in assigned:
            at = committed.get(tp)
            if at is None:  # nothing committed yet for it (a new group): what completed here
                at = done_upto.get(tp, 0)
            if ends is None:  # no answer: no progress
                stuck = now - stalled_since.setdefault(tp, (at, now))[1]
                hw = None
            else:
                hw = ends.get(tp)
                stuck = stuck_for(tp, at, hw is not None and hw > at, now)
            if stuck < stall_after:
                continue
            if hw is not None:  # only transaction markers (or compacted-away records) between: no backlog
                try:
                    present = await asyncio.wait_for(
                        kafka_io.record_offsets(cfg.bootstrap, tp.topic, tp.partition, at, hw,
                                                timeout_s=probe_timeout), timeout=2 * probe_timeout)
                except asyncio.TimeoutError:
                    present = None
                if present is not None and not present:
                    stalled_since[tp] = (at, now)
                    continue
            _stop_hard(f"partition {tp.topic}/{tp.partition}: input up to {hw} on the broker, not committed past "
                       f"offset {at} for {stuck:.0f}s (fetch position {_fetch_position(consumer, tp)}) "
                       f"[{_fetch_state(app, watched)}]")

    folded: dict[Any, set[int]] = {}  # input offsets whose batch is complete (derived sent, state stored)

    def guard_commits_once() -> None:
        """Guard faust's commits (called at every batch: the consumer exists once the first batch is in)."""
        if not getattr(app.consumer, "_leadledger_guarded", False):
            _guard_commits(app.consumer)

    def batch_done(batch: list[faust.EventT]) -> None:
        """The batch's effects are durable: its offsets may be committed (faust acks them after this)."""
        for ev in batch:
            tp, offset = ev.message.tp, ev.message.offset
            folded.setdefault(tp, set()).add(offset)
            if offset >= done_upto.get(tp, 0):
                done_upto[tp] = offset + 1

    def _guard_commits(consumer: Any) -> None:
        """Refuse any commit that would move past an input record we did not fold.

        faust-streaming 0.15.3 can drop records it fetched (a fetch cut short while partitions are paused or the
        flow is stopped around a rebalance or table recovery) and, when the next fetch continues past them, record
        the hole as a "gap" that its next commit treats as acknowledged: a lost join answer holds a lead forever, a
        lost touchpoint is never scored (the SIGKILL-restart and two-worker fail-over flakes). So every commit of an
        input partition is checked against the offsets whose batch completed here: a hole that the log confirms
        holds records (not transaction markers) stops the worker at once, before the commit, and the restart
        re-reads from below it. Checked at the commit, not on delivery: faust also hands over records out of order
        around a rebalance (a prefetched one ahead of the re-read, faust #221), which is harmless."""
        original = consumer._commit  # the driver's commit of the offsets faust decided on (at_least_once path)

        async def checked_commit(offsets: Any) -> bool:
            for tp, upto in offsets.items():
                if tp.topic not in watched:
                    continue
                done = folded.get(tp, set())
                base = consumer._committed_offset.get(tp)  # the commit before this one (faust's own record)
                if base is None:
                    base = min(done, default=upto)
                missing = [o for o in range(base, upto) if o not in done]
                if missing:
                    present = await kafka_io.record_offsets(cfg.bootstrap, tp.topic, tp.partition,
                                                            missing[0], missing[-1] + 1)
                    missing = [o for o in missing if present is None or o in present]
                if missing:
                    _stop_hard(f"faust was about to commit {tp.topic}/{tp.partition} up to {upto} past "
                               f"{len(missing)} record(s) never handed to us (from offset {missing[0]})")
            result = await original(offsets)
            for tp, upto in offsets.items():  # faust takes these as committed from here on, even when refused
                if tp in folded:
                    folded[tp] = {o for o in folded[tp] if o >= upto}
            return result

        consumer._commit = checked_commit
        consumer._leadledger_guarded = True

    @app.agent(stage1_in, name="identity")
    async def identity_agent(stream: faust.StreamT) -> Any:
        async with _crash_worker_on_error():
            await warm_up()
            async for batch in faust_consumer.ready_batches(stream, batch_size):
                sends: list[tuple[str, bytes, bytes]] = []
                requests: list[tuple[str, bytes, bytes]] = []
                touched: dict[bytes, bytes] = {}
                # anonymous states folded in this batch, kept decoded until the batch is stored (or a join request
                # reads the entry): a cookie's run of events costs one decode and one encode, not one each per event
                live: dict[bytes, _Anonymous] = {}

                def settle(akey: bytes) -> None:
                    """Write `akey`'s decoded state back into the batch's entries."""
                    held = live.pop(akey, None)
                    if held is not None:
                        touched[akey] = _pack_identity(b"S", held.upto, held.state.to_bytes())

                guard_commits_once()
                for ev in batch:
                    if ev.message.topic != t.touchpoints:  # a join request, keyed by its anonymous id
                        req = orjson.loads(ev.value)
                        akey = req["anonymous_id"].encode()
                        settle(akey)
                        mapped, upto, anon_state = _unpack_identity(touched.get(akey) or identity.get(akey))
                        lead_b = req["lead"].encode()
                        if mapped is None:  # the first join wins, forever
                            touched[akey] = _pack_identity(b"L", upto, lead_b)
                        else:
                            anon_state = None
                        sends.append((by_lead_name, lead_b, lead_log.resolution_record(
                            req["lead"], req["anonymous_id"], req["event_id"], anon_state)))
                        continue
                    # poison messages: dead-lettered with the reason, never dropped silently
                    try:
                        rec = decode(ev.value)
                    except Exception as exc:
                        sends.append((rejected_name, ev.key or b"",
                                      _rejected_raw(ev.value, f"invalid touchpoint: undecodable: {exc}")))
                        continue
                    problem = check_envelope(rec)
                    if problem is not None:  # the same refusal as the lead stage's (lead_log.apply)
                        refused = lead_log.refusal((ev.key or b"").decode("utf-8", "replace"), rec, problem)
                        sends.append((rejected_name, ev.key or b"", orjson.dumps(refused)))
                        continue
                    lead, anon = core.subject_of(rec)
                    if lead is not None:
                        # the lead's own events keep their log order: straight to the lead
                        sends.append((by_lead_name, lead.encode(), ev.value))
                        if anon is not None:  # decide the join where the anonymous id's table partition lives
                            requests.append((by_anon_name, anon.encode(),
                                          orjson.dumps({"anonymous_id": anon, "lead": lead,
                                                        "event_id": rec["event_id"]})))
                        continue
                    akey = anon.encode()
                    offset = ev.message.offset
                    held = live.get(akey)
                    if held is None:
                        mapped, upto, anon_state = _unpack_identity(touched.get(akey) or identity.get(akey))
                        if mapped is not None:
                            if offset > upto:  # not redelivered: at or below `upto` it went to the lead in the state
                                sends.append((by_lead_name, mapped.encode(), ev.value))
                            continue
                        # still anonymous: fold into the anonymous subject's compact state
                        held = _Anonymous(anon, anon_state, upto)
                    try:
                        _, derived = core.fold(held.state, rec, book)
                    except Exception as exc:  # poison record: dead-letter it; the state stays as it was before it
                        sends.append((rejected_name, akey, _rejected_raw(ev.value, f"unfoldable: {exc}")))
                        if akey in live:  # the fold may have changed it before failing: rebuilt
                            held.rebuild(book)
                        continue
                    held.upto = max(held.upto, offset)
                    held.folded.append(rec)
                    live[akey] = held
                    for d in derived:
                        if d["type"] == "event_rejected":
                            sends.append((rejected_name, akey, orjson.dumps(d)))
                for akey in list(live):
                    settle(akey)
                await produce(sends)
                # a join request only once the event that asks is on the lead's log: the answer must follow it.
                # Sent together with the identity entries: neither depends on the other (a redelivered lead event
                # asks again; the entries change only with join requests and anonymous events, whose records are
                # already acknowledged above)
                await asyncio.gather(produce(requests), store(identity, touched))
                batch_done(batch)

    # Deserialised lead states as last written, with the bytes written: a shortcut, never the source of truth.
    # Used only while the table still holds exactly those bytes (a recovery or a rebalance that replaced the entry
    # falls back to decoding the table's value); taken out while a batch may change the object and put back with
    # the new bytes once they are stored. Equivalent to decoding, since from_bytes(to_bytes(s)) folds as s does
    # (tests/test_lead_log.py).
    lead_cache: dict[bytes, tuple[bytes, lead_log.LeadLogState]] = {}

    @app.agent(by_lead, name="leads")
    async def lead_agent(stream: faust.StreamT) -> Any:
        async with _crash_worker_on_error():
            await warm_up()
            async for batch in faust_consumer.ready_batches(stream, batch_size):
                guard_commits_once()
                sends: list[tuple[str, bytes, bytes]] = []
                states: dict[bytes, lead_log.LeadLogState | None] = {}
                good: dict[bytes, list[dict]] = {}  # records of this batch folded per lead (see the except)
                for ev in batch:
                    key = ev.key
                    if key in states:
                        st = states[key]
                    else:
                        raw = leads.get(key)
                        cached = lead_cache.pop(key, None)  # out while this batch may change the object
                        if raw is None:
                            st = None
                        elif cached is not None and (cached[0] is raw or cached[0] == raw):
                            st = cached[1]
                        else:
                            st = lead_log.LeadLogState.from_bytes(raw)
                    try:
                        rec = orjson.loads(ev.value)
                        if rec.get("type") != lead_log.RESOLVE_TYPE:
                            rec = upcast(rec)
                        st, derived = lead_log.apply(st, key.decode(), rec, book)
                    except Exception as exc:  # poison record: dead-letter it, keep the lead's state as it was
                        log.warning("rejecting an unfoldable record at %s/%s: %s", ev.message.partition,
                                    ev.message.offset, exc)
                        sends.append((rejected_name, key, _rejected_raw(ev.value, f"unfoldable: {exc}")))
                        # the fold may have changed the state before it failed: rebuild it from the stored state
                        # and this batch's good records (the fold is deterministic: the same state, the same
                        # derived events, which are already in `sends`)
                        raw = leads.get(key)
                        st = lead_log.LeadLogState.from_bytes(raw) if raw is not None else None
                        for r in good.get(key, ()):
                            st, _ = lead_log.apply(st, key.decode(), r, book)
                        states[key] = st
                        continue
                    states[key] = st
                    good.setdefault(key, []).append(rec)
                    for d in derived:
                        sends.append((out_names[d["type"]], key, orjson.dumps(d)))
                await produce(sends)  # derived events are durable before the state that produced them
                written = {k: st.to_bytes() for k, st in states.items() if st is not None}
                await store(leads, written)
                batch_done(batch)
                for k, raw in written.items():
                    lead_cache[k] = (raw, states[k])
                while len(lead_cache) > LEAD_CACHE_SIZE:
                    del lead_cache[next(iter(lead_cache))]  # the least recently written

    return app


@contextlib.asynccontextmanager
async def _crash_worker_on_error() -> AsyncIterator[None]:
    """An agent that dies must take the worker down (a live process folding nothing is worse: nobody notices)."""
    try:
        yield
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("agent crashed; stopping the worker")
        _exit_now(1)


def _fetch_position(consumer: Any, tp: Any) -> int | None:
    """The consumer's next fetch offset for `tp`, or None while it has no valid one — read from aiokafka's
    subscription state without waiting (faust-streaming 0.15 / aiokafka 0.14 internals; None if they moved)."""
    try:
        state = consumer._thread._consumer._subscription.subscription.assignment.state_value(tp)
        return state.position if state is not None and state.has_valid_position else None
    except Exception:
        return None


def _fetch_state(app: Any, topics: set[str]) -> str:
    """One line of the consumer's fetch state for a stop message: what to look at when input stops moving
    (faust's flow and partition sets, the fetcher service, the consumer thread's method queue, aiokafka's
    fetch task, in-flight nodes, buffered records and per-partition positions). Never raises."""
    out: list[str] = []

    def add(name: str, get: Any) -> None:
        try:
            out.append(f"{name}={get()}")
        except Exception as exc:  # internals differ: say so and go on
            out.append(f"{name}=<{type(exc).__name__}>")

    def tps(xs: Any) -> str:
        return ",".join(sorted(f"{short(tp.topic)}/{tp.partition}" for tp in xs if tp.topic in topics)) or "-"

    def short(topic: str) -> str:  # the input topics' names differ in their middle part: keep the role
        return "-".join(w for w in topic.split("-") if w in ("touchpoints", "by", "lead", "anon")) or topic[:14]

    def stack(task: Any) -> str:
        if task is None:
            return "None"
        if task.done():
            exc = None if task.cancelled() else task.exception()
            return f"done(cancelled={task.cancelled()}, exc={exc!r})"
        frames = task.get_stack(limit=8)
        return "pending@" + ">".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in frames)

    c = app.consumer
    fetcher = app._fetcher
    add("rebalancing", lambda: app.rebalancing)
    add("recovery_completed", lambda: app.tables.recovery.completed.is_set())
    add("in_recovery", lambda: app.tables.recovery.in_recovery)
    add("flow_control_active", lambda: app.flow_control.is_active())
    add("flow_active", lambda: c.flow_active)
    add("suspend_flow", lambda: c.suspend_flow.is_set())
    add("active", lambda: tps(c._active_partitions))
    add("paused", lambda: tps(c._paused_partitions))
    add("buffered", lambda: tps(c._buffered_partitions))
    add("fetcher_service", lambda: f"{fetcher.state}/started={fetcher._started.is_set()}/"
                                   f"stopped={fetcher._stopped.is_set()}/crashed={fetcher._crashed.is_set()}")
    add("fetcher_tasks", lambda: [stack(f) for f in fetcher._futures])
    add("thread_queue", lambda: c._thread.method_queue._queue.qsize())
    add("main_queue", lambda: c._method_queue._queue.qsize())
    ak = lambda: c._thread._consumer  # noqa: E731
    add("fetch_task", lambda: stack(ak()._fetcher._fetch_task))
    add("in_flight", lambda: sorted(ak()._fetcher._in_flight))
    add("pending_tasks", lambda: [stack(t) for t in ak()._fetcher._pending_tasks])
    add("records", lambda: tps(ak()._fetcher._records))
    add("fetch_waiters", lambda: len(ak()._fetcher._fetch_waiters))

    def positions() -> str:
        assignment = ak()._subscription.subscription.assignment
        parts = []
        for tp in sorted(assignment.tps):
            if tp.topic not in topics:
                continue
            st = assignment.state_value(tp)
            pos = st.position if st.has_valid_position else "invalid"
            parts.append(f"{short(tp.topic)}/{tp.partition}:{pos}/hw{st.highwater}{'/P' if st.paused else ''}")
        return " ".join(parts)

    add("positions", positions)
    return "; ".join(out)


def _stop_hard(reason: str) -> None:
    """Stop the worker at once so that its supervisor restarts it; nothing is lost, input is re-read from the
    committed offsets and deduplicated by event id."""
    log.error("%s: stopping the worker so it restarts", reason)
    _exit_now(RESTART_EXIT)


def _exit_now(code: int) -> None:
    """Exit like SIGKILL, which the processor is built to survive. Not faust's graceful stop: that commits on the way
    down, after a stop of ours for a reason that makes the commit suspect (records faust skipped, a stall). (faust's
    own batch iterators also ack the batch in flight when they are finalised; `faust_consumer.ready_batches` does
    not.)"""
    for h in logging.getLogger().handlers + log.handlers:
        h.flush()
    sys.stderr.flush()
    os._exit(code)


class _Anonymous:
    """An anonymous subject's state as the identity stage folds it within one batch: the state, the `touchpoints`
    offset of its last event, and what a failed fold needs to rebuild it (the stored state it was decoded from and
    the batch's records folded into it since)."""

    __slots__ = ("key", "stored", "state", "upto", "folded")

    def __init__(self, key: str, stored: bytes | None, upto: int) -> None:
        self.key, self.stored, self.upto = key, stored, upto
        self.state = self._decoded()
        self.folded: list[dict[str, Any]] = []

    def _decoded(self) -> core.LeadState:
        return core.LeadState.from_bytes(self.stored) if self.stored else core.LeadState(self.key, True)

    def rebuild(self, book: RuleBook) -> None:
        """The state as before the failed fold: decoded again and the batch's good records folded (deterministic)."""
        self.state = self._decoded()
        for r in self.folded:
            core.fold(self.state, r, book)


def _pack_identity(kind: bytes, upto: int, body: bytes) -> bytes:
    """Identity table value: b"S" (still anonymous: its fold state) or b"L" (joined: the lead key), then the
    `touchpoints` offset of the last anonymous event folded into the state, then the body."""
    return kind + upto.to_bytes(8, "big", signed=True) + body


def _unpack_identity(raw: bytes | None) -> tuple[str | None, int, bytes | None]:
    """(lead or None, offset of the last event folded into the anonymous state, that state or None)."""
    if not raw:
        return None, -1, None
    upto = int.from_bytes(raw[1:9], "big", signed=True)
    if raw[:1] == b"L":
        return raw[9:].decode(), upto, None
    return None, upto, raw[9:]


def _rejected_raw(value: bytes | None, reason: str) -> bytes:
    """The dead-letter record of bytes that are no touchpoint, or whose fold failed: ``event`` is the record as
    written (its object when it is a JSON object, else its text); the id is a digest of the bytes, so a redelivery
    repeats it."""
    raw = value or b""
    try:
        event: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        event = raw.decode("utf-8", "replace")[:4000]
    return orjson.dumps({"type": "event_rejected", "reason": reason, "field": None,
                         "event_id": f"rejected:raw:{hashlib.sha256(raw).hexdigest()[:32]}", "event": event})


def main(argv: list[str] | None = None) -> int:
    """`leadledger processor [--loglevel warn]`: run one worker; start more processes to scale out."""
    import argparse

    p = argparse.ArgumentParser(prog="leadledger processor")
    p.add_argument("--loglevel", default=os.environ.get("LEADLEDGER_LOGLEVEL", "warn"),
                   choices=["crit", "error", "warn", "info", "debug"])
    a = p.parse_args(argv or [])
    # The cyclic GC's default thresholds (700, 10, 10) ran a collection every few hundred allocations, and full ones
    # that walk every cached lead state and faust's/aiokafka's objects, pausing the agents: hand-off p99 at 1,000
    # events/s 1.4-1.6 s with them, 0.54-0.61 s with these (bench_processor, two alternated pairs, docs/design.md).
    # Nothing here relies on the GC: states and records hold no cycles, reference counting frees them.
    runtime.tune_gc(freeze=False)
    cfg = load_settings()
    app = create_app(cfg)
    # faust declares a table's changelog only when the topic is missing, and by then a metadata request for it had
    # made the broker auto-create it with the broker's defaults (deleted, not compacted: a restart's recovery read
    # every state ever written; records up to 1 MiB). Declared here first, as a changelog should be.
    changelogs = [table.changelog_topic.get_topic_name() for table in app.tables.values()]
    for name in asyncio.run(kafka_io.ensure_changelogs(cfg.bootstrap, changelogs, cfg.partitions)):
        log.warning("changelog %s was not compacted or took records under %d bytes: changed", name,
                    kafka_io.MAX_RECORD_BYTES)
    sys.argv = ["leadledger-processor", "worker", "-l", a.loglevel, "--without-web"]
    profile_to = os.environ.get("LEADLEDGER_PROFILE")  # cProfile the worker until it stops (bench/profiling)
    if not profile_to:
        app.main()
        return 0
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        app.main()
    finally:
        prof.disable()
        prof.dump_stats(profile_to)
    return 0

"""faust-streaming 0.15.3's consumer and stream batching, as the processor needs them (`services.processor`).

- `FetchConsumer`: faust's aiokafka consumer with a short fetch wait, input partitions held back until the flow
  resumes after a table recovery, an active-partition set aiokafka cannot read as "all", and faust's per-record
  callback run directly instead of through four tasks per record. Each fix's docstring says what it mends and how
  it was found (docs/design.md has the measurements).
- `ready_batches`: a stream's events in batches of what is ready, acked only when the next batch is asked for.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, AsyncIterator

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode.services import WaitResults

FETCH_MAX_WAIT_MS = int(os.environ.get("LEADLEDGER_FETCH_MAX_WAIT_MS", "20"))


class FetchConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's aiokafka consumer with `fetch_max_wait_ms` from LEADLEDGER_FETCH_MAX_WAIT_MS (faust hard-codes 1500).

    aiokafka keeps one fetch in flight per broker, and a fetch leaves out the partitions that still have fetched
    records to hand over. So when the partitions in flight are quiet (join requests, a quiet input) the broker holds
    that fetch for the whole wait, and the busy partitions, once drained, cannot be fetched again until it returns:
    the agents sat idle with thousands of records waiting on the broker, and the hand-off latency at 1,000 events/s
    settled at 3-7 s (1.5 s per stall, several stalls per hand-off). The wait bounds each such stall."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read by the fetcher the consumer creates on start
        return consumer

    async def _fetch_records(self, consumer: Any, active_partitions: Any, timeout: float | None = None,
                             max_records: int | None = None) -> Any:
        """faust hands aiokafka its live set of active partitions, and aiokafka's `fetched_records` reads an empty
        set as "every partition". A getmany that started while the set held partitions and waits (up to 1 s) for
        records sees it emptied when faust pauses the changelogs at the end of a recovery; records fetched then
        for the input partitions (after their seek to the committed offsets) came back as if asked for, faust skipped
        them as not active, and aiokafka's fetch position had moved past them: lost, never acked, never committed
        (seen once in six crash-test runs with the input partitions held back until `resume_flow`). Here an empty
        set stays empty."""
        if active_partitions is not None:
            active_partitions = NeverAll(active_partitions)
        return await super()._fetch_records(consumer, active_partitions, timeout=timeout, max_records=max_records)


class NeverAll:
    """A live view of faust's active-partition set that aiokafka cannot read as "all partitions" when it is empty
    (`fetched_records` only tests its truth and membership)."""

    __slots__ = ("_tps",)

    def __init__(self, tps: Any) -> None:
        self._tps = tps

    def __bool__(self) -> bool:
        return True

    def __contains__(self, tp: Any) -> bool:
        return tp in self._tps

    def __iter__(self) -> Any:
        return iter(set(self._tps))


class FetchConsumer(faust_aiokafka.Consumer):
    """faust's consumer with the fetch wait above, and input partitions resumed only once they can deliver safely.

    faust-streaming 0.15.3 ends a table recovery (`Recovery.on_recovery_completed`, also `_resume_streams`) with:
    resume the input partitions, seek them to the committed offsets (a broker round trip per partition, 0.1-0.5 s),
    then `flow_control.resume()`, which empties every stream's queue, then `resume_flow()`. Its fetcher runs all
    along (started when the recovery began), so in the seek window it hands input records to the stream queues and
    moves its read offsets past them; the queue clear then drops them, never acked and never read again. faust
    then either commits past them (its gap and head-of-queue checks let a hole through: the commit guard stops the
    worker) or never commits that partition again (no commit, no error, the fetch position at the end: the input
    is silently lost until a restart — the "stall" seen after restarts and takeovers). With a 20 ms fetch wait the
    fetcher has fresh records for the input partitions in that window almost every time (with 1.5 s it usually
    sat in a long fetch of quiet changelog partitions), which is why the crash test failed more often with it.

    So input (non-changelog) partitions resumed here are held back and made active in `resume_flow()`, which faust
    calls right after that queue clear (and after the seek); changelog partitions resume at once (recovery reads
    them). Pausing a held partition drops it from the held set, as does a rebalance's pause of all partitions."""

    _held_back: set[TP] | None = None

    def _new_consumer_thread(self) -> FetchConsumerThread:
        return FetchConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def resume_partitions(self, tps: Any) -> None:
        tps = {TP(tp.topic, tp.partition) for tp in tps}
        held = {tp for tp in tps if not self._is_changelog_tp(tp)}
        if held:
            self._held_back = (self._held_back or set()) | held  # they stay paused until then
        super().resume_partitions(tps - held)

    def pause_partitions(self, tps: Any) -> None:
        tps = {TP(tp.topic, tp.partition) for tp in tps}
        if self._held_back:
            self._held_back -= tps
        super().pause_partitions(tps)

    def resume_flow(self) -> None:
        super().resume_flow()
        held, self._held_back = self._held_back, None
        if held:
            assigned = self.assignment()
            super().resume_partitions({tp for tp in held if tp in assigned})

    async def wait_first(self, *coros: Any, timeout: Any = None) -> WaitResults:
        """faust's fetch loop (`Consumer._drain_messages`) hands every record to the streams with
        `wait_first(callback(message), suspend_flow.wait())`: four tasks and an `asyncio.wait` per record (a sixth
        of a worker's time at full load), and it is the only caller with two awaitables. The callback usually
        finishes without suspending (the stream queue has room), so it is run here first; only if it suspends (a
        full queue, the flow suspended) is it finished faust's way, in a task the suspend flag can abandon. Every
        other wait, and any wait once the consumer stops or crashed, is faust's."""
        first = coros[0] if coros else None
        if len(coros) == 2 and timeout is None and inspect.iscoroutine(first) \
                and not (self._stopped.is_set() or self._crashed.is_set()):
            try:
                step = first.send(None)
            except StopIteration as done:
                if inspect.iscoroutine(coros[1]):
                    coros[1].close()  # the suspend flag's wait, never started: not "never awaited"
                return WaitResults([first], [done.value], False)
            coros = (Resumed(first, step), coros[1])
        return await super().wait_first(*coros, timeout=timeout)


class Resumed:
    """Awaiting it finishes a coroutine that already ran up to its first suspension, where it yielded `first`: what
    awaiting the coroutine from the start would have done, so a task can take it over (cancellation included)."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Any, first: Any) -> None:
        self._coro, self._first = coro, first

    def __await__(self) -> Any:
        coro, value = self._coro, self._first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the task (a cancellation): into the coroutine
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def ready_batches(stream: faust.StreamT, most: int) -> AsyncIterator[list[faust.EventT]]:
    """The stream's events in batches of what is ready: a batch ends when the stream's queue is empty (or at
    `most`), and it is acked once the agent asks for the next one. Under load, records queue up while a batch is
    folded and sent, so batches grow and their broker round trips are shared; on a quiet stream an event is folded
    as soon as it arrives. (faust's `take_events` waits a fixed window for each batch to fill: 50 ms per stage
    held every hand-off back, and shorter windows cost 15-45 % of the throughput.) Each event goes through
    faust's own stream iterator (generation and flow checks, tracking for commits); acks are the agent's, after its
    batch, and a batch abandoned (the worker stopping) is never acked."""
    stream.enable_acks = False
    queue = stream.channel.queue
    batch: list[faust.EventT] = []
    async for ev in stream.events():
        batch.append(ev)
        if len(batch) >= most or queue.empty():
            yield batch
            for done in batch:
                await stream.ack(done)
            batch = []

"""Processor benchmark on the real broker, every figure from one run:

1. raw aiokafka consumer that only reads a touchpoints topic (events/s);
2. a bare faust agent that only iterates the same topic (events/s) — faust's own ceiling; also on the processor's
   consumer (`services.faust_consumer`), whose fetch loop spares faust's per-record tasks;
3. the processor, one worker: touchpoints in → derived events committed (events/s), and its ratio to (2)
   (goal ≥ 40 %); the same again with a relaxed commit interval, which prices the interval used for (5);
4. the processor, two worker processes (goal: ≥ 50 % more than one);
5. hand-off latency: touchpoints through the ingest app at a steady ~1,000 events/s, from the ingest
   acknowledgement of the decisive touchpoint to the `lead_handed_off` visible to a read_committed consumer
   (p50/p99, goal p99 < 250 ms), after a warm-up of the same schedule (3 s, reported apart: the steady state is
   what is asked).

(1) and (2) read a backlog. For (3) and (4) the workers start on empty topics with unique names, the benchmark
waits until the consumer group is stable with every worker in it, then writes the same history to `touchpoints`
(`services.kafka_io.produce_events`: batches per partition, in event order, ≈ 9 µs of CPU per record; it shares
the CPUs for the first second or so); the rate is input events / (first touchpoint's broker
timestamp → last derived event's broker timestamp), read back with a read_committed consumer. Every worker and
consumer stops by itself (bounded waits); the run's topics are deleted at the end (--keep-topics to keep them).

Run under the shared lock: flock /tmp/leadledger-bench.lock .venv/bin/python -m bench.bench_processor
    [--events 50000] [--partitions 12] [--latency-seconds 60] [--latency-rate 1000] [--floor-rate 200]
    [--latency-warmup 3] [--commit-interval 0.5] [--relaxed-commit-interval 5] [--keep-topics]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.gen_history import generate
from projections.fold import normalise_email
from services import runtime
from services.config import Settings
from services.derived_reader import topic_partitions
from services.ingest import IngestConfig, create_app
from services.kafka_io import ensure_topics, produce_events
from tests.streaming import Worker, committed_up_to, offset_clients, settings_for, topic_env

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = os.environ.get("LEADLEDGER_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
RUN = uuid.uuid4().hex[:8]  # every topic and group name of this run contains it


def history(n: int) -> list[dict[str, Any]]:
    events = generate(n, max(200, n // 40), seed=5)
    for e in events:
        e["email"] = normalise_email(e["email"])
    return events


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg()}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# (1) raw consumer, (2) bare faust


async def raw_read(topic: str, n: int) -> float:
    c = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False, auto_offset_reset="earliest",
                         max_partition_fetch_bytes=4 << 20, fetch_max_bytes=32 << 20)
    await c.start()
    try:
        tps = await topic_partitions(c, topic)
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        got = 0
        t0 = time.perf_counter()
        deadline = t0 + 120
        while got < n:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"raw consumer read {got} of {n} within 120 s")
            batch = await c.getmany(timeout_ms=1000, max_records=10000)
            got += sum(len(v) for v in batch.values())
        return got / (time.perf_counter() - t0)
    finally:
        await c.stop()


def bare_faust(topic: str, n: int, consumer: str = "faust") -> float:
    """A bare agent's rate on faust's own consumer, or ("leadledger") on the processor's."""
    env = {**os.environ, "BARE_TOPIC": topic, "BARE_COUNT": str(n), "BARE_BOOTSTRAP": BOOTSTRAP,
           "BARE_CONSUMER": consumer}
    try:
        out = subprocess.run([sys.executable, "-m", "bench.faust_bare", "worker", "--without-web", "-l", "warn"],
                             cwd=ROOT, env=env, capture_output=True, timeout=240)
    finally:
        shutil.rmtree(f"/tmp/faust-bare-{topic}-{consumer}", ignore_errors=True)
    text = out.stdout.decode() + out.stderr.decode()  # faust routes stdout through its logger
    found = re.findall(r'\{"events":\d+,"seconds":[0-9.e-]+\}', text)
    if not found:
        raise RuntimeError(text[-3000:])
    r = orjson.loads(found[-1])
    return r["events"] / r["seconds"]


# ---------------------------------------------------------------------------------------------------------------
# (3), (4) the processor


async def edge_timestamp(topics: list[str], last: bool) -> float | None:
    """Broker timestamp (s) of the first (min over partitions) or last (max) record of `topics`, read_committed."""
    c = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False, isolation_level="read_committed")
    await c.start()
    try:
        tps = [tp for t in topics for tp in await topic_partitions(c, t)]
        c.assign(tps)
        begin, end = await c.beginning_offsets(tps), await c.end_offsets(tps)
        found: list[float] = []
        for tp in tps:
            if end[tp] <= begin[tp]:
                continue
            c.seek(tp, end[tp] - 1 if last else begin[tp])
            msgs = (await c.getmany(tp, timeout_ms=5000, max_records=1)).get(tp, [])
            if msgs:
                found.append(msgs[0].timestamp / 1000.0)
        if not found:
            return None
        return max(found) if last else min(found)
    finally:
        await c.stop()


async def end_offsets_sum(topics: list[str]) -> int:
    c = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False)
    await c.start()
    try:
        tps = [tp for t in topics for tp in await topic_partitions(c, t)]
        return sum((await c.end_offsets(tps)).values())
    finally:
        await c.stop()


async def wait_group_stable(group: str, members: int, workers: list[Worker], timeout: float = 120) -> None:
    """Until the group is Stable with `members` members, each with an assignment, three polls in a row."""
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        end = time.monotonic() + timeout
        ok = 0
        while ok < 3:
            if time.monotonic() > end:
                raise RuntimeError(f"group {group} not stable with {members} members within {timeout}s")
            for w in workers:
                w.check_alive()
            try:
                g = (await admin.describe_consumer_groups([group]))[0].groups[0]
                _err, _gid, state, _ptype, _proto, mems = g[:6]
                ok = ok + 1 if state == "Stable" and len(mems) == members and all(m[4] for m in mems) else 0
            except Exception:
                ok = 0
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


async def wait_done(group: str, cfg: Settings, workers: list[Worker], timeout: float) -> str:
    """Until the group committed the end of every input (twice in a row), or — faust's committed offsets can lag
    behind after a rebalance (faust #318) — until nothing was written to any downstream topic for 20 s.

    One admin client and one consumer for the whole wait: a poll is two requests. (Starting fresh clients for every
    poll, three per 0.5 s, took 10–30 % of a core in this process while the workers were being timed.)"""
    t = cfg.topics
    inputs = [t.touchpoints, t.by_anon, t.by_lead]
    downstream = [t.by_anon, t.by_lead, t.scores, t.stages, t.handoffs, t.intent_alerts, t.rejected]
    async with offset_clients(BOOTSTRAP) as (admin, c):
        in_tps = [tp for name in inputs for tp in await topic_partitions(c, name)]
        down_tps = [tp for name in downstream for tp in await topic_partitions(c, name)]
        all_tps = sorted(set(in_tps) | set(down_tps))
        end_at = time.monotonic() + timeout
        stable, last_sum, quiet_since = 0, -1, time.monotonic()
        while time.monotonic() < end_at:
            for w in workers:
                w.check_alive()
            end = await c.end_offsets(all_tps)
            stable = stable + 1 if await committed_up_to(admin, group, {tp: end[tp] for tp in in_tps}) else 0
            if stable >= 2:
                return "committed"
            s = sum(end[tp] for tp in down_tps)
            if s != last_sum:
                last_sum, quiet_since = s, time.monotonic()
            elif time.monotonic() - quiet_since > 20:
                return "quiet"
            await asyncio.sleep(0.5)
    raise RuntimeError(f"processor group {group} did not finish within {timeout}s")


async def processor_rate(events: list[dict], partitions: int, workers: int, logdir: Path, commit_interval: float,
                         created: list[str]) -> tuple[float, float, str]:
    """(events/s, seconds, how the end was detected) for `workers` processes on fresh topics."""
    suffix = f"bench{RUN}w{workers}c{str(commit_interval).replace('.', '_')}"
    env = {**topic_env(suffix, partitions), "LEADLEDGER_COMMIT_INTERVAL": str(commit_interval)}
    cfg = settings_for(env, BOOTSTRAP)
    created.append(suffix)
    await ensure_topics(BOOTSTRAP, cfg.topics.all(), cfg.partitions)
    group = env["LEADLEDGER_PROCESSOR_ID"]
    ws = [Worker(env, BOOTSTRAP, logdir / f"{suffix}-{i}.log") for i in range(workers)]
    for w in ws:
        w.start()
    try:
        await wait_group_stable(group, workers, ws)
        say(f"{workers} worker(s) stable in group {group}; producing {len(events)} touchpoints")
        await produce_events(BOOTSTRAP, cfg.topics.touchpoints, events)
        how = await wait_done(group, cfg, ws, timeout=400)
    finally:
        for w in ws:
            w.stop()
        shutil.rmtree(ROOT / "var" / "processor" / group, ignore_errors=True)
    restarts = sum(w.restarts for w in ws)
    if restarts:
        how += f", {restarts} watchdog restart(s)"
    t = cfg.topics
    first_in = await edge_timestamp([t.touchpoints], last=False)
    last_out = await edge_timestamp([t.scores, t.stages, t.handoffs, t.intent_alerts, t.rejected], last=True)
    assert first_in is not None and last_out is not None
    secs = last_out - first_in
    return len(events) / secs, secs, how


# ---------------------------------------------------------------------------------------------------------------
# (5) hand-off latency


async def handoff_latency(partitions: int, seconds: float, rate: int, logdir: Path, commit_interval: float,
                          created: list[str], workers: int = 1, warmup: float = 0.0
                          ) -> tuple[list[float], int, int, float, list[float], list[tuple[float, float]]]:
    """Latencies (ms) of the hand-offs seen, hand-offs expected, events sent, achieved events/s, the latencies
    of the first `warmup` seconds, which run the same schedule and are not counted in the others (a cold start
    queues: the first requests to the ingest app, a worker's first batches), and the timeline of the counted ones:
    (seconds since the measured part began, latency ms) in acknowledgement order. Every 0.1 s: one lead's form +
    meeting and `rate/10 - 3` page views of 5,000 other leads in one request, then the lead's seminar (the decisive
    touchpoint) in a request of its own."""
    suffix = f"lat{RUN}r{rate}w{workers}"
    per_tick = max(0, rate // 10 - 3)
    env = {**topic_env(suffix, partitions), "LEADLEDGER_COMMIT_INTERVAL": str(commit_interval)}
    cfg = settings_for(env, BOOTSTRAP)
    created.append(suffix)
    await ensure_topics(BOOTSTRAP, cfg.topics.all(), cfg.partitions)
    ws = [Worker(env, BOOTSTRAP, logdir / f"{suffix}-{i}.log") for i in range(workers)]
    for w in ws:
        w.start()
    app = create_app(cfg, IngestConfig.from_env())
    acked: dict[str, float] = {}
    warm: set[str] = set()  # the leads of the warm-up ticks
    arrived: dict[str, float] = {}
    stop = asyncio.Event()
    sent = 0

    async def watch() -> None:
        c = AIOKafkaConsumer(cfg.topics.handoffs, bootstrap_servers=BOOTSTRAP, isolation_level="read_committed",
                             auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=100)
        await c.start()
        try:
            while not stop.is_set():
                for msgs in (await c.getmany(timeout_ms=50)).values():
                    now = time.perf_counter()
                    for m in msgs:
                        arrived.setdefault(orjson.loads(m.value)["lead"], now)
        finally:
            await c.stop()

    def ev(i: str, type_: str, email: str, at: datetime, payload: dict) -> dict:
        return {"event_id": f"{suffix}-{i}", "type": type_, "occurred_at": at.isoformat(), "email": email,
                "payload": payload}

    watcher = asyncio.create_task(watch())
    t_run = 0.0
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as c:
            async def post(evs: list[dict]) -> None:
                nonlocal sent
                r = await c.post("/v1/events", json={"events": evs}, headers={"X-API-Key": "dev-crm-key"})
                r.raise_for_status()
                sent += len(evs)

            # warm-up: the worker joined its group and folds before the clock starts
            await wait_group_stable(env["LEADLEDGER_PROCESSOR_ID"], workers, ws)
            await post([ev("warm", "page_viewed", "warm@x.example", datetime.now(timezone.utc),
                           {"url": "https://x.example/"})])
            deadline = time.monotonic() + 60
            while await end_offsets_sum([cfg.topics.scores]) == 0:
                for w in ws:
                    w.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError("the latency worker scored nothing within 60 s")
                await asyncio.sleep(0.2)
            say(f"latency: worker ready; {warmup:.0f} s of warm-up, then {seconds:.0f} s at ~{rate} events/s")
            t0 = time.perf_counter()
            t_end = t0 + warmup + seconds
            k = 0
            k_warm = round(warmup * 10)
            t_start = t0
            while time.perf_counter() < t_end:
                if k == k_warm:  # the measured part starts
                    sent, t_start = 0, time.perf_counter()
                tick = t0 + k * 0.1  # a fixed schedule: rate/10 events per 0.1 s, no drift
                now = datetime.now(timezone.utc) - timedelta(seconds=1)
                email = f"lat{k}@{suffix}.example"
                fields = {"name": "N", "email": email, "company": "C", "department": "IT", "title": "IT Manager",
                          "phone": "1", "company_size": "800"}
                noise = [ev(f"n{k}-{j}", "page_viewed", f"noise{(k * per_tick + j) % 5000}@{suffix}.example", now,
                            {"url": "https://x.example/blog"}) for j in range(per_tick)]
                prep = [ev(f"f{k}", "form_submitted", email, now, {"form_id": "f", "fields": fields}),
                        ev(f"m{k}", "meeting_booked", email, now, {"slot": "x"})]
                await post(noise + prep)
                await post([ev(f"s{k}", "event_attended", email, now, {"event": "seminar"})])  # the decisive one
                acked[email] = time.perf_counter()
                if k < k_warm:
                    warm.add(email)
                k += 1
                await asyncio.sleep(max(0.0, tick + 0.1 - time.perf_counter()))
                for w in ws:
                    w.check_alive()
            t_run = time.perf_counter() - t_start
            deadline = time.perf_counter() + 30
            while len(arrived.keys() & acked.keys()) < len(acked) and time.perf_counter() < deadline:
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await watcher
        await app.state.ingest.close()
        for w in ws:
            w.stop()
        shutil.rmtree(ROOT / "var" / "processor" / env["LEADLEDGER_PROCESSOR_ID"], ignore_errors=True)
    timeline = [(acked[e] - t_start, (arrived[e] - acked[e]) * 1000) for e in acked if e in arrived and e not in warm]
    lat = sorted(x[1] for x in timeline)
    warm_lat = sorted((arrived[e] - acked[e]) * 1000 for e in warm if e in arrived)
    return lat, len(acked) - len(warm), sent, sent / t_run if t_run else 0.0, warm_lat, timeline


def windows(timeline: list[tuple[float, float]], width: float = 10.0) -> str:
    """p99 (ms) of each ``width``-second window of a latency timeline, and where the worst latency fell: tells a
    transient (one stall) from a steady state over the goal."""
    groups: dict[int, list[float]] = {}
    for t, ms in timeline:
        groups.setdefault(int(t // width), []).append(ms)
    worst = max(timeline, key=lambda x: x[1], default=None)
    return (f"p99 per {width:.0f} s window: " + " / ".join(f"{pct(sorted(v), 99):.0f}" for _k, v in sorted(groups.items()))
            + (f" ms; worst {worst[1]:.0f} ms at +{worst[0]:.1f} s" if worst else ""))


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


async def delete_run_topics() -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if RUN in t]
        if mine:
            await admin.delete_topics(mine)
        return len(mine)
    finally:
        await admin.close()


async def main_async(a: argparse.Namespace) -> None:
    started = datetime.now(timezone.utc)
    load_start = loadavg()
    logdir = Path(tempfile.mkdtemp(prefix="bench-processor-"))
    created: list[str] = []
    say(f"run {RUN}: generating {a.events} touchpoints")
    events = history(a.events)
    try:
        topic = f"bench-raw-{RUN}"
        await ensure_topics(BOOTSTRAP, [topic], a.partitions)
        await produce_events(BOOTSTRAP, topic, events)
        say("raw consumer")
        raw = await raw_read(topic, len(events))
        say("bare faust")
        bare = bare_faust(topic, len(events))
        say("bare faust on the processor's consumer")
        bare_ll = bare_faust(topic, len(events), "leadledger")
        say("processor, 1 worker")
        one, one_s, one_how = await processor_rate(events, a.partitions, 1, logdir, a.commit_interval, created)
        say("processor, 2 workers")
        two, two_s, two_how = await processor_rate(events, a.partitions, 2, logdir, a.commit_interval, created)
        say(f"processor, 1 worker, commit interval {a.relaxed_commit_interval} s")
        lax, lax_s, lax_how = await processor_rate(events, a.partitions, 1, logdir, a.relaxed_commit_interval,
                                                   created)
        # This process stamps the ingest acknowledgements and the hand-offs' arrival: a full collection of its own
        # objects (the generated history, every client of the runs above) would pause both, and show as latency.
        # The ingest app runs in here, so this is also the GC setting of the service (`leadledger ingest`).
        runtime.tune_gc()
        say("hand-off latency")
        lat, expected, sent, rate, warm, timeline = await handoff_latency(a.partitions, a.latency_seconds, a.latency_rate,
                                                                logdir, a.commit_interval, created, a.latency_workers,
                                                                a.latency_warmup)
        lat2: list[float] = []
        if a.floor_rate:
            say("hand-off latency, light load")
            lat2, expected2, sent2, rate2, _, _ = await handoff_latency(a.partitions, a.floor_seconds, a.floor_rate,
                                                                     logdir, a.commit_interval, created,
                                                                     a.latency_workers, a.latency_warmup)
    finally:
        if not a.keep_topics:
            say(f"deleted {await delete_run_topics()} topics of run {RUN}")
    n = len(events)
    print(f"leadledger processor benchmark, {started:%Y-%m-%d %H:%M} UTC, run {RUN}, {os.cpu_count()} CPUs, "
          f"load average {load_start} at start, {loadavg()} at end (1/5/15 min)")
    print(f"events: {n} touchpoints ({len({e.get('lead_id') or e['email'] or e['anonymous_id'] for e in events})} "
          f"subjects) over {a.partitions} partitions; worker logs in {logdir}")
    print(f"(a) raw aiokafka consumer (read only):       {raw:10.0f} events/s")
    print(f"(b) bare faust agent (iterate only):         {bare:10.0f} events/s   ({bare / raw:.1%} of raw)")
    print(f"    the same agent on the processor's consumer: {bare_ll:10.0f} events/s   ({bare_ll / bare - 1:+.1%}; the "
          f"processor is {one / bare_ll:.1%} of it)")
    print(f"(c) processor, 1 worker, end to end:         {one:10.0f} events/s   ({one / bare:.1%} of bare faust; "
          f"goal ≥ 40%)  [{one_s:.1f} s, end: {one_how}]")
    print(f"(d) processor, 2 workers, end to end:        {two:10.0f} events/s   ({two / one - 1:+.1%} vs 1 worker; "
          f"goal ≥ +50%)  [{two_s:.1f} s, end: {two_how}]")
    print(f"    commit interval {a.commit_interval} s (used for (c), (d), latency) vs {a.relaxed_commit_interval} s: "
          f"{one:.0f} vs {lax:.0f} events/s, cost {1 - one / lax:+.1%}  [{lax_s:.1f} s, end: {lax_how}]")
    print(f"(e) hand-off latency, ingest ack → lead_handed_off visible read_committed, {a.latency_workers} "
          f"worker(s), commit interval {a.commit_interval} s, {sent} events in {a.latency_seconds:.0f} s ({rate:.0f} events/s, asked {a.latency_rate}): "
          f"{len(lat)} of {expected} hand-offs seen: p50 {pct(lat, 50):.0f} ms, p99 {pct(lat, 99):.0f} ms, "
          f"max {max(lat, default=float('nan')):.0f} ms, mean {statistics.fmean(lat) if lat else float('nan'):.0f} ms "
          f"(goal p99 < 250 ms)")
    print(f"    {windows(timeline)}")
    print(f"    its first {a.latency_warmup:.0f} s (warm-up, the same schedule, not counted above): "
          f"{len(warm)} hand-offs seen: p50 {pct(warm, 50):.0f} ms, p99 {pct(warm, 99):.0f} ms, max {max(warm, default=float('nan')):.0f} ms")
    if a.floor_rate:
        print(f"    the same at a light load: {sent2} events in {a.floor_seconds:.0f} s ({rate2:.0f} events/s): "
              f"{len(lat2)} of {expected2} hand-offs seen: p50 {pct(lat2, 50):.0f} ms, p99 {pct(lat2, 99):.0f} ms, "
              f"max {max(lat2, default=float('nan')):.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=50000,
                   help="history size; the processor runs three times over it, at well under 1,000 events/s here")
    p.add_argument("--partitions", type=int, default=Settings().partitions,
                   help="partitions of every topic (default: LEADLEDGER_PARTITIONS, else 12 = the service's)")
    p.add_argument("--latency-seconds", type=float, default=60.0)
    p.add_argument("--latency-rate", type=int, default=1000, help="events/s of the latency run")
    p.add_argument("--latency-workers", type=int, default=1, help="processor workers of the latency runs")
    p.add_argument("--latency-warmup", type=float, default=3.0,
                   help="seconds of the latency schedule run first and reported apart (the steady state is measured)")
    p.add_argument("--floor-rate", type=int, default=200,
                   help="a second, shorter latency run at this rate shows the latency without queueing (0: skip)")
    p.add_argument("--floor-seconds", type=float, default=20.0)
    p.add_argument("--commit-interval", type=float,
                   default=float(os.environ.get("LEADLEDGER_COMMIT_INTERVAL", "0.5")),
                   help="LEADLEDGER_COMMIT_INTERVAL of the workers (default: the env var, else 0.5 = the service's)")
    p.add_argument("--relaxed-commit-interval", type=float, default=5.0,
                   help="a second 1-worker run with this interval prices the one used")
    p.add_argument("--keep-topics", action="store_true")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()

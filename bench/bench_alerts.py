"""End-to-end alert latency: ingest acknowledgement of the decisive touchpoint -> webhook request / SSE message.

    .venv/bin/python bench/bench_alerts.py [--mode e2e|alerts] [--rate 1000] [--handoffs 10] [--seconds 30]
                                           [--warmup 10] [--db postgresql|sqlite] [--anonymous 0.5] [--partitions 4]

A steady ``--rate`` events/s go through the real ingest service (``POST /v1/events``, batches every 20 ms), the
real processor (faust) and the alerts service, each in its own process, on the local Kafka broker (and
PostgreSQL), on unique topics. Most events are page views of 2,000 known leads and of anonymous visitors; every
``1/--handoffs`` s a lead starts a five-step journey (form with the full attribute set, download, two pricing
views, a seminar) that the default rules hand off on its last step: that step is the *decisive touchpoint*.
A separate receiver process runs a loopback webhook endpoint (subscribed through the API) and an SSE client and
stamps every arrival with the wall clock; the generator stamps the ingest acknowledgement of each batch.
Latency per hand-off = arrival - acknowledgement of the batch holding its decisive touchpoint (joined on the
alert's ``cause_event_id``). Prints p50 / p90 / p99 / max per channel and the achieved event rate. Goal: p99 < 500 ms.

Modes: ``--mode e2e`` (above) and ``--mode alerts``: the processor's output written straight to its topics
(``--rate`` by-lead touchpoints/s each with its ``lead_scored``, ``--handoffs`` hand-offs/s): from the broker's
acknowledgement of the hand-off to the arrival, i.e. the alerts service alone under the same context load.
Every run also reports ``*_after_topic``: arrival minus the moment the hand-off was visible on its topic to a
read_committed consumer (the alerts service's share of the e2e figure), its CPU share and the machine's load.

Results, 2026-11-29, one 2-core container shared with other engineers' jobs (Kafka, PostgreSQL, processor, ingest,
alerts, load generator and receiver all on it), 30 s measured after 10 s, 10 hand-offs/s:

    mode    db          events/s  load  webhook p50/p90/p99/max ms   SSE p50/p90/p99/max ms   alerts CPU
    alerts  postgresql  1000      3.2   33 / 58 / 104 / 145          25 / 43 / 92 / 96         0.43 core
    alerts  sqlite      1000      4.8   34 / 218 / 546 / 611         23 / 185 / 456 / 509      0.34 core
    alerts  postgresql  1000      9.8   77 / 240 / 474 / 553         60 / 194 / 437 / 537      0.32 core
    e2e     postgresql  1000      3.8   31,469 / 36,383 / 38,574     31,460 / 36,354 / 38,568  (113 of 300
            hand-offs not out of the processor within 30 s after the load; alerts share p50 42 / 31, p99 140 / 139)
    e2e     postgresql   200 (*)  5.4   559 / 2,379 / 3,556 / 3,888  540 / 2,375 / 3,548 / 3,860
            of which ack -> hand-off on its topic (processor): 512 / 2,323 / 3,450; alerts share 45 / 102 / 158,
            34 / 74 / 138                                                        (*) anonymous filler, 4 hand-offs/s

Reading: the alerts service meets the goal with room to spare (p99 about 0.1 s on PostgreSQL on a quiet machine,
under 0.5 s even at a load average of 10 on 2 cores). End to end at 1,000 events/s the goal is not met on this
machine because the processor does not sustain that rate here: bench/bench_processor.py measured 246 events/s for
one worker in the same session (and its own ingest-ack -> hand-off latency at ~1,000 events/s: p50 22 s), so the
hand-offs queue up in front of the processor. Re-run ``--mode e2e`` where the processor keeps up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

API_KEY = "bench-key"
TOKEN = "bench-sales-token"
FULL = {"company": "Bench Seiki", "department": "IT", "title": "IT Manager", "phone": "+81-3-0000-0000",
        "company_size": "800", "industry": "manufacturing"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# ---------------------------------------------------------------------------------------------- receiver process

async def receiver_main(port: int, alerts_url: str, out_path: str, bootstrap: str, handoffs_topic: str) -> None:
    import httpx
    import uvicorn
    from aiokafka import AIOKafkaConsumer

    out = open(out_path, "ab", buffering=0)

    def record(channel: str, alert: dict, t: float) -> None:
        out.write(orjson.dumps({"ch": channel, "t": t, "kind": alert.get("kind"), "id": alert.get("alert_id"),
                                "cause": alert.get("cause_event_id")}) + b"\n")

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        t = time.time()
        if scope.get("method") == "POST":
            record("webhook", orjson.loads(body), t)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def sse() -> None:
        async with httpx.AsyncClient(base_url=alerts_url, timeout=httpx.Timeout(10, read=None)) as c:
            last = None
            while True:
                headers = {"Authorization": f"Bearer {TOKEN}"}
                if last:
                    headers["Last-Event-ID"] = last
                try:
                    async with c.stream("GET", "/v1/alerts/stream", headers=headers) as r:
                        buf = b""
                        async for chunk in r.aiter_raw():
                            t = time.time()
                            buf += chunk
                            while b"\n\n" in buf:
                                block, buf = buf.split(b"\n\n", 1)
                                data = None
                                for line in block.split(b"\n"):
                                    if line.startswith(b"id: "):
                                        last = line[4:].decode()
                                    elif line.startswith(b"data: "):
                                        data = line[6:]
                                if data:
                                    record("sse", orjson.loads(data), t)
                except httpx.HTTPError:
                    await asyncio.sleep(0.2)

    async def topic() -> None:
        """When each hand-off became visible on its topic (read_committed): the processor's share."""
        c = AIOKafkaConsumer(handoffs_topic, bootstrap_servers=bootstrap, isolation_level="read_committed",
                             auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=50)
        await c.start()
        try:
            while True:
                for msgs in (await c.getmany(timeout_ms=100)).values():
                    t = time.time()
                    for m in msgs:
                        h = orjson.loads(m.value)
                        record("topic", {"kind": "handoff", "alert_id": h.get("event_id"),
                                         "cause_event_id": h.get("cause_event_id")}, t)
        finally:
            await c.stop()

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    tasks = [asyncio.create_task(sse()), asyncio.create_task(topic())]
    await server.serve()
    for t in tasks:
        t.cancel()


# ---------------------------------------------------------------------------------------------- load

class Conn:
    """A minimal keep-alive HTTP/1.1 client (the generator shares the CPUs with everything it measures)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Conn":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, path: bytes, body: bytes, headers: bytes) -> tuple[int, bytes]:
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n%s\r\n"
                          % (path, len(body), headers) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return int(head[9:12]), await self.reader.readexactly(length)


class Load:
    def __init__(self, run: str, rate: int, handoffs_per_s: float, anonymous_share: float = 0.5) -> None:
        self.run = run
        self.anonymous_every = round(1 / anonymous_share) if anonymous_share > 0 else 0
        self.rate = rate
        self.hps = handoffs_per_s
        self.n = 0
        self.journeys: list[list] = []   # [lead, next step, next time]
        self.started = 0
        self.next_journey = 0.0
        self.decisive: dict[str, tuple[str, float]] = {}  # event id -> (lead, journey start)

    def _id(self) -> str:
        self.n += 1
        return f"{self.run}-{self.n}"

    def _journey_event(self, lead: str, step: int) -> dict:
        e = {"event_id": self._id(), "occurred_at": now_iso(), "email": lead}
        if step == 0:
            return {**e, "type": "form_submitted",
                    "payload": {"form_id": "bench", "fields": {"name": f"Bench {lead[:12]}", "email": lead, **FULL}}}
        if step == 1:
            return {**e, "type": "content_downloaded", "payload": {"asset_id": "wp-bench", "title": "Guide"}}
        if step in (2, 3):
            return {**e, "type": "page_viewed", "payload": {"url": "https://bench.example/pricing"}}
        return {**e, "type": "event_attended", "payload": {"event": "Bench seminar"}}

    def tick(self, t: float, n_events: int) -> tuple[list[dict], list[str]]:
        """One batch of `n_events` (journey steps first, fillers after) and the decisive ids in it."""
        batch: list[dict] = []
        decisive: list[str] = []
        while self.hps > 0 and t >= self.next_journey:
            self.started += 1
            self.journeys.append([f"j{self.started}-{self.run}@bench.example", 0, t])
            self.next_journey = (self.next_journey or t) + 1.0 / self.hps
        keep = []
        for j in self.journeys:
            if j[2] <= t and len(batch) < n_events:
                ev = self._journey_event(j[0], j[1])
                batch.append(ev)
                if j[1] == 4:
                    decisive.append(ev["event_id"])
                    continue
                j[1] += 1
                j[2] = t + 0.1
            keep.append(j)
        self.journeys = keep
        while len(batch) < n_events:
            i = self.n
            if not self.anonymous_every or i % self.anonymous_every:
                batch.append({"event_id": self._id(), "type": "page_viewed", "occurred_at": now_iso(),
                              "email": f"k{i % 2000}-{self.run}@bench.example",
                              "payload": {"url": "https://bench.example/blog"}})
            else:
                batch.append({"event_id": self._id(), "type": "page_viewed", "occurred_at": now_iso(),
                              "anonymous_id": f"anon-{i % 5000}-{self.run}",
                              "payload": {"url": "https://bench.example/"}})
        return batch, decisive


async def drive(port: int, load: Load, seconds: float, tick_s: float, acks: dict[str, float],
                measure_from: float, measure_to: float) -> tuple[int, float]:
    """Send `load` for `seconds`; acks[decisive id] = wall time of its batch's acknowledgement (measured window)."""
    conns = [await Conn.open(port) for _ in range(8)]
    free = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)
    hdr = b"X-API-Key: %s\r\nContent-Type: application/json\r\n" % API_KEY.encode()
    sent = 0
    pending: set[asyncio.Task] = set()
    per_tick = load.rate * tick_s

    async def post(body: bytes, decisive: list[str], t_send: float) -> None:
        c = await free.get()
        try:
            status, resp = await c.post(b"/v1/events", body, hdr)
        finally:
            free.put_nowait(c)
        t_ack = time.time()
        if status != 200:
            raise RuntimeError(f"ingest answered {status}: {resp[:200]!r}")
        if measure_from <= t_send < measure_to:
            for d in decisive:
                acks[d] = t_ack

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    k = 0
    carry = 0.0
    while True:
        target = t0 + k * tick_s
        now = loop.time()
        if now - t0 >= seconds:
            break
        if target > now:
            await asyncio.sleep(target - now)
        carry += per_tick
        n = int(carry)
        carry -= n
        batch, decisive = load.tick(time.time(), n)
        task = asyncio.create_task(post(orjson.dumps({"events": batch}), decisive, time.time()))
        pending.add(task)
        task.add_done_callback(pending.discard)
        sent += len(batch)
        k += 1
    elapsed = loop.time() - t0
    if pending:
        await asyncio.gather(*pending)
    for c in conns:
        c.writer.close()
    return sent, sent / elapsed


async def drive_synthetic(bootstrap: str, topics: dict[str, str], run: str, rate: int, hps: float, seconds: float,
                          tick_s: float, acks: dict[str, float], measure_from: float, measure_to: float
                          ) -> tuple[int, float]:
    """The processor's output written directly: `rate` by-lead touchpoints/s, each with its lead_scored, and `hps`
    hand-offs/s; acks[cause] = wall time the broker acknowledged the hand-off (the alerts service's own latency)."""
    from services.kafka_io import make_producer

    producer = make_producer(bootstrap, linger_ms=1)
    await producer.start()
    sent = 0
    k = 0
    carry = 0.0
    hcarry = 0.0
    n_ev = 0
    pending: set[asyncio.Task] = set()
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def handoff(lead: str, cause: str, t_send: float) -> None:
        rec = {"event_id": f"{lead}:handoff:1", "type": "lead_handed_off", "lead": lead, "at": now_iso(),
               "cause_event_id": cause, "rules_version": "bench", "episode": 1, "fit": 40.0, "engagement": 43.0,
               "score": 83.0, "explanation": {"fit": [{"rule": "title", "attribute": "title", "points": 15}],
                                              "engagement": [{"rule": "seminar", "points": 15, "events": 1,
                                                              "contribution": 15.0}]},
               "top_touchpoints": [], "attributes": {"name": "Bench", "email": lead, **FULL}}
        await (await producer.send(topics["handoffs"], orjson.dumps(rec), key=lead.encode()))
        t_ack = time.time()
        if measure_from <= t_send < measure_to:
            acks[cause] = t_ack

    try:
        while loop.time() - t0 < seconds:
            target = t0 + k * tick_s
            now = loop.time()
            if target > now:
                await asyncio.sleep(target - now)
            carry += rate * tick_s
            n = int(carry)
            carry -= n
            at = now_iso()
            for _ in range(n):
                n_ev += 1
                lead = f"k{n_ev % 2000}-{run}@bench.example"
                eid = f"{run}-{n_ev}"
                tp = {"event_id": eid, "type": "page_viewed", "occurred_at": at, "received_at": at, "email": lead,
                      "source": "web", "campaign": None, "payload": {"url": "https://bench.example/blog"},
                      "schema_version": 2}
                sc = {"event_id": f"{lead}:scored:{n_ev}", "type": "lead_scored", "lead": lead, "at": at,
                      "cause_event_id": eid, "rules_version": "bench", "fit": 10.0, "engagement": 1.0, "score": 11.0,
                      "fit_before": 10.0, "engagement_before": 0.0, "explanation": {"fit": [], "engagement": []}}
                await producer.send(topics["by_lead"], orjson.dumps(tp), key=lead.encode())
                await producer.send(topics["scores"], orjson.dumps(sc), key=lead.encode())
            sent += n
            hcarry += hps * tick_s
            while hcarry >= 1:
                hcarry -= 1
                n_ev += 1
                t = asyncio.create_task(handoff(f"h{n_ev}-{run}@bench.example", f"{run}-h{n_ev}", time.time()))
                pending.add(t)
                t.add_done_callback(pending.discard)
            k += 1
        elapsed = loop.time() - t0
        if pending:
            await asyncio.gather(*pending)
        await producer.flush()
    finally:
        await producer.stop()
    return sent, sent / elapsed


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process and its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


# ---------------------------------------------------------------------------------------------- orchestration

def spawn(args: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=open(log_path, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=20)


async def wait_http(port: int, path: str, timeout: float, proc: subprocess.Popen, log_path: Path) -> None:
    import httpx

    end = time.monotonic() + timeout
    async with httpx.AsyncClient() as c:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited: {log_path.read_text()[-2000:]}")
            try:
                if (await c.get(f"http://127.0.0.1:{port}{path}")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"{path} on {port} not ready")
            await asyncio.sleep(0.1)


async def wait_port(port: int, timeout: float, proc: subprocess.Popen, log_path: Path) -> None:
    end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {log_path.read_text()[-2000:]}")
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > end:
                raise RuntimeError(f"nothing listens on {port}") from None
            await asyncio.sleep(0.1)


async def probe_processor(run: str, ingest_port: int, alerts_port: int, proc: subprocess.Popen) -> None:
    """The processor is up when a probe journey comes out as an alert."""
    import httpx

    probe = Load(run + "p", 0, 0)
    events = [probe._journey_event(f"probe-{run}@bench.example", step) for step in range(5)]
    conn = await Conn.open(ingest_port)
    status, _ = await conn.post(b"/v1/events", orjson.dumps({"events": events}),
                                b"X-API-Key: %s\r\nContent-Type: application/json\r\n" % API_KEY.encode())
    conn.writer.close()
    assert status == 200, status
    end = time.monotonic() + 120
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{alerts_port}",
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        while not (await c.get("/v1/alerts", params={"kind": "handoff"})).json()["items"]:
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError("the processor produced no hand-off for the probe journey")
            await asyncio.sleep(0.2)


async def bench(a: argparse.Namespace) -> dict:
    import httpx
    import sqlalchemy as sa

    from deploy import infra
    from services.kafka_io import ensure_topics

    run = uuid.uuid4().hex[:8]
    icfg = infra.InfraConfig.from_env()
    infra.kafka_up(icfg)
    names = {"TOUCHPOINTS": "touchpoints", "BY_LEAD": "touchpoints-by-lead", "BY_ANON": "touchpoints-by-anon",
             "SCORES": "lead-scores", "STAGES": "lead-stages", "HANDOFFS": "lead-handoffs",
             "INTENT_ALERTS": "intent-alerts", "REJECTED": "rejected"}
    env = {**os.environ, **{f"LEADLEDGER_TOPIC_{k}": f"bench-{v}-{run}" for k, v in names.items()},
           "LEADLEDGER_PARTITIONS": str(a.partitions), "LEADLEDGER_PROCESSOR_ID": f"bench-proc-{run}",
           "LEADLEDGER_KAFKA_BOOTSTRAP": icfg.bootstrap, "LEADLEDGER_API_KEYS": json.dumps(
               {API_KEY: {"source": "crm", "types": "*"}}),
           "LEADLEDGER_API_TOKENS": json.dumps({TOKEN: "sales"}), "LEADLEDGER_ALERTS_START": "earliest",
           "LEADLEDGER_ALERTS_GROUP": f"bench-alerts-{run}", "LEADLEDGER_LOG_LEVEL": "WARNING"}
    env.pop("LEADLEDGER_KEYSTORE_URL", None)
    await ensure_topics(icfg.bootstrap, [f"bench-{v}-{run}" for v in names.values()], a.partitions)
    workdir = ROOT / "var" / "bench" / f"alerts-{run}"
    workdir.mkdir(parents=True, exist_ok=True)
    schema = None
    if a.db == "postgresql":
        infra.pg_up(icfg)
        base = icfg.pg_dsn
        schema = f"bench_{run}"
        admin = sa.create_engine(base)
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        db_url = f"{base}?options=-csearch_path%3D{schema}"
    else:
        db_url = f"sqlite:///{workdir / 'alerts.db'}"
    env["LEADLEDGER_DATABASE_URL"] = db_url
    ingest_port, alerts_port, recv_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []
    result: dict = {}
    try:
        e2e = a.mode == "e2e"
        if e2e:
            proc = spawn(["-m", "services.cli", "processor", "--loglevel", "warn"], env, workdir / "processor.log")
            procs.append(proc)
            ingest = spawn(["-m", "services.cli", "ingest", "--port", str(ingest_port)], env, workdir / "ingest.log")
            procs.append(ingest)
        alerts = spawn(["-m", "services.cli", "alerts", "--port", str(alerts_port)], env, workdir / "alerts.log")
        procs.append(alerts)
        if e2e:
            await wait_http(ingest_port, "/readyz", 60, ingest, workdir / "ingest.log")
        await wait_http(alerts_port, "/readyz", 60, alerts, workdir / "alerts.log")
        arrivals_path = workdir / "arrivals.jsonl"
        recv = spawn([str(Path(__file__).resolve()), "--receiver", str(recv_port), f"http://127.0.0.1:{alerts_port}",
                      str(arrivals_path), icfg.bootstrap, env["LEADLEDGER_TOPIC_HANDOFFS"]],
                     env, workdir / "receiver.log")
        procs.append(recv)
        await wait_port(recv_port, 30, recv, workdir / "receiver.log")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{alerts_port}",
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            r = await c.post("/v1/webhooks", json={"url": f"http://127.0.0.1:{recv_port}/hook",
                                                   "kinds": ["handoff"]})
            r.raise_for_status()
        if e2e:
            await probe_processor(run, ingest_port, alerts_port, proc)
        await asyncio.sleep(1.0)  # let the receiver's SSE connection settle (it reconnects from its last id)
        acks: dict[str, float] = {}
        t_start = time.time()
        cpu0 = cpu_seconds(alerts.pid)
        if e2e:
            load = Load(run, a.rate, a.handoffs, a.anonymous)
            sent, rate = await drive(ingest_port, load, a.warmup + a.seconds, 0.02, acks, t_start + a.warmup,
                                     t_start + a.warmup + a.seconds)
        else:
            topics = {k: env[f"LEADLEDGER_TOPIC_{u}"] for k, u in (("handoffs", "HANDOFFS"), ("by_lead", "BY_LEAD"),
                                                                    ("scores", "SCORES"))}
            sent, rate = await drive_synthetic(icfg.bootstrap, topics, run, a.rate, a.handoffs, a.warmup + a.seconds,
                                               0.02, acks, t_start + a.warmup, t_start + a.warmup + a.seconds)
        alerts_cpu = (cpu_seconds(alerts.pid) - cpu0) / (time.time() - t_start)
        # wait for the last measured hand-offs to arrive on both channels
        end = time.monotonic() + 30
        while time.monotonic() < end:
            got = _arrivals(arrivals_path)
            if all(d in got["webhook"] and d in got["sse"] for d in acks):
                break
            await asyncio.sleep(0.5)
        got = _arrivals(arrivals_path)
        result = {"mode": a.mode, "db": a.db, "partitions": a.partitions, "target_rate": a.rate, "achieved_rate": round(rate, 1),
                  "events_sent": sent, "measured_handoffs": len(acks),
                  "alerts_cpu_share_of_one_core": round(alerts_cpu, 3), "load_average_1m": os.getloadavg()[0]}
        for ch in ("topic", "webhook", "sse"):
            lat = [(got[ch][d] - t) * 1000 for d, t in acks.items() if d in got[ch]]
            missing = sum(1 for d in acks if d not in got[ch])
            result[ch] = {"n": len(lat), "missing": missing,
                          **({"p50_ms": round(statistics.median(lat), 1), "p90_ms": round(pct(lat, 90), 1),
                              "p99_ms": round(pct(lat, 99), 1), "max_ms": round(max(lat), 1)} if lat else {})}
        async with httpx.AsyncClient() as c:
            m = (await c.get(f"http://127.0.0.1:{alerts_port}/metrics")).text
        vals = {line.split(" ")[0]: float(line.split(" ")[1]) for line in m.splitlines()
                if line.startswith("leadledger_alerts_write_seconds_")}
        if vals.get("leadledger_alerts_write_seconds_count"):
            result["alerts_tx_mean_ms"] = round(1000 * vals["leadledger_alerts_write_seconds_sum"]
                                                / vals["leadledger_alerts_write_seconds_count"], 2)
            result["alerts_tx_count"] = int(vals["leadledger_alerts_write_seconds_count"])
        # the alerts service's own share: from the hand-off visible on its topic to the arrival
        for ch in ("webhook", "sse"):
            lat = [(got[ch][d] - got["topic"][d]) * 1000 for d in acks if d in got[ch] and d in got["topic"]]
            if lat:
                result[f"{ch}_after_topic"] = {"n": len(lat), "p50_ms": round(statistics.median(lat), 1),
                                               "p90_ms": round(pct(lat, 90), 1), "p99_ms": round(pct(lat, 99), 1),
                                               "max_ms": round(max(lat), 1)}
        return result
    finally:
        for p in reversed(procs):
            stop(p)
        if schema is not None:
            admin = sa.create_engine(icfg.pg_dsn)
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


def _arrivals(path: Path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {"webhook": {}, "sse": {}, "topic": {}}
    if not path.exists():
        return out
    for line in path.read_bytes().splitlines():
        try:
            r = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if r.get("kind") == "handoff" and r.get("cause"):
            out[r["ch"]].setdefault(r["cause"], r["t"])
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--receiver":
        asyncio.run(receiver_main(int(argv[1]), argv[2], argv[3], argv[4], argv[5]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=int, default=1000, help="events per second")
    p.add_argument("--seconds", type=float, default=30, help="measured duration")
    p.add_argument("--warmup", type=float, default=10, help="load before measuring")
    p.add_argument("--handoffs", type=float, default=10, help="decisive journeys started per second")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--anonymous", type=float, default=0.5, help="share of filler page views by anonymous visitors")
    p.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    p.add_argument("--mode", choices=["e2e", "alerts"], default="e2e",
                   help="e2e: ingest -> processor -> alerts; alerts: the processor's output written directly "
                        "(by-lead touchpoints + scores at --rate, hand-offs at --handoffs), ack of the hand-off -> "
                        "arrival: the alerts service alone")
    a = p.parse_args(argv)
    result = asyncio.run(bench(a))
    print(json.dumps(result, indent=2))
    for ch in ("topic", "webhook", "sse", "webhook_after_topic", "sse_after_topic"):
        r = result.get(ch, {})
        if "p99_ms" in r:
            print(f"{ch:>19}: n={r['n']} missing={r.get('missing', 0)} p50={r['p50_ms']} ms p90={r['p90_ms']} ms "
                  f"p99={r['p99_ms']} ms max={r['max_ms']} ms  (goal p99 < 500 ms: "
                  f"{'met' if r['p99_ms'] < 500 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ingest throughput beside a raw aiokafka producer on the same broker, in the same run.

    python bench/bench_ingest.py [--events 50000] [--batch 100] [--clients 8] [--pixels 5000] [--repeat 2]

1. batched: ``POST /v1/events`` (uvicorn in a subprocess on loopback, batches of ``--batch``, ``--clients``
   concurrent requests) vs a raw idempotent acks=all producer sending the same encoded envelopes
   (all sends, then one gather: the producer's best case);
2. pixel: ``GET /t.gif`` requests (one event each, ``--clients`` concurrent) vs the raw producer sending
   the same number of events.
Prints events/s for each and the ratio ingest/raw (goal for batched: >= 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from events.envelope import Envelope  # noqa: E402
from events.wire import encode, subject_key  # noqa: E402
from services import kafka_io  # noqa: E402

API_KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_events(n: int, run: str) -> list[dict]:
    types = [("page_viewed", {"url": "https://example.com/pricing", "title": "Pricing"}),
             ("content_downloaded", {"asset_id": "whitepaper-7", "title": "Guide"}),
             ("email_clicked", {"url": "https://example.com/demo", "campaign": "spring"})]
    out = []
    for i in range(n):
        type_, payload = types[i % len(types)]
        out.append({"event_id": f"{run}-{i}", "type": type_, "occurred_at": "2026-03-01T09:00:00.000000+00:00",
                    "email": f"lead{i % 5000}@example.com", "campaign": "spring", "payload": payload})
    return out


async def raw_producer(bootstrap: str, topic: str, events: list[dict], partitions: int) -> float:
    """events/s of a raw idempotent acks=all producer for the same envelopes (encoded up front)."""
    await kafka_io.ensure_topics(bootstrap, [topic], partitions)
    now = datetime.now(timezone.utc)
    msgs = []
    for e in events:
        env = Envelope.model_validate({**e, "received_at": now, "source": "crm"})
        msgs.append((subject_key(env).encode(), encode(env)))
    producer = kafka_io.make_producer(bootstrap)
    await producer.start()
    try:
        await (await producer.send(topic, b"warm-up", key=b"w"))
        t0 = time.perf_counter()
        futs = [await producer.send(topic, value, key=key) for key, value in msgs]
        await asyncio.gather(*futs)
        return len(msgs) / (time.perf_counter() - t0)
    finally:
        await producer.stop()


class Conn:
    """A minimal keep-alive HTTP/1.1 client: the load generator shares the CPUs with the server and the broker,
    so it must cost next to nothing (httpx costs more per request than the server does)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Conn":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, method: bytes, path: bytes, body: bytes = b"", headers: bytes = b"") -> tuple[int, bytes]:
        self.writer.write(b"%s %s HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n%s\r\n"
                          % (method, path, len(body), headers) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return int(head[9:12]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def batched_ingest(port: int, events: list[dict], batch: int, clients: int) -> float:
    bodies = [orjson.dumps({"events": events[i:i + batch]}) for i in range(0, len(events), batch)]
    bodies.reverse()
    hdr = b"X-API-Key: %s\r\nContent-Type: application/json\r\n" % API_KEY.encode()
    accepted = 0

    async def worker() -> None:
        nonlocal accepted
        conn = await Conn.open(port)
        try:
            while bodies:
                status, resp = await conn.request(b"POST", b"/v1/events", bodies.pop(), hdr)
                if status != 200:
                    raise RuntimeError(f"ingest answered {status}: {resp[:200]!r}")
                accepted += orjson.loads(resp)["accepted"]
        finally:
            conn.close()

    warm = await Conn.open(port)
    status, _ = await warm.request(b"POST", b"/v1/events",
                                   orjson.dumps({"events": make_events(1, "warm-" + uuid.uuid4().hex)}), hdr)
    warm.close()
    assert status == 200, status
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    dt = time.perf_counter() - t0
    if accepted != len(events):
        raise RuntimeError(f"accepted {accepted} of {len(events)}")
    return accepted / dt


async def pixel_ingest(port: int, n: int, clients: int, run: str) -> float:
    todo = list(range(n))

    async def worker() -> None:
        conn = await Conn.open(port)
        try:
            while todo:
                i = todo.pop()
                path = b"/t.gif?url=https%%3A%%2F%%2Fexample.com%%2Fpricing&eid=%s-px-%d" % (run.encode(), i)
                status, _ = await conn.request(b"GET", path, headers=b"Cookie: ll_aid=anon-%d\r\n" % (i % 5000))
                if status != 200:
                    raise RuntimeError(f"pixel answered {status}")
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return n / (time.perf_counter() - t0)


def start_server(bootstrap: str, port: int, run: str, partitions: int) -> subprocess.Popen:
    env = {**os.environ, "LEADLEDGER_KAFKA_BOOTSTRAP": bootstrap, "LEADLEDGER_PARTITIONS": str(partitions),
           "LEADLEDGER_API_KEYS": orjson.dumps({API_KEY: {"source": "crm", "types": "*"}}).decode(),
           "LEADLEDGER_FORM_SECRETS": "{}", "PYTHONPATH": str(ROOT)}
    for name in ("TOUCHPOINTS", "BY_LEAD", "BY_ANON", "SCORES", "STAGES", "HANDOFFS", "INTENT_ALERTS", "REJECTED"):
        env[f"LEADLEDGER_TOPIC_{name}"] = f"bench-{name.lower()}-{run}"
    return subprocess.Popen([sys.executable, "-m", "services.ingest", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=5) as c:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("ingest server exited")
            try:
                if (await c.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                raise RuntimeError("ingest server not ready")
            await asyncio.sleep(0.1)


async def run(a: argparse.Namespace) -> None:
    run_id = uuid.uuid4().hex[:8]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(a.bootstrap, port, run_id, a.partitions)
    try:
        await wait_ready(base, proc)
        events = make_events(a.events, run_id)
        pix_events = make_events(a.pixels, run_id + "p")
        raw = ing = raw_px = px = 0.0
        for r in range(a.repeat):  # interleaved, best of each: the box is shared with the broker
            raw = max(raw, await raw_producer(a.bootstrap, f"bench-raw-{run_id}", events, a.partitions))
            ing = max(ing, await batched_ingest(port, make_events(a.events, f"{run_id}-{r}"), a.batch, a.clients))
        print(f"batched  {a.events} events, batch {a.batch}, {a.clients} clients, best of {a.repeat}: "
              f"ingest {ing:,.0f} ev/s | raw aiokafka {raw:,.0f} ev/s | ratio {ing / raw:.2f}", flush=True)
        for r in range(a.repeat):
            raw_px = max(raw_px, await raw_producer(a.bootstrap, f"bench-rawpx-{run_id}", pix_events, a.partitions))
            px = max(px, await pixel_ingest(port, a.pixels, a.clients * 4, f"{run_id}-{r}"))
        print(f"pixel    {a.pixels} requests, {a.clients * 4} clients, best of {a.repeat}: "
              f"ingest {px:,.0f} req/s | raw aiokafka {raw_px:,.0f} ev/s | ratio {px / raw_px:.2f}", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bootstrap", default=os.environ.get("LEADLEDGER_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--pixels", type=int, default=5_000)
    p.add_argument("--partitions", type=int, default=12)
    p.add_argument("--repeat", type=int, default=2, help="interleaved runs per measurement; the best is kept")
    asyncio.run(run(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

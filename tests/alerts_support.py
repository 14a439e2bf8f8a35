"""Helpers for the alerts tests: a real uvicorn server in the test's loop, loopback webhook receivers, an SSE
client, unique topics and synthetic derived events written to the real broker the way the processor writes them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Callable, Optional

import httpx
import orjson
import uvicorn
from aiokafka import AIOKafkaProducer

from services.alerts import AlertsConfig, create_app
from services.config import Settings, Topics
from services.kafka_io import ensure_topics
from services.webhooks import WebhookConfig

SALES = "sales-token-for-tests"
TOKENS = {SALES: "sales", "bi-token-for-tests": "bi", "admin-token-for-tests": "admin"}
AUTH = {"Authorization": f"Bearer {SALES}"}
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)


def ts(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="microseconds")


def topics_for(unique: str) -> Topics:
    return Topics(touchpoints=f"tp-{unique}", by_lead=f"bylead-{unique}", by_anon=f"byanon-{unique}",
                  scores=f"scores-{unique}", stages=f"stages-{unique}", handoffs=f"handoffs-{unique}",
                  intent_alerts=f"intent-{unique}", rejected=f"rejected-{unique}")


def config_for(bootstrap: str, unique: str, database_url: str, **kw: Any) -> AlertsConfig:
    webhook = kw.pop("webhook", None) or WebhookConfig(max_attempts=4, backoff_base_s=0.1, backoff_max_s=0.4,
                                                       timeout_s=1.0, concurrency=4, poll_s=0.2)
    settings = Settings(bootstrap=bootstrap, partitions=2, topics=topics_for(unique), database_url=database_url)
    base = AlertsConfig(settings=settings, group=f"alerts-{unique}", start="earliest", warmup=1000,
                        sla_minutes=15, sla_grace_s=0, heartbeat_s=15, sse_poll_s=0.5,
                        links_base="http://query.test", webhook=webhook)
    return replace(base, **kw)


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Run an ASGI app on a real loopback port (uvicorn, lifespan on) in this loop; yields its base URL."""
    sock = _listening_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1,
                                           timeout_keep_alive=5))
    server.install_signal_handlers = lambda: None  # uvicorn < 0.29
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # keep pytest's handlers
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        end = time.monotonic() + 20
        while not server.started:
            if task.done():
                task.result()
            if time.monotonic() > end:
                raise AssertionError("server did not start")
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
        sock.close()


async def wait_ready(base: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base) as c:
        while True:
            if (await c.get("/readyz")).status_code == 200:
                return
            if time.monotonic() > end:
                raise AssertionError("alerts service not ready")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def alerts_service(cfg: AlertsConfig, **kw: Any) -> AsyncIterator[tuple[str, Any]]:
    """The alerts service on a loopback port, ready (partitions assigned); yields (base URL, app)."""
    await ensure_topics(cfg.settings.bootstrap, [cfg.topics.handoffs, cfg.topics.intent_alerts, cfg.topics.by_lead,
                                                 cfg.topics.scores, cfg.topics.stages], cfg.settings.partitions)
    app = create_app(cfg, TOKENS, **kw)
    async with serve(app) as base:
        await wait_ready(base)
        yield base, app


# ---------------------------------------------------------------------------------------------- receivers

@dataclass
class Req:
    t: float
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A loopback webhook receiver; `behaviour(n)` -> (status, delay seconds) for the n-th request (0-based)."""

    behaviour: Callable[[int], tuple[int, float]] = lambda n: (200, 0.0)
    requests: list[Req] = field(default_factory=list)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        n = len(self.requests)
        self.requests.append(Req(time.monotonic(), {k.decode().lower(): v.decode() for k, v in scope["headers"]},
                                 body))
        status, delay = self.behaviour(n)
        if delay:
            await asyncio.sleep(delay)  # the receiver's own slowness (what a slow endpoint does), not a sync
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok" if status < 300 else b"nope"})


def dead_url() -> tuple[str, socket.socket]:
    """A loopback URL that refuses connections (bound, never listening); keep the socket until the test ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{sock.getsockname()[1]}/hook", sock


# ---------------------------------------------------------------------------------------------- SSE client

@dataclass
class SseEvent:
    id: Optional[str]
    event: str
    data: dict


async def sse_events(client: httpx.AsyncClient, url: str, headers: dict, out: list, comments: Optional[list] = None,
                     stop: Optional[Callable[[], bool]] = None) -> None:
    """Read an SSE stream into `out` (SseEvent) until `stop()` or the stream ends."""
    async with client.stream("GET", url, headers=headers, timeout=httpx.Timeout(30, read=60)) as r:
        assert r.status_code == 200, r.status_code
        buf = ""
        async for chunk in r.aiter_text():
            buf += chunk
            while "\n\n" in buf:
                block, buf = buf.split("\n\n", 1)
                ev_id, ev, data = None, "message", []
                for line in block.split("\n"):
                    if line.startswith(":"):
                        if comments is not None:
                            comments.append(line)
                        continue
                    k, _, v = line.partition(":")
                    v = v[1:] if v.startswith(" ") else v
                    if k == "id":
                        ev_id = v
                    elif k == "event":
                        ev = v
                    elif k == "data":
                        data.append(v)
                if data:
                    out.append(SseEvent(ev_id, ev, orjson.loads("\n".join(data))))
            if stop is not None and stop():
                return


# ---------------------------------------------------------------------------------------------- derived events

class Feed:
    """Writes derived events and by-lead touchpoints like the processor does (keyed by lead)."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.topics = topics
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all",
                                         linger_ms=0)

    async def __aenter__(self) -> "Feed":
        await self.producer.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.producer.stop()

    async def send(self, topic: str, lead: str, rec: dict) -> None:
        await self.producer.send_and_wait(topic, orjson.dumps(rec), key=lead.encode())

    async def touch(self, lead: str, event_id: str, type_: str, at: datetime, **payload: Any) -> None:
        rec = {"event_id": event_id, "type": type_, "occurred_at": ts(at), "received_at": ts(at), "lead_id": None,
               "anonymous_id": None, "email": lead, "source": "crm", "campaign": None, "payload": payload,
               "schema_version": 2}
        await self.send(self.topics.by_lead, lead, rec)

    async def scored(self, lead: str, seq: int, at: datetime, fit: float, eng: float, fit_before: float,
                     eng_before: float, cause: str) -> None:
        await self.send(self.topics.scores, lead, {
            "event_id": f"{lead}:scored:{seq}", "type": "lead_scored", "lead": lead, "at": ts(at),
            "cause_event_id": cause, "rules_version": "v-test", "fit": fit, "engagement": eng, "score": fit + eng,
            "fit_before": fit_before, "engagement_before": eng_before, "explanation": {"fit": [], "engagement": []}})

    async def stage(self, lead: str, n: int, at: datetime, frm: str, to: str, cause: str,
                    by: Optional[str] = None) -> None:
        await self.send(self.topics.stages, lead, {
            "event_id": f"{lead}:stage:{n}", "type": "lead_stage_changed", "lead": lead, "at": ts(at),
            "cause_event_id": cause, "rules_version": "v-test", "from": frm, "to": to, "reason": "test", "by": by})

    async def handoff(self, lead: str, at: datetime, score: float = 60.0, episode: int = 1,
                      cause: Optional[str] = None) -> dict:
        rec = handoff_event(lead, at, score, episode, cause)
        await self.send(self.topics.handoffs, lead, rec)
        return rec

    async def intent(self, lead: str, at: datetime, first: str, then: str) -> dict:
        rec = {"event_id": f"{lead}:intent:doc-then-product:{first}", "type": "intent_alert", "lead": lead,
               "at": ts(at), "cause_event_id": then, "rules_version": "v-test", "rule": "doc-then-product",
               "first_event_id": first, "then_event_id": then}
        await self.send(self.topics.intent_alerts, lead, rec)
        return rec


def handoff_event(lead: str, at: datetime, score: float = 60.0, episode: int = 1, cause: Optional[str] = None) -> dict:
    fit = 25.0
    return {"event_id": f"{lead}:handoff:{episode}", "type": "lead_handed_off", "lead": lead, "at": ts(at),
            "cause_event_id": cause or f"{lead}-cause-{episode}", "rules_version": "v-test", "episode": episode,
            "fit": fit, "engagement": score - fit, "score": score,
            "explanation": {"fit": [{"rule": "decision-maker title", "attribute": "title", "points": 15},
                                    {"rule": "target department", "attribute": "department", "points": 10}],
                            "engagement": [{"rule": "seminar attended", "points": 15, "events": 1,
                                            "contribution": 15.0},
                                           {"rule": "pricing page", "points": 8, "events": 2,
                                            "contribution": score - fit - 15.0}]},
            "top_touchpoints": [{"event_id": f"{lead}-e1", "type": "event_attended", "rule": "seminar attended",
                                 "points": 15, "occurred_at": ts(at), "contribution": 15.0}],
            "attributes": {"name": f"Name of {lead}", "email": lead, "company": "ACME KK", "title": "IT Manager",
                           "department": "IT", "company_size": "800", "phone": "+81-3-0000-0000"}}


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


# ---------------------------------------------------------------------------------------------- browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_executable() -> str:
    """Debian's chromium (installed here, as deploy/setup.sh installs the other system packages, when missing)."""
    import os
    import subprocess

    import pytest

    if not os.path.exists(CHROMIUM):
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "chromium"]):
            if os.path.exists(CHROMIUM):
                break
            subprocess.run(sudo + cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                           timeout=900)
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed and could not be installed (apt-get install chromium)")
    return CHROMIUM

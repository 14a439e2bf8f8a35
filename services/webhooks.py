"""Outgoing webhooks: HMAC signatures, back-off with jitter, and the delivery dispatcher.

Every delivery is a POST of the alert JSON (the same bytes on every attempt) with the headers

    X-Leadledger-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
    X-Leadledger-Delivery:  <delivery id = sha256(subscription id, alert id): stable across retries>
    X-Leadledger-Event:     <handoff | intent | sla_breached | sla_met>
    X-Leadledger-Alert-Id:  <the alert's event id>

A 2xx answer delivers it; anything else (status, time-out, refused connection) is retried with exponential
back-off and jitter (``Retry-After`` on 429/503 is honoured up to the maximum), and after ``max_attempts`` failures
the delivery is dead-lettered (status ``dead``) with the last reason. ``leadledger alerts redrive`` re-queues dead
deliveries. Delivery is at least once: a receiver dedupes on ``X-Leadledger-Delivery``.

Isolation: one :class:`Lane` (an asyncio task with its own HTTP connection pool and a bounded number of requests in
flight) per subscription, so a slow or dead receiver only ever delays itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable, Optional

import httpx
import sqlalchemy as sa

from services import alerts_store as store

log = logging.getLogger("leadledger.webhooks")

SIGNATURE_HEADER = "X-Leadledger-Signature"
DELIVERY_HEADER = "X-Leadledger-Delivery"
EVENT_HEADER = "X-Leadledger-Event"
ALERT_HEADER = "X-Leadledger-Alert-Id"
DEFAULT_TOLERANCE_S = 300


def sign(secret: str, body: bytes, t: Optional[int] = None) -> str:
    """The signature header value for `body` at unix time `t` (now by default)."""
    t = int(time.time()) if t is None else int(t)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, body: bytes, header: str, tolerance_s: float = DEFAULT_TOLERANCE_S,
           now: Optional[float] = None) -> bool:
    """True when `header` signs `body` with `secret` and its timestamp is within `tolerance_s` of now."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (ValueError, KeyError, AttributeError):
        return False
    now = time.time() if now is None else now
    if abs(now - t) > tolerance_s:
        return False
    want = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, parts.get("v1", ""))


def backoff(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (1 = after the first failure): exponential, capped, "equal jitter"
    (half the step fixed, half random), so retries of many deliveries spread out but never shrink to zero."""
    step = min(max_s, base_s * (2 ** max(0, attempt - 1)))
    r = (rng or random).random()
    return step / 2 + r * step / 2


@dataclass(frozen=True)
class WebhookConfig:
    max_attempts: int = 8
    backoff_base_s: float = 1.0
    backoff_max_s: float = 600.0
    timeout_s: float = 5.0
    concurrency: int = 8          # requests in flight per subscription
    poll_s: float = 1.0           # how often lanes look for due retries / redrives and subscriptions are reloaded
    batch: int = 100


@dataclass(frozen=True)
class Fresh:
    """A delivery committed a moment ago, handed to its lane in memory (no database round trip on the hot path;
    retries, redrives and deliveries of other processes come from the table)."""

    id: str
    alert_id: int
    alert_event_id: str
    kind: str
    payload: str
    attempts: int = 0


class Lane:
    """The deliveries of one subscription."""

    RECENT = 10_000

    def __init__(self, dispatcher: "Dispatcher", sub: dict) -> None:
        self.d = dispatcher
        self.sub = sub
        self.wake = asyncio.Event()
        self.task: Optional[asyncio.Task] = None
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(dispatcher.cfg.timeout_s),
                                        limits=httpx.Limits(max_connections=dispatcher.cfg.concurrency,
                                                            max_keepalive_connections=dispatcher.cfg.concurrency),
                                        headers={"User-Agent": "leadledger-webhooks/1"})
        self.inflight: set[str] = set()
        self.fresh: deque[Fresh] = deque()
        self.recent: OrderedDict[str, None] = OrderedDict()  # ids attempted lately (a fresh copy is then stale)
        self.sem = asyncio.Semaphore(dispatcher.cfg.concurrency)

    def push(self, rows: list[Fresh]) -> None:
        self.fresh.extend(rows)
        self.wake.set()

    def _launch(self, row, pending: set) -> None:
        self.inflight.add(row.id)
        self.recent[row.id] = None
        if len(self.recent) > self.RECENT:
            self.recent.popitem(last=False)
        t = asyncio.create_task(self._attempt(row))
        pending.add(t)
        t.add_done_callback(pending.discard)

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"webhook-lane-{self.sub['id']}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        await self.client.aclose()

    async def run(self) -> None:
        cfg = self.d.cfg
        pending: set[asyncio.Task] = set()
        while True:
            try:
                self.wake.clear()  # before looking: a notification from now on is never lost
                while self.fresh and len(self.inflight) < cfg.concurrency:
                    row = self.fresh.popleft()
                    if row.id not in self.inflight and row.id not in self.recent:
                        self._launch(row, pending)
                free = cfg.concurrency - len(self.inflight)
                rows = []
                if free > 0:
                    rows = await self.d.db(store.due_deliveries, self.sub["id"], store.utcnow(),
                                           min(cfg.batch, free), tuple(self.inflight))
                for row in rows:
                    if row.id not in self.inflight:
                        self._launch(row, pending)
                if self.fresh and len(self.inflight) < cfg.concurrency:
                    continue
                if free <= 0 or len(rows) == free:
                    delay = cfg.poll_s  # every slot busy: an attempt that finishes wakes us
                else:
                    nxt = await self.d.db(store.next_due_at, self.sub["id"], tuple(self.inflight))
                    delay = cfg.poll_s
                    if nxt is not None:
                        delay = max(0.0, min(delay, (nxt - store.utcnow()).total_seconds()))
                if delay > 0:
                    try:
                        await asyncio.wait_for(self.wake.wait(), timeout=delay)
                    except asyncio.TimeoutError:
                        pass
            except asyncio.CancelledError:
                for t in pending:
                    t.cancel()
                raise
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the lane
                log.exception("webhook lane %s: error; retrying", self.sub["id"])
                await asyncio.sleep(cfg.poll_s)

    async def _attempt(self, row) -> None:
        cfg = self.d.cfg
        payload = row.payload
        if self.d.prepare is not None:
            try:
                payload = (await self.d.prepare([payload]))[0]
            except Exception:  # noqa: BLE001 - e.g. the keystore is down: retry later, never send ciphertext
                log.warning("webhook delivery %s: could not prepare the body; retrying", row.id)
                await self.d.db(store.record_attempts, [dict(
                    id=row.id, status="pending", attempts=row.attempts, last_status=None,
                    next_attempt_at=store.utcnow() + timedelta(seconds=cfg.poll_s),
                    last_error="could not reveal PII (keystore unavailable)")])
                self.inflight.discard(row.id)
                return
        body = payload.encode()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.sub["secret"], body),
                   DELIVERY_HEADER: row.id, EVENT_HEADER: row.kind, ALERT_HEADER: row.alert_event_id}
        attempts = row.attempts + 1
        code: Optional[int] = None
        retry_after: Optional[float] = None
        try:
            async with self.sem:
                r = await self.client.post(self.sub["url"], content=body, headers=headers)
            code = r.status_code
            ok = 200 <= code < 300
            error = None if ok else f"HTTP {code}: {r.text[:200]}"
            if code in (429, 503):
                try:
                    retry_after = float(r.headers.get("Retry-After", ""))
                except ValueError:
                    retry_after = None
        except httpx.TimeoutException as exc:
            ok, error = False, f"timeout after {cfg.timeout_s}s ({type(exc).__name__})"
        except httpx.HTTPError as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"[:300]
        now = store.utcnow()
        if ok:
            res = dict(id=row.id, status="delivered", attempts=attempts, next_attempt_at=now, last_status=code,
                       delivered_at=now, last_error=None)
            self.d.count("delivered")
        elif attempts >= cfg.max_attempts:
            res = dict(id=row.id, status="dead", attempts=attempts, next_attempt_at=now, last_status=code,
                       last_error=f"dead after {attempts} attempts; last: {error}")
            log.warning("webhook delivery %s to subscription %s dead-lettered: %s", row.id, self.sub["id"], error)
            self.d.count("dead")
        else:
            delay = backoff(attempts, cfg.backoff_base_s, cfg.backoff_max_s, self.d.rng)
            if retry_after is not None:
                delay = min(cfg.backoff_max_s, max(delay, retry_after))
            res = dict(id=row.id, status="pending", attempts=attempts, next_attempt_at=now + timedelta(seconds=delay),
                       last_status=code, last_error=error)
            self.d.count("retry")
        try:
            await self.d.db(store.record_attempts, [res])
        except Exception:  # noqa: BLE001
            log.exception("could not record a webhook attempt (it will be retried: at least once)")
        finally:
            self.inflight.discard(row.id)
            self.wake.set()


class Dispatcher:
    """Runs one :class:`Lane` per active subscription; reloads subscriptions every ``poll_s``."""

    def __init__(self, engine: sa.Engine, cfg: WebhookConfig, rng: random.Random | None = None,
                 on_result: Optional[Callable[[str], None]] = None,
                 prepare: Optional[Callable[[list[str]], Awaitable[list[str]]]] = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.rng = rng or random.Random()
        self.lanes: dict[str, Lane] = {}
        self._task: Optional[asyncio.Task] = None
        self._reload = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhooks-db")
        self._on_result = on_result
        self.prepare = prepare

    def count(self, result: str) -> None:
        if self._on_result:
            self._on_result(result)

    async def db(self, fn, *args):
        def run():
            with self.engine.begin() as conn:
                return fn(conn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    def reload(self) -> None:
        self._reload.set()

    def notify(self, sub_ids) -> None:
        for s in sub_ids:
            lane = self.lanes.get(s)
            if lane is not None:
                lane.wake.set()

    def push(self, fresh: dict[str, list[Fresh]]) -> None:
        """Deliveries just committed, per subscription (a lane not started yet finds them in the table)."""
        for sid, rows in fresh.items():
            lane = self.lanes.get(sid)
            if lane is not None:
                lane.push(rows)

    async def _sync(self) -> None:
        subs = {s["id"]: s for s in await self.db(store.list_subscriptions, True)}
        for sid in list(self.lanes):
            if sid not in subs:
                await self.lanes.pop(sid).stop()
        for sid, s in subs.items():
            lane = self.lanes.get(sid)
            if lane is not None and (lane.sub["url"] != s["url"] or lane.sub["secret"] != s["secret"]):
                lane.sub = s  # url/secret rotation takes effect on the next attempt
            elif lane is None:
                lane = self.lanes[sid] = Lane(self, s)
                lane.start()

    async def _run(self) -> None:
        while True:
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("could not load webhook subscriptions")
            self._reload.clear()
            try:
                await asyncio.wait_for(self._reload.wait(), timeout=self.cfg.poll_s)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        for lane in list(self.lanes.values()):
            await lane.stop()
        self.lanes.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


def utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt

"""The alerts service for inside sales (issue #8): live SSE stream, signed webhooks, SLA tracking, hot-lead board.

One process (``leadledger alerts``, :func:`main`; FastAPI app :func:`create_app`) runs

* the **pipeline** — one aiokafka consumer (read_committed, manual assignment, positions stored in the database)
  over ``lead-handoffs`` and ``intent-alerts`` (the alerts), ``touchpoints-by-lead`` (sales touches and the
  event-time clock of the SLA) and ``lead-scores`` / ``lead-stages`` (context: score before, old stage, owner).
  Each fetched batch becomes at most one database transaction: new alerts in the durable ``alerts`` log (unique on
  the derived event id, so duplicated derived events are one alert), their webhook deliveries, SLA rows and the
  consumed offsets. Then the SSE hub and the webhook lanes are woken up;
* the **SSE hub** — ``GET /v1/alerts/stream`` streams the alert log from any id (``Last-Event-ID``), from an
  in-memory tail of the log (or the database for older ids), with heartbeats;
* the **webhook dispatcher** — one lane per subscription (``services/webhooks.py``);
* the **board** — ``GET /board``, one HTML page fed by the stream.

Topics, tables, payloads and environment: docs/alerts.md.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Literal, Optional
from urllib.parse import urlsplit

import orjson
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, TopicPartition
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, field_validator

from services import alerts_core as core
from services import alerts_store as store
from services.config import Settings, Topics
from services.derived_reader import topic_partitions
from services.kafka_io import ensure_topics
from services.webhooks import Dispatcher, Fresh, WebhookConfig

log = logging.getLogger("leadledger.alerts")

#: used only when LEADLEDGER_API_TOKENS is unset (never deploy with them)
DEV_TOKENS = {"dev-sales-token": "sales", "dev-admin-token": "admin", "dev-bi-token": "bi"}
ALERT_ROLES = frozenset({"sales", "admin"})
MAX_SSE_BATCH = 500


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _flag(name: str, default: str = "0") -> bool:
    return _env(name, default).lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class AlertsConfig:
    settings: Settings = field(default_factory=Settings)
    group: str = "leadledger-alerts"
    start: str = "latest"                 # where a partition without a stored position starts
    warmup: int = 5000                    # context records re-read per partition on start (cache only)
    cache_leads: int = 50_000
    sla_minutes: float = 15.0
    sla_grace_s: float = 60.0
    sla_wall_clock: bool = False
    heartbeat_s: float = 15.0
    sse_poll_s: float = 1.0
    sse_tail: int = 5000
    links_base: str = "http://127.0.0.1:8081"
    offsets_every_s: float = 1.0
    keystore_url: Optional[str] = None    # PII sealed at ingest (issue #7) is revealed on the way out
    keystore_cache_s: float = 30.0
    webhook: WebhookConfig = field(default_factory=WebhookConfig)

    @property
    def database_url(self) -> str:
        return self.settings.database_url

    @property
    def topics(self) -> Topics:
        return self.settings.topics

    @classmethod
    def from_env(cls, **overrides: Any) -> "AlertsConfig":
        query_base = f"http://{_env('LEADLEDGER_QUERY_HOST', '127.0.0.1')}:{_env('LEADLEDGER_QUERY_PORT', '8081')}"
        cfg = cls(
            settings=Settings(),
            group=_env("LEADLEDGER_ALERTS_GROUP", "leadledger-alerts"),
            start=_env("LEADLEDGER_ALERTS_START", "latest"),
            warmup=int(_env("LEADLEDGER_ALERTS_WARMUP", "5000")),
            cache_leads=int(_env("LEADLEDGER_ALERTS_CACHE_LEADS", "50000")),
            sla_minutes=float(_env("LEADLEDGER_SLA_MINUTES", "15")),
            sla_grace_s=float(_env("LEADLEDGER_SLA_GRACE_SECONDS", "60")),
            sla_wall_clock=_flag("LEADLEDGER_SLA_WALL_CLOCK"),
            heartbeat_s=float(_env("LEADLEDGER_SSE_HEARTBEAT_S", "15")),
            links_base=_env("LEADLEDGER_QUERY_PUBLIC_URL", query_base),
            keystore_url=os.environ.get("LEADLEDGER_KEYSTORE_URL") or None,
            keystore_cache_s=float(_env("LEADLEDGER_KEYSTORE_CACHE_S", "30")),
            webhook=WebhookConfig(
                max_attempts=int(_env("LEADLEDGER_WEBHOOK_MAX_ATTEMPTS", "8")),
                backoff_base_s=float(_env("LEADLEDGER_WEBHOOK_BACKOFF_BASE_S", "1")),
                backoff_max_s=float(_env("LEADLEDGER_WEBHOOK_BACKOFF_MAX_S", "600")),
                timeout_s=float(_env("LEADLEDGER_WEBHOOK_TIMEOUT_S", "5")),
                concurrency=int(_env("LEADLEDGER_WEBHOOK_CONCURRENCY", "8")),
                poll_s=float(_env("LEADLEDGER_WEBHOOK_POLL_S", "1")),
            ),
        )
        if cfg.start not in ("latest", "earliest"):
            raise ValueError("LEADLEDGER_ALERTS_START must be latest or earliest")
        return replace(cfg, **overrides) if overrides else cfg


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.alerts = Counter("leadledger_alerts_total", "Alerts written to the alert log", ["kind"],
                              registry=registry)
        self.webhooks = Counter("leadledger_webhook_attempts_total", "Webhook delivery attempts by result",
                                ["result"], registry=registry)
        self.sse = Gauge("leadledger_sse_connections", "Open SSE streams", registry=registry)
        self.records = Counter("leadledger_alerts_records_total", "Kafka records consumed", ["topic"],
                               registry=registry)
        self.write = Histogram("leadledger_alerts_write_seconds", "Pipeline transaction time", registry=registry,
                               buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))


# ---------------------------------------------------------------------------------------------- PII

class Revealer:
    """Opens PII sealed at ingest (``projections.pii``) in alert payloads on their way out — stream, listing,
    webhook bodies — never in the stored log: the ``alerts`` table keeps ciphertext, so destroying a person's key
    (``leadledger forget``) erases the values from every alert at once (they then read ``[erased]``)."""

    PREFIX = "pii:v1:"

    def __init__(self, url: Optional[str], cache_s: float = 30.0) -> None:
        self.url = url
        self.cache_s = cache_s
        self._ks = None
        self._keys: dict[str, tuple[float, Optional[bytes]]] = {}

    async def texts(self, payloads: list[str]) -> list[str]:
        if self.url is None or not any(self.PREFIX in p for p in payloads):
            return payloads
        from projections import pii

        objs = {i: orjson.loads(p) for i, p in enumerate(payloads) if self.PREFIX in p}
        ids = pii.collect_key_ids(objs.values())
        now = time.monotonic()
        need = [k for k in ids if k not in self._keys or now - self._keys[k][0] > self.cache_s]
        if need:
            got = await asyncio.to_thread(self._lookup, need)
            for k in need:
                if k in got:
                    self._keys[k] = (now, got[k])
                else:
                    self._keys.pop(k, None)
            if len(self._keys) > 100_000:
                self._keys.clear()
        keys = {k: self._keys[k][1] for k in ids if k in self._keys}
        out = list(payloads)
        for i, o in objs.items():
            out[i] = orjson.dumps(pii.reveal(o, keys)).decode()
        return out

    def _lookup(self, ids: list[str]) -> dict[str, Optional[bytes]]:
        if self._ks is None:
            from services.keystore import Keystore

            self._ks = Keystore(self.url)
        return self._ks.keys(ids)

    def close(self) -> None:
        if self._ks is not None:
            self._ks.close()


# ---------------------------------------------------------------------------------------------- SSE hub

@dataclass(frozen=True)
class AlertRow:
    id: int
    event_id: str
    kind: str
    lead: str
    owner: Optional[str]
    score: Optional[float]
    payload: str

    @classmethod
    def of(cls, r) -> "AlertRow":
        return cls(r.id, r.event_id, r.kind, r.lead, r.owner, r.score, r.payload)

    def matches(self, kinds: Optional[frozenset], owner: Optional[str], min_score: Optional[float]) -> bool:
        if kinds and self.kind not in kinds:
            return False
        if owner is not None and self.owner != owner:
            return False
        if min_score is not None and (self.score is None or self.score < min_score):
            return False
        return True

    def sse(self, payload: Optional[str] = None) -> str:
        return f"id: {self.id}\nevent: {self.kind}\ndata: {payload or self.payload}\n\n"


class Hub:
    """An in-memory tail of the alert log (ids ascending, contiguous in commit order) that SSE streams read.

    Filled by the in-process pipeline right after each commit and by a poller (alerts written by another process).
    ``base``: every alert with an id > base is in the tail; older resume points read the database.
    """

    def __init__(self, engine: sa.Engine, maxlen: int = 5000, poll_s: float = 1.0) -> None:
        self.engine = engine
        self.maxlen = maxlen
        self.poll_s = poll_s
        self.rows: list[AlertRow] = []
        self.ids: list[int] = []
        self.base = 0
        self.last_id = 0
        self._event = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="alerts-sse-db")

    async def db(self, fn, *args):
        def run():
            with self.engine.connect() as conn:
                return fn(conn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def start(self) -> None:
        rows = await self.db(store.latest_alerts, self.maxlen)
        self.rows = [AlertRow.of(r) for r in rows]
        self.ids = [r.id for r in self.rows]
        if len(rows) < self.maxlen:
            self.base = 0
        else:
            self.base = self.ids[0] - 1
        self.last_id = self.ids[-1] if self.ids else await self.db(store.max_alert_id)
        self._task = asyncio.create_task(self._poll(), name="alerts-hub-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    def publish(self, rows: list[AlertRow]) -> None:
        added = False
        for r in rows:
            if r.id > self.last_id:
                self.rows.append(r)
                self.ids.append(r.id)
                self.last_id = r.id
                added = True
        if len(self.rows) > 2 * self.maxlen:
            cut = len(self.rows) - self.maxlen
            self.base = self.ids[cut - 1]
            del self.rows[:cut]
            del self.ids[:cut]
        if added:
            ev, self._event = self._event, asyncio.Event()
            ev.set()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                rows = await self.db(store.alerts_after, self.last_id, 1000)
                self.publish([AlertRow.of(r) for r in rows])
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.warning("alert hub: database poll failed", exc_info=True)

    async def read(self, after: int, kinds, owner, min_score, limit: int = MAX_SSE_BATCH) -> tuple[list[AlertRow], int]:
        """Matching alerts with id > after (ascending, at most `limit`) and the position the scan reached."""
        if after >= self.base:
            i = bisect.bisect_right(self.ids, after)
            out: list[AlertRow] = []
            pos = self.last_id if self.last_id > after else after
            for j in range(i, len(self.rows)):
                r = self.rows[j]
                if r.matches(kinds, owner, min_score):
                    out.append(r)
                    if len(out) >= limit:
                        pos = r.id
                        break
            return out, pos

        def q(conn):
            top = store.max_alert_id(conn)
            rows = store.alerts_after(conn, after, limit, sorted(kinds) if kinds else None, owner, min_score)
            return top, rows

        top, rows = await self.db(q)
        out = [AlertRow.of(r) for r in rows]
        if len(out) >= limit:
            return out, out[-1].id
        return out, max(top, out[-1].id if out else after, after)

    async def wait_beyond(self, pos: int, timeout: float) -> bool:
        if self.last_id > pos:
            return True
        ev = self._event
        try:
            await asyncio.wait_for(ev.wait(), timeout=timeout)
            return True
        except asyncio.TimeoutError:
            return self.last_id > pos


# ---------------------------------------------------------------------------------------------- pipeline

@dataclass
class _Plan:
    handoffs: list[dict] = field(default_factory=list)
    intents: list[dict] = field(default_factory=list)
    new_episodes: list[core.SlaEpisode] = field(default_factory=list)
    decisions: list[core.SlaEpisode] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)

    def has_work(self) -> bool:
        return bool(self.handoffs or self.intents or self.new_episodes or self.decisions)


def _subscription_wants(sub: dict, kind: str, owner: Optional[str], score: Optional[float]) -> bool:
    kinds = sub.get("kinds") or list(core.DEFAULT_WEBHOOK_KINDS)
    if kind not in kinds:
        return False
    if sub.get("owner") is not None and sub["owner"] != owner:
        return False
    if sub.get("min_score") is not None and (score is None or score < sub["min_score"]):
        return False
    return True


def _dt(x: float) -> datetime:
    return datetime.fromtimestamp(x, timezone.utc)


class Pipeline:
    """Kafka → alert log (+ deliveries, SLA rows, offsets) in one transaction per batch → hub and lanes."""

    def __init__(self, cfg: AlertsConfig, engine: sa.Engine, hub: Hub, dispatcher: Optional[Dispatcher],
                 metrics: Metrics) -> None:
        self.cfg = cfg
        self.engine = engine
        self.hub = hub
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.cache = core.LeadCache(cfg.cache_leads)
        self.sla = core.SlaTracker(cfg.sla_minutes, cfg.sla_grace_s)
        self.ready = asyncio.Event()
        self.live_from: dict[TopicPartition, int] = {}
        self.pending_offsets: dict[tuple[str, int], int] = {}
        self.last_offsets_write = 0.0
        self.stop_event = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alerts-writer")
        self._has_leads: Optional[bool] = None
        self.subs: Optional[list[dict]] = None  # active subscriptions, re-read at most every webhook poll_s
        self.subs_at = 0.0
        t = cfg.topics
        self.alert_topics = (t.handoffs, t.intent_alerts)
        self.context_topics = (t.by_lead, t.scores, t.stages)

    async def _db(self, fn, *args):
        def run():
            with self.engine.begin() as conn:
                return fn(conn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def run_forever(self) -> None:
        delay = 0.5
        while not self.stop_event.is_set():
            try:
                await self.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - Kafka or database down: retry, positions come from the database
                log.exception("alerts pipeline failed; restarting in %.1fs", delay)
                self.ready.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def run(self) -> None:
        cfg = self.cfg
        topics = [*self.alert_topics, *self.context_topics]
        await ensure_topics(cfg.settings.bootstrap, topics, cfg.settings.partitions)
        stored = await self._db(store.load_offsets, cfg.group)
        self.sla = core.SlaTracker(cfg.sla_minutes, cfg.sla_grace_s)
        self.sla.load(core.SlaEpisode(r.handoff_event_id, r.lead, r.episode, r.handoff_at.timestamp(),
                                      r.due_at.timestamp(), r.sla_minutes)
                      for r in await self._db(store.open_slas))
        consumer = AIOKafkaConsumer(bootstrap_servers=cfg.settings.bootstrap, group_id=None,
                                    enable_auto_commit=False, isolation_level="read_committed",
                                    auto_offset_reset="earliest", fetch_max_wait_ms=100,
                                    max_partition_fetch_bytes=4 * 1024 * 1024)
        await consumer.start()
        try:
            tps: list[TopicPartition] = []
            for name in topics:
                parts = await topic_partitions(consumer, name)
                if not parts:
                    raise RuntimeError(f"topic {name} has no partitions yet")
                tps.extend(parts)
            consumer.assign(tps)
            begin = await consumer.beginning_offsets(tps)
            end = await consumer.end_offsets(tps)
            for tp in tps:
                pos = stored.get((tp.topic, tp.partition))
                if pos is None:
                    pos = begin[tp] if cfg.start == "earliest" else end[tp]
                pos = max(pos, begin[tp])
                self.live_from[tp] = pos
                seek = max(begin[tp], pos - cfg.warmup) if tp.topic in self.context_topics else pos
                consumer.seek(tp, seek)
            self.ready.set()
            log.info("alerts pipeline assigned %d partitions", len(tps))
            while not self.stop_event.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                if cfg.sla_wall_clock:
                    self.sla.advance_to(time.time() - cfg.sla_grace_s)
                await self.process(batch)
        finally:
            self.ready.clear()
            await consumer.stop()

    async def process(self, batch: dict) -> None:
        t = self.cfg.topics
        plan = _Plan()
        touches: list[tuple[str, Optional[str], Optional[float], Optional[str]]] = []
        for tp, msgs in batch.items():
            live = self.live_from.get(tp, 0)
            topic = tp.topic
            self.metrics.records.labels(topic).inc(len(msgs))
            if topic == t.scores:  # the bulk of the records: kept raw, parsed only when an alert needs them
                for m in msgs:
                    if m.key:
                        self.cache.on_scored(m.value, m.key.decode("utf-8", "replace"))
                last = msgs[-1].offset + 1 if msgs else live
                if last > live:
                    plan.offsets[(topic, tp.partition)] = last
                continue
            for m in msgs:
                if m.offset >= live:
                    plan.offsets[(topic, tp.partition)] = m.offset + 1
                try:
                    rec = orjson.loads(m.value)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(rec, dict):
                    continue
                warm = m.offset < live
                if topic == t.stages:
                    self.cache.on_stage(rec)
                elif topic == t.by_lead:
                    if not m.key:
                        continue
                    lead = m.key.decode("utf-8", "replace")
                    occ = self.cache.on_touchpoint(lead, rec)
                    if warm:
                        self.sla.observe(occ)
                    elif rec.get("type") != core.RESOLVE_TYPE:
                        touches.append((lead, rec.get("type"), occ, rec.get("event_id")))
                elif warm:
                    continue
                elif topic == t.handoffs and rec.get("type") == "lead_handed_off" and rec.get("lead"):
                    plan.handoffs.append(rec)
                elif topic == t.intent_alerts and rec.get("type") == "intent_alert" and rec.get("lead"):
                    plan.intents.append(rec)
        # SLA: hand-offs open episodes (deciding at once from touches and clocks already seen), then touches
        for h in plan.handoffs:
            at = core.parse_ts(h.get("at"))
            if at is None or h["event_id"] in self.sla.open:
                continue
            e, decided = self.sla.open_episode(h["event_id"], h["lead"], h.get("episode") or 0, at,
                                               self.cache.get(h["lead"]))
            plan.new_episodes.append(e)
            plan.decisions.extend(decided)
        for lead, typ, occ, eid in touches:
            plan.decisions.extend(self.sla.on_touchpoint(lead, typ, occ, eid))
        plan.decisions.extend(self.sla.expire())
        for k, v in plan.offsets.items():
            self.pending_offsets[k] = v
        now = time.monotonic()
        if not plan.has_work() and (not self.pending_offsets or now - self.last_offsets_write < self.cfg.offsets_every_s):
            return
        plan.offsets = dict(self.pending_offsets)
        t0 = time.perf_counter()
        rows, subs = await self._db(self._write, plan)
        self.metrics.write.observe(time.perf_counter() - t0)
        self.pending_offsets.clear()
        self.last_offsets_write = now
        if rows:
            for r in rows:
                self.metrics.alerts.labels(r.kind).inc()
            self.hub.publish(rows)
        if subs and self.dispatcher is not None:
            self.dispatcher.push(subs)

    # -- the transaction (runs in the writer thread while the loop awaits it: the cache is not mutated meanwhile)

    def _write(self, conn: sa.Connection, plan: _Plan) -> tuple[list[AlertRow], dict[str, list[Fresh]]]:
        cfg = self.cfg
        now = store.utcnow()
        rows: list[AlertRow] = []
        notified: dict[str, list[Fresh]] = {}
        deliveries: list[dict] = []
        if plan.has_work():
            store.lock_writers(conn)  # ids commit in id order (SSE resume) even if a second writer runs by mistake
            if self.subs is None or time.monotonic() - self.subs_at > self.cfg.webhook.poll_s:
                self.subs = store.list_subscriptions(conn, True)
                self.subs_at = time.monotonic()

        def add(payloads: list[dict]) -> None:
            """Insert alerts (one statement) and fan each new one out to the matching subscriptions."""
            recs = []
            for p in payloads:
                score = (p.get("score") or {}).get("after")
                recs.append(dict(event_id=p["alert_id"], kind=p["kind"], lead=p["lead"], owner=p.get("owner"),
                                 score=score, at=datetime.fromisoformat(p["at"]), payload=orjson.dumps(p).decode(),
                                 created_at=now))
            ids = store.insert_alerts(conn, recs)
            new = sorted(((ids[r["event_id"]], r) for r in recs if r["event_id"] in ids), key=lambda x: x[0])
            for aid, r in new:
                row = AlertRow(aid, r["event_id"], r["kind"], r["lead"], r["owner"], r["score"], r["payload"])
                rows.append(row)
                for s in self.subs or ():
                    if _subscription_wants(s, row.kind, row.owner, row.score):
                        did = core.delivery_id(s["id"], row.event_id)
                        deliveries.append(dict(id=did, subscription_id=s["id"], alert_id=aid,
                                               alert_event_id=row.event_id, status="pending", attempts=0,
                                               next_attempt_at=now, created_at=now, updated_at=now))
                        notified.setdefault(s["id"], []).append(Fresh(did, aid, row.event_id, row.kind, row.payload))

        handoff_payloads: dict[str, dict] = {}
        first: list[dict] = []
        for h in plan.handoffs:
            p = core.handoff_alert(h, self.cache.get(h["lead"]), cfg.sla_minutes, cfg.links_base)
            handoff_payloads[h["event_id"]] = p
            first.append(p)
        for a in plan.intents:
            info = self.cache.get(a["lead"])
            fallback = None
            if info is None or not info.attrs:
                fallback = self._lead_row(conn, a["lead"])
            first.append(core.intent_alert(a, info, cfg.links_base, fallback))
        add(first)
        store.insert_sla(conn, [dict(handoff_event_id=e.handoff_id, lead=e.lead, episode=e.episode,
                                     sla_minutes=e.minutes, handoff_at=_dt(e.handoff_at), due_at=_dt(e.due_at),
                                     status="open") for e in plan.new_episodes])
        decided: list[dict] = []
        for e in plan.decisions:
            touch = _dt(e.touch_at) if e.touch_at is not None else None
            secs = e.touch_at - e.handoff_at if e.touch_at is not None else None
            changed = store.decide_sla(conn, e.handoff_id, e.status, e.decided_by or "", touch, e.touch_event_id,
                                       secs, _dt(e.due_at) if e.status == "breached" else None)
            if not changed:
                continue  # decided before (a redelivered hand-off or a restart): exactly one outcome
            hp = handoff_payloads.get(e.handoff_id)
            if hp is None:
                raw = store.handoff_payload(conn, e.handoff_id)
                hp = orjson.loads(raw) if raw else {}
            kind = "sla_breached" if e.status == "breached" else "sla_met"
            decided.append(core.sla_alert(kind, hp, e, self.cache.get(e.lead), cfg.links_base))
        add(decided)
        store.insert_deliveries(conn, deliveries)
        store.store_offsets(conn, cfg.group, plan.offsets)
        return rows, notified

    def _lead_row(self, conn: sa.Connection, lead: str) -> Optional[dict]:
        """The lead's row of the ``leads`` projection, if the projector runs on this database."""
        if self._has_leads is None:
            self._has_leads = sa.inspect(conn).has_table("leads")
        if not self._has_leads:
            return None
        from projections.sql_schema import leads

        r = conn.execute(sa.select(leads.c.stage, leads.c.fit, leads.c.engagement, leads.c.attributes,
                                   leads.c.email, leads.c.owner).where(leads.c.lead == lead)).mappings().first()
        return dict(r) if r else None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- HTTP API

def load_tokens() -> dict[str, str]:
    raw = os.environ.get("LEADLEDGER_API_TOKENS")
    if not raw:
        log.warning("LEADLEDGER_API_TOKENS unset: using the development tokens (dev-sales-token, ...)")
        return dict(DEV_TOKENS)
    from services.query_api import load_tokens as parse

    return parse(raw)


def _kinds_param(raw: Optional[list[str]], param: str = "kind") -> Optional[frozenset]:
    if not raw:
        return None
    kinds = {k.strip() for r in raw for k in r.split(",") if k.strip()}
    bad = kinds - set(core.KINDS)
    if bad:
        raise HTTPException(status_code=422, detail=[{"loc": ["query", param], "type": "value_error",
                                                      "msg": f"unknown kind(s) {sorted(bad)}; one of {core.KINDS}"}])
    return frozenset(kinds)


class SubscriptionIn(BaseModel):
    url: str = Field(..., max_length=2000, description="http(s) URL that receives POSTed alerts")
    secret: Optional[str] = Field(None, min_length=16, max_length=256,
                                  description="HMAC secret; generated (and returned once) when omitted")
    kinds: Optional[list[Literal["handoff", "intent", "sla_breached", "sla_met"]]] = Field(
        None, description="alert kinds to receive (default: handoff, intent, sla_breached)")
    owner: Optional[str] = Field(None, max_length=255, description="only alerts of leads owned by this salesperson")
    min_score: Optional[float] = Field(None, description="only alerts whose score is at least this")
    description: Optional[str] = Field(None, max_length=500)
    active: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an absolute http(s) URL")
        return v


class SubscriptionPatch(BaseModel):
    url: Optional[str] = Field(None, max_length=2000)
    secret: Optional[str] = Field(None, min_length=16, max_length=256)
    kinds: Optional[list[Literal["handoff", "intent", "sla_breached", "sla_met"]]] = None
    owner: Optional[str] = Field(None, max_length=255)
    min_score: Optional[float] = None
    description: Optional[str] = Field(None, max_length=500)
    active: Optional[bool] = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else SubscriptionIn._url(v)


def _iso(v: Any) -> Any:
    return v.astimezone(timezone.utc).isoformat(timespec="microseconds") if isinstance(v, datetime) else v


def _sub_json(s: dict, reveal: bool = False) -> dict:
    out = {f: _iso(s.get(f)) for f in store.SUB_FIELDS}
    out["kinds"] = list(s.get("kinds") or core.DEFAULT_WEBHOOK_KINDS)
    if reveal:
        out["secret"] = s["secret"]
    else:
        out["secret_hint"] = "…" + s["secret"][-4:]
    return out


def create_app(cfg: Optional[AlertsConfig] = None, tokens: Optional[dict[str, str]] = None, *,
               consume: bool = True, deliver: bool = True, registry: Optional[CollectorRegistry] = None) -> FastAPI:
    """The alerts service. `consume`: run the Kafka pipeline; `deliver`: run the webhook dispatcher (run exactly
    one process with both per database; SSE-only replicas set both to False)."""
    cfg = cfg or AlertsConfig.from_env()
    tokens = load_tokens() if tokens is None else dict(tokens)
    registry = registry or CollectorRegistry()
    metrics = Metrics(registry)
    engine = store.engine_for(cfg.database_url)
    hub = Hub(engine, maxlen=cfg.sse_tail, poll_s=cfg.sse_poll_s)
    revealer = Revealer(cfg.keystore_url, cfg.keystore_cache_s)
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(store.create_tables, engine)
        await hub.start()
        dispatcher = None
        if deliver:
            dispatcher = Dispatcher(engine, cfg.webhook, on_result=lambda r: metrics.webhooks.labels(r).inc(),
                                    prepare=revealer.texts)
            dispatcher.start()
        state["dispatcher"] = dispatcher
        pipeline = None
        task = None
        if consume:
            pipeline = Pipeline(cfg, engine, hub, dispatcher, metrics)
            task = asyncio.create_task(pipeline.run_forever(), name="alerts-pipeline")
        state["pipeline"] = pipeline
        app.state.pipeline = pipeline
        try:
            yield
        finally:
            if pipeline is not None:
                pipeline.stop_event.set()
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if pipeline is not None:
                pipeline.close()
            if dispatcher is not None:
                await dispatcher.stop()
            await hub.stop()
            revealer.close()
            engine.dispose()

    app = FastAPI(title="leadledger alerts", version="1.0", lifespan=lifespan,
                  description="Hot-lead alerts for inside sales: SSE stream, signed webhooks, SLA, board.")
    app.state.engine = engine
    app.state.hub = hub
    app.state.cfg = cfg
    bearer = HTTPBearer(auto_error=False)

    def sales(creds: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> str:
        if creds is None or creds.scheme.lower() != "bearer" or creds.credentials not in tokens:
            raise HTTPException(status_code=401, detail="missing or invalid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        role = tokens[creds.credentials]
        if role not in ALERT_ROLES:
            raise HTTPException(status_code=403, detail=f"role {role!r} may not use the alerts service")
        return role

    async def db(fn, *args, write: bool = False):
        def run():
            ctx = engine.begin() if write else engine.connect()
            with ctx as conn:
                return fn(conn, *args)
        return await asyncio.to_thread(run)

    @app.get("/v1/alerts/stream", summary="server-sent events: alerts as they happen (resumable)")
    async def stream(
        request: Request,
        role: str = Depends(sales),
        kind: Optional[list[str]] = Query(None, description="handoff, intent, sla_breached, sla_met (comma list)"),
        owner: Optional[str] = Query(None, description="only alerts of leads owned by this salesperson"),
        min_score: Optional[float] = Query(None, description="only alerts whose score is at least this"),
        backlog: int = Query(0, ge=0, le=1000, description="without Last-Event-ID: start with the last N alerts"),
        last_event_id_q: Optional[str] = Query(None, alias="last_event_id",
                                               description="resume after this id (as the Last-Event-ID header)"),
        last_event_id: Optional[str] = Header(None, alias="Last-Event-ID"),
    ):
        kinds = _kinds_param(kind)
        raw = last_event_id if last_event_id not in (None, "") else last_event_id_q
        if raw not in (None, ""):
            try:
                after = int(raw)
                if after < 0:
                    raise ValueError
            except ValueError:
                raise HTTPException(status_code=422, detail=[{"loc": ["header", "Last-Event-ID"],
                                                              "msg": "must be a non-negative integer alert id",
                                                              "type": "value_error"}]) from None
            top = await db(store.max_alert_id)
            if after > top:  # an id this log never issued (e.g. a restored database): continue from its end
                after = top
        elif backlog:
            after = await db(store.backlog_start, backlog, sorted(kinds) if kinds else None, owner, min_score)
        else:
            after = await db(store.max_alert_id)
        heartbeat = cfg.heartbeat_s

        async def events() -> AsyncIterator[str]:
            metrics.sse.inc()
            try:
                yield f"retry: 2000\n: stream from {after}\n\n"
                pos = after
                while True:
                    rows, pos = await hub.read(pos, kinds, owner, min_score)
                    if rows:
                        texts = await revealer.texts([r.payload for r in rows])
                        yield "".join(r.sse(t) for r, t in zip(rows, texts))
                        continue
                    if not await hub.wait_beyond(pos, heartbeat):
                        yield f": heartbeat {int(time.time())}\n\n"
            finally:
                metrics.sse.dec()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/alerts", summary="alerts after an id (JSON; the same log as the stream)")
    async def list_alerts(
        role: str = Depends(sales),
        after: int = Query(0, ge=0, description="alerts with an id greater than this"),
        limit: int = Query(100, ge=1, le=1000),
        kind: Optional[list[str]] = Query(None),
        owner: Optional[str] = Query(None),
        min_score: Optional[float] = Query(None),
    ):
        kinds = _kinds_param(kind)
        rows = await db(store.alerts_after, after, limit, sorted(kinds) if kinds else None, owner, min_score)
        texts = await revealer.texts([r.payload for r in rows])
        return {"items": [{"id": r.id, **orjson.loads(t)} for r, t in zip(rows, texts)],
                "last_id": rows[-1].id if rows else after}

    # -- webhooks

    def _reload() -> None:
        d = state.get("dispatcher")
        if d is not None:
            d.reload()
        p = state.get("pipeline")
        if p is not None:
            p.subs = None  # the next alert transaction fans out to the changed subscriptions

    @app.post("/v1/webhooks", status_code=201, summary="subscribe a URL to alerts (the secret is shown once)")
    async def create_webhook(body: SubscriptionIn, role: str = Depends(sales)):
        secret = body.secret or store.new_secret()
        row = await db(store.create_subscription, body.url, secret, list(body.kinds or core.DEFAULT_WEBHOOK_KINDS),
                       body.owner, body.min_score, body.description, body.active, write=True)
        _reload()
        return _sub_json(row, reveal=True)

    @app.get("/v1/webhooks", summary="list subscriptions (secrets hidden)")
    async def list_webhooks(role: str = Depends(sales)):
        return {"items": [_sub_json(s) for s in await db(store.list_subscriptions)]}

    async def _get(sub_id: str) -> dict:
        s = await db(store.get_subscription, sub_id)
        if s is None:
            raise HTTPException(status_code=404, detail=f"no subscription {sub_id!r}")
        return s

    @app.get("/v1/webhooks/{sub_id}", summary="one subscription")
    async def get_webhook(sub_id: str = Path(..., max_length=40), role: str = Depends(sales)):
        return _sub_json(await _get(sub_id))

    @app.patch("/v1/webhooks/{sub_id}", summary="change URL, filters, secret (rotation) or pause it")
    async def patch_webhook(body: SubscriptionPatch, sub_id: str = Path(..., max_length=40),
                            role: str = Depends(sales)):
        await _get(sub_id)
        changes = body.model_dump(exclude_unset=True)
        for k in ("url", "secret", "active", "kinds"):
            if k in changes and changes[k] is None:
                raise HTTPException(status_code=422, detail=[{"loc": ["body", k], "msg": "may not be null",
                                                              "type": "value_error"}])
        s = await db(store.update_subscription, sub_id, changes, write=True)
        _reload()
        return _sub_json(s, reveal="secret" in changes)

    @app.delete("/v1/webhooks/{sub_id}", status_code=204, summary="unsubscribe (pending deliveries cancelled)")
    async def delete_webhook(sub_id: str = Path(..., max_length=40), role: str = Depends(sales)):
        if not await db(store.delete_subscription, sub_id, write=True):
            raise HTTPException(status_code=404, detail=f"no subscription {sub_id!r}")
        _reload()
        return Response(status_code=204)

    @app.get("/v1/webhooks/{sub_id}/deliveries", summary="deliveries of a subscription (dead letters with reason)")
    async def webhook_deliveries(sub_id: str = Path(..., max_length=40), role: str = Depends(sales),
                                 status: Optional[Literal["pending", "delivered", "dead", "cancelled"]] = Query(None),
                                 limit: int = Query(100, ge=1, le=1000)):
        await _get(sub_id)
        rows = await db(store.list_deliveries, sub_id, status, limit)
        return {"items": [{k: _iso(v) for k, v in r.items()} for r in rows]}

    @app.post("/v1/webhooks/{sub_id}/redrive", summary="re-queue dead-lettered deliveries")
    async def redrive_webhook(sub_id: str = Path(..., max_length=40), role: str = Depends(sales),
                              delivery: Optional[str] = Query(None, max_length=64)):
        await _get(sub_id)
        n = await db(store.redrive, sub_id, delivery, write=True)
        d = state.get("dispatcher")
        if d is not None:
            d.notify([sub_id])
        return {"requeued": n}

    # -- board, health, metrics

    @app.get("/board", response_class=HTMLResponse, include_in_schema=False)
    async def board():
        from services.alerts_board import BOARD_HTML

        return HTMLResponse(BOARD_HTML, headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                       "style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
            "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"})

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        await db(lambda c: c.execute(sa.text("SELECT 1")))
        return {"ok": True}

    @app.get("/readyz", include_in_schema=False)
    async def readyz():
        p = state.get("pipeline")
        if p is not None and not p.ready.is_set():
            return Response(status_code=503, content=b'{"ready":false}', media_type="application/json")
        return {"ready": True}

    @app.get("/metrics", include_in_schema=False)
    async def prom():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


# ---------------------------------------------------------------------------------------------- CLI

def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", default=os.environ.get("LEADLEDGER_DATABASE_URL", "sqlite:///leadledger.db"),
                   help="SQLAlchemy URL (env LEADLEDGER_DATABASE_URL)")


def redrive_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="leadledger alerts redrive",
                                description="re-queue dead-lettered webhook deliveries (fresh attempt budget)")
    _db_arg(p)
    p.add_argument("--subscription", help="only this subscription's dead letters")
    p.add_argument("--delivery", help="only this delivery id")
    a = p.parse_args(argv)
    engine = store.engine_for(a.database_url)
    try:
        store.create_tables(engine)
        with engine.begin() as conn:
            n = store.redrive(conn, a.subscription, a.delivery)
    finally:
        engine.dispose()
    print(f"re-queued {n} dead-lettered deliver{'y' if n == 1 else 'ies'}")
    return 0


def dead_letters_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="leadledger alerts dead-letters", description="list dead-lettered deliveries")
    _db_arg(p)
    p.add_argument("--subscription")
    p.add_argument("--limit", type=int, default=100)
    a = p.parse_args(argv)
    engine = store.engine_for(a.database_url)
    try:
        store.create_tables(engine)
        with engine.connect() as conn:
            rows = store.list_deliveries(conn, a.subscription, "dead", a.limit)
    finally:
        engine.dispose()
    for r in rows:
        print(json.dumps({k: _iso(v) for k, v in r.items()}, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``leadledger alerts [serve|redrive|dead-letters] ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "redrive":
        return redrive_main(argv[1:])
    if argv and argv[0] == "dead-letters":
        return dead_letters_main(argv[1:])
    if argv and argv[0] == "serve":
        argv = argv[1:]
    import uvicorn

    p = argparse.ArgumentParser(prog="leadledger alerts",
                                description="alerts service: SSE stream, webhooks, SLA, board "
                                            "(subcommands: serve (default), redrive, dead-letters)")
    _db_arg(p)
    p.add_argument("--host", default=os.environ.get("LEADLEDGER_ALERTS_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("LEADLEDGER_ALERTS_PORT", "8082")))
    p.add_argument("--no-consume", action="store_true", help="serve the stream only (a read replica)")
    p.add_argument("--no-webhooks", action="store_true", help="do not deliver webhooks from this process")
    a = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LEADLEDGER_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = AlertsConfig.from_env()
    cfg = replace(cfg, settings=replace(cfg.settings, database_url=a.database_url))
    app = create_app(cfg, consume=not a.no_consume, deliver=not a.no_webhooks)
    # no access log: query strings (owner filters) may carry personal names
    uvicorn.run(app, host=a.host, port=a.port, log_level="info", access_log=False)
    return 0

"""SQL tables of the alerts service and every database operation on them (synchronous SQLAlchemy 2).

The tables live in the projections database (``LEADLEDGER_DATABASE_URL``) beside the projections, but in their
own metadata, created with ``create_all`` on start (they are a durable log with delivery state, not a projection:
``leadledger projections rebuild`` leaves them alone).

* ``alerts`` — the durable alert log. ``id`` is a strictly increasing sequence in commit order (writers serialise on
  a PostgreSQL advisory lock; SQLite has one writer at a time), which is what makes the SSE ``Last-Event-ID`` resume
  exact: a reader that saw id N has seen every alert with a smaller id. Unique on ``event_id`` (the derived id), so
  a redelivered derived event is one alert.
* ``webhook_subscriptions`` / ``webhook_deliveries`` — subscriptions (URL, secret, filters) and one delivery row per
  (subscription, alert), id = sha256(subscription id, alert id), with status, attempts, next_attempt_at, last_error.
* ``alert_sla`` — one row per hand-off: due time, first sales touch, status (open / met / breached).
* ``alert_offsets`` — the consumer's Kafka positions, written in the same transaction as the rows they produced.

``sla_section`` is what ``GET /v1/funnel`` of the query API reports under ``sla``.
"""

from __future__ import annotations

import os
import secrets as _secrets
import statistics
from datetime import date, datetime, timezone
from typing import Any, Iterable, Optional, Sequence

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from projections.sql_schema import JSONType, UTCDateTime, make_engine

metadata = sa.MetaData()

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

alerts = sa.Table(
    "alerts", metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(1024), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("lead", sa.String(255), nullable=False),
    sa.Column("owner", sa.String(255)),
    sa.Column("score", sa.Float),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Index("ux_alerts_event_id", "event_id", unique=True),
    sa.Index("ix_alerts_lead", "lead"),
    sqlite_autoincrement=True,
)

webhook_subscriptions = sa.Table(
    "webhook_subscriptions", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("secret", sa.Text, nullable=False),
    sa.Column("kinds", JSONType, nullable=False),
    sa.Column("owner", sa.String(255)),
    sa.Column("min_score", sa.Float),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("description", sa.Text),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("subscription_id", sa.String(40), nullable=False),
    sa.Column("alert_id", _ID, nullable=False),
    sa.Column("alert_event_id", sa.String(1024), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | delivered | dead | cancelled
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
    sa.Column("last_error", sa.Text),
    sa.Column("last_status", sa.Integer),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("delivered_at", UTCDateTime()),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Index("ix_webhook_deliveries_due", "subscription_id", "status", "next_attempt_at"),
)

alert_sla = sa.Table(
    "alert_sla", metadata,
    sa.Column("handoff_event_id", sa.String(1024), primary_key=True),
    sa.Column("lead", sa.String(255), nullable=False),
    sa.Column("episode", sa.Integer, nullable=False),
    sa.Column("sla_minutes", sa.Float, nullable=False),
    sa.Column("handoff_at", UTCDateTime(), nullable=False),
    sa.Column("due_at", UTCDateTime(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # open | met | breached
    sa.Column("first_touch_at", UTCDateTime()),
    sa.Column("first_touch_event_id", sa.String(512)),
    sa.Column("time_to_first_touch_s", sa.Float),
    sa.Column("decided_by", sa.String(32)),
    sa.Column("breached_at", UTCDateTime()),
    sa.Index("ix_alert_sla_status_due", "status", "due_at"),
    sa.Index("ix_alert_sla_lead", "lead"),
)

alert_offsets = sa.Table(
    "alert_offsets", metadata,
    sa.Column("consumer_group", sa.String(255), primary_key=True),
    sa.Column("topic", sa.String(255), primary_key=True),
    sa.Column("partition", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("next_offset", sa.BigInteger, nullable=False),
)

TABLES = (alerts, webhook_subscriptions, webhook_deliveries, alert_sla, alert_offsets)
ADVISORY_LOCK_KEY = 0x1EAD_A1E7  # serialises alert writers on PostgreSQL: ids commit in id order


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _sqlite_wal(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
    finally:
        cur.close()


def engine_for(url: str, **kw) -> sa.Engine:
    """The projections engine (busy timeout / pre-ping), SQLite in WAL mode so the SSE readers never block."""
    if url.startswith("sqlite"):
        kw.setdefault("connect_args", {"timeout": 15})
    engine = make_engine(url, **kw)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_wal)
    return engine


def create_tables(engine: sa.Engine) -> None:
    metadata.create_all(engine, checkfirst=True)


def _insert(conn: sa.Connection, table: sa.Table):
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(conn.dialect.name)


def lock_writers(conn: sa.Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK_KEY})


# ---------------------------------------------------------------------------------------------- alerts

def insert_alert(conn: sa.Connection, event_id: str, kind: str, lead: str, owner: Optional[str],
                 score: Optional[float], at: datetime, payload: str, now: datetime) -> Optional[int]:
    """Insert one alert; its id, or None when the alert existed (a redelivered derived event)."""
    stmt = _insert(conn, alerts).values(event_id=event_id, kind=kind, lead=lead, owner=owner, score=score, at=at,
                                        payload=payload, created_at=now) \
        .on_conflict_do_nothing(index_elements=["event_id"]).returning(alerts.c.id)
    return conn.execute(stmt).scalar()


def insert_alerts(conn: sa.Connection, rows: list[dict]) -> dict[str, int]:
    """Insert alerts in one statement (rows: event_id, kind, lead, owner, score, at, payload, created_at);
    returns {event_id: id} of the new ones (an alert that existed — a redelivered derived event — is left out)."""
    seen: set[str] = set()
    rows = [r for r in rows if not (r["event_id"] in seen or seen.add(r["event_id"]))]
    if not rows:
        return {}
    stmt = _insert(conn, alerts).values(rows).on_conflict_do_nothing(index_elements=["event_id"]) \
        .returning(alerts.c.event_id, alerts.c.id)
    return {e: i for e, i in conn.execute(stmt)}


ALERT_COLS = (alerts.c.id, alerts.c.event_id, alerts.c.kind, alerts.c.lead, alerts.c.owner, alerts.c.score,
              alerts.c.payload)


def alerts_after(conn: sa.Connection, after_id: int, limit: int, kinds: Optional[Sequence[str]] = None,
                 owner: Optional[str] = None, min_score: Optional[float] = None) -> list[sa.Row]:
    q = sa.select(*ALERT_COLS).where(alerts.c.id > after_id)
    if kinds:
        q = q.where(alerts.c.kind.in_(list(kinds)))
    if owner is not None:
        q = q.where(alerts.c.owner == owner)
    if min_score is not None:
        q = q.where(alerts.c.score >= min_score)
    return list(conn.execute(q.order_by(alerts.c.id).limit(limit)))


def latest_alerts(conn: sa.Connection, limit: int) -> list[sa.Row]:
    rows = conn.execute(sa.select(*ALERT_COLS).order_by(alerts.c.id.desc()).limit(limit)).all()
    return list(reversed(rows))


def backlog_start(conn: sa.Connection, n: int, kinds=None, owner=None, min_score=None) -> int:
    """The id to stream after so that the last `n` matching alerts come first."""
    q = sa.select(alerts.c.id)
    if kinds:
        q = q.where(alerts.c.kind.in_(list(kinds)))
    if owner is not None:
        q = q.where(alerts.c.owner == owner)
    if min_score is not None:
        q = q.where(alerts.c.score >= min_score)
    ids = list(conn.execute(q.order_by(alerts.c.id.desc()).limit(n)).scalars())
    if len(ids) < n:
        return 0
    return ids[-1] - 1


def max_alert_id(conn: sa.Connection) -> int:
    return conn.execute(sa.select(sa.func.max(alerts.c.id))).scalar() or 0


def handoff_payload(conn: sa.Connection, handoff_event_id: str) -> Optional[str]:
    return conn.execute(sa.select(alerts.c.payload).where(alerts.c.event_id == handoff_event_id)).scalar()


# ---------------------------------------------------------------------------------------------- SLA rows

def insert_sla(conn: sa.Connection, rows: list[dict]) -> None:
    if rows:
        conn.execute(_insert(conn, alert_sla).on_conflict_do_nothing(index_elements=["handoff_event_id"]), rows)


def decide_sla(conn: sa.Connection, handoff_event_id: str, status: str, decided_by: str,
               first_touch_at: Optional[datetime], first_touch_event_id: Optional[str],
               time_to_first_touch_s: Optional[float], breached_at: Optional[datetime]) -> bool:
    """open -> met/breached (only from open: exactly one decision per episode). True when it changed."""
    r = conn.execute(alert_sla.update().where(alert_sla.c.handoff_event_id == handoff_event_id,
                                              alert_sla.c.status == "open")
                     .values(status=status, decided_by=decided_by, first_touch_at=first_touch_at,
                             first_touch_event_id=first_touch_event_id,
                             time_to_first_touch_s=time_to_first_touch_s, breached_at=breached_at))
    return r.rowcount > 0


def open_slas(conn: sa.Connection) -> list[sa.Row]:
    return list(conn.execute(sa.select(alert_sla).where(alert_sla.c.status == "open")))


# ---------------------------------------------------------------------------------------------- offsets

def load_offsets(conn: sa.Connection, group: str) -> dict[tuple[str, int], int]:
    o = alert_offsets
    return {(t, p): n for t, p, n in conn.execute(
        sa.select(o.c.topic, o.c.partition, o.c.next_offset).where(o.c.consumer_group == group))}


def store_offsets(conn: sa.Connection, group: str, offsets: dict[tuple[str, int], int]) -> None:
    if not offsets:
        return
    ins = _insert(conn, alert_offsets)
    conn.execute(ins.on_conflict_do_update(index_elements=["consumer_group", "topic", "partition"],
                                           set_={"next_offset": ins.excluded.next_offset}),
                 [dict(consumer_group=group, topic=t, partition=p, next_offset=n)
                  for (t, p), n in sorted(offsets.items())])


# ---------------------------------------------------------------------------------------------- subscriptions

SUB_FIELDS = ("id", "url", "kinds", "owner", "min_score", "active", "description", "created_at", "updated_at")


def new_subscription_id() -> str:
    return "sub_" + _secrets.token_hex(8)


def new_secret() -> str:
    return "whsec_" + _secrets.token_urlsafe(24)


def create_subscription(conn: sa.Connection, url: str, secret: str, kinds: list[str], owner: Optional[str],
                        min_score: Optional[float], description: Optional[str], active: bool = True) -> dict:
    now = utcnow()
    row = dict(id=new_subscription_id(), url=url, secret=secret, kinds=list(kinds), owner=owner,
               min_score=min_score, active=active, description=description, created_at=now, updated_at=now)
    conn.execute(webhook_subscriptions.insert().values(**row))
    return row


def get_subscription(conn: sa.Connection, sub_id: str) -> Optional[dict]:
    row = conn.execute(sa.select(webhook_subscriptions).where(webhook_subscriptions.c.id == sub_id)) \
        .mappings().first()
    return dict(row) if row else None


def list_subscriptions(conn: sa.Connection, active_only: bool = False) -> list[dict]:
    q = sa.select(webhook_subscriptions).order_by(webhook_subscriptions.c.created_at, webhook_subscriptions.c.id)
    if active_only:
        q = q.where(webhook_subscriptions.c.active.is_(True))
    return [dict(r) for r in conn.execute(q).mappings()]


def update_subscription(conn: sa.Connection, sub_id: str, changes: dict) -> Optional[dict]:
    if changes:
        changes = dict(changes, updated_at=utcnow())
        conn.execute(webhook_subscriptions.update().where(webhook_subscriptions.c.id == sub_id).values(**changes))
    return get_subscription(conn, sub_id)


def delete_subscription(conn: sa.Connection, sub_id: str) -> bool:
    d = webhook_deliveries
    now = utcnow()
    conn.execute(d.update().where(d.c.subscription_id == sub_id, d.c.status.in_(("pending", "dead")))
                 .values(status="cancelled", updated_at=now, last_error="subscription deleted"))
    return conn.execute(webhook_subscriptions.delete().where(webhook_subscriptions.c.id == sub_id)).rowcount > 0


# ---------------------------------------------------------------------------------------------- deliveries

def insert_deliveries(conn: sa.Connection, rows: list[dict]) -> None:
    if rows:
        conn.execute(_insert(conn, webhook_deliveries).on_conflict_do_nothing(index_elements=["id"]), rows)


def due_deliveries(conn: sa.Connection, sub_id: str, now: datetime, limit: int,
                   exclude: Iterable[str] = ()) -> list[sa.Row]:
    d, a = webhook_deliveries, alerts
    q = sa.select(d.c.id, d.c.alert_id, d.c.alert_event_id, d.c.attempts, a.c.kind, a.c.payload) \
        .select_from(d.join(a, a.c.id == d.c.alert_id)) \
        .where(d.c.subscription_id == sub_id, d.c.status == "pending", d.c.next_attempt_at <= now)
    exclude = list(exclude)
    if exclude:
        q = q.where(d.c.id.not_in(exclude))
    return list(conn.execute(q.order_by(d.c.next_attempt_at, d.c.alert_id).limit(limit)))


def next_due_at(conn: sa.Connection, sub_id: str, exclude: Iterable[str] = ()) -> Optional[datetime]:
    d = webhook_deliveries
    q = sa.select(sa.func.min(d.c.next_attempt_at)).where(d.c.subscription_id == sub_id, d.c.status == "pending")
    exclude = list(exclude)
    if exclude:
        q = q.where(d.c.id.not_in(exclude))
    return conn.execute(q).scalar()


def record_attempts(conn: sa.Connection, results: list[dict]) -> None:
    """Results of delivery attempts: dicts with id, status, attempts, next_attempt_at, last_error, last_status,
    delivered_at. Only a pending row is updated (a concurrent cancel wins)."""
    if not results:
        return
    d = webhook_deliveries
    now = utcnow()
    stmt = d.update().where(d.c.id == sa.bindparam("b_id"), d.c.status == "pending").values(
        status=sa.bindparam("b_status"), attempts=sa.bindparam("b_attempts"),
        next_attempt_at=sa.bindparam("b_next", type_=d.c.next_attempt_at.type),
        last_error=sa.bindparam("b_error"), last_status=sa.bindparam("b_code"),
        delivered_at=sa.bindparam("b_delivered", type_=d.c.delivered_at.type),
        updated_at=sa.bindparam("b_updated", type_=d.c.updated_at.type))
    conn.execute(stmt, [{"b_id": r["id"], "b_status": r["status"], "b_attempts": r["attempts"],
                         "b_next": r["next_attempt_at"], "b_error": r.get("last_error"),
                         "b_code": r.get("last_status"), "b_delivered": r.get("delivered_at"),
                         "b_updated": now} for r in results])


DELIVERY_FIELDS = ("id", "subscription_id", "alert_id", "alert_event_id", "status", "attempts", "next_attempt_at",
                   "last_error", "last_status", "created_at", "delivered_at", "updated_at")


def list_deliveries(conn: sa.Connection, sub_id: Optional[str] = None, status: Optional[str] = None,
                    limit: int = 100, delivery: Optional[str] = None) -> list[dict]:
    d = webhook_deliveries
    q = sa.select(*[d.c[f] for f in DELIVERY_FIELDS])
    if sub_id:
        q = q.where(d.c.subscription_id == sub_id)
    if status:
        q = q.where(d.c.status == status)
    if delivery:
        q = q.where(d.c.id == delivery)
    return [dict(r) for r in conn.execute(q.order_by(d.c.alert_id.desc(), d.c.id).limit(limit)).mappings()]


def redrive(conn: sa.Connection, sub_id: Optional[str] = None, delivery: Optional[str] = None) -> int:
    """Dead-lettered deliveries back to pending, due now, with a fresh attempt budget. Returns how many."""
    d = webhook_deliveries
    now = utcnow()
    q = d.update().where(d.c.status == "dead")
    if sub_id:
        q = q.where(d.c.subscription_id == sub_id)
    if delivery:
        q = q.where(d.c.id == delivery)
    return conn.execute(q.values(status="pending", attempts=0, next_attempt_at=now, updated_at=now)).rowcount


# ---------------------------------------------------------------------------------------------- funnel SLA

def _sla_minutes() -> float:
    return float(os.environ.get("LEADLEDGER_SLA_MINUTES", "15"))


def _median(xs: list[float]) -> Optional[float]:
    return round(statistics.median(xs), 3) if xs else None


def _p90(xs: list[float]) -> Optional[float]:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(0.9 * (len(s) - 1) + 0.5))], 3)


def _sla_metrics(rows: list[tuple], sla_s: float) -> dict:
    """rows: (time_to_first_touch_s | None, sla status | None)."""
    ttft = [r[0] for r in rows if r[0] is not None]
    breached = 0
    met = 0
    open_ = 0
    for secs, status in rows:
        if status == "breached" or (status is None and secs is not None and secs > sla_s):
            breached += 1
        elif status == "met" or (status is None and secs is not None):
            met += 1
        else:
            open_ += 1
    n = len(rows)
    return {"handoffs": n, "touched": len(ttft), "met": met, "breached": breached, "open": open_,
            "breach_rate": round(breached / n, 6) if n else None,
            "median_s_to_first_touch": _median(ttft), "p90_s_to_first_touch": _p90(ttft)}


def _sla_source(conn: sa.Connection, group_by: Optional[str], date_from: Optional[date], date_to: Optional[date],
                has_sla: bool) -> Any:
    """``(g, secs, status)`` of every hand-off of the leads whose first touch falls in the range (UTC dates), as a
    subquery over funnel_handoffs (the hand-offs with their lead's group, kept by the projector)."""
    from projections.sql_schema import funnel_handoffs as fh

    gcol = {"source": fh.c.source, "campaign": fh.c.campaign, "cohort": fh.c.cohort,
            None: sa.literal(None, sa.String)}[group_by]
    cols = [gcol.label("g"), fh.c.secs.label("secs")]
    src = fh
    if has_sla:
        cols.append(alert_sla.c.status.label("status"))
        src = src.outerjoin(alert_sla, alert_sla.c.handoff_event_id == fh.c.event_id)
    else:
        cols.append(sa.literal(None, sa.String).label("status"))
    q = sa.select(*cols).select_from(src)
    if date_from is not None:
        q = q.where(fh.c.day >= date_from)
    if date_to is not None:
        q = q.where(fh.c.day <= date_to)
    return q.subquery("sla_src")


def _sla_sql(conn: sa.Connection, src: Any, sla_s: float, grouped: bool) -> dict[Any, dict]:
    """``{g: _sla_metrics of the group}`` (g None when not grouped), counted and ranked in SQL: the same numbers
    as ``_sla_metrics`` over the rows, without reading them."""
    g = src.c.g if grouped else sa.literal(None, sa.String)
    secs, status = src.c.secs, src.c.status
    breached = sa.or_(status == "breached", sa.and_(status.is_(None), secs.isnot(None), secs > sla_s))
    met = sa.and_(sa.not_(sa.func.coalesce(breached, False)),
                  sa.or_(status == "met", sa.and_(status.is_(None), secs.isnot(None))))
    one = sa.literal(1)
    counts = sa.select(g.label("g"), sa.func.count().label("n"), sa.func.count(secs).label("touched"),
                       sa.func.coalesce(sa.func.sum(sa.case((breached, one), else_=0)), 0).label("breached"),
                       sa.func.coalesce(sa.func.sum(sa.case((met, one), else_=0)), 0).label("met"))
    if grouped:
        counts = counts.group_by(g)

    def p90_rank(t: Any) -> Any:   # 1-based rank of _p90's pick: int(0.9 * (t - 1) + 0.5) + 1, in float8 as Python
        return sa.cast(sa.func.floor(sa.cast(0.9, sa.Float) * (t - 1) + 0.5), sa.Integer) + 1

    out: dict[Any, dict] = {}
    for r in conn.execute(counts).mappings():
        n = int(r["n"])
        if not n:
            continue
        b, m = int(r["breached"]), int(r["met"])
        out[r["g"]] = {"handoffs": n, "touched": int(r["touched"]), "met": m, "breached": b, "open": n - m - b,
                       "breach_rate": round(b / n, 6), "median_s_to_first_touch": None,
                       "p90_s_to_first_touch": None}
    # the middle value(s) and the p90 rank of the times to first touch, per group (ranks as _median / _p90 take)
    ranked = sa.select(g.label("g"), secs.label("secs"),
                       sa.func.row_number().over(partition_by=g, order_by=secs).label("rn"),
                       sa.func.count().over(partition_by=g).label("n")).where(secs.isnot(None)).subquery("r")
    rows = conn.execute(sa.select(ranked.c.g, ranked.c.n, ranked.c.rn, ranked.c.secs).where(sa.or_(
        ranked.c.rn == (ranked.c.n + 1) // 2, ranked.c.rn == ranked.c.n // 2 + 1,
        ranked.c.rn == p90_rank(ranked.c.n))))
    picked: dict[Any, dict[int, float]] = {}
    sizes: dict[Any, int] = {}
    for gv, n, rn, v in rows:
        picked.setdefault(gv, {})[int(rn)] = v
        sizes[gv] = int(n)
    for gv, at in picked.items():
        n = sizes[gv]
        lo, hi = at[(n + 1) // 2], at[n // 2 + 1]
        out[gv]["median_s_to_first_touch"] = round(lo if n % 2 else (lo + hi) / 2, 3)
        out[gv]["p90_s_to_first_touch"] = round(at[min(n - 1, int(0.9 * (n - 1) + 0.5)) + 1], 3)
    return out


_SLA_GROUP_COLS = {"source": "source", "campaign": "campaign", "cohort": "cohort"}


def _sla_pg(conn: sa.Connection, src: Any, sla_s: float, group_by: Optional[str], date_from: Optional[date],
            date_to: Optional[date]) -> tuple[dict, dict[Any, dict]]:
    """PostgreSQL: (overall, {group: ...}) as ``_sla_metrics``. The counts in one pass (grouping sets); the middle
    value(s) and the p90 pick of the times to first touch as the k-th values read through the ordered indexes of
    funnel_handoffs (``(group, secs)``; the p90 from the top), instead of sorting every hand-off."""
    g = src.c.g
    secs, status = src.c.secs, src.c.status
    breached = sa.or_(status == "breached", sa.and_(status.is_(None), secs.isnot(None), secs > sla_s))
    met = sa.and_(sa.not_(sa.func.coalesce(breached, False)),
                  sa.or_(status == "met", sa.and_(status.is_(None), secs.isnot(None))))
    one = sa.literal(1)
    gsel = g if group_by is not None else sa.literal(None, sa.String)
    counts = sa.select((sa.func.grouping(g) if group_by is not None else sa.literal(1)).label("all"), gsel.label("g"),
                       sa.func.count().label("n"),
                       sa.func.count(secs).label("touched"),
                       sa.func.coalesce(sa.func.sum(sa.case((breached, one), else_=0)), 0).label("breached"),
                       sa.func.coalesce(sa.func.sum(sa.case((met, one), else_=0)), 0).label("met"))
    if group_by is not None:
        counts = counts.group_by(sa.text("GROUPING SETS ((), (g))"))
    overall: dict = {}
    groups: dict[Any, dict] = {}
    wanted = []   # (key, overall?, g, touched)
    for r in conn.execute(counts).mappings():
        n = int(r["n"])
        if not n:
            continue
        b, m = int(r["breached"]), int(r["met"])
        is_all = group_by is None or bool(r["all"])
        m_ = {"handoffs": n, "touched": int(r["touched"]), "met": m, "breached": b, "open": n - m - b,
              "breach_rate": round(b / n, 6), "median_s_to_first_touch": None, "p90_s_to_first_touch": None}
        if is_all:
            overall = m_
        else:
            groups[r["g"]] = m_
        if m_["touched"]:
            wanted.append((m_, is_all, r["g"], m_["touched"]))
    gname = _SLA_GROUP_COLS.get(group_by)
    ranges = ["f.secs IS NOT NULL"]
    if date_from is not None:
        ranges.append("f.day >= :date_from")
    if date_to is not None:
        ranges.append("f.day <= :date_to")
    for kind in ("all", "group", "null"):
        reqs = []
        for i, (_m, is_all, gv, t) in enumerate(wanted):
            if (kind == "all") != is_all or (kind == "null") != (not is_all and gv is None):
                continue
            lo = (t + 1) // 2 - 1   # offsets of the middle value(s) from the bottom
            p90 = min(t - 1, int(0.9 * (t - 1) + 0.5))   # _p90's index; read from the top
            reqs += [{"i": i, "k": "mid", "g": gv, "dir": 0, "off": lo, "lim": 2 - t % 2},
                     {"i": i, "k": "p90", "g": gv, "dir": 1, "off": t - 1 - p90, "lim": 1}]
        if not reqs:
            continue
        where = list(ranges)
        if kind == "group":
            where.append(f"f.{gname} = v.g")
        elif kind == "null":
            where.append(f"f.{gname} IS NULL")
        cond = " AND ".join(where)
        gcols = f"f.{gname}, " if kind != "all" else ""
        q = sa.text(
            "SELECT v.i, v.k, x.secs FROM json_to_recordset(CAST(:reqs AS json)) "
            "AS v(i int, k text, g text, dir int, off int, lim int) CROSS JOIN LATERAL ("
            f"(SELECT f.secs FROM funnel_handoffs f WHERE {cond} AND v.dir = 0 "
            f"ORDER BY {gcols}f.secs OFFSET v.off LIMIT v.lim) UNION ALL "
            f"(SELECT f.secs FROM funnel_handoffs f WHERE {cond} AND v.dir = 1 "
            f"ORDER BY {gcols.replace(',', ' DESC,')}f.secs DESC OFFSET v.off LIMIT v.lim)) x "
            "ORDER BY v.i, v.k, x.secs")
        picked: dict[tuple, list[float]] = {}
        for i, k, v in conn.execute(q, {"reqs": orjson.dumps(reqs).decode(), "date_from": date_from,
                                         "date_to": date_to}):
            picked.setdefault((i, k), []).append(v)
        for r in reqs:
            m_, t = wanted[r["i"]][0], wanted[r["i"]][3]
            vals = picked[(r["i"], r["k"])]
            if r["k"] == "mid":
                m_["median_s_to_first_touch"] = round(vals[0] if t % 2 else (vals[0] + vals[1]) / 2, 3)
            else:
                m_["p90_s_to_first_touch"] = round(vals[0], 3)
    return overall, groups


def sla_section(conn: sa.Connection, group_by: Optional[str] = None, date_from: Optional[date] = None,
                date_to: Optional[date] = None) -> dict:
    """SLA figures for ``GET /v1/funnel``: hand-offs, time to first sales touch (median / p90 seconds, from the
    ``funnel_handoffs`` projection), met / breached / open (the alerts service's event-time decision in ``alert_sla``
    when it ran, else from the time to first touch), overall and per group of the funnel's grouping. Counted and
    ranked in SQL (``_sla_metrics`` is the definition)."""
    sla_s = _sla_minutes() * 60
    has_sla = sa.inspect(conn).has_table("alert_sla")
    src = _sla_source(conn, group_by, date_from, date_to, has_sla)
    if conn.dialect.name == "postgresql":
        overall, groups = _sla_pg(conn, src, sla_s, group_by, date_from, date_to)
    else:
        overall = _sla_sql(conn, src, sla_s, False).get(None)
        groups = _sla_sql(conn, src, sla_s, True) if group_by is not None else {}
    out = {"sla_minutes": sla_s / 60, "source": "alert_sla" if has_sla else "handoffs",
           **(overall or _sla_metrics([], sla_s))}
    if group_by is not None:
        out["groups"] = [{"group": g, **groups[g]} for g in sorted(groups, key=lambda x: (x is None, str(x)))]
    return out

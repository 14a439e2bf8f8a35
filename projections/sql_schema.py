"""The SQL projections for BI (PRODUCT.md §5): tables, views, and the Alembic entry points.

The tables below are the *head* of the migration history in ``projections/migrations``; a test compares them
with what the migrations build, so a change here needs a new revision. Columns are documented for analysts in
``docs/projections.md``.

All timestamps are stored in UTC (``TIMESTAMP WITH TIME ZONE`` on PostgreSQL, ISO text on SQLite) and read back
as timezone-aware UTC datetimes. Every value comes from event data, never from the wall clock, so replaying the
same log builds byte-identical tables.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: the main funnel path; conversion is measured between neighbours (PRODUCT.md §4 stages)
FUNNEL_PATH: tuple[str, ...] = ("known", "lead", "mql", "sal", "sql", "opportunity", "won")
STAGES: tuple[str, ...] = ("anonymous", "known", "lead", "mql", "sal", "sql", "opportunity", "won", "lost",
                           "recycled")


class UTCDateTime(sa.types.TypeDecorator):
    """A timezone-aware UTC datetime on every dialect (SQLite keeps naive text, so UTC is re-attached)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


JSONType = sa.JSON().with_variant(JSONB(), "postgresql")

metadata = sa.MetaData()

leads = sa.Table(
    "leads", metadata,
    sa.Column("lead", sa.String(255), primary_key=True),
    sa.Column("email", sa.String(320)),
    sa.Column("stage", sa.String(32)),
    sa.Column("fit", sa.Float, nullable=False, server_default="0"),
    sa.Column("engagement", sa.Float, nullable=False, server_default="0"),
    sa.Column("score", sa.Float, nullable=False, server_default="0"),
    sa.Column("rules_version", sa.String(64)),
    sa.Column("attributes", JSONType, nullable=False),
    sa.Column("first_touch_at", UTCDateTime()),
    sa.Column("last_touch_at", UTCDateTime()),
    sa.Column("first_source", sa.String(64)),
    sa.Column("first_campaign", sa.String(255)),
    sa.Column("cohort", sa.String(7)),
    sa.Column("mql_at", UTCDateTime()),
    sa.Column("owner", sa.String(255)),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("handoffs", sa.Integer, nullable=False, server_default="0"),
    sa.Column("score_seq", sa.Integer),
    sa.Column("stage_seq", sa.Integer),
    sa.Index("ix_leads_first_touch_at", "first_touch_at"),
    # revision 0002
    sa.Index("ix_leads_score_lead", "score", "lead"),
    sa.Index("ix_leads_updated_at_lead", "updated_at", "lead"),
    sa.Index("ix_leads_mql_at_lead", "mql_at", "lead"),
    # revision 0004: keyset pages of one stage / one owner without walking past the others (ix_leads_stage of 0001
    # is dropped: the stage-first indexes serve its lookups)
    sa.Index("ix_leads_stage_score_lead", "stage", "score", "lead"),
    sa.Index("ix_leads_stage_updated_at_lead", "stage", "updated_at", "lead"),
    sa.Index("ix_leads_owner_score_lead", "owner", "score", "lead"),
    # revision 0007: pages of one first source / first campaign / owner
    sa.Index("ix_leads_source_score_lead", "first_source", "score", "lead"),
    sa.Index("ix_leads_source_updated_at_lead", "first_source", "updated_at", "lead"),
    sa.Index("ix_leads_campaign_score_lead", "first_campaign", "score", "lead"),
    sa.Index("ix_leads_campaign_updated_at_lead", "first_campaign", "updated_at", "lead"),
    sa.Index("ix_leads_owner_updated_at_lead", "owner", "updated_at", "lead"),
)

lead_stage_history = sa.Table(
    "lead_stage_history", metadata,
    sa.Column("event_id", sa.String(512), primary_key=True),
    sa.Column("lead", sa.String(255), nullable=False),
    sa.Column("n", sa.Integer),
    sa.Column("from_stage", sa.String(32)),
    sa.Column("to_stage", sa.String(32), nullable=False),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("left_at", UTCDateTime()),
    sa.Column("cause_event_id", sa.String(512)),
    sa.Column("rules_version", sa.String(64)),
    sa.Column("reason", sa.Text),
    sa.Column("by", sa.String(255)),
    sa.Index("ix_lead_stage_history_lead_n", "lead", "n"),
    sa.Index("ix_lead_stage_history_to_stage_at", "to_stage", "at"),
)

lead_score_history = sa.Table(
    "lead_score_history", metadata,
    sa.Column("event_id", sa.String(512), primary_key=True),
    sa.Column("lead", sa.String(255), nullable=False),
    sa.Column("seq", sa.Integer),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("fit", sa.Float, nullable=False),
    sa.Column("engagement", sa.Float, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("fit_before", sa.Float),
    sa.Column("engagement_before", sa.Float),
    sa.Column("explanation", JSONType),
    sa.Column("cause_event_id", sa.String(512)),
    sa.Column("rules_version", sa.String(64)),
    sa.Index("ix_lead_score_history_lead_seq", "lead", "seq"),
)

handoffs = sa.Table(
    "handoffs", metadata,
    sa.Column("event_id", sa.String(512), primary_key=True),
    sa.Column("lead", sa.String(255), nullable=False),
    sa.Column("episode", sa.Integer, nullable=False),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("fit", sa.Float),
    sa.Column("engagement", sa.Float),
    sa.Column("score", sa.Float),
    sa.Column("rules_version", sa.String(64)),
    sa.Column("cause_event_id", sa.String(512)),
    sa.Column("explanation", JSONType),
    sa.Column("top_touchpoints", JSONType),
    sa.Column("first_sales_touch_at", UTCDateTime()),
    sa.Column("time_to_first_touch_s", sa.Float),
    sa.Index("ix_handoffs_lead_episode", "lead", "episode"),
)

touchpoint_archive = sa.Table(
    "touchpoint_archive", metadata,
    sa.Column("event_id", sa.String(128), primary_key=True),
    sa.Column("lead", sa.String(255), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("occurred_at", UTCDateTime(), nullable=False),
    sa.Column("received_at", UTCDateTime()),
    sa.Column("source", sa.String(64)),
    sa.Column("campaign", sa.String(255)),
    sa.Column("envelope", JSONType, nullable=False),
    # revision 0003: the per-lead hash chain (projections/audit_chain.py)
    sa.Column("prev_event_id", sa.String(128)),
    sa.Column("prev_hash", sa.String(64)),
    sa.Column("hash", sa.String(64)),
    sa.Index("ux_touchpoint_archive_lead_seq", "lead", "seq", unique=True),
)

projector_offsets = sa.Table(
    "projector_offsets", metadata,
    sa.Column("consumer_group", sa.String(255), primary_key=True),
    sa.Column("topic", sa.String(255), primary_key=True),
    sa.Column("partition", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("next_offset", sa.BigInteger, nullable=False),
)

# revision 0004: the funnel, maintained by the projector so ``GET /v1/funnel`` reads a few aggregates instead of
# every stage transition (the numbers are those of the transitions; docs/projections.md)

#: funnel_durations.metric values: a completed stay in a stage (``stage`` = that stage), and per lead the days from
#: first touch to the first MQL / won, and from the first MQL / SQL to the first won (``stage`` = '')
DURATION_METRICS = ("stay", "touch_mql", "touch_won", "mql_won", "sql_won")

funnel_leads = sa.Table(
    "funnel_leads", metadata,
    sa.Column("lead", sa.String(255), primary_key=True),
    sa.Column("bucket", sa.String(600), nullable=False),   # JSON [day, source, campaign]: the funnel_daily row
    sa.Column("day", sa.Date),                             # UTC date of the first touch
    sa.Column("source", sa.String(64)),
    sa.Column("campaign", sa.String(255)),
    sa.Column("cohort", sa.String(7)),
    sa.Column("first_touch_at", UTCDateTime()),
    *[sa.Column(f"at_{s}", UTCDateTime()) for s in STAGES],   # first entry into each stage
)

funnel_durations = sa.Table(
    "funnel_durations", metadata,
    sa.Column("lead", sa.String(255), primary_key=True),
    sa.Column("metric", sa.String(16), primary_key=True),
    sa.Column("key", sa.String(512), primary_key=True),    # stay: the transition's event id; others: the lead
    sa.Column("stage", sa.String(32), nullable=False),
    sa.Column("bucket", sa.String(600), nullable=False),
    sa.Column("day", sa.Date),
    sa.Column("source", sa.String(64)),
    sa.Column("campaign", sa.String(255)),
    sa.Column("cohort", sa.String(7)),
    sa.Column("days", sa.Float, nullable=False),
    # the k-th smallest of a group without sorting it (medians): one ordered index per grouping
    sa.Index("ix_funnel_durations_all", "metric", "stage", "days", postgresql_include=["day"]),
    sa.Index("ix_funnel_durations_source", "metric", "stage", "source", "days", postgresql_include=["day"]),
    sa.Index("ix_funnel_durations_campaign", "metric", "stage", "campaign", "days", postgresql_include=["day"]),
    sa.Index("ix_funnel_durations_cohort", "metric", "stage", "cohort", "days", postgresql_include=["day"]),
)

FUNNEL_PAIRS = tuple(zip(FUNNEL_PATH, FUNNEL_PATH[1:]))

funnel_daily = sa.Table(
    "funnel_daily", metadata,
    sa.Column("bucket", sa.String(600), primary_key=True),
    sa.Column("day", sa.Date),
    sa.Column("source", sa.String(64)),
    sa.Column("campaign", sa.String(255)),
    sa.Column("cohort", sa.String(7)),
    sa.Column("leads", sa.Integer, nullable=False),
    *[sa.Column(f"reached_{s}", sa.Integer, nullable=False) for s in STAGES],
    *[sa.Column(f"conv_{a}_{b}", sa.Integer, nullable=False) for a, b in FUNNEL_PAIRS],
    *[sa.Column(f"n_stay_{s}", sa.Integer, nullable=False) for s in STAGES],
    *[sa.Column(f"n_{m}", sa.Integer, nullable=False) for m in DURATION_METRICS[1:]],
    sa.Index("ix_funnel_daily_day", "day"),
)

# revision 0006: funnel_daily rolled up per month (UTC month of the first touch, = the cohort), so a funnel over
# whole months (or no range) sums a few thousand rows; a range sums its whole months here and its edge days in
# funnel_daily
funnel_monthly = sa.Table(
    "funnel_monthly", metadata,
    sa.Column("bucket", sa.String(600), primary_key=True),   # JSON [month, cohort, source, campaign]
    sa.Column("month", sa.String(7)),                         # YYYY-MM of funnel_daily.day
    sa.Column("source", sa.String(64)),
    sa.Column("campaign", sa.String(255)),
    sa.Column("cohort", sa.String(7)),
    *[sa.Column(c.name, sa.Integer, nullable=False) for c in funnel_daily.columns if c.name not in
      ("bucket", "day", "source", "campaign", "cohort")],
    sa.Index("ix_funnel_monthly_month", "month"),
)

# revision 0005: every hand-off with its lead's funnel group, so the funnel's SLA section reads one narrow table
# instead of joining the hand-offs with every lead
funnel_handoffs = sa.Table(
    "funnel_handoffs", metadata,
    sa.Column("event_id", sa.String(512), primary_key=True),   # the hand-off's
    sa.Column("lead", sa.String(255), nullable=False),
    sa.Column("day", sa.Date),                                 # UTC date of the lead's first touch
    sa.Column("source", sa.String(64)),
    sa.Column("campaign", sa.String(255)),
    sa.Column("cohort", sa.String(7)),
    sa.Column("secs", sa.Float),                               # handoffs.time_to_first_touch_s
    sa.Index("ix_funnel_handoffs_lead", "lead"),
    sa.Index("ix_funnel_handoffs_day", "day"),
    # the k-th time to first touch of a group without sorting it (median, p90): one ordered index per grouping
    sa.Index("ix_funnel_handoffs_secs", "secs", postgresql_include=["day"]),
    sa.Index("ix_funnel_handoffs_source_secs", "source", "secs", postgresql_include=["day"]),
    sa.Index("ix_funnel_handoffs_campaign_secs", "campaign", "secs", postgresql_include=["day"]),
    sa.Index("ix_funnel_handoffs_cohort_secs", "cohort", "secs", postgresql_include=["day"]),
)

TABLES = (leads, lead_stage_history, lead_score_history, handoffs, touchpoint_archive, projector_offsets,
          funnel_leads, funnel_durations, funnel_daily, funnel_handoffs, funnel_monthly)
#: SQL views, created by revision 0001 (plain SQL valid on SQLite and PostgreSQL)
VIEWS = ("funnel_conversion", "funnel_transitions")



# ---------------------------------------------------------------- engines and migrations

def make_engine(url: str, **kw) -> sa.Engine:
    """An engine with sane defaults: SQLite with a busy timeout, PostgreSQL with pre-ping."""
    if url.startswith("sqlite"):
        if "timeout=" not in url:
            kw.setdefault("connect_args", {"timeout": 5})
    else:
        kw.setdefault("pool_pre_ping", True)
    return sa.create_engine(url, **kw)


def alembic_config(database_url: str):
    """An Alembic config built in code (no alembic.ini needed in the working directory)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def migrate(database_url: str, revision: str = "head") -> None:
    """Upgrade the database to `revision` (default: the latest)."""
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(database_url), revision)


def current_revision(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def drop_all(database_url: str) -> None:
    """Drop every projection table, view and the Alembic version table (for a rebuild)."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            for v in VIEWS:
                conn.execute(sa.text(f"DROP VIEW IF EXISTS {v}"))
            metadata.drop_all(conn)
            conn.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
    finally:
        engine.dispose()


def migrate_main(argv: list[str] | None = None) -> int:
    """``leadledger projections migrate [--revision REV] [--database-url URL]``."""
    p = argparse.ArgumentParser(prog="leadledger projections migrate",
                                description="create or upgrade the SQL projections (Alembic)")
    p.add_argument("--database-url", default=os.environ.get("LEADLEDGER_DATABASE_URL", "sqlite:///leadledger.db"))
    p.add_argument("--revision", default="head", help="target revision (default: head)")
    p.add_argument("--downgrade", action="store_true", help="downgrade to --revision instead")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if a.downgrade:
        downgrade(a.database_url, a.revision)
    else:
        migrate(a.database_url, a.revision)
    print(f"projections at revision {current_revision(a.database_url)}")
    return 0

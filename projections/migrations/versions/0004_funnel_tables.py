"""The funnel kept by the projector (funnel_leads, funnel_durations, funnel_daily) and stage / owner keyset indexes.

``GET /v1/funnel`` sums funnel_daily (per first-touch day, source, campaign) and takes medians as the k-th values
of funnel_durations through its ordered indexes, instead of reading every stage transition; the upgrade fills the
tables from the stored transitions, as the projector would have. ix_leads_stage gives way to (stage, score, lead)
and (stage, updated_at, lead); (owner, score, lead) serves the owner filter.

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

from projections.sql_schema import STAGES, UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_PATH = ("known", "lead", "mql", "sal", "sql", "opportunity", "won")
_PAIRS = tuple(zip(_PATH, _PATH[1:]))
_METRICS = ("touch_mql", "touch_won", "mql_won", "sql_won")


def upgrade() -> None:
    op.create_index("ix_leads_stage_score_lead", "leads", ["stage", "score", "lead"])
    op.create_index("ix_leads_stage_updated_at_lead", "leads", ["stage", "updated_at", "lead"])
    op.create_index("ix_leads_owner_score_lead", "leads", ["owner", "score", "lead"])
    op.drop_index("ix_leads_stage", table_name="leads")
    op.create_table(
        "funnel_leads",
        sa.Column("lead", sa.String(255), primary_key=True),
        sa.Column("bucket", sa.String(600), nullable=False),
        sa.Column("day", sa.Date),
        sa.Column("source", sa.String(64)),
        sa.Column("campaign", sa.String(255)),
        sa.Column("cohort", sa.String(7)),
        sa.Column("first_touch_at", UTCDateTime()),
        *[sa.Column(f"at_{s}", UTCDateTime()) for s in STAGES],
    )
    op.create_table(
        "funnel_durations",
        sa.Column("lead", sa.String(255), primary_key=True),
        sa.Column("metric", sa.String(16), primary_key=True),
        sa.Column("key", sa.String(512), primary_key=True),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("bucket", sa.String(600), nullable=False),
        sa.Column("day", sa.Date),
        sa.Column("source", sa.String(64)),
        sa.Column("campaign", sa.String(255)),
        sa.Column("cohort", sa.String(7)),
        sa.Column("days", sa.Float, nullable=False),
    )
    for name, cols in (("all", []), ("source", ["source"]), ("campaign", ["campaign"]), ("cohort", ["cohort"])):
        op.create_index(f"ix_funnel_durations_{name}", "funnel_durations", ["metric", "stage", *cols, "days"],
                        postgresql_include=["day"])
    op.create_table(
        "funnel_daily",
        sa.Column("bucket", sa.String(600), primary_key=True),
        sa.Column("day", sa.Date),
        sa.Column("source", sa.String(64)),
        sa.Column("campaign", sa.String(255)),
        sa.Column("cohort", sa.String(7)),
        sa.Column("leads", sa.Integer, nullable=False),
        *[sa.Column(f"reached_{s}", sa.Integer, nullable=False) for s in STAGES],
        *[sa.Column(f"conv_{a}_{b}", sa.Integer, nullable=False) for a, b in _PAIRS],
        *[sa.Column(f"n_stay_{s}", sa.Integer, nullable=False) for s in STAGES],
        *[sa.Column(f"n_{m}", sa.Integer, nullable=False) for m in _METRICS],
    )
    op.create_index("ix_funnel_daily_day", "funnel_daily", ["day"])
    from projections.sql_writer import rebuild_funnel

    rebuild_funnel(op.get_bind(), monthly_table=False)   # funnel_monthly comes with 0006


def downgrade() -> None:
    op.drop_table("funnel_daily")
    op.drop_table("funnel_durations")
    op.drop_table("funnel_leads")
    op.create_index("ix_leads_stage", "leads", ["stage"])
    op.drop_index("ix_leads_owner_score_lead", table_name="leads")
    op.drop_index("ix_leads_stage_updated_at_lead", table_name="leads")
    op.drop_index("ix_leads_stage_score_lead", table_name="leads")

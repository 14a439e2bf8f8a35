"""funnel_handoffs: every hand-off with its lead's funnel group (day, source, campaign, cohort) and its time to first
sales touch, so the SLA section of ``GET /v1/funnel`` reads one narrow table instead of joining the hand-offs with
every lead. The upgrade fills it from handoffs and leads, as the projector would have.

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "funnel_handoffs",
        sa.Column("event_id", sa.String(512), primary_key=True),
        sa.Column("lead", sa.String(255), nullable=False),
        sa.Column("day", sa.Date),
        sa.Column("source", sa.String(64)),
        sa.Column("campaign", sa.String(255)),
        sa.Column("cohort", sa.String(7)),
        sa.Column("secs", sa.Float),
    )
    op.create_index("ix_funnel_handoffs_lead", "funnel_handoffs", ["lead"])
    op.create_index("ix_funnel_handoffs_day", "funnel_handoffs", ["day"])
    op.create_index("ix_funnel_handoffs_secs", "funnel_handoffs", ["secs"], postgresql_include=["day"])
    for g in ("source", "campaign", "cohort"):
        op.create_index(f"ix_funnel_handoffs_{g}_secs", "funnel_handoffs", [g, "secs"], postgresql_include=["day"])
    from projections.sql_writer import rebuild_funnel_handoffs

    rebuild_funnel_handoffs(op.get_bind())


def downgrade() -> None:
    op.drop_table("funnel_handoffs")

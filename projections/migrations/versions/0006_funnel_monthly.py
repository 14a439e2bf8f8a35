"""funnel_monthly: funnel_daily rolled up per month of the first touch, so ``GET /v1/funnel`` sums a few thousand rows
for whole months (or no range) and only the edge days of a range in funnel_daily. The upgrade rolls up the stored
funnel_daily, as the projector would have kept it.

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa

from projections.sql_schema import STAGES

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_PATH = ("known", "lead", "mql", "sal", "sql", "opportunity", "won")
_PAIRS = tuple(zip(_PATH, _PATH[1:]))
_METRICS = ("touch_mql", "touch_won", "mql_won", "sql_won")


def upgrade() -> None:
    op.create_table(
        "funnel_monthly",
        sa.Column("bucket", sa.String(600), primary_key=True),
        sa.Column("month", sa.String(7)),
        sa.Column("source", sa.String(64)),
        sa.Column("campaign", sa.String(255)),
        sa.Column("cohort", sa.String(7)),
        sa.Column("leads", sa.Integer, nullable=False),
        *[sa.Column(f"reached_{s}", sa.Integer, nullable=False) for s in STAGES],
        *[sa.Column(f"conv_{a}_{b}", sa.Integer, nullable=False) for a, b in _PAIRS],
        *[sa.Column(f"n_stay_{s}", sa.Integer, nullable=False) for s in STAGES],
        *[sa.Column(f"n_{m}", sa.Integer, nullable=False) for m in _METRICS],
    )
    op.create_index("ix_funnel_monthly_month", "funnel_monthly", ["month"])
    from projections.sql_writer import fill_funnel_monthly

    fill_funnel_monthly(op.get_bind())


def downgrade() -> None:
    op.drop_table("funnel_monthly")

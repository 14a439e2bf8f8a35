"""Keyset-pagination indexes for the query API sorts (score, updated_at, mql_at; lead as tie-breaker).

Revision ID: 0002
Revises: 0001
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_leads_score_lead", "leads", ["score", "lead"])
    op.create_index("ix_leads_updated_at_lead", "leads", ["updated_at", "lead"])
    op.create_index("ix_leads_mql_at_lead", "leads", ["mql_at", "lead"])


def downgrade() -> None:
    op.drop_index("ix_leads_mql_at_lead", table_name="leads")
    op.drop_index("ix_leads_updated_at_lead", table_name="leads")
    op.drop_index("ix_leads_score_lead", table_name="leads")

"""Keyset indexes for the first-source / first-campaign filters of ``GET /v1/leads`` (by score and by updated_at)
and the owner filter by updated_at: a page of a rare source or campaign no longer walks the whole score / updated_at
order (8,000 heap fetches for a campaign holding 0.6 % of 1M leads).

Revision ID: 0007
Revises: 0006
"""
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

INDEXES = (("ix_leads_source_score_lead", ["first_source", "score", "lead"]),
           ("ix_leads_source_updated_at_lead", ["first_source", "updated_at", "lead"]),
           ("ix_leads_campaign_score_lead", ["first_campaign", "score", "lead"]),
           ("ix_leads_campaign_updated_at_lead", ["first_campaign", "updated_at", "lead"]),
           ("ix_leads_owner_updated_at_lead", ["owner", "updated_at", "lead"]))


def upgrade() -> None:
    for name, cols in INDEXES:
        op.create_index(name, "leads", cols)


def downgrade() -> None:
    for name, _cols in reversed(INDEXES):
        op.drop_index(name, table_name="leads")

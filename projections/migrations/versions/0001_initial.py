"""Initial projections: leads, histories, hand-offs, touchpoint archive, projector offsets, funnel views.

Revision ID: 0001
Revises:
"""
from alembic import op
import sqlalchemy as sa

from projections.sql_schema import JSONType, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_PAIRS = "(0, 'known', 'lead'), (1, 'lead', 'mql'), (2, 'mql', 'sal'), (3, 'sal', 'sql'), " \
         "(4, 'sql', 'opportunity'), (5, 'opportunity', 'won')"

FUNNEL_TRANSITIONS = """
CREATE VIEW funnel_transitions AS
SELECT h.event_id, h.lead, h.n, h.from_stage, h.to_stage, h.at, h.left_at, h.reason, h."by",
       l.first_source, l.first_campaign, l.cohort, l.first_touch_at
FROM lead_stage_history h LEFT JOIN leads l ON l.lead = h.lead
"""

FUNNEL_CONVERSION = f"""
CREATE VIEW funnel_conversion AS
WITH pairs(ord, from_stage, to_stage) AS (VALUES {_PAIRS}),
firsts AS (SELECT lead, to_stage AS stage, MIN(at) AS at FROM lead_stage_history GROUP BY lead, to_stage)
SELECT p.ord, p.from_stage, p.to_stage,
       COUNT(a.lead) AS entered,
       COUNT(b.lead) AS converted,
       CASE WHEN COUNT(a.lead) > 0 THEN CAST(COUNT(b.lead) AS FLOAT) / COUNT(a.lead) END AS conversion_rate
FROM pairs p
LEFT JOIN firsts a ON a.stage = p.from_stage
LEFT JOIN firsts b ON b.lead = a.lead AND b.stage = p.to_stage AND b.at >= a.at
GROUP BY p.ord, p.from_stage, p.to_stage
"""


def upgrade() -> None:
    op.create_table(
        "leads",
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
    )
    op.create_index("ix_leads_stage", "leads", ["stage"])
    op.create_index("ix_leads_first_touch_at", "leads", ["first_touch_at"])

    op.create_table(
        "lead_stage_history",
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
    )
    op.create_index("ix_lead_stage_history_lead_n", "lead_stage_history", ["lead", "n"])
    op.create_index("ix_lead_stage_history_to_stage_at", "lead_stage_history", ["to_stage", "at"])

    op.create_table(
        "lead_score_history",
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
    )
    op.create_index("ix_lead_score_history_lead_seq", "lead_score_history", ["lead", "seq"])

    op.create_table(
        "handoffs",
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
    )
    op.create_index("ix_handoffs_lead_episode", "handoffs", ["lead", "episode"])

    op.create_table(
        "touchpoint_archive",
        sa.Column("event_id", sa.String(128), primary_key=True),
        sa.Column("lead", sa.String(255), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("occurred_at", UTCDateTime(), nullable=False),
        sa.Column("received_at", UTCDateTime()),
        sa.Column("source", sa.String(64)),
        sa.Column("campaign", sa.String(255)),
        sa.Column("envelope", JSONType, nullable=False),
    )
    op.create_index("ux_touchpoint_archive_lead_seq", "touchpoint_archive", ["lead", "seq"], unique=True)

    op.create_table(
        "projector_offsets",
        sa.Column("consumer_group", sa.String(255), primary_key=True),
        sa.Column("topic", sa.String(255), primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
    )

    op.execute(FUNNEL_TRANSITIONS)
    op.execute(FUNNEL_CONVERSION)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS funnel_conversion")
    op.execute("DROP VIEW IF EXISTS funnel_transitions")
    for t in ("projector_offsets", "touchpoint_archive", "handoffs", "lead_score_history", "lead_stage_history",
              "leads"):
        op.drop_table(t)

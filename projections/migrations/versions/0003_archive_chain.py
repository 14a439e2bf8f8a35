"""Tamper evidence: a per-lead hash chain over touchpoint_archive (prev_event_id, prev_hash, hash).

Existing rows are chained in (lead, seq) order by the upgrade, exactly as the projector would have chained them.

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

from projections.audit_chain import link
from projections.sql_schema import touchpoint_archive

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_COLS = ("event_id", "lead", "seq", "type", "occurred_at", "received_at", "source", "campaign", "envelope")


def upgrade() -> None:
    with op.batch_alter_table("touchpoint_archive") as b:
        b.add_column(sa.Column("prev_event_id", sa.String(128)))
        b.add_column(sa.Column("prev_hash", sa.String(64)))
        b.add_column(sa.Column("hash", sa.String(64)))
    conn = op.get_bind()
    a = touchpoint_archive
    rows = conn.execute(sa.select(*[a.c[c] for c in _COLS]).order_by(a.c.lead, a.c.seq)).mappings()
    prev, lead, updates = None, None, []
    stmt = a.update().where(a.c.event_id == sa.bindparam("b_id")).values(
        prev_event_id=sa.bindparam("b_pe"), prev_hash=sa.bindparam("b_ph"), hash=sa.bindparam("b_h"))
    for r in rows.all():
        row = dict(r)
        if row["lead"] != lead:
            lead, prev = row["lead"], None
        link(row, prev)
        prev = (row["hash"], row["event_id"])
        updates.append({"b_id": row["event_id"], "b_pe": row["prev_event_id"], "b_ph": row["prev_hash"],
                        "b_h": row["hash"]})
        if len(updates) >= 2000:
            conn.execute(stmt, updates)
            updates = []
    if updates:
        conn.execute(stmt, updates)


def downgrade() -> None:
    with op.batch_alter_table("touchpoint_archive") as b:
        b.drop_column("hash")
        b.drop_column("prev_hash")
        b.drop_column("prev_event_id")

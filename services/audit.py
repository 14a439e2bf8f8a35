"""Audit commands over the SQL archive: ``leadledger audit verify``, ``leadledger replay``, ``leadledger forget``.

``leadledger audit verify [--lead KEY] [--json]``   walk every lead's hash chain (projections/audit_chain.py);
                                                   exit 1 and one line per problem when anything was altered,
                                                   deleted or reordered
``leadledger replay --lead KEY [--as-of T] [--explain]``  a lead's history from the archive, folded again
``leadledger forget --lead KEY``                   destroy the lead's PII keys (crypto-shredding)

Environment: ``LEADLEDGER_DATABASE_URL`` (the projections/archive), ``LEADLEDGER_KEYSTORE_URL`` (PII keys),
``LEADLEDGER_RULES`` (rule-set files of the processor; default deploy/rules/default.yaml).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator, Optional

import orjson
import sqlalchemy as sa

from projections import sql_schema
from projections.audit_chain import Problem, verify_rows
from projections.sql_schema import touchpoint_archive

_CHAIN_COLS = ("event_id", "lead", "seq", "type", "occurred_at", "received_at", "source", "campaign", "envelope",
               "prev_event_id", "prev_hash", "hash")


def _db_url(given: Optional[str]) -> str:
    return given or os.environ.get("LEADLEDGER_DATABASE_URL", "sqlite:///leadledger.db")


def archive_rows(conn: sa.Connection, lead: Optional[str] = None) -> Iterator[dict]:
    """Archive rows in (lead, seq) order, streamed."""
    a = touchpoint_archive
    q = sa.select(*[a.c[c] for c in _CHAIN_COLS]).order_by(a.c.lead, a.c.seq)
    if lead is not None:
        q = q.where(a.c.lead == lead)
    res = conn.execution_options(stream_results=True, yield_per=5000).execute(q).mappings()
    for r in res:
        yield dict(r)


def verify(database_url: str, lead: Optional[str] = None) -> tuple[int, int, list[Problem]]:
    """(records, leads, problems) of the archive's hash chains (one lead or all)."""
    engine = sql_schema.make_engine(database_url)
    try:
        with engine.connect() as conn:
            return verify_rows(archive_rows(conn, lead))
    finally:
        engine.dispose()


def verify_main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="leadledger audit verify",
                                description="verify the hash chain of every lead's archived touchpoints")
    p.add_argument("--database-url", default=None, help="projections database (env LEADLEDGER_DATABASE_URL)")
    p.add_argument("--lead", help="verify one lead only")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    n, leads, problems = verify(_db_url(a.database_url), a.lead)
    if a.json:
        print(orjson.dumps({"records": n, "leads": leads, "ok": not problems,
                            "problems": [x.as_dict() for x in problems]}).decode())
    else:
        for x in problems:
            print(x.line())
        print(f"verified {n} records of {leads} leads: "
              + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0

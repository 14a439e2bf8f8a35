"""Tamper evidence for the touchpoint archive: a per-lead hash chain, and its verification (issue #7).

Every archived record (``touchpoint_archive`` row) holds ``prev_hash`` and ``prev_event_id`` (the hash and id of
the lead's previous record; the first record of a lead has ``prev_hash = GENESIS`` and ``prev_event_id = None``)
and ``hash = sha256(prev_hash || "\\n" || canonical bytes of the record)``. The projector writes them in the same
transaction as the row (``projections.sql_writer``).

Canonical bytes: a canonical JSON of ``event_id, lead, type, occurred_at, received_at, source, campaign,
envelope, prev_event_id`` — keys sorted, no whitespace, timestamps as UTC ISO text with microseconds, integral
numbers below 10**21 as integer digits and every other number as its normalised decimal (so ``5``, ``5.0`` and
PostgreSQL's JSONB rendering of ``1e20`` or ``1e300`` hash alike: the hash survives the database's own number
normalisation). ``seq`` is not hashed: a record's position is protected
by the chain itself, which is what lets verification tell a *reordered* record from an *altered* one.

``verify_lead(rows)`` reports, per record:

* ``altered``  — the record's content (or its prev_hash / prev_event_id) no longer matches its hash, or its hash
  no longer matches what its successor recorded (content changed and the hash recomputed);
* ``missing``  — a position of the chain is absent (deleted); the id is the ``prev_event_id`` its successor
  recorded (unknown, ``None``, for all but the last of several consecutive deleted records);
* ``reordered`` — the record is intact but sits at a position (``seq``) other than the one the chain gives it.

Limits (docs/audit.md): the chain is not keyed, so someone able to rewrite the whole tail of a lead's chain
consistently, or to delete its latest records, is caught only against an outside anchor (the Kafka log).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Iterable, Optional, Sequence

import orjson

from events.envelope import as_utc

GENESIS = "0" * 64
#: archive ids are at most 128 characters (the column); longer ids (join resolutions keyed by a long lead) hash
MAX_ID = 128


def archive_id(event_id: str) -> str:
    """The id a record is archived under: its event id, or a digest of it when longer than the column."""
    if len(event_id) <= MAX_ID:
        return event_id
    return "sha256:" + hashlib.sha256(event_id.encode()).hexdigest()


def _num(x: Any) -> str:
    """A number's canonical text: integral values below 10**21 as plain integer digits, others as a normalised
    decimal. The same for an int and an equal float, and for a value and PostgreSQL's JSONB rendering of it."""
    if isinstance(x, float):
        if x != x or x in (float("inf"), float("-inf")):
            raise ValueError("non-finite number in an archived record")
        if x.is_integer() and abs(x) < 1e21:
            return str(int(x))
        d = Decimal(repr(x))
    else:
        if abs(x) < 10 ** 21:
            return str(x)
        d = Decimal(x)
    return str(d.normalize())


_Fragment = orjson.Fragment


def _norm(v: Any) -> Any:
    """``v`` with every number replaced by its canonical text (a raw JSON fragment), datetimes as UTC text."""
    t = type(v)
    if t is str or v is None or t is bool:
        return v
    if t is dict:
        return {k if type(k) is str else str(k): _norm(x) for k, x in v.items()}
    if t is list or t is tuple:
        return [_norm(x) for x in v]
    if t is int or t is float:
        return _Fragment(_num(v).encode())
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return _Fragment(_num(v).encode())
    if isinstance(v, dict):
        return {str(k): _norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, datetime):
        return _ts(v)
    raise TypeError(f"cannot canonicalise {type(v).__name__}")


def _ts(v: Any) -> Optional[str]:
    v = as_utc(v)
    return None if v is None else v.astimezone(timezone.utc).isoformat(timespec="microseconds")


def canonical_bytes(row: dict) -> bytes:
    """The canonical bytes of an archive row (a mapping with the archive's column names): compact JSON, keys
    sorted (code point order), numbers in canonical text."""
    rec = {"event_id": row["event_id"], "lead": row["lead"], "type": row["type"],
           "occurred_at": _ts(row["occurred_at"]), "received_at": _ts(row.get("received_at")),
           "source": row.get("source"), "campaign": row.get("campaign"), "envelope": _norm(row["envelope"]),
           "prev_event_id": row.get("prev_event_id")}
    return orjson.dumps(rec, option=orjson.OPT_SORT_KEYS)


def record_hash(prev_hash: str, row: dict) -> str:
    h = hashlib.sha256(prev_hash.encode("ascii"))
    h.update(b"\n")
    h.update(canonical_bytes(row))
    return h.hexdigest()


def link(row: dict, prev: Optional[tuple[str, str]]) -> dict:
    """Fill ``prev_hash``, ``prev_event_id`` and ``hash`` of ``row`` after ``prev`` = (hash, event_id) or None."""
    row["prev_hash"] = prev[0] if prev else GENESIS
    row["prev_event_id"] = prev[1] if prev else None
    row["hash"] = record_hash(row["prev_hash"], row)
    return row


# ---------------------------------------------------------------------------------------------------- verification

@dataclass(frozen=True, order=True)
class Problem:
    lead: str
    seq: int
    kind: str                 # altered | missing | reordered
    event_id: Optional[str]
    detail: str

    def as_dict(self) -> dict:
        return {"lead": self.lead, "seq": self.seq, "kind": self.kind, "event_id": self.event_id,
                "detail": self.detail}

    def line(self) -> str:
        return f"{self.kind} lead={self.lead} seq={self.seq} event_id={self.event_id}: {self.detail}"


def verify_lead(lead: str, rows: Sequence[dict]) -> list[Problem]:
    """Check one lead's archived rows (any order; each a mapping of the archive's columns)."""
    rows = sorted(rows, key=lambda r: r["seq"])
    problems: dict[tuple[str, int, str], Problem] = {}

    def report(kind: str, seq: int, eid: Optional[str], detail: str) -> None:
        problems.setdefault((kind, seq, eid or ""), Problem(lead, seq, kind, eid, detail))

    altered: set[str] = set()
    for r in rows:
        if r.get("hash") is None or r.get("prev_hash") is None:
            report("altered", r["seq"], r["event_id"], "no hash stored")
            altered.add(r["event_id"])
        elif record_hash(r["prev_hash"], r) != r["hash"]:
            report("altered", r["seq"], r["event_id"], "content does not match its hash")
            altered.add(r["event_id"])
    by_hash: dict[str, dict] = {}
    for r in rows:
        if r.get("hash") is not None:
            by_hash.setdefault(r["hash"], r)
    by_seq = {r["seq"]: r for r in rows}

    # the position the chain gives each record: 1 after GENESIS, parent's + 1; an orphan (its parent is gone or
    # was changed) keeps its own seq, and its descendants follow from there
    rank: dict[int, int] = {}
    for r in rows:
        path: list[dict] = []
        on_path: set[int] = set()
        cur: Optional[dict] = r
        base: Optional[int] = None
        while cur is not None and id(cur) not in rank:
            if id(cur) in on_path:  # a cycle (forged hashes): treat as an orphan
                base = cur["seq"] - 1
                break
            path.append(cur)
            on_path.add(id(cur))
            ph = cur.get("prev_hash")
            if ph == GENESIS:
                base = 0
                break
            parent = by_hash.get(ph) if ph is not None else None
            if parent is None or parent is cur:
                base = cur["seq"] - 1
                break
            cur = parent
        if base is None:
            base = rank[id(cur)]
        for p in reversed(path):
            base += 1
            rank[id(p)] = base

    for r in rows:
        ph = r.get("prev_hash")
        if ph is not None and ph != GENESIS and ph not in by_hash and r["event_id"] not in altered:
            # the recorded predecessor is not in the chain: deleted, or changed (and re-hashed)
            before = by_seq.get(r["seq"] - 1)
            if r["seq"] > 1 and before is None:
                report("missing", r["seq"] - 1, r.get("prev_event_id"), "record absent from the chain")
            elif before is not None and before["event_id"] not in altered:
                report("altered", before["seq"], before["event_id"],
                       "its hash differs from the one its successor recorded")
                altered.add(before["event_id"])
        if r["event_id"] not in altered and rank[id(r)] != r["seq"]:
            report("reordered", r["seq"], r["event_id"], f"chain position {rank[id(r)]}, stored at seq {r['seq']}")
    present = set(by_seq)
    top = max(present) if present else 0
    for s in range(1, top):
        if s not in present and not any(k[0] == "missing" and k[1] == s for k in problems):
            report("missing", s, None, "record absent from the chain")
    return sorted(problems.values(), key=lambda p: (p.seq, p.kind, p.event_id or ""))


def verify_rows(rows: Iterable[dict]) -> tuple[int, int, list[Problem]]:
    """Verify rows of many leads, given in (lead, seq) order; returns (records, leads, problems)."""
    problems: list[Problem] = []
    n = leads = 0
    cur: Optional[str] = None
    buf: list[dict] = []
    for r in rows:
        n += 1
        if r["lead"] != cur:
            if buf:
                problems.extend(verify_lead(cur, buf))  # type: ignore[arg-type]
            cur, buf = r["lead"], []
            leads += 1
        buf.append(r)
    if buf:
        problems.extend(verify_lead(cur, buf))  # type: ignore[arg-type]
    return n, leads, problems


# ---------------------------------------------------------------------------------------------------- the log as anchor

RESOLVE_TYPE = "_join_resolved"


def rows_from_log(records: Iterable[tuple[str, dict]]) -> dict[str, list[dict]]:
    """The archive rows, chained, that the projector writes for the lead-keyed log ``(key, record)`` in log
    order (each record as on the topic): the reference against which ``compare_with_log`` checks an archive."""
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    times: dict[str, tuple] = {}
    for key, rec in records:
        aid = archive_id(rec["event_id"])
        if aid in seen:
            continue  # the archive keeps the first copy of an id
        seen.add(aid)
        rows = out.setdefault(key, [])
        if rec.get("type") == RESOLVE_TYPE:
            occ, ra = times.get(rec.get("request_id"), (None, None))
            if occ is None and rows:
                occ, ra = rows[-1]["occurred_at"], rows[-1]["received_at"]
            if occ is None:
                occ = "1970-01-01T00:00:00+00:00"
        else:
            occ, ra = rec["occurred_at"], rec.get("received_at")
            times[rec["event_id"]] = (occ, ra)
        row = {"event_id": aid, "lead": key, "seq": len(rows) + 1, "type": rec["type"], "occurred_at": _ts(occ),
               "received_at": _ts(ra), "source": rec.get("source"), "campaign": rec.get("campaign"),
               "envelope": {k: v for k, v in rec.items() if k != "lead"}}
        link(row, (rows[-1]["hash"], rows[-1]["event_id"]) if rows else None)
        rows.append(row)
    return out


def _content(row: dict) -> bytes:
    return canonical_bytes({**row, "prev_event_id": None})


def compare_with_log(lead: str, expected: Sequence[dict], archived: Sequence[dict]) -> list[Problem]:
    """An archived chain against the one the log implies. Catches what the chain alone cannot: deleted latest
    records, and alterations whose chain was recomputed to the end. Differences that follow from an earlier one
    (shifted positions, hashes after an altered record) are not reported again."""
    by_id = {r["event_id"]: r for r in archived}
    problems: list[Problem] = []
    explained = False
    for e in expected:
        a = by_id.pop(e["event_id"], None)
        if a is None:
            problems.append(Problem(lead, e["seq"], "missing", e["event_id"], "in the log, not in the archive"))
            explained = True
        elif _content(a) != _content(e):
            problems.append(Problem(lead, a["seq"], "altered", e["event_id"], "differs from the log"))
            explained = True
        elif not explained and a["seq"] != e["seq"]:
            problems.append(Problem(lead, a["seq"], "reordered", e["event_id"],
                                    f"log position {e['seq']}, stored at seq {a['seq']}"))
            explained = True
        elif not explained and (a.get("hash") != e["hash"] or a.get("prev_hash") != e["prev_hash"]):
            problems.append(Problem(lead, a["seq"], "altered", e["event_id"],
                                    "chain differs from the log's from here (hashes recomputed)"))
            explained = True
    for a in sorted(by_id.values(), key=lambda r: r["seq"]):
        problems.append(Problem(lead, a["seq"], "inserted", a["event_id"], "in the archive, not in the log"))
    return problems

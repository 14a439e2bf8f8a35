"""The fold of the lead-keyed log (`touchpoints-by-lead`): touchpoints, plus join resolutions from identity.

The live processor re-keys only what it must: a lead's own events (lead id or email) keep their order in the
`touchpoints` partition and go straight to the lead. Whether an event carrying an anonymous id as well *joins*
that anonymous history (the first such event does; §4) is decided where the anonymous id lives (stage 1), which
answers every such event with a *resolution record* on the lead's log: the anonymous subject's compact state when
this event is the join, nothing otherwise. The lead holds its later events back until the answer is there, then
folds the event exactly as the offline fold does (`fold(state, event, merge_from=anonymous state)`), so the live
result equals the offline fold of the same log. Anonymous ids already resolved for a lead need no round trip.

A record that is not a foldable touchpoint (`events.wire.check_envelope`: written past the ingest API by another
producer) is refused with an `event_rejected` and leaves the state untouched, wherever the log is folded.

Pure: the processor, replays of the lead-keyed log and the tests all call `apply`.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Union

import orjson

from events.wire import FIELDS as WIRE_FIELDS, check_envelope
from projections import fold as core
from projections.rules import RuleBook

RESOLVE_TYPE = "_join_resolved"
MAX_RESOLVED = 64  # anonymous ids remembered per lead as resolved (older ones just cost one more round trip)


def resolution_record(lead: str, anonymous_id: str, request_id: str, anon_state: Optional[bytes]) -> bytes:
    """Stage 1's answer to a lead's event `request_id` carrying `anonymous_id` (state only when it is the join)."""
    return orjson.dumps({"type": RESOLVE_TYPE, "event_id": f"{lead}:resolve:{request_id}", "lead": lead,
                         "anonymous_id": anonymous_id, "request_id": request_id,
                         "state": orjson.Fragment(anon_state) if anon_state else None})


class LeadLogState:
    """A lead's fold state plus the join bookkeeping of the lead-keyed log."""

    __slots__ = ("lead", "resolved", "pending")

    def __init__(self, lead: core.LeadState, resolved: Optional[list[str]] = None,
                 pending: Optional[list[Any]] = None):
        self.lead = lead
        self.resolved: list[str] = resolved or []
        # [anonymous id, request event id, [records held back, the requesting event first]]
        self.pending: Optional[list[Any]] = pending

    def to_bytes(self) -> bytes:
        head = orjson.dumps([self.resolved, self.pending])
        return len(head).to_bytes(4, "big") + head + self.lead.to_bytes()

    @classmethod
    def from_bytes(cls, raw: Union[bytes, memoryview]) -> "LeadLogState":
        raw = bytes(raw)
        n = int.from_bytes(raw[:4], "big")
        resolved, pending = orjson.loads(raw[4:4 + n])
        return cls(core.LeadState.from_bytes(raw[4 + n:]), resolved, pending)


def apply(st: Optional[LeadLogState], key: str, rec: dict[str, Any],
          book: RuleBook, emit: bool = True) -> tuple[LeadLogState, list[dict]]:
    """Fold one record of the lead-keyed log into lead `key`; returns (state, derived events). ``emit=False``: the
    same state, no derived events built (a replay's records outside the window it describes)."""
    if st is None:
        st = LeadLogState(core.LeadState(key, False))
    out: list[dict] = []
    if rec.get("type") == RESOLVE_TYPE:
        p = st.pending
        if p is None or p[0] != rec["anonymous_id"] or p[1] != rec["request_id"]:
            return st, out  # an answer nobody waits for (already resolved, or redelivered)
        st.pending = None
        _remember(st, p[0])
        anon = core.LeadState.from_dict(rec["state"]) if rec.get("state") else None
        held = p[2]
        _, derived = core.fold(st.lead, held[0], book, merge_from=anon, emit=emit)
        out.extend(derived)
        for r in held[1:]:
            _touchpoint(st, r, book, out, emit)
        return st, out
    problem = check_envelope(rec)
    if problem is not None:  # written past the ingest API's validation: refused, the state untouched
        out.append(refusal(key, rec, problem))
        return st, out
    _touchpoint(st, rec, book, out, emit)
    return st, out


def refusal(lead: str, rec: Any, problem: str) -> dict[str, Any]:
    """The ``event_rejected`` of a record that is not a foldable touchpoint (``problem``: check_envelope's words,
    which start with the field to blame)."""
    field = problem.split(":", 1)[0]
    eid = rec.get("event_id") if isinstance(rec, dict) else None
    if not isinstance(eid, str):
        eid = "raw:" + hashlib.sha256(orjson.dumps(rec)).hexdigest()[:32]
    return {"type": "event_rejected", "event_id": f"rejected:{eid}", "lead": lead,
            "reason": f"invalid touchpoint: {problem}", "field": field if field in WIRE_FIELDS else None,
            "event": rec}


def _touchpoint(st: LeadLogState, rec: dict[str, Any], book: RuleBook, out: list[dict], emit: bool = True) -> None:
    lead = st.lead
    eid = rec.get("event_id")
    if eid in lead.seen or eid in lead.seen_old:
        return  # a redelivered or repeated event: nothing to fold, nothing to wait for
    if st.pending is not None:
        st.pending[2].append(rec)
        return
    aid = rec.get("anonymous_id")
    if aid and aid not in st.resolved and core.subject_of(rec)[0] is not None:
        st.pending = [aid, rec["event_id"], [rec]]  # wait for stage 1: is this the join?
        return
    out.extend(core.fold(st.lead, rec, book, emit=emit)[1])


def _remember(st: LeadLogState, aid: str) -> None:
    if aid not in st.resolved:
        st.resolved.append(aid)
        if len(st.resolved) > MAX_RESOLVED:
            del st.resolved[0]

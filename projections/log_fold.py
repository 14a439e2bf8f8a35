"""The back-test's fold of the lead-keyed log, pure: records in, MQLs and states out (issue #7).

``LogFold`` folds a lead's records as the live lead stage does (``projections.lead_log`` semantics, derived events
not built), with each join's anonymous state rebuilt under the fold's own book from the cookie's anonymous events
(``services.backtest_log`` explains why that reproduces the live system). ``lead_records`` decodes a lead's raw
records as the lead stage does; ``collect_anonymous`` sorts touchpoint records into a cookie's anonymous events
as the identity stage would fold them. ``services.backtest_log`` reads the Kafka log and calls these.
"""

from __future__ import annotations

from typing import Any, Optional

import orjson

from events.envelope import CURRENT_SCHEMA_VERSION
from events.upcast import upcast
from events.wire import check_envelope, decode
from projections import fold as core
from projections import lead_log
from projections.rules import RuleBook

_fold_events = core._fold_events   # the fold of a run of one subject's events (hooks: on_handoff)


class LogFold:
    """The live stage-2 fold of the lead-keyed log (``projections.lead_log`` semantics, derived events not built),
    with join states rebuilt under this fold's book from the anonymous events (see the module doc)."""

    def __init__(self, book: RuleBook, anon_events: dict[str, list[dict]]):
        self.book = book
        self.anon_events = anon_events
        self.states: dict[str, lead_log.LeadLogState] = {}
        self.mqls: list[tuple[str, int, float, str]] = []   # (lead, episode, evaluation time, cause event id)
        self.short_joins = 0                                # joins whose anonymous events were not all found

    def _handed_off(self, st: core.LeadState, cause: str) -> None:
        """The fold's ``on_handoff``: lead ``st`` was handed off (episode ``st.handoffs``) by event ``cause``."""
        self.mqls.append((st.key, st.handoffs, st.t, cause))

    def _fold(self, s: lead_log.LeadLogState, rec: dict, merge_from: Optional[core.LeadState] = None) -> None:
        """``core.fold`` of a record whose id is new to the lead (the callers checked the dedupe window)."""
        core._fold(s.lead, rec, self.book, merge_from, None, True, on_handoff=self._handed_off)

    def _fold_run(self, s: lead_log.LeadLogState, recs: list[dict]) -> None:
        """``core.fold`` of consecutive touchpoints of one lead, none held back or holding the lead back, in one call
        (the fold skips those already in its dedupe window, as ``_touchpoint`` would)."""
        _fold_events(s.lead, recs, self.book, None, False, on_handoff=self._handed_off)

    def _touchpoint(self, lead: str, s: lead_log.LeadLogState, rec: dict) -> None:
        eid = rec.get("event_id")
        if eid in s.lead.seen or eid in s.lead.seen_old:
            return  # a repeated event: nothing to fold, nothing to wait for (as lead_log)
        if s.pending is not None:
            s.pending[2].append(rec)
            return
        aid = rec.get("anonymous_id")
        if aid and aid not in s.resolved and core.subject_of(rec)[0] is not None:
            s.pending = [aid, rec["event_id"], [rec]]
            return
        self._fold(s, rec)

    def anon_state(self, aid: str, live: dict) -> core.LeadState:
        """The anonymous subject as the identity stage had it at the join, folded under this book."""
        want = live.get("q", 0)
        st = core.LeadState(aid, True)
        evs = self.anon_events.get(aid, ())
        for i, ev in enumerate(evs):
            if st.seq >= want:
                break
            if type(ev) is bytes:
                ev = evs[i] = anonymous_event(ev, aid)  # decoded once, for every book
            if ev is not None:
                core.fold(st, ev, self.book, emit=False)
        if st.seq < want:
            self.short_joins += 1
        return st

    def _state(self, lead: str) -> lead_log.LeadLogState:
        s = self.states.get(lead)
        if s is None:
            s = self.states[lead] = lead_log.LeadLogState(core.LeadState(lead, False))
        return s

    def apply(self, lead: str, rec: dict) -> None:
        s = self._state(lead)
        if rec.get("type") != lead_log.RESOLVE_TYPE:
            self._touchpoint(lead, s, rec)
            return
        self._resolution(lead, s, rec)

    def apply_many(self, lead: str, recs: list[dict]) -> None:
        """``apply`` of consecutive records of one lead (its log order). The runs of touchpoints that go straight to
        the fold (the lead waits for no join answer, and the record asks for none) are folded in one call each;
        any other record (a join answer, a join request, a record held back) takes ``apply``'s path after the run
        before it was folded."""
        s = self._state(lead)
        resolve = lead_log.RESOLVE_TYPE
        subject_of = core.subject_of
        run: list[dict] = []
        for rec in recs:
            if s.pending is None and rec.get("type") != resolve:
                aid = rec.get("anonymous_id")
                if not aid or aid in s.resolved or subject_of(rec)[0] is None:
                    run.append(rec)
                    continue
            if run:
                self._fold_run(s, run)
                run = []
            self.apply(lead, rec)
        if run:
            self._fold_run(s, run)

    def _resolution(self, lead: str, s: lead_log.LeadLogState, rec: dict) -> None:
        p = s.pending
        if p is None or p[0] != rec["anonymous_id"] or p[1] != rec["request_id"]:
            return
        s.pending = None
        lead_log._remember(s, p[0])
        anon = self.anon_state(p[0], rec["state"]) if rec.get("state") else None
        held = p[2]
        self._fold(s, held[0], merge_from=anon)
        for r in held[1:]:
            self._touchpoint(lead, s, r)


_AID = b'"anonymous_id"'


def _foldable_anonymous(raw: bytes) -> Optional[dict]:
    """The touchpoint ``raw`` decoded as the identity stage decodes it (``events.wire.decode``) when that stage folds
    it into an anonymous state (anonymous-only, a valid envelope), else None (it carries a lead key, or is
    dead-lettered: undecodable, not an object, no upcaster, not a valid envelope)."""
    try:
        ev = decode(raw)
    except Exception:  # noqa: BLE001 - a poison record: the live identity stage dead-letters it, never folds it
        return None
    if core.subject_of(ev)[0] is not None or not ev.get("anonymous_id") or check_envelope(ev) is not None:
        return None
    return ev


def _loads_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except Exception:  # noqa: BLE001 - undecodable: the caller leaves it out
        return None


def anonymous_event(raw: bytes, aid: str) -> Optional[dict]:
    """A touchpoint kept raw under its key ``aid`` (``collect_anonymous``), decoded: the event when it is a foldable
    anonymous-only event of ``aid``, else None (it carries a lead key, or the identity stage dead-letters it)."""
    ev = _foldable_anonymous(raw)
    if ev is None:
        return None
    if ev["anonymous_id"] != aid:  # collect_anonymous kept it raw under its one "anonymous_id" member: cannot be
        raise ValueError(f"touchpoint {ev.get('event_id')!r} of cookie {ev['anonymous_id']!r} keyed by {aid!r}")
    return ev


def collect_anonymous(recs: list, anon: dict[str, list]) -> None:
    """Add the anonymous-only events among the touchpoint records ``recs`` (``.key``, ``.value``: bytes) to
    ``anon`` (cookie → its events in log order): the raw bytes of those keyed by their cookie, as ingest keys them
    (decoded if a join needs them: few are, most of a cookie's events reach its lead on the lead-keyed log), the
    decoded event of any other.

    Most records are sorted by a look at their bytes, exactly: without a backslash, a JSON text's quotes delimit its
    strings, so ``"anonymous_id"`` found once is the only string of that name. No such string: no cookie. Once, and
    followed by ``:null``: no cookie either (either the event's own member, or a nested one beside none of the
    event's own). Once, and followed by ``:"<the record's key>"``: kept raw. Anything else is decoded."""
    for r in recs:
        v = r.value
        if v is None:
            continue  # a tombstone: nothing the identity stage folds
        if b"\\" not in v:
            parts = v.split(_AID)  # one call: on this machine each bytes method call costs more than its scan
            if len(parts) == 1:
                continue
            if len(parts) == 2:
                after = parts[1]
                if after[:5] == b":null":
                    continue
                k = r.key
                if k and after[1:len(k) + 3] == b'"' + k + b'"' and b'"' not in k:
                    g = anon.get(k.decode())
                    if g is None:
                        anon[k.decode()] = [v]
                    else:
                        g.append(v)
                    continue
        ev = _foldable_anonymous(v)
        if ev is not None:
            anon.setdefault(ev["anonymous_id"], []).append(ev)


def lead_records(raw: list[bytes]) -> tuple[list[dict], int]:
    """A lead's records on the lead-keyed log (raw values, log order) decoded as the live lead stage decodes them;
    returns (the records it folds, how many it dead-letters unfolded instead: undecodable, not an object, no
    upcaster, not a valid envelope — ``lead_log.apply``)."""
    try:
        recs = [orjson.loads(v) for v in raw]
    except Exception:  # noqa: BLE001
        recs = [_loads_or_none(v) for v in raw]
    resolve = lead_log.RESOLVE_TYPE
    current = CURRENT_SCHEMA_VERSION
    refused = False
    for i, rec in enumerate(recs):
        try:
            if rec.get("type") == resolve:
                continue
            if rec.get("schema_version") != current:
                rec = recs[i] = upcast(rec)
            if check_envelope(rec) is None:
                continue
        except Exception:  # noqa: BLE001
            pass
        recs[i] = None
        refused = True
    if not refused:
        return recs, 0
    kept = [r for r in recs if r is not None]
    return kept, len(recs) - len(kept)


def merge_anonymous(parts: list[dict[str, list]]) -> dict[str, list]:
    """The anonymous events read in shares of the ``touchpoints`` partitions, as one read would have them (a
    cookie's events come from its partition: only events keyed by something else span shares, in share order)."""
    merged: dict[str, list] = {}
    for part in parts:
        for aid, evs in part.items():
            have = merged.get(aid)
            merged[aid] = evs if have is None else have + evs
    return merged

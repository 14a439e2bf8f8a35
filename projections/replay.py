"""Replay one lead from its archived (lead-keyed) log: every record, the score before/after, why (issue #7).

Input: the lead's ``touchpoint_archive`` rows in ``seq`` order — the lead-keyed log ``touchpoints-by-lead`` as the
live processor folded it, join resolutions included — each a mapping with at least ``seq``, ``type``,
``received_at``, ``envelope``. They are folded with the live processor's own pure code
(``projections.lead_log.apply`` → ``projections.fold.fold`` with derived events built), so a replay ends in
exactly the state the live system had after the same records. Nothing is read from the mutable ``leads`` row.

**As of T** (``as_of``): the state after the longest prefix of the lead's log whose records had all *arrived* by
T (``received_at ≤ T``; a join resolution counts as arriving with the event that asked for it). Arrival, not
event time, because §4 folds in arrival order: the live system at wall-clock T could only have folded records
that had arrived, and only as a prefix of the log (a record that arrived by T but is logged behind one that
arrived later was not folded at T either). Event time would describe a state the live system never had when
events arrive late (their ``occurred_at`` lies before records folded earlier). The record where the prefix stops
and the number left out are reported.

**A window of steps** (``from_seq``, ``limit``): every record of the prefix is folded (the state needs them all), but
only the steps from ``from_seq`` on, at most ``limit`` of them, are described; ``next_from_seq`` says where the next
window starts (None: no step left). A lead with a long history (a crawler behind one email: tens of thousands of
records) is read page by page instead of in one report of hundreds of MB. Folding a record costs ≈ 7 µs here,
describing it 10–30 µs more.

Pure: no I/O. PII in payloads stays sealed here (``projections.pii``); the caller reveals what its keystore allows.
"""

from __future__ import annotations

from datetime import timezone
from typing import Any, Iterable, Optional, Sequence

from events.envelope import as_utc
from events.upcast import upcast
from projections import fold as core
from projections import lead_log
from projections.rules import RuleBook

_DERIVED_KEEP = {
    "lead_stage_changed": ("event_id", "from", "to", "reason", "by", "at", "rules_version"),
    "lead_handed_off": ("event_id", "episode", "at", "fit", "engagement", "score", "rules_version",
                        "top_touchpoints"),
    "intent_alert": ("event_id", "rule", "first_event_id", "then_event_id"),
    "event_rejected": ("reason", "field"),
}


def _epoch(v: Any) -> Optional[float]:
    v = as_utc(v)
    return None if v is None else v.timestamp()


def _iso(v: Any) -> Optional[str]:
    if v is None or isinstance(v, str):
        return v
    return v.astimezone(timezone.utc).isoformat(timespec="microseconds")


def as_of_prefix(records: Sequence[dict], as_of: Any) -> int:
    """Length of the longest prefix of ``records`` whose records all arrived at or before ``as_of``."""
    if as_of is None:
        return len(records)
    t = _epoch(as_of)
    for i, r in enumerate(records):
        ra = _epoch(r.get("received_at")) if r.get("received_at") is not None else _epoch(r.get("occurred_at"))
        if ra is not None and ra > t:
            return i
    return len(records)


def _scores(st: Optional[lead_log.LeadLogState]) -> dict:
    if st is None:
        return {"fit": 0, "engagement": 0.0, "score": 0.0, "stage": "anonymous", "rules_version": None}
    s = st.lead
    return {"fit": s.fit, "engagement": s.eng, "score": s.fit + s.eng, "stage": s.stage, "rules_version": s.version}


def _explain(st: Optional[lead_log.LeadLogState], book: RuleBook) -> dict:
    if st is None or st.lead.version is None:
        return {"fit": [], "engagement": []}
    return core.explain(st.lead, book.by_version.get(st.lead.version))


def _why(before: dict, after: dict, exp_before: dict, exp_after: dict, factor: float) -> dict:
    """The rules and points behind one step's change of score. ``factor``: how much the engagement known before
    the step decayed by the step's evaluation time (1.0 when time did not move or the rule set switched):
    ``decay`` is that loss over every rule; a rule that counted events in this step shows what they added."""
    fb = {(f["rule"], f["attribute"]): f["points"] for f in exp_before["fit"]}
    fa = {(f["rule"], f["attribute"]): f["points"] for f in exp_after["fit"]}
    eb = {e["rule"]: e for e in exp_before["engagement"]}
    matched, decay = [], 0.0
    for e in exp_before["engagement"]:
        decay += e["contribution"] * factor - e["contribution"]
    for e in exp_after["engagement"]:
        old = eb.get(e["rule"], {"events": 0, "contribution": 0.0})
        delta = e["contribution"] - old["contribution"] * factor
        if e["events"] != old["events"]:
            matched.append({"rule": e["rule"], "points": e["points"], "events": e["events"] - old["events"],
                            "contribution": delta})
        else:
            decay += delta  # no event of this rule counted here: what is left is decay (or a displaced entry)
    for r, e in eb.items():  # a rule that no longer counts (rule set switched, capped entry displaced)
        if r not in {x["rule"] for x in exp_after["engagement"]}:
            matched.append({"rule": r, "points": e["points"], "events": -e["events"],
                            "contribution": -e["contribution"] * factor})
    return {
        "fit_rules_added": [{"rule": r, "attribute": a, "points": p} for (r, a), p in fa.items() if (r, a) not in fb],
        "fit_rules_removed": [{"rule": r, "attribute": a, "points": p} for (r, a), p in fb.items() if (r, a) not in fa],
        "engagement_rules": matched,
        "decay": decay,
        "rules_version_changed": before["rules_version"] != after["rules_version"],
    }


def replay(lead: str, records: Sequence[dict], book: RuleBook, as_of: Any = None, explain: bool = False,
           from_seq: int = 0, limit: Optional[int] = None) -> dict:
    """Fold ``records`` (the lead's archived log, seq order) and describe its steps from seq ``from_seq`` on, at most
    ``limit`` of them (None: all); see the module doc."""
    n = as_of_prefix(records, as_of)
    st: Optional[lead_log.LeadLogState] = None
    steps: list[dict] = []
    exp_prev: Optional[dict] = None   # the explanation before the step being described (explain only)
    next_seq = None
    for r in records[:n]:
        env = dict(r["envelope"])
        is_res = env.get("type") == lead_log.RESOLVE_TYPE
        if not is_res:
            env = upcast(env)
        if limit is not None and len(steps) >= limit and next_seq is None and r["seq"] >= from_seq:
            next_seq = r["seq"]
        if r["seq"] < from_seq or next_seq is not None:
            st, _ = lead_log.apply(st, lead, env, book, emit=False)  # outside the window: folded, not described
            continue
        if explain and exp_prev is None:
            exp_prev = _explain(st, book)
        before = _scores(st)
        t_before = st.lead.t if st is not None else None
        pend = st.pending if st is not None else None
        st, derived = lead_log.apply(st, lead, env, book)
        after = _scores(st)
        step: dict[str, Any] = {"seq": r["seq"], "event_id": env.get("event_id"), "type": env.get("type"),
                                "occurred_at": _iso(r.get("occurred_at")), "received_at": _iso(r.get("received_at"))}
        if is_res:
            state = env.get("state") or None
            step["join"] = {"anonymous_id": env.get("anonymous_id"), "request_id": env.get("request_id"),
                            "joined": state is not None,
                            "anonymous_events_merged": state.get("q", 0) if state else 0,
                            "anonymous_attributes": {a[0]: a[1] for a in state.get("at", []) if a[1] is not None}
                            if state else {},
                            "released": [x.get("event_id") for x in pend[2]]
                            if pend is not None and pend[0] == env.get("anonymous_id")
                            and pend[1] == env.get("request_id") else []}
        else:
            step.update(source=env.get("source"), campaign=env.get("campaign"), anonymous_id=env.get("anonymous_id"),
                        payload=env.get("payload"))
            if st.pending is not None and env.get("event_id") in {x.get("event_id") for x in st.pending[2]}:
                step["held_for_join"] = True  # folded when the identity stage answers (a later join step)
        step["before"] = before
        step["after"] = after
        step["changes"] = [{k: d.get(k) for k in ("type", *_DERIVED_KEEP[d["type"]])}
                           for d in derived if d["type"] in _DERIVED_KEEP]
        if explain:
            exp_now = _explain(st, book)
            factor = 1.0
            rs = book.by_version.get(after["rules_version"]) if after["rules_version"] is not None else None
            if rs is not None and before["rules_version"] == after["rules_version"] and t_before is not None \
                    and st.lead.t is not None and st.lead.t != t_before:
                factor = 2.0 ** ((t_before - st.lead.t) / rs.h_s)
            step["why"] = _why(before, after, exp_prev, exp_now, factor)
            exp_prev = exp_now
        steps.append(step)
    state = _final(lead, st, book)
    cut = records[n] if n < len(records) else None
    return {"lead": lead, "as_of": _iso(as_of) if not isinstance(as_of, (int, float)) else as_of,
            "records": len(records), "replayed": n,
            "stopped_at": None if cut is None else {"seq": cut["seq"], "event_id": cut["envelope"].get("event_id"),
                                                    "received_at": _iso(cut.get("received_at"))},
            "steps_from_seq": from_seq or None, "limit": limit, "next_from_seq": next_seq,
            "steps": steps, "state": state}


def _final(lead: str, st: Optional[lead_log.LeadLogState], book: RuleBook) -> dict:
    if st is None:
        return {"lead": lead, "stage": None, "fit": 0, "engagement": 0.0, "score": 0.0, "handoffs": 0,
                "attributes": {}, "explanation": {"fit": [], "engagement": []}, "top_touchpoints": [],
                "pending_join": None}
    s = st.lead
    rs = book.by_version.get(s.version) if s.version is not None else None
    out = s.summary()
    out.update(attributes=s.attributes, qualified=s.qualified, explanation=core.explain(s, rs),
               top_touchpoints=core.top_touchpoints(s, rs),
               pending_join=None if st.pending is None else {"anonymous_id": st.pending[0],
                                                             "held_events": [x.get("event_id") for x in st.pending[2]]})
    return out


def explanation_totals(expl: dict) -> tuple[float, float]:
    """(Σ fit points, Σ engagement contributions) of an explanation: equal to (fit, engagement)."""
    return (sum(f["points"] for f in expl["fit"]), sum(e["contribution"] for e in expl["engagement"]))


def lead_records(rows: Iterable[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: r["seq"])

"""Pure parts of the alerts service: lead context cache, alert payloads, the SLA rule. No I/O, no wall clock.

The alerts service (``services/alerts.py``) feeds every record it consumes into :class:`LeadCache` and turns
hand-offs, intent alerts and SLA decisions into *alert payloads* built here. A payload is what an inside-sales rep
needs to act without another lookup (issue #8 §4): old → new stage, score before/after, the top reasons, the rule
version, the lead's key attributes and links to its history.

SLA rule (decided in event time, docs/alerts.md):

* a hand-off at ``at`` opens an SLA episode due at ``at + sla_minutes``;
* the first *sales touch* (``call_logged`` or ``stage_changed`` touchpoint of the lead) with
  ``at <= occurred_at`` decides it: ``occurred_at <= due_at`` → met, later → breached;
* without such a touch it is breached as soon as the event-time clock passes ``due_at``: the lead's own clock (the
  latest ``occurred_at`` of its touchpoints) or the global clock (the latest ``occurred_at`` of any touchpoint,
  minus a grace for cross-partition skew);
* exactly one outcome per episode: a breach alert ``{lead}:sla:{episode}`` (``at`` = ``due_at``) or an
  ``sla_met`` notice ``{lead}:sla-met:{episode}`` (``at`` = the touch time).
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Optional
from urllib.parse import quote

import orjson

KINDS = ("handoff", "intent", "sla_breached", "sla_met")
#: what a webhook subscription receives when it names no kinds (sla_met is a board notice, opt-in for webhooks)
DEFAULT_WEBHOOK_KINDS = ("handoff", "intent", "sla_breached")
#: touchpoints that count as the first sales touch after a hand-off (same set as the handoffs projection)
SALES_TOUCH_TYPES = frozenset({"call_logged", "stage_changed"})
#: stage changes whose ``by`` names the lead's owner (same rule as the leads projection)
SALES_STAGES = frozenset({"sal", "sql", "opportunity", "won", "lost"})
#: the attributes shown to a rep ("who, company, why")
KEY_ATTRIBUTES = ("name", "email", "company", "title", "department", "company_size", "industry", "phone")
RESOLVE_TYPE = "_join_resolved"
TOP_REASONS = 5

_UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)


def parse_ts(s: Any) -> Optional[float]:
    """RFC 3339 text -> epoch seconds (None when absent or unreadable)."""
    if not isinstance(s, str) or not s:
        return None
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_UTC)
    return dt.timestamp()


def iso(x: float) -> str:
    """Epoch seconds -> the wire format (UTC, microseconds)."""
    return (_EPOCH + timedelta(microseconds=round(x * 1e6))).isoformat(timespec="microseconds")


def delivery_id(subscription_id: str, alert_event_id: str) -> str:
    """Stable webhook delivery id: the same alert to the same subscription is always the same delivery."""
    return hashlib.sha256(f"{subscription_id}\x00{alert_event_id}".encode()).hexdigest()


def lead_links(lead: str, base_url: str) -> dict[str, str]:
    q = quote(lead, safe="")
    base = base_url.rstrip("/")
    return {"history": f"{base}/v1/leads/{q}/history", "lead": f"{base}/v1/leads/{q}"}


# ---------------------------------------------------------------------------------------------- lead cache

class LeadInfo:
    """What the service knows about one lead from the streams (recent events only; bounded)."""

    __slots__ = ("stage", "owner", "stages", "raw_scores", "attrs", "email", "clock", "touches")

    def __init__(self) -> None:
        self.stage: Optional[str] = None
        self.owner: Optional[str] = None
        self.stages: deque = deque(maxlen=8)   # (n, from, to, cause, by)
        self.raw_scores: deque = deque(maxlen=8)  # lead_scored events as consumed (bytes or dict), parsed on demand
        self.attrs: Optional[dict[str, Any]] = None
        self.email: Optional[str] = None
        self.clock: Optional[float] = None     # latest occurred_at of the lead's touchpoints
        self.touches: deque = deque(maxlen=8)  # sales touches: (occurred_at, event_id)

    @property
    def scores(self) -> list[tuple]:
        """Recent scores, deduplicated, in sequence order:
        (seq, cause, fit, engagement, fit_before, engagement_before, version)."""
        out: dict[int, tuple] = {}
        for raw in self.raw_scores:
            ev = orjson.loads(raw) if isinstance(raw, (bytes, str)) else raw
            n = _seq(ev.get("event_id"))
            out[n] = (n, ev.get("cause_event_id"), ev.get("fit"), ev.get("engagement"), ev.get("fit_before"),
                      ev.get("engagement_before"), ev.get("rules_version"))
        return [out[k] for k in sorted(out)]


def _seq(event_id: Any) -> int:
    tail = str(event_id).rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else -1


class LeadCache:
    """LRU of :class:`LeadInfo` fed by ``lead-scores``, ``lead-stages`` and ``touchpoints-by-lead``.

    Every update is idempotent (events are kept by their sequence number), so re-reading a stretch of a topic after a
    restart (the warm-up) or a redelivered derived event changes nothing.
    """

    def __init__(self, max_leads: int = 50_000) -> None:
        self.max_leads = max_leads
        self._d: OrderedDict[str, LeadInfo] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, lead: str) -> Optional[LeadInfo]:
        info = self._d.get(lead)
        if info is not None:
            self._d.move_to_end(lead)
        return info

    def _info(self, lead: str) -> LeadInfo:
        info = self._d.get(lead)
        if info is None:
            info = self._d[lead] = LeadInfo()
            if len(self._d) > self.max_leads:
                self._d.popitem(last=False)
        else:
            self._d.move_to_end(lead)
        return info

    def on_stage(self, ev: dict) -> None:
        lead = ev.get("lead")
        if not lead:
            return
        info = self._info(lead)
        n = _seq(ev.get("event_id"))
        if any(s[0] == n for s in info.stages):
            return
        info.stages.append((n, ev.get("from"), ev.get("to"), ev.get("cause_event_id"), ev.get("by")))
        last = max(info.stages, key=lambda s: s[0])
        info.stage = last[2]
        if ev.get("by") and ev.get("to") in SALES_STAGES and n >= last[0]:
            info.owner = ev["by"]

    def on_scored(self, ev: dict | bytes, lead: Optional[str] = None) -> None:
        """A ``lead_scored`` event: kept as consumed (the most frequent record; parsed only when an alert needs
        it), keyed by the Kafka key `lead` (or the event's ``lead``)."""
        if lead is None:
            lead = ev.get("lead") if isinstance(ev, dict) else None
        if not lead:
            return
        self._info(lead).raw_scores.append(ev)

    def on_touchpoint(self, lead: str, rec: dict) -> Optional[float]:
        """A by-lead touchpoint: attributes, email, the lead's clock, sales touches. Returns its occurred_at."""
        if rec.get("type") == RESOLVE_TYPE:
            return None
        occ = parse_ts(rec.get("occurred_at"))
        info = self._info(lead)
        if occ is not None and (info.clock is None or occ > info.clock):
            info.clock = occ
        if rec.get("email"):
            info.email = rec["email"]
        t = rec.get("type")
        payload = rec.get("payload") or {}
        changes = None
        if t == "form_submitted":
            changes = payload.get("fields")
        elif t == "attribute_updated":
            changes = payload.get("attributes")
        if isinstance(changes, dict) and changes:
            attrs = dict(info.attrs or {})
            for k, v in changes.items():
                if v == "" or v is None:
                    attrs.pop(k, None)
                else:
                    attrs[k] = v
            info.attrs = attrs
        if t in SALES_TOUCH_TYPES and occ is not None:
            eid = rec.get("event_id")
            if not any(x[1] == eid for x in info.touches):
                info.touches.append((occ, eid))
        return occ


# ---------------------------------------------------------------------------------------------- payloads

def key_attributes(attrs: Optional[dict], email: Optional[str] = None) -> dict[str, Any]:
    attrs = attrs or {}
    out = {k: attrs[k] for k in KEY_ATTRIBUTES if attrs.get(k) not in (None, "")}
    if "email" not in out and email:
        out["email"] = email
    return out


def top_reasons(explanation: Optional[dict], n: int = TOP_REASONS) -> list[dict[str, Any]]:
    """The strongest reasons behind a score: engagement rules by contribution, fit rules by points."""
    explanation = explanation or {}
    out = []
    for e in explanation.get("engagement") or []:
        out.append({"axis": "engagement", "rule": e.get("rule"), "points": e.get("points"),
                    "events": e.get("events"), "value": round(float(e.get("contribution") or 0.0), 2)})
    for f in explanation.get("fit") or []:
        out.append({"axis": "fit", "rule": f.get("rule"), "attribute": f.get("attribute"),
                    "points": f.get("points"), "value": round(float(f.get("points") or 0.0), 2)})
    out.sort(key=lambda r: (-abs(r["value"]), str(r["rule"])))
    return out[:n]


def _num(x: Any) -> Optional[float]:
    return None if x is None else round(float(x), 2)


def _score_before(info: Optional[LeadInfo], cause: Any) -> tuple[Optional[float], Optional[float]]:
    """(fit, engagement) before the touchpoint `cause`: the scored event of that cause if seen (its *_before),
    else the latest score seen (the scored event of `cause` is either still in flight or was never emitted
    because the score did not change: both mean the latest known score is the one before)."""
    scores = info.scores if info is not None else []
    if not scores:
        return None, None
    for s in scores:
        if s[1] == cause:
            return s[4], s[5]
    s = scores[-1]
    return s[2], s[3]


def _stage_from(info: Optional[LeadInfo], cause: Any, to: str) -> Optional[str]:
    """The stage a transition to `to` caused by `cause` started from (the latest known stage when unseen)."""
    if info is None or not info.stages:
        return None
    for n, frm, t, c, _by in info.stages:
        if c == cause and t == to:
            return frm
    return info.stage


def handoff_alert(h: dict, info: Optional[LeadInfo], sla_minutes: float, links_base: str) -> dict[str, Any]:
    lead = h["lead"]
    at = parse_ts(h.get("at"))
    fb, eb = _score_before(info, h.get("cause_event_id"))
    before = None if fb is None and eb is None else round(float(fb or 0) + float(eb or 0), 2)
    tops = []
    for tp in (h.get("top_touchpoints") or [])[:TOP_REASONS]:
        tops.append({k: (round(v, 2) if isinstance(v, float) else v) for k, v in tp.items()})
    return {
        "alert_id": h["event_id"],
        "kind": "handoff",
        "lead": lead,
        "at": h.get("at"),
        "episode": h.get("episode"),
        "rules_version": h.get("rules_version"),
        "cause_event_id": h.get("cause_event_id"),
        "stage": {"from": _stage_from(info, h.get("cause_event_id"), "mql"), "to": "mql"},
        "score": {"before": before, "after": _num(h.get("score")),
                  "fit_before": _num(fb), "fit": _num(h.get("fit")),
                  "engagement_before": _num(eb), "engagement": _num(h.get("engagement"))},
        "reasons": top_reasons(h.get("explanation")),
        "top_touchpoints": tops,
        "attributes": key_attributes(h.get("attributes") or (info.attrs if info else None),
                                     info.email if info else None),
        "owner": info.owner if info else None,
        "sla": {"minutes": sla_minutes, "due_at": iso(at + sla_minutes * 60) if at is not None else None},
        "links": lead_links(lead, links_base),
    }


def _current(info: Optional[LeadInfo]) -> tuple[Optional[float], Optional[float], Optional[str]]:
    scores = info.scores if info is not None else []
    if not scores:
        return None, None, None
    s = scores[-1]
    return s[2], s[3], s[6]


def intent_alert(a: dict, info: Optional[LeadInfo], links_base: str,
                 fallback: Optional[dict] = None) -> dict[str, Any]:
    """An intent alert; `fallback` = the lead's row of the ``leads`` projection when the cache knows nothing."""
    lead = a["lead"]
    fit, eng, _v = _current(info)
    fallback = fallback or {}
    if fit is None and eng is None and fallback:
        fit, eng = fallback.get("fit"), fallback.get("engagement")
    score = None if fit is None and eng is None else round(float(fit or 0) + float(eng or 0), 2)
    stage = (info.stage if info else None) or fallback.get("stage")
    attrs = info.attrs if info and info.attrs else fallback.get("attributes")
    return {
        "alert_id": a["event_id"],
        "kind": "intent",
        "lead": lead,
        "at": a.get("at"),
        "rules_version": a.get("rules_version"),
        "cause_event_id": a.get("cause_event_id"),
        "stage": {"from": stage, "to": stage},
        "score": {"before": score, "after": score, "fit": _num(fit), "engagement": _num(eng)},
        "reasons": [{"axis": "intent", "rule": a.get("rule"), "first_event_id": a.get("first_event_id"),
                     "then_event_id": a.get("then_event_id")}],
        "intent": {"rule": a.get("rule"), "first_event_id": a.get("first_event_id"),
                   "then_event_id": a.get("then_event_id")},
        "attributes": key_attributes(attrs, (info.email if info else None) or fallback.get("email")),
        "owner": (info.owner if info else None) or fallback.get("owner"),
        "links": lead_links(lead, links_base),
    }


def sla_alert(kind: str, handoff_payload: dict, sla: "SlaEpisode", info: Optional[LeadInfo],
              links_base: str) -> dict[str, Any]:
    """``sla_breached`` / ``sla_met`` for an episode; carries the hand-off's context (who, why, score)."""
    lead = sla.lead
    stage = (info.stage if info else None) or "mql"
    breached = kind == "sla_breached"
    at = sla.due_at if breached else sla.touch_at
    out = {
        "alert_id": sla.alert_event_id(kind),
        "kind": kind,
        "lead": lead,
        "at": iso(at),
        "episode": sla.episode,
        "rules_version": handoff_payload.get("rules_version"),
        "cause_event_id": sla.touch_event_id if sla.touch_event_id else handoff_payload.get("cause_event_id"),
        "stage": {"from": stage, "to": stage},
        "score": dict(handoff_payload.get("score") or {}),
        "reasons": handoff_payload.get("reasons") or [],
        "attributes": handoff_payload.get("attributes") or {},
        "owner": (info.owner if info else None) or handoff_payload.get("owner"),
        "sla": {"minutes": sla.minutes, "handoff_id": sla.handoff_id, "handoff_at": iso(sla.handoff_at),
                "due_at": iso(sla.due_at),
                "first_touch_at": iso(sla.touch_at) if sla.touch_at is not None else None,
                "first_touch_event_id": sla.touch_event_id,
                "time_to_first_touch_s": (round(sla.touch_at - sla.handoff_at, 3)
                                          if sla.touch_at is not None else None),
                "overdue_s": (round(sla.touch_at - sla.due_at, 3)
                              if breached and sla.touch_at is not None else None),
                "decided_by": sla.decided_by},
        "links": lead_links(lead, links_base),
    }
    return out


# ---------------------------------------------------------------------------------------------- SLA

@dataclass
class SlaEpisode:
    handoff_id: str
    lead: str
    episode: int
    handoff_at: float
    due_at: float
    minutes: float
    status: str = "open"                      # open | met | breached
    touch_at: Optional[float] = None
    touch_event_id: Optional[str] = None
    decided_by: Optional[str] = None          # touch | late_touch | lead_activity | clock

    def alert_event_id(self, kind: str) -> str:
        return f"{self.lead}:sla:{self.episode}" if kind == "sla_breached" else f"{self.lead}:sla-met:{self.episode}"


@dataclass
class SlaTracker:
    """Open SLA episodes and the event-time clock; returns decisions, never fires one episode twice."""

    minutes: float = 15.0
    grace_s: float = 60.0
    open: dict[str, SlaEpisode] = field(default_factory=dict)          # handoff id -> episode
    by_lead: dict[str, list[str]] = field(default_factory=dict)
    _heap: list[tuple[float, str]] = field(default_factory=list)
    max_seen: Optional[float] = None

    def load(self, episodes: Iterable[SlaEpisode]) -> None:
        for e in episodes:
            self._add(e)

    def _add(self, e: SlaEpisode) -> None:
        self.open[e.handoff_id] = e
        self.by_lead.setdefault(e.lead, []).append(e.handoff_id)
        heapq.heappush(self._heap, (e.due_at, e.handoff_id))

    def _close(self, e: SlaEpisode, status: str, how: str) -> SlaEpisode:
        e.status = status
        e.decided_by = how
        self.open.pop(e.handoff_id, None)
        ids = self.by_lead.get(e.lead)
        if ids is not None:
            try:
                ids.remove(e.handoff_id)
            except ValueError:
                pass
            if not ids:
                del self.by_lead[e.lead]
        return e

    @property
    def clock(self) -> Optional[float]:
        """The global event-time clock: the latest occurred_at seen, minus the grace."""
        return None if self.max_seen is None else self.max_seen - self.grace_s

    def observe(self, occurred_at: Optional[float]) -> None:
        if occurred_at is not None and (self.max_seen is None or occurred_at > self.max_seen):
            self.max_seen = occurred_at

    def advance_to(self, t: float) -> None:
        """A tick from outside the stream (wall clock mode): the clock is at least `t`."""
        self.observe(t + self.grace_s)

    def open_episode(self, handoff_id: str, lead: str, episode: int, at: float,
                     info: Optional[LeadInfo]) -> tuple[SlaEpisode, list[SlaEpisode]]:
        """A hand-off: a new open episode, plus whatever is decided at once (touches already seen, clocks)."""
        e = SlaEpisode(handoff_id, lead, int(episode or 0), at, at + self.minutes * 60, self.minutes)
        self._add(e)
        decided: list[SlaEpisode] = []
        if info is not None:
            touches = sorted(t for t in info.touches if t[0] >= at)
            if touches:
                decided.append(self._decide_touch(e, touches[0][0], touches[0][1]))
            elif info.clock is not None and info.clock > e.due_at:
                decided.append(self._close(e, "breached", "lead_activity"))
        if e.status == "open":
            decided.extend(self.expire())
        return e, decided

    def _decide_touch(self, e: SlaEpisode, occ: float, event_id: Optional[str]) -> SlaEpisode:
        e.touch_at = occ
        e.touch_event_id = event_id
        if occ <= e.due_at:
            return self._close(e, "met", "touch")
        return self._close(e, "breached", "late_touch")

    def on_touchpoint(self, lead: str, rec_type: Optional[str], occ: Optional[float],
                      event_id: Optional[str]) -> list[SlaEpisode]:
        """A touchpoint of `lead` (arrival order): a sales touch decides its open episodes; any later activity
        past the due time breaches them."""
        self.observe(occ)
        ids = self.by_lead.get(lead)
        if not ids or occ is None:
            return []
        out = []
        for hid in list(ids):
            e = self.open[hid]
            if rec_type in SALES_TOUCH_TYPES and occ >= e.handoff_at:
                out.append(self._decide_touch(e, occ, event_id))
            elif occ > e.due_at:
                out.append(self._close(e, "breached", "lead_activity"))
        return out

    def expire(self) -> list[SlaEpisode]:
        """Episodes whose due time the global clock has passed without a touch."""
        clock = self.clock
        out = []
        while self._heap and clock is not None and self._heap[0][0] < clock:
            _due, hid = heapq.heappop(self._heap)
            e = self.open.get(hid)
            if e is not None and e.status == "open":
                out.append(self._close(e, "breached", "clock"))
        return out

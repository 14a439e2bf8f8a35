"""The lead fold (PRODUCT.md §4): one touchpoint at a time into a compact, serialisable lead state.

Pure: no I/O, no clock, no globals (module constants only). The same code runs in the faust processor, the CLI
(backtest/replay) and the tests.

Public API
----------
- ``fold(state, event, book, *, merge_from=None, emit=True) -> (LeadState, list[dict])``
  folds one wire-format touchpoint (plain dict, docs/design.md) into ``state`` (``None`` = a new subject keyed
  from the event), **mutating and returning it**, with the derived events (``lead_scored``, ``lead_stage_changed``,
  ``lead_handed_off``, ``intent_alert``, ``event_rejected``). ``merge_from``: the anonymous subject's state that
  this event joins to the lead (merged first, then the event is folded and the lead evaluated once).
  ``emit=False`` skips building derived events (offline backtests); the state is identical either way.
- ``merge(lead, anon, book) -> LeadState``: joins an anonymous subject's history into a lead (mutates ``lead``),
  as if the anonymous events had been the lead's from the start, histories ordered by (received_at, event_id).
  No evaluation, no derived events, the lead's stage machine is kept (never re-folded).
- ``LeadState``: ``new(key, anonymous)``, ``to_bytes()``, ``from_bytes(b)``, ``summary()``, ``attributes``.
- ``Identity``: the anonymous id -> lead map and the routing rule of §4 (``route(event)``).
- ``Ledger(book)``: an in-memory fold of a whole log (arrival order), with global dedupe and identity routing;
  used by the backtest and the tests.
- ``subject_of(event) -> (lead_key | None, anonymous_id | None)``; ``parse_ts(s) -> float`` epoch seconds.

Semantics at the edges of §4 (decisions; each is tested in tests/test_fold.py)
--------------------------------------------------------------------------------
1. Subject: ``lead_id`` as given (blank = absent), else the email trimmed and lower-cased; else the anonymous id.
   A lead_id subject and an email subject are never linked (§4 only joins anonymous ids).
2. Join: the first event carrying an anonymous id and a lead key maps the anonymous id to that lead forever and
   merges the anonymous subject (if any) into the lead before the event is folded; the lead is evaluated once,
   after the event. A later event with that anonymous id and another lead key belongs to that lead and does not
   move the cookie. The anonymous subject's rejected/alert counts and event count carry over. The lead's stage
   machine is not re-folded.
3. A lead subject starts at ``anonymous`` and is moved to ``known`` (``lead_stage_changed``, reason ``identified``)
   as the first step of its first event, before the event is applied: so an SGL ``stage_changed`` to ``sql`` as a
   lead's very first event is accepted.
4. Attributes come only from ``form_submitted.fields`` and ``attribute_updated.attributes``; ``""`` or null clears.
   The envelope email is not an attribute (``summary()["email"]`` falls back to it).
5. String conditions compare ``str.lower()`` of both sides (non-strings by their text, booleans as true/false).
   Engagement/intent conditions: ``url_contains``/``referrer_contains``/``title_contains`` (substring, any needle),
   ``asset_in``/``outcome_in``/``form_in`` (payload membership), ``campaign_in`` (payload.campaign, else the
   envelope campaign), ``source_in`` (envelope). A missing field fails the condition. Several conditions: all must
   hold. ``range`` reads ints/floats and strings that parse as a finite float after trimming (``"1,000"``,
   booleans, NaN → no match).
6. t = the latest occurred_at of every event folded into the subject (including rejected ``stage_changed`` events
   and types no rule knows). Before the first effective_from no rule set is in force: fit = 0, engagement = 0, no
   MQL, ``rules_version`` null; completeness then uses the default seven attributes and the default stage table.
7. A rejected ``stage_changed`` is still part of the history (t, dedupe, engagement rules on ``stage_changed``);
   only the move is not applied. Stage names are exact (case-sensitive); a move to the current stage, to an
   unknown stage or without ``payload.to`` is rejected.
8. Cool-down: from the occurred_at of the ``stage_changed`` that entered ``recycled`` to t, in seconds:
   t − recycled_at ≥ cooldown_days × 86400.
9. Qualification facts: a ``call_logged`` whose ``payload.qualification`` has a truthy ``problem``, ``role``,
   ``schedule`` or ``timing`` (other keys ignored); once arrived it counts for the lead forever.
10. Order within one event: identify → attributes / qualification / stage move → intent ``then`` check →
    engagement and intent ``first`` bookkeeping → evaluation (known↔lead by completeness only while the stage is
    known or lead; then MQL, which may chain known→lead→mql in one evaluation; hand-off episode = hand-offs + 1).
11. Anonymous subjects are scored (visible in the backtest) but emit no ``lead_scored``/stage/hand-off/intent
    events (only ``event_rejected``); an intent ``then`` on an anonymous subject does not fire, its ``first``
    events are kept and come along on a join.
12. Intent alerts: under the rule set in force at t when the ``then`` event arrives; the ``first`` must have arrived
    earlier and 0 ≤ then.occurred_at − first.occurred_at ≤ within_hours; one ``then`` may fire for several
    ``first`` events; once per (rule name, first event id), also across rule-set versions.
13. ``lead_scored`` is emitted when (fit, engagement) differ from the previous evaluation's; ``seq`` counts the
    touchpoints folded into the subject (merged anonymous ones included).
14. Bounds: dedupe window ≥ 1,000 event ids per subject (the backtest also dedupes globally); ≤ 256 pending
    intent ``first`` events per (rule set, rule); top touchpoints: 5 per rule set; capped buckets keep their ≤ N
    counted entries per (rule, UTC day) with activity. A rule set added to the book after a state was built starts
    with empty aggregates for that state: replay the log to back-fill it (the backtest always does).

Numerics: per rule set, the decayed sum ``total`` is kept valued at ``A`` = the lead's t when the last contribution
was added: a new contribution first rescales it by 0.5^((t − A)/h), then adds points·0.5^((t − occ)/h) (exactly
``points`` when occ = t). Evaluation at t computes total·0.5^((t − A)/h) without storing it, so pure decay never
compounds roundings, and sums of simultaneous events are exact. Per-rule sums (for explanations) are rescaled
lazily the same way. Aggregates are kept for every rule set of the book at once, so a switch of the rule set in force
is free. Time is in seconds; h = half_life_days · 86400.
"""

from __future__ import annotations

import bisect
import math
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Optional, Union

import orjson

try:  # Cython's pure-Python mode: True in the compiled module (setup.py), False in the source as plain Python
    import cython
    _COMPILED: bool = cython.compiled
except ImportError:  # a plain install without Cython
    _COMPILED = False

from projections.rules import (DEFAULT_LEAD_ATTRIBUTES, DEFAULT_TRANSITIONS, STAGES, CompiledRuleSet, RuleBook,
                               conditions_hold)

TOP_K = 5                 # top contributing touchpoints kept per rule set (for hand-offs)
DEDUPE_WINDOW = 1000      # per subject, the ids of at least the last 1,000 (at most 2,000) events are remembered:
                          # a producer may retry an event until 1,000 newer events of the same subject arrived
MAX_PENDING = 256         # unfired `first` events kept per (rule set, intent rule), earliest occurred dropped first
_STATE_FORMAT = 1

_UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)
_fromiso = datetime.fromisoformat
_insort = bisect.insort


def parse_ts(s: str) -> float:
    """RFC 3339 with offset -> epoch seconds (float, correctly rounded from the exact microseconds)."""
    dt = _fromiso(s)
    if dt.tzinfo is None:
        raise ValueError(f"timestamp without offset: {s!r}")
    return dt.timestamp()


def epoch_s(s: str) -> float:
    """``datetime.fromisoformat(s).timestamp()``, exactly. The compiled fold reads the wire format
    (``YYYY-MM-DDTHH:MM:SS.ffffff+00:00``, see ``iso_utc``) itself, in one pass over the characters: ``timestamp()``
    spends ≈ 0.4 µs per call on big-integer arithmetic. Anything else (and the plain source) asks ``datetime``."""
    if _COMPILED and len(s) == 32:
        us = _wire_us(s)
        if us != _NOT_WIRE:
            return us / 1e6   # both exact (|us| < 2^53): the quotient correctly rounded, as timedelta's
    return _fromiso(s).timestamp()


_NOT_WIRE = -(1 << 62)
_WIRE = "0000-00-00T00:00:00.000000+00:00"   # the wire format: its separators, and digits where the zeros are
_WIRE_SEPARATORS = sum(1 << i for i, c in enumerate(_WIRE) if c != "0")   # their positions, as bits


def _wire_us(s: str) -> int:
    """Microseconds since the epoch of a 32-character wire-format timestamp, or ``_NOT_WIRE`` when ``s`` is not one
    (or is out of the range where the float of the result is exact): the caller then asks ``datetime``.
    One pass over the characters (compiled: a C loop over the string's buffer)."""
    y = mo = d = h = mi = sec = us = 0
    v = 0   # the number read since the last separator
    i = 0
    for c in s:
        if (_WIRE_SEPARATORS >> i) & 1:
            if c != _WIRE[i]:
                return _NOT_WIRE
            if i == 4:
                y = v
            elif i == 7:
                mo = v
            elif i == 10:
                d = v
            elif i == 13:
                h = v
            elif i == 16:
                mi = v
            elif i == 19:
                sec = v
            elif i == 26:
                us = v
            elif v != 0:   # +00:
                return _NOT_WIRE
            v = 0
        elif "0" <= c <= "9":
            v = v * 10 + (ord(c) - 48)
        else:
            return _NOT_WIRE
        i += 1
    if i != 32 or v != 0:   # :00
        return _NOT_WIRE
    if y < 1700 or y > 2200 or mo < 1 or mo > 12 or d < 1 or h > 23 or mi > 59 or sec > 59:
        return _NOT_WIRE
    if mo == 2:
        if d > (29 if y % 4 == 0 and (y % 100 != 0 or y % 400 == 0) else 28):
            return _NOT_WIRE
    elif d > (30 if mo == 4 or mo == 6 or mo == 9 or mo == 11 else 31):
        return _NOT_WIRE
    # days from the civil date (proleptic Gregorian, March-based years: the leap day last)
    if mo <= 2:
        y -= 1
        mo += 9
    else:
        mo -= 3
    days = y * 365 + y // 4 - y // 100 + y // 400 + (153 * mo + 2) // 5 + d - 1 - 719468
    return ((days * 86400 + h * 3600 + mi * 60 + sec) * 1000000) + us


def iso_utc(s: Optional[str]) -> Optional[str]:
    """A timestamp string normalised to the wire format (UTC, microseconds)."""
    if s is None:
        return None
    if len(s) == 32 and s.endswith("+00:00"):
        return s
    return _fromiso(s).astimezone(_UTC).isoformat(timespec="microseconds")


def iso_from_epoch(x: float) -> str:
    return (_EPOCH + timedelta(microseconds=round(x * 1e6))).isoformat(timespec="microseconds")


def normalise_email(e: Any) -> Optional[str]:
    if not isinstance(e, str):
        return None
    e = e.strip().lower()
    return e or None


def subject_of(ev: dict) -> tuple[Optional[str], Optional[str]]:
    """(lead key, anonymous id) of an event: lead key = lead_id when given, else the normalised email."""
    lid = ev.get("lead_id")
    if isinstance(lid, str) and lid.strip():
        lk: Optional[str] = lid
    else:
        lk = normalise_email(ev.get("email"))
    aid = ev.get("anonymous_id")
    if not (isinstance(aid, str) and aid):
        aid = None
    return lk, aid


def _qualified(q: Any) -> bool:
    if not isinstance(q, dict):
        return False
    for k in ("problem", "role", "schedule", "timing"):
        if q.get(k):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# state


class Agg:
    """Engagement/intent aggregates of one subject under one rule set (keyed in the state by rule-set version).

    ``sums[r]``/``counts[r]``: decayed sum (anchored at ``A``) and number of counted events per engagement rule;
    ``total`` = Σ sums; ``buckets[(r, utc_day)]`` = the ≤ max_per_day counted entries ``(received_at string,
    event_id, occurred_at)`` of a capped rule (kept so a join recomputes the first N to arrive of the union exactly);
    ``top`` = the TOP_K largest positive contributions ``(-log2(points) - occ/h, event_id, r, occ)`` (time-invariant
    order); ``pending[i]`` = unfired ``first`` events ``(occ, event_id)`` of intent rule ``i``, sorted; at most
    MAX_PENDING (the earliest occurred is dropped first).
    """

    __slots__ = ("A", "total", "sums", "anch", "counts", "buckets", "top", "pending")

    def __init__(self, n_rules: int):
        self.A: Optional[float] = None      # instant at which `total` is valued (the lead's t at the last contribution)
        self.total = 0.0
        self.sums = [0.0] * n_rules         # sums[r] valued at anch[r] (re-anchored lazily, when r matches again)
        self.anch = [0.0] * n_rules
        self.counts = [0] * n_rules
        self.buckets: dict[tuple[int, int], list] = {}
        self.top: list[tuple] = []
        self.pending: dict[int, list] = {}

    def advance(self, t: float, h_s: float) -> None:
        """Value ``total`` at ``t`` (t never goes back): total *= 0.5^((t − A)/h)."""
        A = self.A
        if A != t:
            if A is not None and self.total != 0.0:
                self.total *= 2.0 ** ((A - t) / h_s)
            self.A = t

    def rule_value(self, r: int, t: float, h_s: float) -> float:
        return self.sums[r] * 2.0 ** ((self.anch[r] - t) / h_s) if self.counts[r] else 0.0

    def to_list(self) -> list:
        """The JSON-ready form (``from_list`` inverts it). The entries stay tuples: orjson writes them as arrays,
        and copying each into a list doubled the cost of encoding a lead's state (written once per batch)."""
        return [self.A, self.total, self.sums, self.anch, self.counts,
                [[r, d, b] for (r, d), b in self.buckets.items()], self.top, list(self.pending.items())]

    @classmethod
    def from_list(cls, x: list) -> "Agg":
        a = cls.__new__(cls)
        a.A, a.total, a.sums, a.anch, a.counts = x[0], x[1], list(x[2]), list(x[3]), list(x[4])
        a.buckets = {(r, d): [tuple(e) for e in b] for r, d, b in x[5]}
        a.top = [tuple(e) for e in x[6]]
        a.pending = {i: [tuple(e) for e in p] for i, p in x[7]}
        return a


class LeadState:
    """The compact state of one subject (a lead, or an anonymous visitor before it is joined to a lead)."""

    __slots__ = ("key", "anonymous", "stage", "transitions", "recycled_at", "handoffs", "rejected", "alerts", "seq",
                 "t", "t_str", "attrs", "vals", "rev", "email", "qualified", "aggs", "seen", "seen_old", "fit", "eng",
                 "version", "_fitc", "_er", "_cmp", "_fit_rs", "_fit_v")

    def __init__(self, key: str, anonymous: bool = False):
        self.key = key
        self.anonymous = anonymous
        self.stage = "anonymous"
        self.transitions = 0          # number of stage transitions (ids {lead}:stage:{n})
        self.recycled_at: Optional[float] = None   # occurred_at of the move to `recycled`
        self.handoffs = 0             # MQL episodes handed off
        self.rejected = 0
        self.alerts = 0
        self.seq = 0                  # touchpoints folded
        self.t: Optional[float] = None      # latest occurred_at seen (epoch s) = evaluation time
        self.t_str: Optional[str] = None
        self.attrs: dict[str, tuple] = {}   # name -> (value or None when cleared, received_at str, event_id)
        self.vals: dict[str, Any] = {}      # name -> present value
        self.rev = 0                  # bumped on every attribute change
        self.email: Optional[str] = None    # latest envelope email seen
        self.qualified = False
        self.aggs: dict[str, Agg] = {}
        # dedupe window: two generations of event ids (the last DEDUPE_WINDOW..2*DEDUPE_WINDOW events)
        self.seen: dict[str, None] = {}
        self.seen_old: dict[str, None] = {}
        self.fit: Union[int, float] = 0     # as of the last evaluation
        self.eng = 0.0
        self.version: Optional[str] = None
        self._fitc: Optional[tuple] = None     # caches (not serialised)
        self._er: Optional[str] = None
        self._cmp: Optional[tuple] = None
        self._fit_rs: Optional[CompiledRuleSet] = None   # fit of vals under _fit_rs (None: recompute)
        self._fit_v: Union[int, float] = 0

    @classmethod
    def new(cls, key: str, anonymous: bool = False) -> "LeadState":
        return cls(key, anonymous)

    @property
    def attributes(self) -> dict[str, Any]:
        return dict(self.vals)

    @property
    def score(self) -> float:
        return self.fit + self.eng

    def summary(self) -> dict[str, Any]:
        email = self.vals.get("email")
        if email is not None and not isinstance(email, str):
            email = str(email)
        return {
            "lead": self.key,
            "anonymous": self.anonymous,
            "email": email if email is not None else self.email,
            "stage": self.stage,
            "fit": self.fit,
            "engagement": self.eng,
            "score": self.fit + self.eng,
            "handoffs": self.handoffs,
            "rejected": self.rejected,
            "intent_alerts": self.alerts,
            "rules_version": self.version,
            "events": self.seq,
            "evaluated_at": iso_utc(self.t_str),
        }

    def to_bytes(self) -> bytes:
        return orjson.dumps({
            "f": _STATE_FORMAT, "k": self.key, "a": self.anonymous, "st": self.stage, "n": self.transitions,
            "rc": self.recycled_at, "h": self.handoffs, "rj": self.rejected, "al": self.alerts, "q": self.seq,
            "t": self.t, "ts": self.t_str, "at": [[k, v[0], v[1], v[2]] for k, v in self.attrs.items()],
            "em": self.email, "ql": self.qualified, "fit": self.fit, "eng": self.eng, "ver": self.version,
            "so": list(self.seen_old), "seen": list(self.seen), "g": {v: a.to_list() for v, a in self.aggs.items()},
        })

    @classmethod
    def from_bytes(cls, b: Union[bytes, str]) -> "LeadState":
        return cls.from_dict(orjson.loads(b))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LeadState":
        """The state from the decoded JSON of ``to_bytes`` (e.g. embedded in a join answer, already decoded)."""
        if d.get("f") != _STATE_FORMAT:
            raise ValueError(f"unsupported lead-state format {d.get('f')!r}")
        s = cls(d["k"], d["a"])
        s.stage, s.transitions, s.recycled_at = d["st"], d["n"], d["rc"]
        s.handoffs, s.rejected, s.alerts, s.seq = d["h"], d["rj"], d["al"], d["q"]
        s.t, s.t_str = d["t"], d["ts"]
        s.attrs = {k: (v, ra, eid) for k, v, ra, eid in d["at"]}
        s.vals = {k: v[0] for k, v in s.attrs.items() if v[0] is not None}
        s.email, s.qualified, s.fit, s.eng, s.version = d["em"], d["ql"], d["fit"], d["eng"], d["ver"]
        s.seen = dict.fromkeys(d["seen"])
        s.seen_old = dict.fromkeys(d["so"])
        s.aggs = {v: Agg.from_list(x) for v, x in d["g"].items()}
        return s

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LeadState) and self.to_bytes() == other.to_bytes()

    def __repr__(self) -> str:
        return (f"LeadState(key={self.key!r}, stage={self.stage!r}, fit={self.fit!r}, eng={self.eng!r}, "
                f"seq={self.seq})")


def _agg(state: LeadState, rs: CompiledRuleSet) -> Agg:
    a = state.aggs.get(rs.version)
    if a is None:
        a = state.aggs[rs.version] = Agg(len(rs.eng_rules))
    return a


def _set_attrs(state: LeadState, mapping: Any, ra: str, eid: str) -> None:
    if not isinstance(mapping, dict):
        return
    attrs, vals = state.attrs, state.vals
    for k, v in mapping.items():
        if not isinstance(k, str):
            continue
        if v is None or v == "":
            attrs[k] = (None, ra, eid)
            vals.pop(k, None)
        else:
            attrs[k] = (v, ra, eid)
            vals[k] = v
    state.rev += 1
    state._fit_rs = None


def _fit(state: LeadState, rs: CompiledRuleSet) -> tuple:
    c = state._fitc
    if c is not None and c[0] is rs and c[1] == state.rev:
        return c
    vals = state.vals
    # no attribute: no fit rule holds (a subject's first evaluation; fit_matches reads only present values)
    matches = rs.fit_matches(vals) if vals else []
    total: Union[int, float] = 0
    for m in matches:
        total += m[2]
    c = state._fitc = (rs, state.rev, total, matches)
    state._fit_rs = rs
    state._fit_v = total
    return c


# ----------------------------------------------------------------------------------------------------------------
# the fold


def fold(state: Optional[LeadState], event: dict, book: RuleBook, *, merge_from: Optional[LeadState] = None,
         emit: bool = True) -> tuple[LeadState, list[dict]]:
    """Fold one touchpoint into ``state`` (mutated and returned) and return the derived events."""
    if state is None:
        lk, aid = subject_of(event)
        if lk is not None:
            state = LeadState(lk, False)
        elif aid is not None:
            state = LeadState(aid, True)
        else:
            raise ValueError("event has no subject (lead_id, email or anonymous_id)")
    if emit:
        out: list = []
        _fold(state, event, book, merge_from, out)
        return state, out
    _fold(state, event, book, merge_from, None)
    return state, []


_NO_PAYLOAD: dict = {}
#: event types with effects beyond engagement / intents (attributes, qualification, stage moves)
_SPECIAL = frozenset({"form_submitted", "attribute_updated", "call_logged", "stage_changed"})


def _fold(state: LeadState, event: dict, book: RuleBook, merge_from: Optional[LeadState],
          out: Optional[list], new_id: bool = False,
          on_handoff: Optional[Callable[[LeadState, str], None]] = None, window: bool = True) -> None:
    """The fold of one event into an existing ``state`` (``_fold_events`` of one event, see there)."""
    _fold_events(state, (event,), book, out, new_id, {0: merge_from} if merge_from is not None else None,
                 on_handoff=on_handoff, window=window)


def _fold_events(state: LeadState, events: Iterable[dict], book: RuleBook, out: Optional[list],
                 new_id: bool = False, merges: Optional[dict[int, LeadState]] = None,
                 on_error: Optional[Any] = None, tags: Optional[dict[str, Any]] = None,
                 on_handoff: Optional[Callable[[LeadState, str], None]] = None, window: bool = True) -> None:
    """The fold of ``events`` (one subject's, in arrival order) into an existing ``state``; derived events are
    appended to ``out`` unless None. ``new_id``: the caller knows the event ids are new to this subject (the Ledger's
    global dedupe): skip the check. ``window=False`` (with ``new_id``): the subject's dedupe window is not kept
    either (a Ledger whose states never continue in a live fold: see ``Ledger``). ``merges``: {index in
    ``events``: the anonymous state that event joins (merged first)}. ``on_error(tags.get(event id), exc)``: called
    for an event whose fold raised ValueError, TypeError, KeyError or AttributeError, the fold goes on with the next
    event; without it the exception propagates.
    ``on_handoff(state, event id)``: called when an event moved the subject to ``mql`` (hand-off ``state.handoffs``
    at ``state.t``), right after that event's fold.

    One function on purpose (the hot path of the backtest and the processor): engagement bookkeeping and the
    evaluation are inlined; the rare steps (stage moves, intents, joins, explanations, MQL) are helpers. A run of
    one subject's events is folded in one call (the backtest's Ledger.flush): no call, no setup per event.
    """
    single = book.single
    plans = single.plan if single is not None else None   # its plan by event type (built once, never replaced)
    eff = single.eff if single is not None else 0.0         # and its effective_from (epoch s)
    anonymous = state.anonymous        # never changes (a join merges an anonymous state into a lead state)
    aggs = state.aggs                  # mutated in place, never replaced (merge included)
    # fields of a rule set, read once per rule set rather than per event (slot reads of a Python object): of the
    # rule set of the last matched rules (w_) and of the last rule set in force (now_)
    w_rs = now_rs = None
    w_version = now_version = now_min_fit = now_min_eng = now_lead_attrs = None
    w_hs = now_hs = 0.0
    i = -1
    for event in events:
        i += 1
        try:
            eid = event["event_id"]
            seen = state.seen
            if not new_id and (eid in seen or eid in state.seen_old):
                continue
            if merges is not None:
                merge_from = merges.get(i)
                if merge_from is not None:
                    merge(state, merge_from, book)
                    seen = state.seen
            if window:
                if len(seen) >= DEDUPE_WINDOW:
                    state.seen_old = seen
                    state.seen = seen = {}
                seen[eid] = None
            state.seq += 1
            etype = event["type"]
            occ_s = event["occurred_at"]
            occ = epoch_s(occ_s)
            t0 = state.t
            if t0 is None or occ > t0:
                state.t = occ
                state.t_str = occ_s
                t = occ
            else:
                t = t0
            if single is not None:
                rs_now = single if t >= eff else None
            else:
                rs_now = book.in_force(t)
            if not anonymous and state.stage == "anonymous":
                _transition(state, "known", rs_now, eid, "identified", None, out, occ)
            email = event.get("email")
            if email and email != state._er:
                state._er = email
                state.email = normalise_email(email)
            payload = event.get("payload")
            if payload is None:
                payload = _NO_PAYLOAD
            if etype in _SPECIAL:
                if etype == "form_submitted" or etype == "attribute_updated":
                    ra = event.get("received_at") or occ_s
                    _set_attrs(state, payload.get("fields" if etype == "form_submitted" else "attributes"), ra, eid)
                elif etype == "call_logged":
                    if _qualified(payload.get("qualification")):
                        state.qualified = True
                else:
                    _stage_changed(state, event, payload, rs_now, out, occ)

            # the rules this event matches, per rule set of the book (memoised on the compiled rule sets)
            if single is not None:
                plan = plans.get(etype)
                if plan is None:
                    work = ()
                else:
                    mode = plan[0]
                    if mode == 0:
                        work = plan[2]
                    elif mode == 1:  # CompiledRuleSet.match's memo, read inline (the hot path)
                        v = payload.get(plan[1])
                        if v is None or type(v) is str:
                            memo = plan[2]
                            work = memo.get(v)
                        else:
                            work = None
                        if work is None:
                            work = single.match(plan, event, payload)
                    else:
                        work = single.match(plan, event, payload)
            else:
                work = []
                for rs in book.sets:
                    plan = rs.plan.get(etype)
                    if plan is not None:
                        work += rs.match(plan, event, payload)

            for rs, entries, firsts, thens in work:
                # intent alerts: a `then` event pairs with earlier-arrived `first` events (rule set in force at t)
                if thens is not None and rs is rs_now and not anonymous:
                    ag = aggs.get(rs.version)
                    if ag is not None and ag.pending:
                        _fire_intents(state, event, rs, thens, occ, out, book)
            # engagement and intent `first` events, for every rule set of the book
            day = None           # UTC day of occurred_at (and received_at), computed for the first capped rule
            ra = None
            for rs, entries, firsts, thens in work:
                if entries is None and firsts is None:
                    continue
                if rs is not w_rs:
                    w_rs = rs
                    w_version = rs.version
                    w_hs = rs.h_s
                agg = aggs.get(w_version)
                if agg is None:
                    agg = aggs[w_version] = Agg(rs.n_eng)
                if entries is not None:
                    w = -1.0
                    has_f = False
                    f = fA = 0.0       # read only once has_f is set (initialised for the C compiler's sake)
                    h_s = w_hs
                    for ri, pts, cap, nlp in entries:
                        displaced = None
                        if cap is not None:
                            if cap == 0:
                                continue
                            if day is None:
                                day = int(occ // 86400.0)
                                ra = event.get("received_at") or occ_s
                            bk = (ri, day)
                            b = agg.buckets.get(bk)
                            if b is None:
                                agg.buckets[bk] = [(ra, eid, occ)]
                            elif len(b) >= cap:
                                # The first N by (received_at, event_id) count: within one partition that is arrival
                                # order; an anonymous history reaching its lead late (another partition) merges by
                                # received_at as §4 says, whatever the processing order was.
                                displaced = max(b)
                                if (ra, eid) >= (displaced[0], displaced[1]):
                                    continue
                                b.remove(displaced)
                                b.append((ra, eid, occ))
                            else:
                                b.append((ra, eid, occ))
                        if w < 0.0:
                            A = agg.A
                            # f = 0.5^((t − A)/h): the decay since the total's anchor, shared with rules anchored at A
                            # (has_f: f was computed; fA: A as a float then)
                            if A != t:
                                if A is not None and agg.total != 0.0:
                                    fA = A
                                    f = 2.0 ** ((fA - t) / h_s)
                                    has_f = True
                                    agg.total *= f
                                agg.A = t
                            w = 1.0 if occ == t else 2.0 ** ((occ - t) / h_s)
                            sums = agg.sums
                            anch = agg.anch
                            counts = agg.counts
                        c = pts * w
                        s = sums[ri]
                        an = anch[ri]
                        if an != t:
                            if s != 0.0:
                                s *= f if has_f and an == fA else 2.0 ** ((an - t) / h_s)
                            else:
                                s = 0.0
                            anch[ri] = t
                        sums[ri] = s + c
                        counts[ri] += 1
                        agg.total += c
                        if displaced is not None:
                            dc = pts * (1.0 if displaced[2] == t else 2.0 ** ((displaced[2] - t) / h_s))
                            sums[ri] -= dc
                            counts[ri] -= 1
                            agg.total -= dc
                            agg.top = [x for x in agg.top if x[1] != displaced[1] or x[2] != ri]
                        if nlp is not None:
                            top = agg.top
                            nl = nlp
                            k = nl - occ / h_s
                            if len(top) < TOP_K:
                                _insort(top, (k, eid, ri, occ))
                            elif k <= top[-1][0]:
                                _insort(top, (k, eid, ri, occ))
                                if len(top) > TOP_K:
                                    top.pop()
                if firsts is not None:
                    pending = agg.pending
                    for a in firsts:
                        p = pending.get(a[0])
                        if p is None:
                            p = pending[a[0]] = []
                        _insort(p, (occ, eid))
                        if len(p) > MAX_PENDING:
                            del p[0]

            # evaluation at t under the rule set in force: scores, known<->lead, MQL + hand-off, lead_scored
            if rs_now is None:
                fit: Union[int, float] = 0
                eng = 0.0
                version = None
            else:
                if rs_now is not now_rs:
                    now_rs = rs_now
                    now_version = rs_now.version
                    now_hs = rs_now.h_s
                    now_min_fit = rs_now.min_fit
                    now_min_eng = rs_now.min_engagement
                    now_lead_attrs = rs_now.lead_attributes
                version = now_version
                fit = state._fit_v if state._fit_rs is rs_now else _fit(state, rs_now)[2]
                agg = aggs.get(version)
                if agg is None or agg.A is None:
                    eng = 0.0
                elif agg.A == t:
                    eng = agg.total
                else:  # valued at the last contribution's t; decayed here without storing (no compounding)
                    eng = agg.total * 2.0 ** ((agg.A - t) / now_hs)
            fit_before = state.fit
            eng_before = state.eng
            state.fit = fit
            state.eng = eng
            state.version = version
            if anonymous:
                continue
            if out is not None and (fit != fit_before or eng != eng_before):
                d = _base(state, "lead_scored", rs_now, eid)
                d["event_id"] = f"{state.key}:scored:{state.seq}"
                d["fit"] = fit
                d["engagement"] = eng
                d["score"] = fit + eng
                d["fit_before"] = fit_before
                d["engagement_before"] = eng_before
                d["explanation"] = explain(state, rs_now)
                out.append(d)
            stage = state.stage
            if stage == "known" or stage == "lead":
                lead_attrs = now_lead_attrs if rs_now is not None else DEFAULT_LEAD_ATTRIBUTES
                cm = state._cmp
                if cm is not None and cm[0] == state.rev and cm[1] is lead_attrs:
                    complete = cm[2]
                else:
                    vals = state.vals
                    complete = True
                    for la in lead_attrs:
                        if la not in vals:
                            complete = False
                            break
                    state._cmp = (state.rev, lead_attrs, complete)
                if complete:
                    if stage == "known":
                        _transition(state, "lead", rs_now, eid, "attributes complete", None, out, t)
                elif stage == "lead":
                    _transition(state, "known", rs_now, eid, "attributes incomplete", None, out, t)
            elif stage != "recycled" or rs_now is None or state.recycled_at is None \
                    or t - state.recycled_at < rs_now.cooldown_s:
                continue
            if rs_now is None or fit < now_min_fit or eng < now_min_eng:
                continue
            if _mql(state, rs_now, eid, fit, eng, out) and on_handoff is not None:
                on_handoff(state, eid)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            if on_error is None:
                raise
            on_error(tags.get(event["event_id"]) if tags else None, e)


def _mql(state: LeadState, rs_now: CompiledRuleSet, eid: str, fit: Union[int, float], eng: float,
         out: Optional[list]) -> bool:
    """The rest of the MQL check (fit and engagement thresholds met): required attributes, qualification; then the
    move to ``mql`` and the hand-off. True when the lead was handed off."""
    vals = state.vals
    for a in rs_now.required_attributes:
        if a not in vals:
            return False
    if rs_now.require_qualification and not state.qualified:
        return False
    _transition(state, "mql", rs_now, eid, "mql criteria met", None, out, state.t)
    state.handoffs += 1
    if out is not None:
        d = _base(state, "lead_handed_off", rs_now, eid)
        d["event_id"] = f"{state.key}:handoff:{state.handoffs}"
        d["episode"] = state.handoffs
        d["fit"] = fit
        d["engagement"] = eng
        d["score"] = fit + eng
        d["explanation"] = explain(state, rs_now)
        d["top_touchpoints"] = top_touchpoints(state, rs_now)
        d["attributes"] = dict(state.vals)
        out.append(d)
    return True


def _occ_of(x: tuple) -> float:
    return x[0]


def _arrival_key(x: tuple) -> tuple:
    """Order of two merged histories: (received_at, event_id); entries keep received_at as the wire string."""
    return (epoch_s(x[0]), x[1])


def _base(state: LeadState, etype: str, rs: Optional[CompiledRuleSet], cause: str) -> dict:
    return {"event_id": "", "type": etype, "lead": state.key, "at": iso_utc(state.t_str), "cause_event_id": cause,
            "rules_version": rs.version if rs is not None else None}


def _transition(state: LeadState, to: str, rs: Optional[CompiledRuleSet], cause: str, reason: Optional[str],
                by: Optional[str], out: Optional[list], occ: float) -> None:
    frm = state.stage
    state.stage = to
    state.transitions += 1
    if to == "recycled":
        state.recycled_at = occ
    if out is not None:
        d = _base(state, "lead_stage_changed", rs, cause)
        d["event_id"] = f"{state.key}:stage:{state.transitions}"
        d["from"] = frm
        d["to"] = to
        d["reason"] = reason
        d["by"] = by
        out.append(d)


def _stage_changed(state: LeadState, event: dict, payload: dict, rs: Optional[CompiledRuleSet],
                   out: Optional[list], occ: float) -> None:
    to = payload.get("to")
    frm = state.stage
    table = rs.transitions if rs is not None else DEFAULT_TRANSITIONS
    if not isinstance(to, str) or not to:
        reason = "stage_changed needs payload.to (the target stage)"
    elif to not in STAGES:
        reason = f"unknown stage {to!r}"
    elif to not in table.get(frm, ()):
        reason = f"transition {frm} -> {to} is not allowed"
    else:
        by = payload.get("by")
        why = payload.get("reason")
        _transition(state, to, rs, event["event_id"], why if isinstance(why, str) else "stage_changed",
                    by if isinstance(by, str) else None, out, occ)
        return
    state.rejected += 1
    if out is not None:
        d = _base(state, "event_rejected", rs, event["event_id"])
        d["event_id"] = f"rejected:{event['event_id']}"
        d["reason"] = reason
        d["field"] = "payload.to"
        d["event"] = event
        out.append(d)


def _fire_intents(state: LeadState, event: dict, rs: CompiledRuleSet, thens: list, occ: float,
                  out: Optional[list], book: RuleBook) -> None:
    """Fire the intent rules ``thens`` of ``rs`` (whose `then` conditions hold on ``event``)."""
    agg = state.aggs.get(rs.version)
    if agg is None:
        return
    eid = event["event_id"]
    for a in thens:
        pend = agg.pending.get(a[0])
        if not pend:
            continue
        within = a[6]
        # candidates by bisection (a second wider), then the exact test 0 <= then.occ - first.occ <= within
        lo = bisect.bisect_left(pend, occ - within - 1.0, key=_occ_of)
        hi = bisect.bisect_right(pend, occ + 1.0, lo, key=_occ_of)
        if lo == hi:
            continue
        fired = [p for p in pend[lo:hi] if 0.0 <= occ - p[0] <= within]
        if not fired:
            continue
        if len(fired) == hi - lo:
            del pend[lo:hi]
        else:
            agg.pending[a[0]] = pend = [p for p in pend if not (p in fired)]
        name = a[1]
        gone = {p[1] for p in fired}
        # once per (rule, first event): drop these firsts from the same-named rule of the other rule sets too
        for other in book.sets:
            if other is rs:
                continue
            oa = other.intent_by_name.get(name)
            og = state.aggs.get(other.version)
            if oa is None or og is None:
                continue
            op = og.pending.get(oa[0])
            if op:
                og.pending[oa[0]] = [x for x in op if x[1] not in gone]
        for p in fired:
            state.alerts += 1
            if out is not None:
                d = _base(state, "intent_alert", rs, eid)
                d["event_id"] = f"{state.key}:intent:{name}:{p[1]}"
                d["rule"] = name
                d["first_event_id"] = p[1]
                d["then_event_id"] = eid
                out.append(d)


def engagement_at(state: LeadState, rs: Optional[CompiledRuleSet], t: Optional[float] = None) -> float:
    """Engagement of ``state`` under ``rs`` at ``t`` (default: the state's evaluation time)."""
    if rs is None:
        return 0.0
    if t is None:
        t = state.t
    agg = state.aggs.get(rs.version)
    if agg is None or agg.A is None or t is None:
        return 0.0
    return agg.total * 2.0 ** ((agg.A - t) / rs.h_s)


def explain(state: LeadState, rs: Optional[CompiledRuleSet]) -> dict:
    """Why the scores are what they are: fit rules that hold; per engagement rule: points, events, contribution."""
    if rs is None:
        return {"fit": [], "engagement": []}
    fit = [{"rule": n, "attribute": a, "points": p} for n, a, p in _fit(state, rs)[3]]
    eng = []
    agg = state.aggs.get(rs.version)
    if agg is not None and agg.A is not None and state.t is not None:
        for ri, name, _ev, pts, _cap in rs.eng_rules:
            n = agg.counts[ri]
            if n:
                eng.append({"rule": name, "points": pts, "events": n,
                            "contribution": agg.rule_value(ri, state.t, rs.h_s)})
    return {"fit": fit, "engagement": eng}


def top_touchpoints(state: LeadState, rs: Optional[CompiledRuleSet]) -> list[dict]:
    """The touchpoints that contributed most under ``rs`` at the evaluation time (largest first)."""
    if rs is None or state.t is None:
        return []
    agg = state.aggs.get(rs.version)
    if agg is None:
        return []
    out = []
    for _k, eid, ri, occ in agg.top:
        _i, name, ev, pts, _cap = rs.eng_rules[ri]
        out.append({"event_id": eid, "type": ev, "rule": name, "points": pts, "occurred_at": iso_from_epoch(occ),
                    "contribution": pts * 2.0 ** ((occ - state.t) / rs.h_s)})
    return out


# ----------------------------------------------------------------------------------------------------------------
# identity: joining an anonymous history to a lead


def merge(lead: LeadState, anon: LeadState, book: RuleBook) -> LeadState:
    """Join ``anon``'s history into ``lead`` (mutated and returned; ``anon`` is left untouched).

    As if the anonymous events had been the lead's from the start, the two histories merged by
    (received_at, event_id): decayed sums add up; attributes take the latest (received_at, event_id);
    each capped (rule, UTC day) bucket keeps the first max_per_day entries of the union; the top touchpoints and
    pending intent `first` events are united. The lead's stage machine (stage, transitions, hand-offs, recycled
    time) is kept as it is: a join never re-folds it. No evaluation here (the caller folds the joining event).
    Exact when each history's arrival order agrees with its received_at order (true of the log's partitions).
    """
    if anon is lead:
        return lead
    if anon.t is not None and (lead.t is None or anon.t > lead.t):
        lead.t, lead.t_str = anon.t, anon.t_str
    for k, v in anon.attrs.items():
        cur = lead.attrs.get(k)
        if cur is None or _arrival_key(v[1:]) > _arrival_key(cur[1:]):
            lead.attrs[k] = v
    lead.vals = {k: v[0] for k, v in lead.attrs.items() if v[0] is not None}
    lead.rev += 1
    lead._fitc = None
    lead._fit_rs = None
    if lead.email is None:
        lead.email = anon.email
    lead.qualified = lead.qualified or anon.qualified
    lead.rejected += anon.rejected
    lead.alerts += anon.alerts
    lead.seq += anon.seq
    ids = list(dict.fromkeys([*anon.seen_old, *anon.seen, *lead.seen_old, *lead.seen]))[-2 * DEDUPE_WINDOW:]
    lead.seen_old = dict.fromkeys(ids[:-DEDUPE_WINDOW])
    lead.seen = dict.fromkeys(ids[-DEDUPE_WINDOW:])
    for v, b in anon.aggs.items():
        a = lead.aggs.get(v)
        rs = book.by_version.get(v)
        if a is None:
            # a copy (from_list builds new containers from to_list's; the values are immutable), no JSON round trip
            lead.aggs[v] = Agg.from_list(b.to_list())
        elif rs is not None:
            _merge_agg(a, b, rs)
        # a version unknown to the book keeps the lead's aggregates (it cannot be evaluated anyway)
    return lead


def _merge_agg(a: Agg, b: Agg, rs: CompiledRuleSet) -> None:
    h = rs.h_s
    rules = rs.eng_rules
    if b.A is not None:
        A = b.A if a.A is None else max(a.A, b.A)
        sums = [0.0] * len(rules)
        counts = [0] * len(rules)
        for ri, _name, _ev, _pts, cap in rules:
            if cap is None:
                sums[ri] = a.rule_value(ri, A, h) + b.rule_value(ri, A, h)
                counts[ri] = a.counts[ri] + b.counts[ri]
        buckets: dict[tuple[int, int], list] = {}
        for key in sorted(set(a.buckets) | set(b.buckets)):
            cap = rules[key[0]][4]
            ents = sorted([*a.buckets.get(key, ()), *b.buckets.get(key, ())], key=_arrival_key)[:cap]
            if ents:
                buckets[key] = ents
                pts = rules[key[0]][3]
                for _ra, _eid, occ in ents:
                    sums[key[0]] += pts * (1.0 if occ == A else 2.0 ** ((occ - A) / h))
                counts[key[0]] += len(ents)
        cands = {(e[1], e[2]): e for e in [*a.top, *b.top] if rules[e[2]][4] is None}
        for (ri, _d), ents in buckets.items():
            pts = rules[ri][3]
            if pts > 0:
                for _ra, eid, occ in ents:
                    cands[(eid, ri)] = (-(math.log2(pts) + occ / h), eid, ri, occ)
        a.A, a.sums, a.anch, a.counts, a.buckets = A, sums, [A] * len(rules), counts, buckets
        a.total = math.fsum(sums)
        a.top = sorted(cands.values())[:TOP_K]
    for i, pb in b.pending.items():
        pa = a.pending.get(i, [])
        a.pending[i] = sorted(set(pa) | set(pb))[-MAX_PENDING:]


class Identity:
    """§4 routing: lead key = lead_id, else normalised email; anonymous-only events go to the anonymous subject
    until the first event carrying both an anonymous id and a lead key joins them (first join wins, forever).
    A later event with that anonymous id and another lead key belongs to that lead and does not move the cookie.
    """

    __slots__ = ("anon_to_lead",)

    def __init__(self, anon_to_lead: Optional[dict[str, str]] = None):
        self.anon_to_lead: dict[str, str] = dict(anon_to_lead or {})

    def route(self, ev: dict) -> tuple[str, bool, Optional[str]]:
        """(subject key, is anonymous subject, anonymous id joined by this event or None)."""
        lk, aid = subject_of(ev)
        if lk is not None:
            if aid is not None and aid not in self.anon_to_lead:
                self.anon_to_lead[aid] = lk
                return lk, False, aid
            return lk, False, None
        if aid is not None:
            lead = self.anon_to_lead.get(aid)
            if lead is not None:
                return lead, False, None
            return aid, True, None
        raise ValueError("event has no subject (lead_id, email or anonymous_id)")


class Ledger:
    """The fold of a whole log in arrival order, in memory: global dedupe by event_id, identity routing, joins.

    ``apply(ev)`` folds one event at a time. ``add(ev)`` … ``flush()`` (or ``apply_all(events)``) give the same
    final states faster (emit=False only): each event is deduped and routed at once, in arrival order, but the fold
    is deferred and done subject by subject over a chunk of the log. Once routed, subjects are independent (the only
    link is a join, which takes the anonymous subject's state; every event of that anonymous subject precedes the
    join in arrival order), so folding the chunk's anonymous subjects first, then the leads, each subject's events in
    arrival order, ends in exactly the states of the one-at-a-time fold; a subject's state stays in the CPU caches
    while its events are folded (1.25–2× faster on logs of many interleaved subjects, depending on how much of the
    working set fits the caches; docs/audit.md).
    """

    __slots__ = ("book", "identity", "leads", "anons", "seen", "duplicates", "emit", "window", "_keys", "_qa", "_ql",
                 "_joins", "_tags", "_nq")

    def __init__(self, book: RuleBook, emit: bool = False, window: bool = True):
        self.book = book
        # window=False: the subjects' own dedupe windows (DEDUPE_WINDOW ids each, what a live state needs to refuse a
        # retried event) are not kept: the global set ``seen`` dedupes the whole log exactly. For folds whose states
        # are only read (the file back-test): on a 1M-event log that window is a million dict entries to write and
        # keep in memory (≈ 8 % of the fold there). Every other part of a state is the same either way.
        self.window = window
        self.identity = Identity()
        self.leads: dict[str, LeadState] = {}
        self.anons: dict[str, LeadState] = {}
        self.seen: set[str] = set()
        self.duplicates = 0
        self.emit = emit
        self._keys: dict[str, str] = {}     # envelope email -> normalised lead key (cache of normalise_email)
        # deferred folds (add/flush): subject -> its events in arrival order (plain lists: no tuple per event);
        # the rare joins by subject and index in that list; the tags (if any) by event id (unique among the
        # deferred events: deduped), one dict for all subjects
        self._qa: dict[str, list[dict]] = {}             # anonymous subject -> events
        self._ql: dict[str, list[dict]] = {}             # lead -> events
        self._joins: dict[str, dict[int, str]] = {}      # lead -> {index: anonymous id joined by that event}
        self._tags: dict[str, Any] = {}                  # event id -> tag, tags other than None
        self._nq = 0

    def route(self, ev: dict) -> Optional[tuple[str, bool, Optional[str]]]:
        """Dedupe and route one event in arrival order: (subject key, anonymous subject, anonymous id joined by
        this event or None), or None for a duplicate. Marks the event id as seen; raises ValueError (nothing
        marked) for an event without a subject."""
        eid = ev["event_id"]
        seen = self.seen
        if eid in seen:
            self.duplicates += 1
            return None
        lid = ev.get("lead_id")
        if not lid:
            email = ev.get("email")
            aid = ev.get("anonymous_id")
            if not email:
                if aid and isinstance(aid, str):  # the common anonymous-only case, without lookups
                    key = self.identity.anon_to_lead.get(aid)
                    if key is None:
                        r: tuple = (aid, True, None)
                    else:
                        r = (key, False, None)
                else:
                    r = self.identity.route(ev)
            elif not aid and type(email) is str:  # a lead's own event keyed by email: no identity change
                key = self._keys.get(email)
                if key is None:
                    key = normalise_email(email)
                    if key is None:
                        self.identity.route(ev)  # blank email: the routing error
                    self._keys[email] = key
                r = (key, False, None)
            else:
                r = self.identity.route(ev)
        else:
            r = self.identity.route(ev)
        seen.add(eid)
        return r

    def apply(self, ev: dict) -> list[dict]:
        if self._nq:
            self.flush()
        r = self.route(ev)
        if r is None:
            return []
        key, anonymous, join = r
        if self.emit:
            out: Optional[list] = []
        else:
            out = None
        if anonymous:
            st = self.anons.get(key)
            if st is None:
                st = self.anons[key] = LeadState(key, True)
            _fold(st, ev, self.book, None, out, True, window=self.window)
        else:
            st = self.leads.get(key)
            if st is None:
                st = self.leads[key] = LeadState(key, False)
            _fold(st, ev, self.book, self.anons.pop(join, None) if join is not None else None, out, True,
                  window=self.window)
        return out if out is not None else []

    def add(self, ev: dict, tag: Any = None) -> bool:
        """Route ``ev`` now (as ``apply``; raises ValueError for an event without a subject) and defer its fold to
        ``flush``; ``tag`` is handed to ``flush``'s ``on_error``. False for a duplicate. Derived events are never
        built on this path."""
        r = self.route(ev)
        if r is None:
            return False
        key, anonymous, join = r
        queues = self._qa if anonymous else self._ql
        q = queues.get(key)
        if q is None:
            q = queues[key] = []
        if join is not None:
            j = self._joins.get(key)
            if j is None:
                j = self._joins[key] = {}
            j[len(q)] = join
        if tag is not None:
            self._tags[ev["event_id"]] = tag
        q.append(ev)
        self._nq += 1
        return True

    def flush(self, on_error: Optional[Any] = None) -> None:
        """Fold the deferred events, subject by subject (see the class doc). ``on_error(tag, exc)``: called for an
        event whose fold raised ValueError, TypeError, KeyError or AttributeError (the fold goes on with the next
        event, as a caller of ``apply`` that catches them would); without it the exception propagates."""
        qa, ql, joins, tags = self._qa, self._ql, self._joins, self._tags
        self._qa, self._ql, self._joins, self._tags, self._nq = {}, {}, {}, {}, 0
        book = self.book
        window = self.window
        anons, leads = self.anons, self.leads
        for key, evs in qa.items():
            st = anons.get(key)
            if st is None:
                st = anons[key] = LeadState(key, True)
            _fold_events(st, evs, book, None, True, None, on_error, tags, window=window)
            evs.clear()  # freed now, while they are in the CPU caches (at the end of flush they no longer are)
        for key, evs in ql.items():
            st = leads.get(key)
            if st is None:
                st = leads[key] = LeadState(key, False)
            merges = None
            j = joins.get(key)
            if j is not None:
                # the anonymous states joined by this lead's events: taken now, as nothing else can touch them (an
                # anonymous id joins one lead, once; its later events are routed to that lead)
                merges = {}
                for i, aid in j.items():
                    anon = anons.pop(aid, None)
                    if anon is not None:
                        merges[i] = anon
            _fold_events(st, evs, book, None, True, merges, on_error, tags, window=window)
            evs.clear()

    @property
    def deferred(self) -> int:
        """Events added and not yet folded (``flush``)."""
        return self._nq

    def apply_all(self, events: Iterable[dict], chunk: int = 250_000) -> None:
        """``apply`` of every event (derived events not built), folded subject by subject per ``chunk`` events."""
        for ev in events:
            self.add(ev)
            if self._nq >= chunk:
                self.flush()
        self.flush()

    def states(self) -> list[LeadState]:
        """Every subject (leads and not-yet-joined anonymous visitors), sorted by subject key."""
        if self._nq:
            self.flush()
        return sorted([*self.leads.values(), *self.anons.values()], key=lambda s: (s.key, s.anonymous))

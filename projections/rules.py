"""Rule sets (PRODUCT.md §4): pydantic v2 models, loading from YAML/JSON, precompiled matchers, the RuleBook.

Pure: loading functions take a path or a string; nothing here reads a clock.

Public API
----------
- ``RuleSet`` (pydantic model of one rule set; ``extra="forbid"`` everywhere so typos fail).
- ``RuleSetError`` (ValueError) with ``.errors = [(path, message)]`` and a readable ``str``:
  ``engagement.rules[3].points: Input should be a valid number``.
- ``parse_rule_sets(text, source="<string>") -> list[RuleSet]`` (YAML or JSON; a document may hold one rule set,
  a list of rule sets, or several ``---`` documents), ``load_rule_sets(path) -> list[RuleSet]``,
  ``load_rule_set(path) -> RuleSet`` (exactly one).
- ``CompiledRuleSet`` (fast matchers, built once per rule set) and ``compile_rule_set(rs)``.
- ``RuleBook(rule_sets)``, ``RuleBook.from_paths(paths)``, ``RuleBook.from_text(text)``;
  ``book.in_force(t)`` -> the ``CompiledRuleSet`` with the latest ``effective_from <= t`` or ``None``
  (before the first rule set no rules apply: fit = engagement = 0, no MQL).
- ``write_rules_schema(path=None) -> str`` / ``rules_schema_text()``: ``schemas/rules.schema.json``.
- ``validate_main(argv) -> int``: ``leadledger rules validate FILE...``.

YAML is read with YAML 1.2-like scalars: only ``true``/``false`` are booleans (so ``NO``, ``on``, ``yes`` stay
strings) and timestamps stay strings (so ``effective_from`` must carry its offset explicitly).
"""

from __future__ import annotations

import bisect
import math
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Optional, Sequence, Union

import orjson
import yaml
from pydantic import (AwareDatetime, BaseModel, BeforeValidator, WithJsonSchema, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

# ----------------------------------------------------------------------------------------------------------------
# stages (PRODUCT.md §4, defaults)

STAGES = ("anonymous", "known", "lead", "mql", "sal", "sql", "opportunity", "won", "lost", "recycled")

# manual moves by `stage_changed` (sales); the automatic ones (anonymous->known, known<->lead, ->mql) are the fold's
DEFAULT_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "mql": ("sal", "recycled"),
    "sal": ("sql", "recycled"),
    "sql": ("opportunity", "recycled"),
    "opportunity": ("won", "lost"),
    "lost": ("recycled",),
    "known": ("sql",),
    "lead": ("sql",),
    "recycled": ("sql",),
}

DEFAULT_LEAD_ATTRIBUTES = ("name", "email", "company", "department", "title", "phone", "company_size")

# ----------------------------------------------------------------------------------------------------------------
# models

Number = Annotated[float, Field(allow_inf_nan=False)]
Scalar = Union[str, int, float, bool]


def _to_str_list(v: Any) -> Any:
    """A single needle may be written without a list; numbers are read as their text (``[1, "a"]``)."""
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        v = [v]
    if isinstance(v, list):
        return [str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in v]
    return v


StrOrList = Annotated[list[str], BeforeValidator(_to_str_list),
                      WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]})]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Range(_Model):
    min: Optional[Number] = None
    max: Optional[Number] = None

    @model_validator(mode="after")
    def _check(self) -> "Range":
        if self.min is None and self.max is None:
            raise ValueError("range needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("range min must be <= max")
        return self


_FIT_CONDITIONS = ("equals", "in_", "contains_any", "range")


class FitRule(_Model):
    """One fit rule: exactly one condition on one attribute; counts at most once."""
    name: Optional[str] = None
    attribute: str = Field(min_length=1)
    equals: Optional[Scalar] = None
    in_: Optional[list[Scalar]] = Field(default=None, alias="in")
    contains_any: Optional[StrOrList] = None
    range: Optional[Range] = None
    points: Number

    @model_validator(mode="after")
    def _one_condition(self) -> "FitRule":
        given = [c for c in _FIT_CONDITIONS if getattr(self, c) is not None]
        if len(given) != 1:
            raise ValueError("a fit rule needs exactly one condition of equals, in, contains_any, range"
                             f" (got {len(given)})")
        return self


class _Conditions(_Model):
    """Optional payload conditions of an engagement rule / intent step (all case-insensitive, all must hold)."""
    event: str = Field(min_length=1)
    url_contains: Optional[StrOrList] = None
    referrer_contains: Optional[StrOrList] = None
    title_contains: Optional[StrOrList] = None
    asset_in: Optional[StrOrList] = None
    campaign_in: Optional[StrOrList] = None
    outcome_in: Optional[StrOrList] = None
    form_in: Optional[StrOrList] = None
    source_in: Optional[StrOrList] = None


class EngagementRule(_Conditions):
    name: Optional[str] = None
    points: Number
    max_per_day: Optional[Annotated[int, Field(ge=0)]] = None


class Engagement(_Model):
    half_life_days: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    rules: list[EngagementRule] = Field(default_factory=list)


class Mql(_Model):
    min_fit: Number = 0
    min_engagement: Number = 0
    required_attributes: list[str] = Field(default_factory=list)
    require_qualification: bool = False
    cooldown_days: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0


class IntentStep(_Conditions):
    pass


class IntentAlert(_Model):
    name: str = Field(min_length=1)
    first: IntentStep
    then: IntentStep
    within_hours: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Stages(_Model):
    """Override of the manual (`stage_changed`) transition table: from-stage -> allowed to-stages."""
    transitions: dict[str, list[str]]

    @field_validator("transitions")
    @classmethod
    def _known(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for frm, tos in v.items():
            for s in [frm, *tos]:
                if s not in STAGES:
                    raise ValueError(f"unknown stage {s!r} (known: {', '.join(STAGES)})")
            if "mql" in tos or "known" in tos or "lead" in tos or "anonymous" in tos:
                raise ValueError(f"{frm} -> {tos}: anonymous/known/lead/mql are entered by the fold, not by sales")
        return v


class RuleSet(_Model):
    """One versioned rule set (PRODUCT.md §4; canonical example: shared/examples/rules.yaml)."""
    version: str = Field(min_length=1)
    effective_from: AwareDatetime
    description: Optional[str] = None
    lead_attributes: list[str] = Field(default_factory=lambda: list(DEFAULT_LEAD_ATTRIBUTES))
    fit: list[FitRule] = Field(default_factory=list)
    engagement: Engagement
    mql: Mql
    intent_alerts: list[IntentAlert] = Field(default_factory=list)
    stages: Optional[Stages] = None

    @field_validator("version", mode="before")
    @classmethod
    def _version_str(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        return v

    @model_validator(mode="after")
    def _unique_alert_names(self) -> "RuleSet":
        names = [a.name for a in self.intent_alerts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"intent_alerts names must be unique: {dup}")
        return self


# ----------------------------------------------------------------------------------------------------------------
# errors and loading


class RuleSetError(ValueError):
    """A rule-set file/string failed to parse or validate. ``errors`` = ``[(path, message)]``."""

    def __init__(self, source: str, errors: list[tuple[str, str]]):
        self.source = source
        self.errors = errors
        super().__init__("\n".join(f"{source}: {p}: {m}" if p else f"{source}: {m}" for p, m in errors))


def _loc_path(loc: Sequence[Union[str, int]]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            if part == "in_":
                part = "in"
            out += ("." if out else "") + str(part)
    return out


def _strip_union_tags(loc: tuple, value: Any) -> list:
    """Pydantic adds union member tags (``str``, ``list[str]``, ``function-after[...]``) to ``loc``; drop them."""
    out: list = []
    for part in loc:
        if isinstance(part, str) and (part in ("str", "int", "float", "bool", "list[str]", "list[union[str,int,float,bool]]")
                                      or part.startswith(("function-", "list[", "union["))):
            continue
        out.append(part)
    return out


def validation_errors(exc: ValidationError, prefix: Sequence[Union[str, int]] = ()) -> list[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = [*prefix, *_strip_union_tags(tuple(err["loc"]), None)]
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        item = (_loc_path(loc), msg)
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-like scalars: only true/false are booleans; timestamps stay strings."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _parse_documents(text: str, source: str) -> list[Any]:
    try:
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RuleSetError(source, [("", f"invalid YAML/JSON: {where}{problem}")]) from None
    if not docs:
        raise RuleSetError(source, [("", "empty document: no rule set")])
    return docs


def parse_rule_sets(text: str, source: str = "<string>") -> list[RuleSet]:
    """Rule sets from YAML or JSON text: one mapping, a list of mappings, or several YAML documents."""
    items: list[tuple[tuple, Any]] = []
    docs = _parse_documents(text, source)
    for di, doc in enumerate(docs):
        if isinstance(doc, list):
            for i, item in enumerate(doc):
                items.append(((i,) if len(docs) == 1 else (f"document[{di}]", i), item))
        else:
            items.append(((f"document[{di}]",) if len(docs) > 1 else (), doc))
    out: list[RuleSet] = []
    errors: list[tuple[str, str]] = []
    for prefix, item in items:
        if not isinstance(item, dict):
            errors.append((_loc_path(prefix), f"a rule set must be a mapping, got {type(item).__name__}"))
            continue
        try:
            out.append(RuleSet.model_validate(item))
        except ValidationError as e:
            errors.extend(validation_errors(e, prefix))
    if errors:
        raise RuleSetError(source, errors)
    return out


def load_rule_sets(path: Union[str, Path]) -> list[RuleSet]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RuleSetError(str(path), [("", f"cannot read: {e}")]) from None
    return parse_rule_sets(text, str(path))


def load_rule_set(path: Union[str, Path]) -> RuleSet:
    sets = load_rule_sets(path)
    if len(sets) != 1:
        raise RuleSetError(str(path), [("", f"expected exactly one rule set, found {len(sets)}")])
    return sets[0]


# ----------------------------------------------------------------------------------------------------------------
# compiled matchers (the fold's hot path uses only these, never pydantic)

# condition kinds: 0 = substring ("contains"), 1 = membership ("in")
_COND_FIELDS = (
    # (model field, where, key, kind)   where: "p" payload, "e" envelope, "pe" payload then envelope
    ("url_contains", "p", "url", 0),
    ("referrer_contains", "p", "referrer", 0),
    ("title_contains", "p", "title", 0),
    ("asset_in", "p", "asset_id", 1),
    ("campaign_in", "pe", "campaign", 1),
    ("outcome_in", "p", "outcome", 1),
    ("form_in", "p", "form_id", 1),
    ("source_in", "e", "source", 1),
)


def lower_str(v: Any) -> Optional[str]:
    """The case-folded string form used by every string condition (None for null/absent)."""
    if v is None:
        return None
    if isinstance(v, str):
        return v.lower()
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v).lower()
    return orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode().lower()


def as_number(v: Any) -> Optional[float]:
    """An attribute read as a number (§4 `range`): ints/floats and numeric strings; anything else -> None."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        x = float(v)
    elif isinstance(v, str):
        try:
            x = float(v.strip())
        except ValueError:
            return None
    else:
        return None
    return x if math.isfinite(x) else None


def _needles(v: list[str]) -> tuple[str, ...]:
    return tuple(x.lower() for x in v)


def _compile_conditions(c: _Conditions) -> Optional[tuple]:
    conds = []
    for fname, where, key, kind in _COND_FIELDS:
        v = getattr(c, fname)
        if v is None:
            continue
        n = _needles(v)
        conds.append((where, key, kind, n if kind == 0 else frozenset(n)))
    return tuple(conds) or None


def make_matcher(conds: Optional[tuple]) -> Optional[Callable[[dict, dict], bool]]:
    """A fast ``(event, payload) -> bool`` for compiled conditions (None when there are none)."""
    if conds is None:
        return None
    if len(conds) == 1 and conds[0][0] == "p":
        _w, key, kind, needles = conds[0]
        if kind == 0 and len(needles) == 1:
            needle = needles[0]

            def contains_one(ev: dict, p: dict) -> bool:
                v = p.get(key)
                if v is None:
                    return False
                return needle in (v.lower() if type(v) is str else lower_str(v))
            return contains_one
        if kind == 0:
            def contains_any(ev: dict, p: dict) -> bool:
                v = p.get(key)
                if v is None:
                    return False
                v = v.lower() if type(v) is str else lower_str(v)
                for n in needles:
                    if n in v:
                        return True
                return False
            return contains_any

        def member(ev: dict, p: dict) -> bool:
            v = p.get(key)
            if v is None:
                return False
            return (v.lower() if type(v) is str else lower_str(v)) in needles
        return member
    return lambda ev, p: conditions_hold(conds, ev, p)


def conditions_hold(conds: Optional[tuple], ev: dict, payload: dict) -> bool:
    """All compiled payload conditions hold on the event (case-insensitive). ``None`` = no condition."""
    if conds is None:
        return True
    for where, key, kind, needles in conds:
        if where == "p":
            v = payload.get(key)
        elif where == "e":
            v = ev.get(key)
        else:
            v = payload.get(key)
            if v is None:
                v = ev.get(key)
        if v is None:
            return False
        s = v.lower() if isinstance(v, str) else lower_str(v)
        if kind == 0:
            for n in needles:
                if n in s:
                    break
            else:
                return False
        elif s not in needles:
            return False
    return True


#: bound of each per-(rule set, event type) memo of matched rules (cleared when full)
MATCH_CACHE_MAX = 4096


def _plan_key(conds_list: list) -> tuple[int, Optional[str]]:
    """How the rules of one event type read the event: (0, None) no condition at all; (1, key) only conditions on
    the one payload field ``key`` (so the matched rules are a function of its value); (2, None) anything else."""
    key = None
    for conds in conds_list:
        if conds is None:
            continue
        for where, k, _kind, _needles in conds:
            if where != "p" or (key is not None and k != key):
                return 2, None
            key = k
    return (0, None) if key is None else (1, key)


def _num(x: float) -> Union[int, float]:
    return int(x) if float(x).is_integer() else x


class CompiledRuleSet:
    """A rule set compiled for the fold: tuples, lower-cased needles, dispatch by event type."""

    __slots__ = ("model", "version", "effective_from", "eff", "h_s", "half_life_days", "eng_rules", "dispatch",
                 "capped", "fit_rules", "lead_attributes", "min_fit", "min_engagement", "required_attributes",
                 "require_qualification", "cooldown_s", "intents", "intent_by_name", "intent_first", "intent_then",
                 "transitions", "plan", "n_eng")

    def __init__(self, rs: RuleSet):
        self.model = rs
        self.version = rs.version
        self.effective_from = rs.effective_from
        self.eff = rs.effective_from.timestamp()
        self.half_life_days = rs.engagement.half_life_days
        self.h_s = rs.engagement.half_life_days * 86400.0
        # engagement rules: (index, name, event type, points, cap or None)
        eng = []
        dispatch: dict[str, list] = {}
        for i, r in enumerate(rs.engagement.rules):
            name = r.name if r.name is not None else f"engagement[{i}]"
            pts = _num(r.points)
            eng.append((i, name, r.event, pts, r.max_per_day))
            conds = _compile_conditions(r)
            # (rule index, points, cap, conditions, -log2(points) for the top-K key, matcher)
            dispatch.setdefault(r.event, []).append((i, pts, r.max_per_day, conds,
                                                     -math.log2(pts) if pts > 0 else None, make_matcher(conds)))
        self.eng_rules = tuple(eng)
        self.dispatch = {k: tuple(v) for k, v in dispatch.items()}
        self.capped = tuple(r[4] is not None for r in eng)
        # fit rules: (name, attribute, kind, arg, points); kind: eq / in / contains / range
        fits = []
        for i, f in enumerate(rs.fit):
            name = f.name if f.name is not None else f"fit[{i}]"
            if f.equals is not None:
                kind, arg = "eq", lower_str(f.equals)
            elif f.in_ is not None:
                kind, arg = "in", frozenset(lower_str(x) for x in f.in_)
            elif f.contains_any is not None:
                kind, arg = "contains", _needles(f.contains_any)
            else:
                assert f.range is not None
                kind, arg = "range", (f.range.min, f.range.max)
            fits.append((name, f.attribute, kind, arg, _num(f.points)))
        self.fit_rules = tuple(fits)
        self.lead_attributes = tuple(rs.lead_attributes)
        self.min_fit = rs.mql.min_fit
        self.min_engagement = rs.mql.min_engagement
        self.required_attributes = tuple(rs.mql.required_attributes)
        self.require_qualification = rs.mql.require_qualification
        self.cooldown_s = rs.mql.cooldown_days * 86400.0
        # intent alerts: (index, name, first (event, conds), then (event, conds), within seconds)
        intents = []
        for i, a in enumerate(rs.intent_alerts):
            intents.append((i, a.name, a.first.event, _compile_conditions(a.first), a.then.event,
                            _compile_conditions(a.then), a.within_hours * 3600.0))
        self.intents = tuple(intents)
        self.intent_by_name = {a[1]: a for a in intents}
        first: dict[str, list] = {}
        then: dict[str, list] = {}
        for a in intents:
            first.setdefault(a[2], []).append((*a, make_matcher(a[3])))
            then.setdefault(a[4], []).append((*a, make_matcher(a[5])))
        self.intent_first = {k: tuple(v) for k, v in first.items()}
        self.intent_then = {k: tuple(v) for k, v in then.items()}
        if rs.stages is not None:
            self.transitions = {k: tuple(v) for k, v in rs.stages.transitions.items()}
        else:
            self.transitions = DEFAULT_TRANSITIONS
        self.n_eng = len(eng)
        # The fold's per-event plan: event type -> (mode, key, memo), see ``match``. An event type absent from the
        # plan touches no aggregate of this rule set.
        plan = {}
        for et in sorted(set(self.dispatch) | set(self.intent_first) | set(self.intent_then)):
            conds = [e[3] for e in self.dispatch.get(et, ())] + [a[3] for a in self.intent_first.get(et, ())] \
                + [a[5] for a in self.intent_then.get(et, ())]
            mode, key = _plan_key(conds)
            plan[et] = [mode, key, {}, et]
            if mode == 0:
                plan[et][2] = self._match(et, {}, {})
        self.plan = plan

    def _match(self, etype: str, event: dict, payload: dict) -> tuple:
        """``((self, entries, firsts, thens),)``: the rules of ``etype`` whose conditions hold on the event.
        entries: ``(rule index, points, cap or None, -log2(points) or None)`` of the engagement rules, firsts/thens:
        the intent rules whose `first`/`then` conditions hold; each None when empty."""
        entries = tuple((ri, pts, cap, nlp) for ri, pts, cap, conds, nlp, _m in self.dispatch.get(etype, ())
                        if conditions_hold(conds, event, payload))
        firsts = tuple(a for a in self.intent_first.get(etype, ()) if conditions_hold(a[3], event, payload))
        thens = tuple(a for a in self.intent_then.get(etype, ()) if conditions_hold(a[5], event, payload))
        return ((self, entries or None, firsts or None, thens or None),)

    def match(self, plan: list, event: dict, payload: dict) -> tuple:
        """The matched rules of ``event`` (see ``_match``), memoised by the value of the one payload field the
        conditions of its type read (plan mode 1; string or null values only, as other JSON values of equal hash
        may fold to different strings); mode 0 has no condition, mode 2 is evaluated every time."""
        mode = plan[0]
        if mode == 0:
            return plan[2]
        if mode == 1:
            v = payload.get(plan[1])
            if v is None or type(v) is str:
                memo = plan[2]
                m = memo.get(v)
                if m is None:
                    if len(memo) >= MATCH_CACHE_MAX:
                        memo.clear()
                    m = memo[v] = self._match(plan[3], event, payload)
                return m
        return self._match(plan[3], event, payload)

    def fit_matches(self, attrs: dict) -> list[tuple[str, str, Union[int, float]]]:
        """[(rule name, attribute, points)] of the fit rules that hold on ``attrs`` (name -> present value)."""
        out = []
        for name, attr, kind, arg, pts in self.fit_rules:
            v = attrs.get(attr)
            if v is None:
                continue
            if kind == "range":
                x = as_number(v)
                if x is None or (arg[0] is not None and x < arg[0]) or (arg[1] is not None and x > arg[1]):
                    continue
            else:
                s = v.lower() if isinstance(v, str) else lower_str(v)
                if kind == "eq":
                    if s != arg:
                        continue
                elif kind == "in":
                    if s not in arg:
                        continue
                else:
                    for n in arg:
                        if n in s:
                            break
                    else:
                        continue
            out.append((name, attr, pts))
        return out

    def __repr__(self) -> str:
        return f"CompiledRuleSet(version={self.version!r}, effective_from={self.effective_from.isoformat()})"


def compile_rule_set(rs: RuleSet) -> CompiledRuleSet:
    return CompiledRuleSet(rs)


# ----------------------------------------------------------------------------------------------------------------
# the book of rule sets


def _epoch(t: Union[datetime, float, int, str]) -> float:
    if isinstance(t, datetime):
        if t.tzinfo is None:
            raise ValueError("naive datetime: an offset is required")
        return t.timestamp()
    if isinstance(t, str):
        return _epoch(datetime.fromisoformat(t))
    return float(t)


class RuleBook:
    """Several rule sets, sorted by ``effective_from``; the one in force at t has the latest effective_from <= t.

    Versions and effective_from instants must be unique. Before the first effective_from no rule set is in force.
    """

    def __init__(self, rule_sets: Iterable[Union[RuleSet, CompiledRuleSet]] = ()):
        compiled = [r if isinstance(r, CompiledRuleSet) else CompiledRuleSet(r) for r in rule_sets]
        compiled.sort(key=lambda r: r.eff)
        errors = []
        versions = [r.version for r in compiled]
        for v in sorted({v for v in versions if versions.count(v) > 1}):
            errors.append(("version", f"duplicate rule-set version {v!r}"))
        effs = [r.eff for r in compiled]
        for i in range(1, len(effs)):
            if effs[i] == effs[i - 1]:
                errors.append(("effective_from", f"rule sets {compiled[i - 1].version!r} and {compiled[i].version!r}"
                                                 " have the same effective_from"))
        if errors:
            raise RuleSetError("<rule book>", errors)
        self.sets: tuple[CompiledRuleSet, ...] = tuple(compiled)
        self._effs = effs
        self.by_version = {r.version: r for r in compiled}
        self.single: Optional[CompiledRuleSet] = compiled[0] if len(compiled) == 1 else None

    @classmethod
    def from_paths(cls, paths: Iterable[Union[str, Path]]) -> "RuleBook":
        sets: list[RuleSet] = []
        for p in paths:
            sets.extend(load_rule_sets(p))
        return cls(sets)

    @classmethod
    def from_text(cls, text: str, source: str = "<string>") -> "RuleBook":
        return cls(parse_rule_sets(text, source))

    def in_force(self, t: Union[datetime, float, int, str, None]) -> Optional[CompiledRuleSet]:
        """The rule set with the latest effective_from <= t (t: aware datetime, ISO string or epoch seconds)."""
        if t is None:
            return None
        if len(self._effs) == 1 and isinstance(t, float):
            return self.sets[0] if t >= self._effs[0] else None
        i = bisect.bisect_right(self._effs, t if isinstance(t, float) else _epoch(t))
        return self.sets[i - 1] if i else None

    def __len__(self) -> int:
        return len(self.sets)

    def __iter__(self):
        return iter(self.sets)

    def __repr__(self) -> str:
        return f"RuleBook({[r.version for r in self.sets]})"


# ----------------------------------------------------------------------------------------------------------------
# JSON Schema

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "rules.schema.json"


def rules_schema_text() -> str:
    schema = RuleSet.model_json_schema(by_alias=True)
    schema["$id"] = "rules.schema.json"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"


def write_rules_schema(path: Union[str, Path, None] = None) -> str:
    """Write the JSON Schema of a rule set (deterministic, sorted keys); returns the path written."""
    p = Path(path) if path is not None else SCHEMA_PATH
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(rules_schema_text(), encoding="utf-8")
    return str(p)


# ----------------------------------------------------------------------------------------------------------------
# CLI: leadledger rules validate FILE...


def validate_main(argv: Sequence[str]) -> int:
    """Validate rule-set files: ``OK`` line per good file, the errors otherwise; exit 1 on any error.

    When several files are given they are also checked together as one RuleBook (unique versions and
    effective_from instants).
    """
    args = list(argv)
    if args and args[0] == "validate":
        args = args[1:]
    if not args or any(a in ("-h", "--help") for a in args):
        print("usage: leadledger rules validate FILE [FILE...]", file=sys.stderr if not args else sys.stdout)
        return 2 if not args else 0
    rc = 0
    all_sets: list[RuleSet] = []
    for path in args:
        try:
            sets = load_rule_sets(path)
        except RuleSetError as e:
            rc = 1
            for p, m in e.errors:
                print(f"{path}: {p}: {m}" if p else f"{path}: {m}")
            continue
        all_sets.extend(sets)
        desc = ", ".join(f"version {s.version} effective_from {s.effective_from.isoformat()}" for s in sets)
        print(f"OK {path} ({desc})")
    if len(args) > 1 and rc == 0:
        try:
            RuleBook(all_sets)
        except RuleSetError as e:
            rc = 1
            for p, m in e.errors:
                print(f"rule book: {p}: {m}")
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(validate_main(sys.argv[1:]))

"""The lead-keyed log fold survives its own serialisation (what the processor's changelog and a crash restore do).

The processor keeps ``LeadLogState`` in a table: after a crash or a rebalance it continues from
``from_bytes(to_bytes())`` of the state at the last committed batch. Any cache or shared structure in the fold that
is not part of the bytes would make a restored worker score differently from the one that crashed; this property
test compares a run that round-trips the state before random records with one that never does, joins included.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from hypothesis import given, settings, strategies as st

from projections import fold as core
from projections.lead_log import LeadLogState, apply, resolution_record
from projections.rules import RuleBook
from services.processor import default_rules_paths

BOOK = RuleBook.from_paths(default_rules_paths())
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
URLS = ["https://x.example/pricing", "https://x.example/docs/api", "https://x.example/blog/a",
        "https://x.example/case-studies/b", "https://x.example/"]
LEAD = "ann@x.example"


@st.composite
def lead_logs(draw: Any) -> list[dict]:
    """A lead-keyed log: the lead's touchpoints (some carrying cookies), stage 1's answers, and redeliveries."""
    n = 0

    def ev(etype: str, minutes: int, anon: str | None, email: str | None, **payload: Any) -> dict:
        nonlocal n
        n += 1
        return {"event_id": f"e{n}", "type": etype,
                "occurred_at": (T0 + timedelta(minutes=minutes)).isoformat(timespec="microseconds"),
                "received_at": (T0 + timedelta(days=1, seconds=n)).isoformat(timespec="microseconds"),
                "lead_id": None, "anonymous_id": anon, "email": email, "source": "web", "campaign": None,
                "payload": payload, "schema_version": 2}

    cookies = ["c1", "c2"]
    anon_states: dict[str, bytes] = {}
    for c in cookies:
        state = None
        for _ in range(draw(st.integers(0, 12))):
            e = ev("page_viewed", draw(st.integers(0, 60 * 24 * 20)), c, None, url=draw(st.sampled_from(URLS)))
            state, _ = core.fold(state, e, BOOK)
        if state is not None:
            anon_states[c] = state.to_bytes()

    records: list[dict] = []
    for _ in range(draw(st.integers(1, 30))):
        minutes = draw(st.integers(0, 60 * 24 * 30))
        anon = draw(st.sampled_from([None, None, "c1", "c2"]))
        kind = draw(st.sampled_from(["page_viewed", "page_viewed", "form_submitted", "content_downloaded",
                                     "email_clicked"]))
        if kind == "page_viewed":
            e = ev(kind, minutes, anon, LEAD, url=draw(st.sampled_from(URLS)))
        elif kind == "form_submitted":
            e = ev(kind, minutes, anon, LEAD, form_id="contact",
                   fields={"name": "Ann", "company": "Acme", "title": draw(st.sampled_from(["IT Director", "Intern"])),
                           "company_size": draw(st.sampled_from(["250", "5"])), "department": "it"})
        elif kind == "content_downloaded":
            e = ev(kind, minutes, anon, LEAD, asset_id="wp-1", asset_type="whitepaper")
        else:
            e = ev(kind, minutes, anon, LEAD, url="https://x.example/pricing", campaign_id="nl-1")
        records.append(e)

    # stage 1 answers every cookie-carrying record, some records later; the first answer per cookie is the join
    answered: set[str] = set()
    out: list[dict] = []
    waiting: list[dict] = []
    for r in records:
        out.append(r)
        if r["anonymous_id"]:
            waiting.append(r)
        while waiting and draw(st.booleans()):
            q = waiting.pop(0)
            aid = q["anonymous_id"]
            state = anon_states.get(aid) if aid not in answered else None
            answered.add(aid)
            out.append(_decode(resolution_record(LEAD, aid, q["event_id"], state)))
        if draw(st.integers(0, 9)) == 0:
            out.append(dict(draw(st.sampled_from(out))))  # a redelivery
    for q in waiting:
        aid = q["anonymous_id"]
        state = anon_states.get(aid) if aid not in answered else None
        answered.add(aid)
        out.append(_decode(resolution_record(LEAD, aid, q["event_id"], state)))
    return out


def _decode(raw: bytes) -> dict:
    import orjson

    return orjson.loads(raw)


@settings(max_examples=150, deadline=None)
@given(lead_logs(), st.lists(st.booleans(), min_size=80, max_size=80))
def test_round_trip_mid_log_changes_nothing(log: list[dict], cuts: list[bool]) -> None:
    live: LeadLogState | None = None
    live_out: list[dict] = []
    for rec in log:
        live, d = apply(live, LEAD, rec, BOOK)
        live_out.extend(d)

    restored: LeadLogState | None = None
    restored_out: list[dict] = []
    for i, rec in enumerate(log):
        if restored is not None and cuts[i % len(cuts)]:
            restored = LeadLogState.from_bytes(restored.to_bytes())
        restored, d = apply(restored, LEAD, rec, BOOK)
        restored_out.extend(d)

    assert restored_out == live_out
    assert restored is not None and live is not None
    assert restored.to_bytes() == live.to_bytes()
    assert restored.lead.summary() == live.lead.summary()


def test_a_join_merges_the_anonymous_history_once() -> None:
    view = {"event_id": "a1", "type": "page_viewed", "occurred_at": T0.isoformat(), "received_at": T0.isoformat(),
            "lead_id": None, "anonymous_id": "c1", "email": None, "source": "web", "campaign": None,
            "payload": {"url": "https://x.example/pricing"}, "schema_version": 2}
    anon, _ = core.fold(None, view, BOOK)
    form = dict(view, event_id="f1", type="form_submitted", email=LEAD,
                received_at=(T0 + timedelta(minutes=1)).isoformat(),
                payload={"form_id": "contact", "fields": {"name": "Ann"}})
    st_, _ = apply(None, LEAD, form, BOOK)
    assert st_.pending is not None and st_.lead.eng == 0.0  # held until stage 1 answers
    answer = _decode(resolution_record(LEAD, "c1", "f1", anon.to_bytes()))
    st_, _ = apply(LeadLogState.from_bytes(st_.to_bytes()), LEAD, answer, BOOK)
    assert st_.pending is None and st_.resolved == ["c1"]
    merged_eng = st_.lead.eng
    assert merged_eng > 0.0  # the pricing view scored before the join counts for the lead
    st_, _ = apply(st_, LEAD, answer, BOOK)  # a redelivered answer changes nothing
    assert st_.lead.eng == merged_eng


def test_a_record_that_is_no_touchpoint_is_refused_and_changes_nothing() -> None:
    good = {"event_id": "g1", "type": "page_viewed", "occurred_at": T0.isoformat(timespec="microseconds"),
            "received_at": T0.isoformat(timespec="microseconds"), "lead_id": None, "anonymous_id": None,
            "email": LEAD, "source": "web", "campaign": None, "payload": {"url": URLS[0]}, "schema_version": 2}
    st0, _ = apply(None, LEAD, good, BOOK)
    before = st0.to_bytes()
    for bad, field in (({**good, "event_id": "b1", "occurred_at": "soon"}, "occurred_at"),
                       ({**good, "event_id": "b2", "received_at": "2026-03-02T09:00:00"}, "received_at"),
                       ({**good, "event_id": "b3", "payload": ["x"]}, "payload"),
                       ({k: v for k, v in good.items() if k != "event_id"}, "event_id")):
        st1, out = apply(st0, LEAD, bad, BOOK)
        assert st1.to_bytes() == before
        assert [(d["type"], d["field"], d["lead"]) for d in out] == [("event_rejected", field, LEAD)]
        assert out[0]["reason"].startswith(f"invalid touchpoint: {field}: ") and out[0]["event"] == bad
        digest = hashlib.sha256(orjson.dumps(bad)).hexdigest()[:32]
        assert out[0]["event_id"] == (f"rejected:{bad['event_id']}" if "event_id" in bad else f"rejected:raw:{digest}")
        assert apply(st0, LEAD, bad, BOOK)[1] == out  # the same id again: consumers dedupe a redelivery

"""Pure parts of the alerts service: the SLA rule in event time, payload enrichment, signatures, back-off, and the
reference receiver printed in docs/alerts.md (executed from the document itself)."""

from __future__ import annotations

import random
import re
import threading
import time
from http.server import HTTPServer
from pathlib import Path

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services import alerts_core as core
from services.webhooks import backoff, sign, verify
from tests.alerts_support import T0, handoff_event, minutes, ts

ROOT = Path(__file__).resolve().parent.parent
LEAD = "aiko@example.jp"


def _epoch(dt) -> float:
    return dt.timestamp()


def _tracker(grace: float = 0.0) -> core.SlaTracker:
    return core.SlaTracker(minutes=15, grace_s=grace)


def _open(tr: core.SlaTracker, info=None, at=T0):
    return tr.open_episode(f"{LEAD}:handoff:1", LEAD, 1, _epoch(at), info)


def test_touch_within_sla_is_met_once() -> None:
    tr = _tracker()
    e, decided = _open(tr)
    assert decided == [] and e.due_at == _epoch(T0 + minutes(15))
    assert tr.on_touchpoint(LEAD, "page_viewed", _epoch(T0 + minutes(5)), "v") == []
    [d] = tr.on_touchpoint(LEAD, "call_logged", _epoch(T0 + minutes(15)), "call-1")  # at the due time: in time
    assert (d.status, d.decided_by, d.touch_event_id) == ("met", "touch", "call-1")
    assert tr.on_touchpoint(LEAD, "stage_changed", _epoch(T0 + minutes(16)), "s") == []
    assert tr.expire() == [] and tr.open == {}


def test_late_touch_breaches_at_due_time() -> None:
    tr = _tracker()
    _open(tr)
    [d] = tr.on_touchpoint(LEAD, "stage_changed", _epoch(T0 + minutes(22)), "late")
    assert (d.status, d.decided_by, d.touch_at) == ("breached", "late_touch", _epoch(T0 + minutes(22)))
    p = core.sla_alert("sla_breached", {"score": {"after": 60}}, d, None, "http://q")
    assert p["alert_id"] == f"{LEAD}:sla:1" and p["at"] == ts(T0 + minutes(15))
    assert p["sla"]["overdue_s"] == 420.0 and p["sla"]["time_to_first_touch_s"] == 1320.0


def test_other_activity_of_the_lead_past_due_breaches() -> None:
    tr = _tracker(grace=3600)
    _open(tr)
    assert tr.on_touchpoint(LEAD, "page_viewed", _epoch(T0 + minutes(15)), "p1") == []
    [d] = tr.on_touchpoint(LEAD, "page_viewed", _epoch(T0 + minutes(15, ) + minutes(0.01)), "p2")
    assert (d.status, d.decided_by) == ("breached", "lead_activity")


def test_global_clock_breaches_after_grace_exactly_once() -> None:
    tr = _tracker(grace=60)
    _open(tr)
    tr.on_touchpoint("other@x.jp", "page_viewed", _epoch(T0 + minutes(16)), "o1")  # clock = 15:00 - not past due
    assert tr.expire() == []
    tr.on_touchpoint("other@x.jp", "page_viewed", _epoch(T0 + minutes(16.5)), "o2")
    [d] = tr.expire()
    assert (d.status, d.decided_by) == ("breached", "clock")
    assert tr.expire() == [] and tr.on_touchpoint(LEAD, "call_logged", _epoch(T0 + minutes(17)), "c") == []


def test_touch_seen_before_the_handoff_event_counts() -> None:
    cache = core.LeadCache()
    # the processor lags: the rep's call (after the hand-off in event time) is consumed before the hand-off event
    cache.on_touchpoint(LEAD, {"event_id": "old-call", "type": "call_logged", "occurred_at": ts(T0 - minutes(60))})
    cache.on_touchpoint(LEAD, {"event_id": "call", "type": "call_logged", "occurred_at": ts(T0 + minutes(3))})
    tr = _tracker()
    e, [d] = _open(tr, cache.get(LEAD))
    assert (d.status, d.touch_event_id, d.touch_at) == ("met", "call", _epoch(T0 + minutes(3)))


def test_lead_clock_already_past_due_breaches_on_open() -> None:
    cache = core.LeadCache()
    cache.on_touchpoint(LEAD, {"event_id": "v", "type": "page_viewed", "occurred_at": ts(T0 + minutes(40))})
    _e, [d] = _open(_tracker(), cache.get(LEAD))
    assert (d.status, d.decided_by) == ("breached", "lead_activity")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a@x", "b@x", LEAD]),
                          st.sampled_from(["page_viewed", "call_logged", "stage_changed", "form_submitted"]),
                          st.floats(min_value=-30, max_value=60)), max_size=30),
       st.floats(min_value=0, max_value=120))
def test_each_episode_decided_at_most_once(touches, grace) -> None:
    tr = _tracker(grace=grace)
    _open(tr)
    decisions = []
    for i, (lead, typ, m) in enumerate(touches):
        decisions += tr.on_touchpoint(lead, typ, _epoch(T0 + minutes(m)), f"e{i}")
        decisions += tr.expire()
    assert len(decisions) <= 1
    if decisions:
        d = decisions[0]
        if d.status == "met":
            assert d.touch_at is not None and _epoch(T0) <= d.touch_at <= d.due_at
    sales = [(m, i) for i, (lead, typ, m) in enumerate(touches) if lead == LEAD and typ in core.SALES_TOUCH_TYPES
             and m >= 0]
    if sales and not decisions:
        raise AssertionError("a sales touch after the hand-off must decide the episode")


def test_handoff_payload_is_enriched_from_the_streams() -> None:
    cache = core.LeadCache()
    h = handoff_event(LEAD, T0, score=62.5, cause="tp-9")
    cache.on_stage({"event_id": f"{LEAD}:stage:1", "lead": LEAD, "from": "anonymous", "to": "known",
                    "cause_event_id": "tp-1"})
    cache.on_stage({"event_id": f"{LEAD}:stage:2", "lead": LEAD, "from": "known", "to": "lead",
                    "cause_event_id": "tp-2"})
    cache.on_scored({"event_id": f"{LEAD}:scored:8", "lead": LEAD, "cause_event_id": "tp-8", "fit": 25,
                     "engagement": 30.0, "fit_before": 25, "engagement_before": 20.0, "rules_version": "v"})
    # the scored / stage events of the decisive touchpoint are still in flight: the latest known ones are "before"
    p = core.handoff_alert(h, cache.get(LEAD), 15, "http://q:8081/")
    assert p["stage"] == {"from": "lead", "to": "mql"}
    assert p["score"]["before"] == 55.0 and p["score"]["after"] == 62.5
    # ... and once they arrived, they are used (redelivered duplicates change nothing)
    for _ in range(2):
        cache.on_scored({"event_id": f"{LEAD}:scored:9", "lead": LEAD, "cause_event_id": "tp-9", "fit": 25,
                         "engagement": 37.5, "fit_before": 25, "engagement_before": 29.0, "rules_version": "v"})
        cache.on_stage({"event_id": f"{LEAD}:stage:3", "lead": LEAD, "from": "lead", "to": "mql",
                        "cause_event_id": "tp-9"})
    cache.on_stage({"event_id": f"{LEAD}:stage:4", "lead": LEAD, "from": "mql", "to": "sal",
                    "cause_event_id": "tp-10", "by": "sales:kato"})
    p = core.handoff_alert(h, cache.get(LEAD), 15, "http://q:8081/")
    assert p["stage"] == {"from": "lead", "to": "mql"} and p["score"]["before"] == 54.0
    assert p["owner"] == "sales:kato"
    assert p["attributes"]["company"] == "ACME KK" and p["attributes"]["name"] == f"Name of {LEAD}"
    assert [r["rule"] for r in p["reasons"]][:2] == ["pricing page", "decision-maker title"]
    assert p["rules_version"] == "v-test" and p["sla"]["due_at"] == ts(T0 + minutes(15))
    assert p["links"]["history"] == "http://q:8081/v1/leads/aiko%40example.jp/history"
    assert orjson.loads(orjson.dumps(p)) == p


def test_intent_payload_uses_cache_then_projection_row() -> None:
    a = {"event_id": f"{LEAD}:intent:r:d1", "type": "intent_alert", "lead": LEAD, "at": ts(T0),
         "cause_event_id": "p3", "rules_version": "v", "rule": "r", "first_event_id": "d1", "then_event_id": "p3"}
    row = {"stage": "lead", "fit": 10.0, "engagement": 5.0, "attributes": {"name": "Aiko", "company": "Tanaka"},
           "email": LEAD, "owner": None}
    p = core.intent_alert(a, None, "http://q", row)
    assert p["score"]["after"] == 15.0 and p["stage"] == {"from": "lead", "to": "lead"}
    assert p["attributes"] == {"name": "Aiko", "company": "Tanaka", "email": LEAD}
    assert p["intent"] == {"rule": "r", "first_event_id": "d1", "then_event_id": "p3"}
    cache = core.LeadCache()
    cache.on_touchpoint(LEAD, {"event_id": "f", "type": "form_submitted", "occurred_at": ts(T0), "email": LEAD,
                               "payload": {"fields": {"name": "Aiko T", "company": "Tanaka Seiki", "title": ""}}})
    p = core.intent_alert(a, cache.get(LEAD), "http://q", row)
    assert p["attributes"]["company"] == "Tanaka Seiki"


def test_lead_cache_is_bounded() -> None:
    cache = core.LeadCache(max_leads=3)
    for i in range(10):
        cache.on_touchpoint(f"l{i}", {"event_id": str(i), "type": "page_viewed", "occurred_at": ts(T0)})
    assert len(cache) == 3 and cache.get("l9") is not None and cache.get("l0") is None


def test_delivery_id_is_stable_and_distinct() -> None:
    assert core.delivery_id("sub_1", "x:handoff:1") == core.delivery_id("sub_1", "x:handoff:1")
    assert len({core.delivery_id(s, a) for s in ("sub_1", "sub_2") for a in ("a", "b")}) == 4


def test_sign_and_verify() -> None:
    body = b'{"kind":"handoff"}'
    h = sign("s3cret-s3cret-s3cret", body, t=1_700_000_000)
    assert re.fullmatch(r"t=1700000000,v1=[0-9a-f]{64}", h)
    assert verify("s3cret-s3cret-s3cret", body, h, now=1_700_000_100)
    assert not verify("s3cret-s3cret-s3cret", body + b" ", h, now=1_700_000_100)
    assert not verify("other-secret-other", body, h, now=1_700_000_100)
    assert not verify("s3cret-s3cret-s3cret", body, h, now=1_700_000_000 + 301)  # replayed too late
    assert not verify("s3cret-s3cret-s3cret", body, "garbage")


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        step = min(30.0, 0.5 * 2 ** (attempt - 1))
        ds = [backoff(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in ds)
        assert max(ds) - min(ds) > step / 4  # really jittered


# ---------------------------------------------------------------------------------------------- reference receiver

def reference_receiver_source() -> str:
    text = (ROOT / "docs" / "alerts.md").read_text()
    m = re.search(r"```python\n(# reference receiver.*?)```", text, re.S)
    assert m, "docs/alerts.md has no reference receiver block"
    return m.group(1)


@pytest.fixture
def reference_receiver():
    ns: dict = {"__name__": "reference_receiver"}
    exec(compile(reference_receiver_source(), "docs/alerts.md", "exec"), ns)  # noqa: S102 - our own document
    ns["SECRET"] = b"whsec_reference-test-secret"
    handled: list = []
    ns["handle"] = handled.append
    server = HTTPServer(("127.0.0.1", 0), ns["Receiver"])
    th = threading.Thread(target=server.serve_forever, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handled
    finally:
        server.shutdown()
        server.server_close()


def test_reference_receiver_verifies_and_rejects_tampering(reference_receiver) -> None:
    url, handled = reference_receiver
    secret = "whsec_reference-test-secret"
    body = orjson.dumps({"alert_id": "a:handoff:1", "kind": "handoff", "lead": "a"})
    sig = sign(secret, body)
    headers = {"X-Leadledger-Signature": sig, "X-Leadledger-Delivery": "d1", "Content-Type": "application/json"}
    with httpx.Client() as c:
        assert c.post(url, content=body, headers=headers).status_code == 204
        assert c.post(url, content=body, headers=headers).status_code == 204  # a retry: acknowledged, deduped
        assert len(handled) == 1 and handled[0]["alert_id"] == "a:handoff:1"
        tampered = body.replace(b'"handoff"', b'"intent"')
        assert c.post(url, content=tampered, headers={**headers, "X-Leadledger-Delivery": "d2"}).status_code == 401
        old = sign(secret, body, t=int(time.time()) - 3600)
        assert c.post(url, content=body, headers={**headers, "X-Leadledger-Signature": old,
                                                  "X-Leadledger-Delivery": "d3"}).status_code == 401
        assert c.post(url, content=body, headers={"X-Leadledger-Delivery": "d4"}).status_code == 401
        assert len(handled) == 1

"""The event contract: envelope validation, wire round-trip, upcasting on read."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import given, settings, strategies as st
from pydantic import ValidationError

from events import derived
from events.envelope import CURRENT_SCHEMA_VERSION, TOUCHPOINT_TYPES, Envelope, field_errors
from events.upcast import upcast
from events.wire import FIELDS, decode, encode, subject_key, to_wire_dict


def base(**kw) -> dict:
    d = {"event_id": "e1", "type": "page_viewed", "occurred_at": "2026-03-01T10:00:00.123+01:00",
         "anonymous_id": "anon-1", "payload": {"url": "https://example.com/pricing"}}
    d.update(kw)
    return d


def errors_of(d: dict) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as exc:
        Envelope.model_validate(d)
    return field_errors(exc.value)


def test_valid_envelope_normalised() -> None:
    env = Envelope.model_validate(base(email="  Jane.Doe@Example.COM "))
    assert env.email == "jane.doe@example.com"
    assert env.occurred_at == datetime(2026, 3, 1, 9, 0, 0, 123000, tzinfo=timezone.utc)
    assert env.occurred_at.tzinfo is timezone.utc
    assert env.schema_version == CURRENT_SCHEMA_VERSION == 2
    assert env.source == "web"  # default by channel


@pytest.mark.parametrize("type_,payload,field", [
    ("page_viewed", {}, "payload.url"),
    ("content_downloaded", {"title": "x"}, "payload.asset_id"),
    ("stage_changed", {"reason": "x"}, "payload.to"),
])
def test_required_payload_fields(type_: str, payload: dict, field: str) -> None:
    assert (field, "Field required") in errors_of(base(type=type_, payload=payload))


@pytest.mark.parametrize("type_", TOUCHPOINT_TYPES)
def test_every_type_accepts_a_minimal_payload(type_: str) -> None:
    minimal = {"page_viewed": {"url": "/"}, "content_downloaded": {"asset_id": "a"}, "stage_changed": {"to": "sal"}}
    env = Envelope.model_validate(base(type=type_, payload=minimal.get(type_, {})))
    assert env.type == type_


def test_call_logged_qualification_object() -> None:
    q = {"problem": "slow reports", "role": "decision maker", "schedule": "Q3", "timing": "now"}
    env = Envelope.model_validate(base(type="call_logged", payload={"note": "n", "qualification": q}))
    assert env.payload["qualification"] == q
    errs = errors_of(base(type="call_logged", payload={"qualification": "yes"}))
    assert errs[0][0] == "payload.qualification"


@pytest.mark.parametrize("email", ["nope", "a@b", "a b@c.com", "@c.com", "x" * 250 + "@c.com"])
def test_bad_email_rejected(email: str) -> None:
    assert [f for f, _ in errors_of(base(email=email))] == ["email"]


def test_naive_timestamp_rejected() -> None:
    assert [f for f, _ in errors_of(base(occurred_at="2026-03-01T10:00:00"))] == ["occurred_at"]


def test_subject_required() -> None:
    errs = errors_of(base(anonymous_id=None))
    assert errs == [("lead_id", "one of lead_id, anonymous_id or email is required")]


def test_bounds_and_unknown_fields() -> None:
    assert errors_of(base(event_id=""))[0][0] == "event_id"
    assert errors_of(base(event_id="x" * 129))[0][0] == "event_id"
    assert errors_of(base(payload={"url": "u" * 2049}))[0][0] == "payload.url"
    assert errors_of(base(colour="red"))[0][0] == "colour"
    assert errors_of(base(type="page_liked"))[0][0] == "type"


def test_extra_payload_fields_kept() -> None:
    env = Envelope.model_validate(base(payload={"url": "/x", "scroll_depth": 80, "nested": {"a": [1]}}))
    assert env.payload == {"url": "/x", "scroll_depth": 80, "nested": {"a": [1]}}
    assert decode(encode(env))["payload"]["scroll_depth"] == 80


def test_wire_format_exact() -> None:
    env = Envelope.model_validate(base(received_at="2026-03-01T09:00:01Z", campaign="spring"))
    raw = encode(env)
    d = orjson.loads(raw)
    assert tuple(d) == FIELDS
    assert d["occurred_at"] == "2026-03-01T09:00:00.123000+00:00"
    assert d["received_at"] == "2026-03-01T09:00:01.000000+00:00"
    assert d["lead_id"] is None and d["email"] is None
    assert decode(raw) == d
    assert Envelope.model_validate(decode(raw)) == env


def test_subject_key_precedence() -> None:
    env = Envelope.model_validate(base(lead_id="L1", email="A@b.co"))
    assert subject_key(env) == "L1"
    env = Envelope.model_validate(base(email="A@b.co"))
    assert subject_key(env) == "a@b.co" == subject_key(decode(encode(env)))
    assert subject_key(Envelope.model_validate(base())) == "anon-1"


def test_upcast_v1_through_decode() -> None:
    v1 = {"event_id": "old-1", "type": "page_viewed", "timestamp": "2025-11-02T08:30:00+02:00",
          "email": "a@b.co", "source": "web", "payload": {"url": "/p", "utm_campaign": "autumn"},
          "schema_version": 1}
    d = decode(orjson.dumps(v1))
    assert d["schema_version"] == 2
    assert d["occurred_at"] == "2025-11-02T06:30:00.000000+00:00"
    assert "timestamp" not in d
    assert d["campaign"] == "autumn"
    assert d["payload"] == {"url": "/p"}
    assert tuple(d) == FIELDS
    assert Envelope.model_validate(d).campaign == "autumn"
    assert v1["payload"]["utm_campaign"] == "autumn"  # input not mutated


def test_upcast_current_is_identity_and_future_refused() -> None:
    d = orjson.loads(encode(Envelope.model_validate(base())))
    assert upcast(d) is d
    with pytest.raises(ValueError):
        upcast({**d, "schema_version": 99})


def test_derived_names() -> None:
    assert derived.DERIVED_TYPES == ("lead_scored", "lead_stage_changed", "lead_handed_off", "intent_alert",
                                     "event_rejected")


@settings(max_examples=200, deadline=None)
@given(
    event_id=st.text(min_size=1, max_size=128),
    offset_min=st.integers(min_value=-14 * 60, max_value=14 * 60),
    ts=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
    extra=st.dictionaries(st.text(max_size=10).filter(lambda k: k != "url"), st.integers(-2**63, 2**63 - 1) | st.text(max_size=20),
                          max_size=3),
)
def test_round_trip_property(event_id: str, offset_min: int, ts: datetime, extra: dict) -> None:
    occurred = ts.replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    env = Envelope.model_validate(base(event_id=event_id, occurred_at=occurred, payload={"url": "/", **extra}))
    d = decode(encode(env))
    assert Envelope.model_validate(d) == env
    assert encode(Envelope.model_validate(d)) == encode(env)


@pytest.mark.parametrize("micro", [0, 1, 123000, 999999])
def test_encode_timestamp_format_any_fraction(micro: int) -> None:
    at = datetime(2026, 3, 1, 9, 0, 0, micro, tzinfo=timezone.utc)
    env = Envelope.model_validate(base(occurred_at=at, received_at=at.astimezone(timezone(timedelta(hours=2)))))
    d = orjson.loads(encode(env))
    assert d["occurred_at"] == d["received_at"] == f"2026-03-01T09:00:00.{micro:06d}+00:00"
    assert d == to_wire_dict(env)


class _Dict(dict):
    """A dict subclass: never what orjson decodes, so the one-pass acceptance leaves it to the field walk."""


_ANY_VALUE = st.one_of(st.none(), st.just(""), st.just(" "), st.just("x"), st.text(max_size=3), st.integers(0, 2),
                       st.just("x" * 129), st.just({}), st.just([]), st.just(_Dict()))
_TIMES = st.one_of(st.just("2026-03-01T09:00:00.000001+00:00"), st.just("2026-03-01T09:00:00+09:00"),
                   st.just("2026-03-01T09:00:00"), st.just("yesterday"), st.just("2026-02-30T00:00:00+00:00"),
                   _ANY_VALUE)
ENVELOPES = st.tuples(st.fixed_dictionaries({}, optional={
    "event_id": st.one_of(st.just("e-1"), _ANY_VALUE), "type": st.one_of(st.just("page_viewed"), _ANY_VALUE),
    "occurred_at": _TIMES, "received_at": _TIMES, "payload": st.one_of(st.just({"url": "/"}), _ANY_VALUE),
    "lead_id": _ANY_VALUE, "email": st.one_of(st.just("a@x.example"), _ANY_VALUE),
    "anonymous_id": _ANY_VALUE}), st.booleans()).map(lambda x: _Dict(x[0]) if x[1] else x[0])


@settings(max_examples=3000, deadline=None)
@given(ENVELOPES)
def test_check_envelope_accepts_in_one_pass_exactly_what_the_field_walk_accepts(ev: dict) -> None:
    from events.wire import _envelope_problem, check_envelope

    assert check_envelope(ev) == _envelope_problem(ev)


def test_check_envelope_words_each_reason() -> None:
    from events.wire import check_envelope

    ok = {"event_id": "e-1", "type": "page_viewed", "occurred_at": "2026-03-01T09:00:00.000001+00:00",
          "received_at": "2026-03-01T09:00:01.000001+00:00", "lead_id": None, "anonymous_id": "c1", "email": None,
          "payload": {"url": "/"}}
    assert check_envelope(ok) is None and check_envelope(_Dict(ok)) is None
    assert check_envelope([ok]) == "a touchpoint must be a JSON object"
    cases = {"event_id": ("x" * 129, "event_id: a string of 1-128 characters is required"),
             "type": ("", "type: required"),
             "occurred_at": ("2026-03-01T09:00:00", "occurred_at: an offset is required: '2026-03-01T09:00:00'"),
             "received_at": ("soon", "received_at: not an RFC 3339 timestamp: 'soon'"),
             "payload": ([], "payload: must be an object"),
             "anonymous_id": (7, "anonymous_id: must be a string or null")}
    for field, (value, reason) in cases.items():
        assert check_envelope({**ok, field: value}) == reason, field
    assert check_envelope({**ok, "anonymous_id": None, "email": " "}) == \
        "one of lead_id, email, anonymous_id is required"

"""Crypto-shredding building blocks: sealing, the fold's indifference to sealed PII, the key store, forget."""

from __future__ import annotations

import copy

import pytest

from bench.gen_history import generate
from projections import pii
from projections.fold import Ledger, normalise_email
from projections.rules import RuleBook
from services.keystore import Keystore, PiiSealer, reveal_records
from services.processor import default_rules_paths


def test_seal_and_reveal_roundtrip() -> None:
    key = pii.new_key()
    kid = "0" * 31 + "1"
    for v in ("Aiko Tanaka", "+81-3-0000-0000", 12345, {"a": [1, 2]}):
        tok = pii.seal(v, kid, key)
        assert isinstance(tok, str) and tok.startswith("pii:v1:" + kid) and str(v) not in tok
        assert pii.unseal(tok, key) == v
        assert pii.reveal({"x": [tok]}, {kid: key}) == {"x": [v]}
        assert pii.reveal(tok, {kid: None}) == pii.ERASED
        assert pii.reveal(tok, {}) == pii.SEALED
    assert pii.seal("", kid, key) == "" and pii.seal(None, kid, key) is None  # absence stays absence
    assert pii.seal("x", kid, key) != pii.seal("x", kid, key)  # fresh nonce each time
    other = pii.new_key()
    assert pii.reveal(pii.seal("x", kid, key), {kid: other}) == pii.SEALED  # wrong key: never an error, no content


def test_seal_payload_scope() -> None:
    key, kid = pii.new_key(), "a" * 32
    form = {"form_id": "f", "fields": {"name": "N", "email": "e@x.io", "phone": "1", "title": "CTO",
                                       "company_size": 500, "department": ""}}
    s = pii.seal_payload("form_submitted", form, kid, key)
    assert s["fields"]["title"] == "CTO" and s["fields"]["company_size"] == 500 and s["fields"]["department"] == ""
    assert all(pii.token_key_id(s["fields"][k]) == kid for k in ("name", "email", "phone"))
    assert form["fields"]["name"] == "N"  # the input is not changed
    assert pii.seal_payload("form_submitted", s, kid, pii.new_key()) == s  # sealing twice is a no-op
    call = pii.seal_payload("call_logged", {"note": "secret", "qualification": {"role": "cto"}}, kid, key)
    assert pii.token_key_id(call["note"]) == kid and call["qualification"] == {"role": "cto"}
    assert pii.seal_payload("page_viewed", {"url": "/x"}, kid, key) == {"url": "/x"}
    assert pii.key_ids({"a": [s, call]}) == {kid}
    assert not pii.has_pii("form_submitted", {"fields": {"name": "", "title": "x"}})


def test_fold_is_the_same_on_sealed_events(tmp_path) -> None:
    """Scores, stages and hand-offs do not depend on the sealed values (presence is kept)."""
    book = RuleBook.from_paths(default_rules_paths())
    events = generate(4000, 150, seed=3)
    for e in events:
        e["email"] = normalise_email(e["email"])
    sealer = PiiSealer(Keystore(f"sqlite:///{tmp_path / 'k.db'}"))
    sealed = copy.deepcopy(events)
    sealer.seal_sync(sealed)
    assert sum(1 for a, b in zip(events, sealed) if a != b) > 100
    clear, shut = Ledger(book), Ledger(book)
    for a, b in zip(events, sealed):
        clear.apply(a)
        shut.apply(b)
    strip = lambda s: {k: v for k, v in s.summary().items() if k != "email"}  # noqa: E731
    assert [strip(s) for s in clear.states()] == [strip(s) for s in shut.states()]
    sealer.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def ks_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'keys.db'}"
        return
    from tests.projections_support import fresh_pg_schema

    yield from fresh_pg_schema(request.getfixturevalue("pg_dsn"))


def test_keystore_keys_and_destroy(ks_url) -> None:
    ks = Keystore(ks_url)
    try:
        k1, key1 = ks.key_for("a@x.io")
        assert ks.key_for("a@x.io") == (k1, key1) and len(key1) == 32
        k2, _ = ks.key_for("anon-1")
        tok1 = pii.seal("Alice", k1, key1)
        assert reveal_records([{"n": tok1}], ks) == [{"n": "Alice"}]
        assert ks.destroy(subjects=["a@x.io"]) == 1
        assert ks.destroy(subjects=["a@x.io"]) == 0
        assert ks.keys([k1, k2, "f" * 32]) == {k1: None, k2: ks.keys([k2])[k2]}
        assert reveal_records([{"n": tok1}], ks) == [{"n": pii.ERASED}]
        k3, key3 = ks.key_for("a@x.io")  # the same person writing again: a fresh key
        assert k3 != k1 and key3 != key1
        assert ks.destroy(key_ids=[k2, k3]) == 2
    finally:
        ks.close()


def test_sealer_wire_dicts_and_subjects(tmp_path) -> None:
    sealer = PiiSealer(Keystore(f"sqlite:///{tmp_path / 'k.db'}"))
    evs = [{"type": "form_submitted", "email": " A@X.io ", "anonymous_id": "c1", "lead_id": None,
            "payload": {"fields": {"name": "A"}}},
           {"type": "attribute_updated", "email": None, "anonymous_id": "c2", "lead_id": None,
            "payload": {"attributes": {"phone": "1"}}}]
    sealer.seal_sync(evs)
    ks = sealer.keystore
    k_lead, _ = ks.key_for("a@x.io")
    k_anon, _ = ks.key_for("c2")
    assert pii.key_ids(evs[0]) == {k_lead} and pii.key_ids(evs[1]) == {k_anon}
    sealer.close()

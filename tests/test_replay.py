"""Replay from the archive without a broker: a generated history is turned into a lead-keyed log the way the
processor's identity stage does (join resolutions included), archived in batches through the projector's writer,
then replayed lead by lead and compared with the fold of the log itself, as of several instants."""

from __future__ import annotations

from datetime import datetime

import orjson
import pytest

from bench.gen_history import generate
from projections import lead_log, sql_schema
from projections.fold import LeadState, fold, normalise_email, subject_of
from projections.replay import as_of_prefix, explanation_totals, replay
from projections.rules import RuleBook
from projections.sql_writer import apply_batch
from services import audit
from services.processor import default_rules_paths

BOOK = RuleBook.from_paths(default_rules_paths())


def lead_keyed_log(events: list[dict]) -> list[dict]:
    """The identity stage, in one partition with immediate answers: records of `touchpoints-by-lead` + "lead"."""
    ident: dict[str, object] = {}
    out: list[dict] = []
    for ev in events:
        lead, anon = subject_of(ev)
        if lead is not None:
            out.append({**ev, "lead": lead})
            if anon is not None:
                cur = ident.get(anon)
                state = None
                if not isinstance(cur, str):  # the first join wins
                    state = cur.to_bytes() if cur is not None else None
                    ident[anon] = lead
                rec = orjson.loads(lead_log.resolution_record(lead, anon, ev["event_id"], state))
                out.append(rec)
            continue
        cur = ident.get(anon)
        if isinstance(cur, str):
            out.append({**ev, "lead": cur})
        else:
            st = cur if cur is not None else LeadState(anon, True)
            fold(st, ev, BOOK)
            ident[anon] = st
    return out


def fold_log(records: list[dict]) -> dict[str, lead_log.LeadLogState]:
    states: dict[str, lead_log.LeadLogState] = {}
    for r in records:
        rec = {k: v for k, v in r.items() if k != "lead"}
        states[r["lead"]], _ = lead_log.apply(states.get(r["lead"]), r["lead"], rec, BOOK)
    return states


def view(s) -> tuple:
    return (s["fit"], round(s["engagement"], 9), s["stage"], s["handoffs"], s["attributes"])


@pytest.fixture(scope="module")
def archived(tmp_path_factory):
    events = generate(3000, 120, seed=31)
    for e in events:
        e["email"] = normalise_email(e["email"])
    log = lead_keyed_log(events)
    url = f"sqlite:///{tmp_path_factory.mktemp('replay') / 'archive.db'}"
    sql_schema.migrate(url)
    engine = sql_schema.make_engine(url)
    with engine.begin() as conn:
        for i in range(0, len(log), 317):
            apply_batch(conn, log[i:i + 317])
    yield {"events": events, "log": log, "url": url, "engine": engine}
    engine.dispose()


def test_replay_equals_the_fold_of_the_log(archived) -> None:
    states = fold_log(archived["log"])
    joined = 0
    for lead, st in sorted(states.items()):
        r = audit.replay_lead(archived["engine"], lead, BOOK)
        s = st.lead
        assert view(r["state"]) == (s.fit, round(s.eng, 9), s.stage, s.handoffs, s.attributes), lead
        joined += sum(1 for x in r["steps"] if x.get("join", {}).get("joined"))
    assert joined > 20 and len(states) > 100


@pytest.mark.parametrize("cut", [0.2, 0.55, 0.9])
def test_as_of_equals_the_history_that_had_arrived(archived, cut) -> None:
    events = archived["events"]
    k = int(len(events) * cut)
    as_of = datetime.fromisoformat(events[k - 1]["received_at"])
    then = fold_log(lead_keyed_log(events[:k]))
    for lead in sorted({r["lead"] for r in archived["log"]}):
        r = audit.replay_lead(archived["engine"], lead, BOOK, as_of=as_of)
        st = then.get(lead)
        if st is None:
            assert r["replayed"] == 0 and r["state"]["stage"] is None
            continue
        s = st.lead
        assert view(r["state"]) == (s.fit, round(s.eng, 9), s.stage, s.handoffs, s.attributes), lead
        if r["stopped_at"] is not None:
            assert r["stopped_at"]["received_at"] > as_of.isoformat()


def test_explanations_add_up(archived) -> None:
    leads = sorted({r["lead"] for r in archived["log"]})[:30]
    for lead in leads:
        r = audit.replay_lead(archived["engine"], lead, BOOK, explain=True)
        fit, eng = explanation_totals(r["state"]["explanation"])
        assert fit == r["state"]["fit"] and eng == pytest.approx(r["state"]["engagement"], abs=1e-9)
        for st in r["steps"]:
            why = st["why"]
            if why["rules_version_changed"]:
                continue
            d_fit = sum(f["points"] for f in why["fit_rules_added"]) - sum(f["points"] for f in why["fit_rules_removed"])
            assert st["after"]["fit"] - st["before"]["fit"] == d_fit
            d_eng = sum(e["contribution"] for e in why["engagement_rules"]) + why["decay"]
            assert st["after"]["engagement"] - st["before"]["engagement"] == pytest.approx(d_eng, abs=1e-9)


def test_as_of_prefix_stops_at_first_later_arrival() -> None:
    recs = [{"received_at": "2026-01-01T00:00:01+00:00"}, {"received_at": "2026-01-01T00:00:05+00:00"},
            {"received_at": "2026-01-01T00:00:03+00:00"}]
    assert as_of_prefix(recs, "2026-01-01T00:00:04+00:00") == 1  # the third arrived by then, but logged later
    assert as_of_prefix(recs, "2026-01-01T00:00:05+00:00") == 3
    assert as_of_prefix(recs, None) == 3
    assert replay("x", [], BOOK)["state"]["stage"] is None


def test_cli_replay_text_and_json(archived, capsys) -> None:
    lead = max({r["lead"] for r in archived["log"]},
               key=lambda k: sum(1 for r in archived["log"] if r["lead"] == k))
    assert audit.replay_main(["--lead", lead, "--database-url", archived["url"], "--explain"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"lead {lead}: ") and "state: stage" in text and "score " in text
    mid = archived["events"][1500]["received_at"]
    assert audit.replay_main(["--lead", lead, "--database-url", archived["url"], "--as-of", mid, "--json"]) == 0
    out = orjson.loads(capsys.readouterr().out)
    assert out["lead"] == lead and out["replayed"] < out["records"]
    assert audit.replay_main(["--lead", "nobody@x.io", "--database-url", archived["url"]]) == 1
    with pytest.raises(SystemExit):
        audit.replay_main(["--lead", lead, "--database-url", archived["url"], "--as-of", "2026-01-01T00:00:00"])
    capsys.readouterr()
    assert audit.verify_main(["--database-url", archived["url"], "--json"]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["ok"] and report["records"] == len({r["event_id"] for r in archived["log"]})  # duplicates once


def _largest_leads(archived, n: int) -> list[str]:
    count: dict[str, int] = {}
    for r in archived["log"]:
        count[r["lead"]] = count.get(r["lead"], 0) + 1
    return sorted(count, key=lambda k: (-count[k], k))[:n]


@pytest.mark.parametrize("limit", [1, 7, 50])
def test_pages_of_steps_add_up_to_the_whole_replay(archived, limit) -> None:
    """Page after page (``next_from_seq``) gives the whole replay's steps, each explained exactly as there, and
    every page carries the whole history's state; also as of an instant."""
    mid = datetime.fromisoformat(archived["events"][2000]["received_at"])
    for lead in _largest_leads(archived, 4):
        for as_of in (None, mid):
            whole = audit.replay_lead(archived["engine"], lead, BOOK, as_of=as_of, explain=True)
            assert whole["next_from_seq"] is None
            steps, start, pages = [], 0, 0
            while start is not None:
                page = audit.replay_lead(archived["engine"], lead, BOOK, as_of=as_of, explain=True,
                                         from_seq=start, limit=limit)
                assert len(page["steps"]) <= limit and page["state"] == whole["state"]
                assert page["replayed"] == whole["replayed"] and page["stopped_at"] == whole["stopped_at"]
                if page["next_from_seq"] is not None:
                    assert len(page["steps"]) == limit and page["next_from_seq"] > page["steps"][-1]["seq"]
                steps += page["steps"]
                start = page["next_from_seq"]
                pages += 1
            assert steps == whole["steps"] and len(steps) == whole["replayed"]
            assert pages == max(1, -(-len(steps) // limit))


def test_a_window_in_the_middle_equals_that_part_of_the_whole_replay(archived) -> None:
    lead = _largest_leads(archived, 1)[0]
    whole = audit.replay_lead(archived["engine"], lead, BOOK, explain=True)
    seqs = [s["seq"] for s in whole["steps"]]
    k = len(seqs) // 2
    page = audit.replay_lead(archived["engine"], lead, BOOK, explain=True, from_seq=seqs[k], limit=5)
    assert page["steps"] == whole["steps"][k:k + 5] and page["next_from_seq"] == seqs[k + 5]
    assert audit.replay_lead(archived["engine"], lead, BOOK, from_seq=seqs[-1] + 1)["steps"] == []


def test_history_api_pages_and_refuses_bad_windows(archived) -> None:
    from fastapi.testclient import TestClient

    from services.audit_api import HISTORY_MAX_PAGE
    from services.query_api import create_app

    lead = _largest_leads(archived, 1)[0]
    whole = audit.replay_lead(archived["engine"], lead, BOOK)
    auth = {"Authorization": "Bearer t-audit"}
    with TestClient(create_app(archived["url"], {"t-audit": "auditor"})) as c:
        r = c.get(f"/v1/leads/{lead}/history", params={"limit": 3}, headers=auth)
        assert r.status_code == 200
        body = r.json()
        assert [s["seq"] for s in body["steps"]] == [s["seq"] for s in whole["steps"][:3]]
        assert body["next_from_seq"] == whole["steps"][3]["seq"] and body["limit"] == 3
        assert body["state"]["score"] == pytest.approx(whole["state"]["score"], abs=1e-9)
        r = c.get(f"/v1/leads/{lead}/history", params={"from_seq": body["next_from_seq"], "limit": 3}, headers=auth)
        assert [s["seq"] for s in r.json()["steps"]] == [s["seq"] for s in whole["steps"][3:6]]
        r = c.get(f"/v1/leads/{lead}/history", headers=auth)  # the default page holds this whole lead
        assert len(r.json()["steps"]) == len(whole["steps"]) and r.json()["next_from_seq"] is None
        for bad in ({"limit": 0}, {"limit": HISTORY_MAX_PAGE + 1}, {"from_seq": 0}, {"limit": "many"}):
            r = c.get(f"/v1/leads/{lead}/history", params=bad, headers=auth)
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", next(iter(bad))], bad


def test_cli_replay_pages(archived, capsys) -> None:
    lead = _largest_leads(archived, 1)[0]
    whole = audit.replay_lead(archived["engine"], lead, BOOK)
    second = whole["steps"][4]["seq"]
    assert audit.replay_main(["--lead", lead, "--database-url", archived["url"], "--limit", "4"]) == 0
    text = capsys.readouterr().out
    assert f"4 steps shown; the next ones: --from-seq {second}" in text and text.count("\n#") == 4
    assert audit.replay_main(["--lead", lead, "--database-url", archived["url"], "--from-seq", str(second),
                              "--limit", "2", "--json"]) == 0
    out = orjson.loads(capsys.readouterr().out)
    assert [s["seq"] for s in out["steps"]] == [s["seq"] for s in whole["steps"][4:6]]


def test_backtest_fold_mirrors_the_lead_log_fold(archived) -> None:
    """projections.log_fold.LogFold (no derived events, join states rebuilt from the anonymous events) ends in
    the same states and MQL hand-offs as projections.lead_log.apply over the same lead-keyed log."""
    from projections.log_fold import LogFold

    anon: dict[str, list[dict]] = {}
    for ev in archived["events"]:
        lead, aid = subject_of(ev)
        if lead is None:
            anon.setdefault(aid, []).append(ev)
    lf = LogFold(BOOK, anon)
    states: dict[str, lead_log.LeadLogState] = {}
    handoffs = set()
    for r in archived["log"]:
        rec = {k: v for k, v in r.items() if k != "lead"}
        states[r["lead"]], derived = lead_log.apply(states.get(r["lead"]), r["lead"], rec, BOOK)
        handoffs |= {(d["lead"], d["episode"], d["at"], d["cause_event_id"]) for d in derived
                     if d["type"] == "lead_handed_off"}
        lf.apply(r["lead"], rec)
    assert {k: s.lead.to_bytes() for k, s in states.items()} == {k: s.lead.to_bytes() for k, s in lf.states.items()}
    from projections.fold import iso_from_epoch

    assert {(a, b, iso_from_epoch(c), d) for a, b, c, d in lf.mqls} == handoffs and handoffs
    assert lf.short_joins == 0
    # the back-test's grouped form (records grouped by lead, each lead's in log order, in chunks): the same
    for chunk in (7, 10**6):
        grouped = LogFold(BOOK, anon)
        for i in range(0, len(archived["log"]), chunk):
            groups: dict[str, list[dict]] = {}
            for r in archived["log"][i:i + chunk]:
                groups.setdefault(r["lead"], []).append({k: v for k, v in r.items() if k != "lead"})
            for lead, recs in groups.items():
                grouped.apply_many(lead, recs)
        assert {k: s.lead.to_bytes() for k, s in grouped.states.items()} == \
            {k: s.lead.to_bytes() for k, s in lf.states.items()}
        assert sorted(grouped.mqls) == sorted(lf.mqls)
    # anonymous events kept raw (as the back-test keeps those keyed by their cookie) are decoded when a join needs
    # them: the same states; raw events that are not anonymous-only are skipped
    lead_ev = next(e for e in archived["events"] if subject_of(e)[0] is not None)
    raw = {aid: [orjson.dumps(lead_ev), *(orjson.dumps(e) for e in evs)] for aid, evs in anon.items()}
    lazy = LogFold(BOOK, raw)
    for r in archived["log"]:
        lazy.apply(r["lead"], {k: v for k, v in r.items() if k != "lead"})
    assert {k: s.lead.to_bytes() for k, s in lazy.states.items()} == \
        {k: s.lead.to_bytes() for k, s in lf.states.items()}
    assert sorted(lazy.mqls) == sorted(lf.mqls) and lazy.short_joins == 0
    assert any(type(e) is dict for evs in raw.values() for e in evs)  # some joins did need their events


def test_cli_backtest_events_form_is_unchanged(tmp_path, capsys) -> None:
    """`leadledger backtest --events FILE` still runs the offline fold, byte for byte."""
    from projections import backtest
    from services import cli

    events = generate(500, 30, seed=2)
    p = tmp_path / "h.jsonl"
    p.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
    rules = default_rules_paths()[0]
    assert backtest.main(["--rules", rules, "--events", str(p)]) == 0
    direct = capsys.readouterr().out
    assert cli.main(["backtest", "--rules", rules, "--events", str(p)]) == 0
    assert capsys.readouterr().out == direct and direct.count("\n") > 20

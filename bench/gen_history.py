"""Deterministic generator of touchpoint histories (wire-format dicts, docs/design.md) for benchmarks and tests.

``generate(n_events, n_leads, seed)`` -> list of envelopes in received_at order (= arrival order): anonymous
cookies that join a lead later through a form, page views (incl. /pricing, /product, /careers), downloads, email
opens/clicks, seminars, meetings, call notes with qualification facts, attribute updates (incl. clears), sales stage
changes (valid and invalid), unsubscribes, some late arrivals, a shared cookie used by a second email, and
duplicates (the same event_id sent again).

CLI: ``python -m bench.gen_history --events 100000 --leads 5000 --seed 1 --out history.jsonl``
"""

from __future__ import annotations

import argparse
import random
import sys
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import orjson

_START = datetime(2026, 1, 1, tzinfo=timezone.utc)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

URLS = ["https://acme.example/pricing", "https://acme.example/product", "https://acme.example/product/edge",
        "https://acme.example/careers", "https://acme.example/blog/post-1", "https://acme.example/blog/post-2",
        "https://acme.example/docs", "https://acme.example/", "https://acme.example/PRICING?plan=pro"]
URL_W = [12, 10, 4, 3, 10, 8, 6, 10, 2]
TITLES = ["IT Director", "Software Engineer", "Head of Finance", "VP Sales", "情報システム部長", "Intern", "Manager",
          "chief technology officer", "Analyst", ""]
DEPTS = ["IT", "Information Systems", "DX", "Finance", "Accounting", "Marketing", "HR", "Sales"]
SIZES = [10, 50, 100, 250, "500", "1000", 5000, 6000, "about 300", "2,000"]
INDUSTRIES = ["manufacturing", "Manufacturing", "retail", "finance", "software"]
STAGE_TARGETS = ["sal", "sal", "sql", "sql", "opportunity", "won", "lost", "recycled", "recycled", "mql", "known",
                 "bogus"]
TYPES = ["page_viewed", "content_downloaded", "email_opened", "email_clicked", "event_attended", "meeting_booked",
         "form_submitted", "attribute_updated", "call_logged", "stage_changed", "unsubscribed"]
TYPE_W = [50, 8, 10, 6, 2, 1.5, 4, 2, 3, 3, 0.5]
WEB = {"page_viewed", "content_downloaded"}


def _ts(sec: float) -> str:
    return (_EPOCH + timedelta(microseconds=int(round(sec * 1e6)))).isoformat(timespec="microseconds")


def _payload(rng: random.Random, etype: str, lead: int) -> dict[str, Any]:
    if etype == "page_viewed":
        p: dict[str, Any] = {"url": rng.choices(URLS, URL_W)[0]}
        if rng.random() < 0.3:
            p["referrer"] = rng.choice(["https://google.example/", "https://acme.example/docs", ""])
        if rng.random() < 0.2:
            p["title"] = rng.choice(["Pricing", "Product", "Careers at Acme"])
        return p
    if etype == "content_downloaded":
        return {"asset_id": rng.choice(["wp-edge", "wp-roi", "case-study-1", "WP-SECURITY"]),
                "title": "Whitepaper"}
    if etype == "email_opened":
        return {"campaign": rng.choice(["spring", "summer", "webinar"])}
    if etype == "email_clicked":
        return {"url": rng.choice(URLS), "campaign": rng.choice(["spring", "summer"])}
    if etype == "event_attended":
        return {"event": rng.choice(["seminar", "trade show"])}
    if etype == "meeting_booked":
        return {"slot": "2026-06-01T10:00:00+00:00"}
    if etype == "call_logged":
        q = {}
        if rng.random() < 0.5:
            q = {rng.choice(["problem", "role", "schedule", "timing"]): rng.choice(["budget approved", "", "Q3"])}
        return {"note": "called", "outcome": rng.choice(["reached", "voicemail"]), "qualification": q}
    if etype == "stage_changed":
        return {"to": rng.choice(STAGE_TARGETS), "reason": "sales", "by": "rep-1"}
    if etype == "attribute_updated":
        attr = rng.choice(["title", "department", "company_size", "industry", "phone"])
        v = {"title": TITLES, "department": DEPTS, "company_size": SIZES, "industry": INDUSTRIES,
             "phone": ["", "+81-3-0000-0000"]}[attr]
        return {"attributes": {attr: rng.choice(v)}}
    if etype == "form_submitted":
        fields: dict[str, Any] = {"name": f"Person {lead}", "email": f"user{lead}@co{lead % 97}.example"}
        for k, vals, pr in (("company", [f"Co {lead % 97}"], 0.9), ("department", DEPTS, 0.8),
                            ("title", TITLES, 0.85), ("phone", ["+81-3-1234-5678"], 0.7),
                            ("company_size", SIZES, 0.8), ("industry", INDUSTRIES, 0.5)):
            if rng.random() < pr:
                fields[k] = rng.choice(vals)
        return {"form_id": rng.choice(["contact", "download", "seminar"]), "fields": fields}
    return {}


def generate(n_events: int, n_leads: int, seed: int = 0, days: float = 240.0,
             dup_rate: float = 0.01, late_rate: float = 0.02) -> list[dict[str, Any]]:
    """``n_events`` envelopes (plus ~dup_rate duplicates) over ``n_leads`` people, in received_at order."""
    rng = random.Random(seed)
    start = (_START - _EPOCH).total_seconds()
    span = days * 86400.0
    # per person: first touch, join instant (first form), whether identified by lead_id, a cookie
    first = [start + rng.random() * span * 0.8 for _ in range(n_leads)]
    join = [f + rng.expovariate(1 / (10 * 86400.0)) for f in first]
    use_lead_id = [rng.random() < 0.1 for _ in range(n_leads)]
    cookie = [f"anon-{i}" for i in range(n_leads)]
    weights = [rng.paretovariate(1.2) for _ in range(n_leads)]  # a few hot leads
    raw: list[tuple[float, float, dict[str, Any]]] = []
    people = rng.choices(range(n_leads), weights, k=n_events)
    types = rng.choices(TYPES, TYPE_W, k=n_events)
    joined_form_sent = [False] * n_leads
    for i in range(n_events):
        lead = people[i]
        etype = types[i]
        occ = first[lead] + rng.random() * (start + span - first[lead])
        email: Optional[str] = f"user{lead}@co{lead % 97}.example"
        lead_id: Optional[str] = f"crm-{lead}" if use_lead_id[lead] else None
        anon: Optional[str] = None
        if etype in WEB or etype == "email_clicked":
            if occ < join[lead]:
                email, lead_id, anon = None, None, cookie[lead]
            elif rng.random() < 0.5:
                email, lead_id, anon = None, None, cookie[lead]
        if etype == "form_submitted":
            anon = cookie[lead] if rng.random() < 0.7 else None
            if not joined_form_sent[lead]:
                joined_form_sent[lead] = True
                occ = join[lead]
                anon = cookie[lead]
            if rng.random() < 0.01:  # someone else fills a form on this person's browser
                other = rng.randrange(n_leads)
                email, lead_id = f"user{other}@co{other % 97}.example", None
        if email is not None and rng.random() < 0.05:
            email = " " + email.upper()
        delay = rng.random() * 2.0
        if rng.random() < late_rate:
            delay += rng.random() * 6 * 3600.0
        ev = {"event_id": f"ev-{seed}-{i}", "type": etype, "occurred_at": "", "received_at": "",
              "lead_id": lead_id, "anonymous_id": anon, "email": email,
              "source": "pixel" if anon and not email else "web", "campaign": rng.choice([None, "spring"]),
              "payload": _payload(rng, etype, lead), "schema_version": 2}
        raw.append((occ + delay, occ, ev))
        if rng.random() < dup_rate:
            dup = dict(ev)
            raw.append((occ + delay + rng.random() * 60.0, occ, dup))
    raw.sort(key=lambda x: x[0])
    out = []
    last = -1.0
    for ra, occ, ev in raw:
        ra = max(ra, last + 1e-3)  # strictly increasing received_at
        last = ra
        ev = dict(ev)
        ev["occurred_at"] = _ts(occ)
        ev["received_at"] = _ts(ra)
        out.append(ev)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--leads", type=int, default=5_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--days", type=float, default=240.0)
    p.add_argument("--out", default="-")
    a = p.parse_args(argv)
    evs = generate(a.events, a.leads, a.seed, a.days)
    f = sys.stdout.buffer if a.out == "-" else open(a.out, "wb")
    try:
        for ev in evs:
            f.write(orjson.dumps(ev))
            f.write(b"\n")
    finally:
        if f is not sys.stdout.buffer:
            f.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

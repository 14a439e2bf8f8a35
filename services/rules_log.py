"""Rule sets as events: the ``rules`` topic, so "which rules were in force at T" is answerable from the log.

Each published rule set is one message (key = version) on a single-partition topic (``LEADLEDGER_TOPIC_RULES``,
default ``rules``; infinite retention): ``{"event_id": "rules:{version}:{digest}", "type": "rule_set_published",
"version", "effective_from", "digest", "rule_set": {... the rule set as JSON ...}}``; ``digest`` = sha256 of the
canonical JSON of the rule set. Publishing is idempotent (a version already on the log with the same digest is not
written again); a version is immutable: publishing different content under an existing version is refused.

The rule set in force at T is the published one with the latest ``effective_from ≤ T`` — exactly what the
processor applies when it runs with the published book (``leadledger rules publish`` the files it is started with).

``leadledger rules publish FILE... [--bootstrap B]`` -> :func:`publish_main`
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
from typing import Iterable, Optional

import orjson

from projections.rules import RuleBook, RuleSet, RuleSetError, load_rule_sets
from services.config import Settings, default_rules_paths
from services.derived_reader import read_log
from services.kafka_io import ensure_topics, make_producer

EVENT_TYPE = "rule_set_published"


def rules_topic() -> str:
    return os.environ.get("LEADLEDGER_TOPIC_RULES", "rules")


def rule_set_event(rs: RuleSet) -> dict:
    doc = rs.model_dump(mode="json", by_alias=True, exclude_none=True)
    digest = hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return {"event_id": f"rules:{rs.version}:{digest[:16]}", "type": EVENT_TYPE, "version": rs.version,
            "effective_from": rs.effective_from.isoformat(), "digest": digest, "rule_set": doc}


async def read_rule_events(bootstrap: str, topic: Optional[str] = None) -> list[dict]:
    """Every rule-set event on the topic, in log order (empty when the topic does not exist)."""
    return [orjson.loads(m.value) async for m in read_log(bootstrap, topic or rules_topic())]


def book_from_events(events: Iterable[dict]) -> RuleBook:
    """The book of every distinct published rule set (a version published twice with other content: error)."""
    by_version: dict[str, dict] = {}
    for e in events:
        if e.get("type") != EVENT_TYPE:
            continue
        old = by_version.get(e["version"])
        if old is not None and old["digest"] != e["digest"]:
            raise RuleSetError("<rules topic>", [("version", f"version {e['version']!r} published with two contents")])
        by_version.setdefault(e["version"], e)
    return RuleBook([RuleSet.model_validate(e["rule_set"]) for e in by_version.values()])


async def book_from_log(bootstrap: str, topic: Optional[str] = None) -> RuleBook:
    return book_from_events(await read_rule_events(bootstrap, topic))


async def publish(bootstrap: str, rule_sets: list[RuleSet], topic: Optional[str] = None) -> list[str]:
    """Publish rule sets not yet on the log; returns the versions written."""
    topic = topic or rules_topic()
    await ensure_topics(bootstrap, [topic], 1)
    existing = {e["version"]: e for e in await read_rule_events(bootstrap, topic) if e.get("type") == EVENT_TYPE}
    todo = []
    for rs in rule_sets:
        ev = rule_set_event(rs)
        old = existing.get(rs.version)
        if old is not None:
            if old["digest"] != ev["digest"]:
                raise RuleSetError("<rules topic>", [("version", f"version {rs.version!r} is already published with "
                                                                 "other content; rule sets are immutable")])
            continue
        todo.append(ev)
    RuleBook([*(RuleSet.model_validate(e["rule_set"]) for e in existing.values()),
              *(RuleSet.model_validate(e["rule_set"]) for e in todo)])  # unique versions and effective_from
    if todo:
        producer = make_producer(bootstrap)
        await producer.start()
        try:
            for ev in todo:
                await (await producer.send(topic, orjson.dumps(ev), key=ev["version"].encode(),
                                           partition=0))
        finally:
            await producer.stop()
    return [e["version"] for e in todo]


def publish_main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="leadledger rules publish",
                                description="publish rule-set files to the rules topic (idempotent)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--bootstrap", default=Settings().bootstrap, help="Kafka (env LEADLEDGER_KAFKA_BOOTSTRAP)")
    p.add_argument("--topic", default=None, help="rules topic (env LEADLEDGER_TOPIC_RULES, default rules)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sets = [rs for f in a.files for rs in load_rule_sets(f)]
        written = asyncio.run(publish(a.bootstrap, sets, a.topic))
    except RuleSetError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"published {len(written)} rule set(s)" + (f": {', '.join(written)}" if written else " (all already on the log)"))
    return 0


def load_book(rules: Optional[list[str]], from_log: bool = False, bootstrap: Optional[str] = None) -> RuleBook:
    """The rule book of a CLI: the published rule sets (``from_log``), the files given, or the processor's
    (``LEADLEDGER_RULES``, default deploy/rules/default.yaml)."""
    if from_log:
        return asyncio.run(book_from_log(bootstrap or Settings().bootstrap))
    if rules:
        return RuleBook.from_paths(rules)
    paths = [p for p in os.environ.get("LEADLEDGER_RULES", "").split(",") if p]
    if not paths:
        paths = default_rules_paths()
    return RuleBook.from_paths(paths)


__all__ = ["rules_topic", "rule_set_event", "read_rule_events", "book_from_events", "book_from_log", "publish",
           "publish_main", "load_book"]

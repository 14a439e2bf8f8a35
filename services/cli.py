"""The `leadledger` command line: runs the services, the local stack, the offline tools.

Each subcommand imports its module lazily, so `leadledger infra up` works before anything heavy is loaded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable

# subcommand -> (module:function taking argv and returning an exit code, help)
DELEGATED: dict[str, tuple[str, str]] = {
    "ingest": ("services.ingest:main", "run the ingest HTTP service (pixel, JS snippet, batch API, forms)"),
    "processor": ("services.processor:main", "run the stream processor (identity + lead fold on faust)"),
    "backtest": ("services.backtest_log:main", "back-test rules over the Kafka log (--from/--to) or a JSONL file (--events)"),
    "replay": ("services.audit:replay_main", "replay one lead from the archive, as of any instant, explained"),
    "forget": ("services.audit:forget_main", "erase a lead's PII by destroying its keys (crypto-shredding)"),
    "demo": ("services.demo:main", "send a few journeys through the running stack and show the result"),
    "stack": ("services.stack:main", "set up the local stack and run every service in the foreground"),
    "projector": ("services.projector:main", "project the derived topics into the SQL store"),
    "query-api": ("services.query_api:main", "serve the BI query API (leads, funnel, forecast)"),
    "alerts": ("services.alerts:main", "hot-lead alerts: SSE stream, signed webhooks, SLA, board (redrive, dead-letters)"),
}

# two-word subcommands: (command, action) -> module:function
NESTED: dict[tuple[str, str], str] = {
    ("rules", "validate"): "projections.rules:validate_main",
    ("projections", "migrate"): "projections.sql_schema:migrate_main",
    ("projections", "rebuild"): "services.projector:rebuild_main",
    ("rules", "publish"): "services.rules_log:publish_main",
    ("audit", "verify"): "services.audit:verify_main",
}


def _resolve(target: str) -> Callable[[list[str]], int]:
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


def _infra(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="leadledger infra", description="the local Kafka broker and PostgreSQL")
    p.add_argument("action", choices=["up", "down", "status", "reset"],
                   help="reset stops both servers and deletes their data")
    p.add_argument("--only", choices=["kafka", "postgres"], help="act on one of the two only")
    a = p.parse_args(argv)
    from deploy import infra

    kafka = a.only in (None, "kafka")
    postgres = a.only in (None, "postgres")
    if a.action == "up":
        cfg = infra.up(kafka=kafka, postgres=postgres)
        if kafka:
            import asyncio

            from services.config import settings
            from services.kafka_io import ensure_topics

            s = settings()
            asyncio.run(ensure_topics(cfg.bootstrap, s.topics.all(), s.partitions))
    elif a.action == "down":
        infra.down(kafka=kafka, postgres=postgres)
    elif a.action == "reset":
        infra.reset()
    else:
        print(json.dumps(infra.status(), indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"infra": "start/stop/inspect the local Kafka broker and PostgreSQL",
                **{k: v[1] for k, v in DELEGATED.items()},
                **{f"{c} {a}": "" for c, a in NESTED}}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: leadledger COMMAND [ARGS...]\n\ncommands:")
        for name, help_ in commands.items():
            print(f"  {name:<22} {help_}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "infra":
        return _infra(rest)
    groups = {c for c, _ in NESTED}
    if cmd in groups:
        actions = sorted(a for c, a in NESTED if c == cmd)
        if not rest or rest[0] not in actions:
            print(f"usage: leadledger {cmd} {{{','.join(actions)}}} ...", file=sys.stderr)
            return 2
        return int(_resolve(NESTED[(cmd, rest[0])])(rest[1:]) or 0)
    if cmd in DELEGATED:
        return int(_resolve(DELEGATED[cmd][0])(rest) or 0)
    print(f"leadledger: unknown command {cmd!r}; try leadledger --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

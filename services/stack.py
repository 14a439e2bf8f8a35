"""`leadledger stack [--demo]`: the whole local stack in the foreground.

Starts Kafka and PostgreSQL (deploy/infra.py), creates the topics, then runs every service as a child process
(ingest, processor, and — where installed — projector and query API), waits until the ingest service is ready,
and either keeps running until Ctrl-C or, with `--demo`, sends the demo journeys, prints the result and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from deploy import infra
from services.config import settings
from services.kafka_io import ensure_topics
from services.processor import RESTART_EXIT

ROOT = Path(__file__).resolve().parent.parent


def _services() -> list[tuple[str, list[str]]]:
    out = [("ingest", ["ingest"]), ("processor", ["processor"])]
    if importlib.util.find_spec("services.projector"):
        out.append(("projector", ["projector"]))
    if importlib.util.find_spec("services.query_api"):
        out.append(("query-api", ["query-api"]))
    if importlib.util.find_spec("services.alerts"):
        out.append(("alerts", ["alerts"]))
    return out


def _wait_ready(url: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="leadledger stack")
    p.add_argument("--demo", action="store_true", help="send the demo journeys, print the result, stop")
    p.add_argument("--logs", default=os.environ.get("LEADLEDGER_LOG_DIR", str(ROOT / "var" / "log")))
    a = p.parse_args(argv or [])
    cfg = infra.up()
    s = settings()
    asyncio.run(ensure_topics(s.bootstrap, s.topics.all(), s.partitions))
    os.environ.setdefault("LEADLEDGER_DATABASE_URL", f"sqlite:///{ROOT / 'var' / 'leadledger.db'}")
    logs = Path(a.logs)
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[str, subprocess.Popen]] = []
    try:
        def start(name: str, args: list[str]) -> subprocess.Popen:
            out = open(logs / f"{name}.log", "ab")
            return subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

        services = dict(_services())
        for name, args in services.items():
            procs.append((name, start(name, args)))
            print(f"[stack] {name} started (log: {logs / (name + '.log')})")
        port = os.environ.get("LEADLEDGER_INGEST_PORT", "8080")
        _wait_ready(f"http://127.0.0.1:{port}/readyz")
        print(f"[stack] ingest ready on http://127.0.0.1:{port}; Kafka {cfg.bootstrap}; PostgreSQL {cfg.pg_dsn}")
        if a.demo:
            from services import demo

            return demo.main(["--ingest-url", f"http://127.0.0.1:{port}"])
        print("[stack] running; Ctrl-C stops the services (the broker and PostgreSQL keep running: "
              "`leadledger infra down`)")
        while True:
            for i, (name, pr) in enumerate(procs):
                if pr.poll() == RESTART_EXIT:  # a processor worker that stopped itself on purpose: restart it
                    print(f"[stack] {name} asked for a restart (see its log); restarting", file=sys.stderr)
                    procs[i] = (name, start(name, services[name]))
            if any(pr.poll() is not None for _, pr in procs):
                break
            time.sleep(1)
        dead = [n for n, pr in procs if pr.poll() is not None]
        print(f"[stack] stopped: {', '.join(dead)} exited", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for _, pr in procs:
            if pr.poll() is None:
                os.killpg(pr.pid, signal.SIGTERM)
        for _, pr in procs:
            try:
                pr.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(pr.pid, signal.SIGKILL)

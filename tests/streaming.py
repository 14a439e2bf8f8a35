"""Test helpers for the live processor: unique topic sets, a worker subprocess, reading derived topics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from services.config import Settings, Topics
from services.derived_reader import read_topic, topic_partitions
from services.processor import RESTART_EXIT

ROOT = Path(__file__).resolve().parent.parent


def topic_env(suffix: str, partitions: int = 4) -> dict[str, str]:
    names = {"TOUCHPOINTS": "touchpoints", "BY_LEAD": "touchpoints-by-lead", "BY_ANON": "touchpoints-by-anon",
             "SCORES": "lead-scores", "STAGES": "lead-stages", "HANDOFFS": "lead-handoffs",
             "INTENT_ALERTS": "intent-alerts", "REJECTED": "rejected"}
    env = {f"LEADLEDGER_TOPIC_{k}": f"{v}-{suffix}" for k, v in names.items()}
    env["LEADLEDGER_PARTITIONS"] = str(partitions)
    env["LEADLEDGER_PROCESSOR_ID"] = f"proc-{suffix}"
    return env


def settings_for(env: dict[str, str], bootstrap: str) -> Settings:
    t = Topics(touchpoints=env["LEADLEDGER_TOPIC_TOUCHPOINTS"], by_lead=env["LEADLEDGER_TOPIC_BY_LEAD"],
               by_anon=env["LEADLEDGER_TOPIC_BY_ANON"],
               scores=env["LEADLEDGER_TOPIC_SCORES"], stages=env["LEADLEDGER_TOPIC_STAGES"],
               handoffs=env["LEADLEDGER_TOPIC_HANDOFFS"], intent_alerts=env["LEADLEDGER_TOPIC_INTENT_ALERTS"],
               rejected=env["LEADLEDGER_TOPIC_REJECTED"])
    return Settings(bootstrap=bootstrap, partitions=int(env["LEADLEDGER_PARTITIONS"]), topics=t)


@dataclass
class Worker:
    """One `leadledger processor` process with its own environment."""

    env: dict[str, str]
    bootstrap: str
    log_path: Path
    proc: subprocess.Popen | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        env = {**os.environ, **self.env, **self.extra, "LEADLEDGER_KAFKA_BOOTSTRAP": self.bootstrap,
               "LEADLEDGER_SESSION_TIMEOUT": "8", "LEADLEDGER_HEARTBEAT_INTERVAL": "1",
               "LEADLEDGER_STALL_SECONDS": "30"}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "processor", "--loglevel",
                                      os.environ.get("LEADLEDGER_TEST_WORKER_LOGLEVEL", "warn")],
                                     cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    restarts: int = 0

    def check_alive(self) -> None:
        """Act as the worker's supervisor: restart it when it stopped itself on purpose (exit 70: a stalled
        partition, or records faust skipped — a restart right after a takeover can meet the latter again); raise with
        the log tail when it died of anything else (so a test fails fast, not on a timeout)."""
        if self.proc is not None and self.proc.poll() is not None:
            log = self.log_path.read_text(errors="replace")
            if self.proc.returncode == RESTART_EXIT and self.restarts < 6:
                self.restarts += 1
                self.start()
                return
            raise AssertionError(f"processor exited with {self.proc.returncode}:\n{log[-3000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


async def read_all(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every message of `topic` as a read_committed consumer sees it, duplicates included."""
    return await read_topic(bootstrap, topic, dedupe=False)


@contextlib.asynccontextmanager
async def offset_clients(bootstrap: str) -> AsyncIterator[tuple[AIOKafkaAdminClient, AIOKafkaConsumer]]:
    """An admin client (committed offsets) and a consumer (end offsets), started, stopped on the way out."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        yield admin, consumer
    finally:
        await consumer.stop()
        await admin.close()


async def group_caught_up(bootstrap: str, group: str, topics: list[str]) -> bool:
    """True when `group` has committed the end offset of every partition of `topics`."""
    async with offset_clients(bootstrap) as (admin, consumer):
        tps = [tp for t in topics for tp in await topic_partitions(consumer, t)]
        return await committed_up_to(admin, group, await consumer.end_offsets(tps))


async def committed_up_to(admin: AIOKafkaAdminClient, group: str, end: dict) -> bool:
    """True when `group` has committed `end` (partition -> end offset) for every partition that holds records."""
    try:
        committed = await admin.list_consumer_group_offsets(group)
    except KafkaError as e:
        if not e.retriable:
            raise
        return False  # the group's coordinator is not up yet (a fresh broker's offsets topic): not caught up
    for tp, offset in end.items():
        meta = committed.get(tp)
        if offset and (meta is None or meta.offset < offset):
            return False
    return True


async def wait_caught_up(bootstrap: str, group: str, topics: list[str], timeout: float = 120.0,
                         workers: tuple["Worker", ...] = ()) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    stable = 0
    while loop.time() < end:
        for w in workers:
            w.check_alive()
        # twice in a row: stage 1's output only exists once stage 1 processed, so one check can race
        stable = stable + 1 if await group_caught_up(bootstrap, group, topics) else 0
        if stable >= 2:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"consumer group {group} did not catch up on {topics} within {timeout}s")

"""Shared fixtures: the real local Kafka broker and PostgreSQL, started by the project's own infra code.

`.ci/run` starts them before pytest; the fixtures start them too when a developer runs pytest alone
(idempotent: an already running broker is reused). No infrastructure is mocked.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Awaitable, Callable

import pytest

from deploy import infra


@pytest.fixture(scope="session")
def infra_cfg() -> infra.InfraConfig:
    return infra.InfraConfig.from_env()


@pytest.fixture(scope="session")
def kafka_bootstrap(infra_cfg: infra.InfraConfig) -> str:
    infra.kafka_up(infra_cfg)
    return infra_cfg.bootstrap


@pytest.fixture(scope="session")
def pg_dsn(infra_cfg: infra.InfraConfig) -> str:
    infra.pg_up(infra_cfg)
    return f"postgresql+psycopg://postgres@127.0.0.1:{infra_cfg.pg_port}/leadledger_test"


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic names / consumer groups, so tests never see each other's data."""
    return uuid.uuid4().hex[:10]


async def wait_for(cond: Callable[[], Awaitable[bool] | bool], timeout: float = 30.0, interval: float = 0.05,
                   what: str = "condition") -> None:
    """Poll `cond` until it is true or the deadline passes (no sleeps as synchronisation)."""
    end = time.monotonic() + timeout
    while True:
        r = cond()
        if asyncio.iscoroutine(r):
            r = await r
        if r:
            return
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def eventually(check: Callable[[], Awaitable[None]], timeout: float = 60.0, interval: float = 1.0) -> None:
    """Run the assertions in `check` until they hold or the deadline passes (then its last failure is raised).

    For outcomes that become true once a stream has been processed, without trusting the processor's own
    bookkeeping (e.g. committed offsets) to say when that is."""
    end = time.monotonic() + timeout
    while True:
        try:
            await check()
            return
        except AssertionError:
            if time.monotonic() > end:
                raise
        await asyncio.sleep(interval)

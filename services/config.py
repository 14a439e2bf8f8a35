"""Runtime settings, all from environment variables with sane local defaults (documented in the README)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


#: the rule-set files shipped with the project (deploy/rules: the default, and the demo's candidate)
RULES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "rules")


def default_rules_paths() -> list[str]:
    """The processor's rule files when ``LEADLEDGER_RULES`` is not set."""
    return [os.path.join(RULES_DIR, "default.yaml")]


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class Topics:
    """Kafka topic names; every name can be overridden with LEADLEDGER_TOPIC_<NAME>."""

    touchpoints: str = field(default_factory=lambda: _env("LEADLEDGER_TOPIC_TOUCHPOINTS", "touchpoints"))
    by_lead: str = field(default_factory=lambda: _env("LEADLEDGER_TOPIC_BY_LEAD", "touchpoints-by-lead"))
    by_anon: str = field(default_factory=lambda: _env("LEADLEDGER_TOPIC_BY_ANON", "touchpoints-by-anon"))
    scores: str = field(default_factory=lambda: _env("LEADLEDGER_TOPIC_SCORES", "lead-scores"))
    stages: str = field(default_factory=lambda: _env("LEADLEDGER_TOPIC_STAGES", "lead-stages"))
    handoffs: str = field(default_factory=lambda: _env("LEADLEDGER_TOPIC_HANDOFFS", "lead-handoffs"))
    intent_alerts: str = field(default_factory=lambda: _env("LEADLEDGER_TOPIC_INTENT_ALERTS", "intent-alerts"))
    rejected: str = field(default_factory=lambda: _env("LEADLEDGER_TOPIC_REJECTED", "rejected"))

    def all(self) -> list[str]:
        return [self.touchpoints, self.by_lead, self.by_anon, self.scores, self.stages, self.handoffs, self.intent_alerts,
                self.rejected]


@dataclass(frozen=True)
class Settings:
    bootstrap: str = field(default_factory=lambda: _env(
        "LEADLEDGER_KAFKA_BOOTSTRAP", f"127.0.0.1:{_env('LEADLEDGER_KAFKA_PORT', '9092')}"))
    partitions: int = field(default_factory=lambda: int(_env("LEADLEDGER_PARTITIONS", "12")))
    topics: Topics = field(default_factory=Topics)
    database_url: str = field(default_factory=lambda: _env("LEADLEDGER_DATABASE_URL", "sqlite:///leadledger.db"))
    rules_paths: tuple[str, ...] = field(
        default_factory=lambda: tuple(p for p in _env("LEADLEDGER_RULES", "").split(",") if p))


def settings() -> Settings:
    return Settings()

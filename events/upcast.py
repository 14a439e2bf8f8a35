"""Upcasters: old envelope versions are upcast on read (dict -> dict), never rewritten in the log.

Register with ``@upcaster(from_version=N)``: a function taking a version-N dict and returning a version-N+1
dict. ``upcast(d)`` applies the chain until ``CURRENT_SCHEMA_VERSION``. A record without ``schema_version``
is treated as version 1 (v1 producers did not always send it); the v1 upcaster is tolerant of v2-shaped input.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable

from events.envelope import CURRENT_SCHEMA_VERSION, format_ts

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
_UPCASTERS: dict[int, Upcaster] = {}


def upcaster(from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register ``fn`` as the upcaster from ``from_version`` to ``from_version + 1``."""

    def register(fn: Upcaster) -> Upcaster:
        if from_version in _UPCASTERS:
            raise ValueError(f"an upcaster from version {from_version} is already registered")
        _UPCASTERS[from_version] = fn
        return fn

    return register


def upcast(d: dict[str, Any]) -> dict[str, Any]:
    """Bring ``d`` to the current schema version (returns ``d`` itself when already current)."""
    version = d.get("schema_version", 1)
    if version == CURRENT_SCHEMA_VERSION:
        return d
    if not isinstance(version, int) or isinstance(version, bool) or version > CURRENT_SCHEMA_VERSION:
        raise ValueError(f"unsupported schema_version {version!r}")
    while version < CURRENT_SCHEMA_VERSION:
        fn = _UPCASTERS.get(version)
        if fn is None:
            raise ValueError(f"no upcaster from schema_version {version}")
        d = fn(d)
        version = d["schema_version"]
    return d


@upcaster(from_version=1)
def _v1_to_v2(d: dict[str, Any]) -> dict[str, Any]:
    """v1 carried the UTM campaign as ``payload.utm_campaign`` and named ``occurred_at`` ``timestamp``."""
    out = dict(d)
    if "timestamp" in out:
        ts = out.pop("timestamp")
        out.setdefault("occurred_at", ts)
    for name in ("occurred_at", "received_at"):
        if isinstance(out.get(name), str):
            try:
                dt = datetime.fromisoformat(out[name])
            except ValueError:
                continue  # kept as written; odd stamps are not guessed at
            if dt.tzinfo is not None:  # naive stamps are kept as written, never given a guessed offset
                out[name] = format_ts(dt)
    payload = out.get("payload")
    if isinstance(payload, dict) and "utm_campaign" in payload:
        payload = dict(payload)
        campaign = payload.pop("utm_campaign")
        if out.get("campaign") is None:
            out["campaign"] = campaign
        out["payload"] = payload
    out.setdefault("payload", {})
    out["schema_version"] = 2
    ordered = {name: out.pop(name, None) for name in _V2_FIELDS}
    ordered.update(out)  # unknown top-level fields are kept, after the known ones
    return ordered


_V2_FIELDS = ("event_id", "type", "occurred_at", "received_at", "lead_id", "anonymous_id", "email", "source",
              "campaign", "payload", "schema_version")

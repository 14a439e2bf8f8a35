"""The touchpoint envelope (PRODUCT.md §3): one pydantic v2 model for every touchpoint type.

``Envelope.model_validate(dict)`` validates and normalises (email trimmed + lower-cased, timestamps to UTC,
payload checked against the per-type model of ``events.payloads``). ``field_errors(exc)`` turns a
``ValidationError`` into ``[(field_path, reason), ...]`` for clear 4xx answers.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Optional, Union, get_args

import orjson

from pydantic import (AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationError,
                      ValidationInfo, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from events.payloads import PAYLOAD_MODELS

CURRENT_SCHEMA_VERSION = 2

TouchpointType = Literal[
    "page_viewed", "form_submitted", "attribute_updated", "content_downloaded", "email_opened",
    "email_clicked", "event_attended", "meeting_booked", "call_logged", "stage_changed", "unsubscribed",
]
TOUCHPOINT_TYPES: tuple[str, ...] = get_args(TouchpointType)
#: Types a browser may send anonymously (pixel / JS snippet).
ENGAGEMENT_TYPES: frozenset[str] = frozenset({"page_viewed", "email_opened", "email_clicked", "content_downloaded"})

#: Default ``source`` when the producer does not name one.
DEFAULT_SOURCE: dict[str, str] = {
    "page_viewed": "web", "content_downloaded": "web", "form_submitted": "form", "attribute_updated": "import",
    "email_opened": "email", "email_clicked": "email", "event_attended": "import", "meeting_booked": "web",
    "call_logged": "inside_sales", "stage_changed": "crm", "unsubscribed": "email",
}

Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Short = Annotated[str, StringConstraints(min_length=1, max_length=256)]
# the models' core validators, called directly on the hot path (skips the python-level model_validate wrapper)
_PAYLOAD_VALIDATORS = {t: m.__pydantic_validator__ for t, m in PAYLOAD_MODELS.items()}
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")


class Envelope(BaseModel):
    """A validated, normalised touchpoint. ``payload`` stays a plain dict (validated per ``type``)."""

    model_config = ConfigDict(extra="forbid")

    event_id: Id
    type: TouchpointType
    occurred_at: AwareDatetime
    received_at: Optional[AwareDatetime] = None
    lead_id: Optional[Id] = None
    anonymous_id: Optional[Id] = None
    email: Optional[Annotated[str, StringConstraints(max_length=320)]] = None
    source: Optional[Short] = None
    campaign: Optional[Short] = None
    payload: dict[str, Any] = Field(default_factory=dict)
    schema_version: Literal[2] = CURRENT_SCHEMA_VERSION

    @field_validator("occurred_at", "received_at")
    @classmethod
    def _utc(cls, v: Optional[datetime]) -> Optional[datetime]:
        return None if v is None else v.astimezone(timezone.utc)

    @field_validator("email")
    @classmethod
    def _email(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return None
        v = v.strip().lower()
        if len(v) > 254 or not _EMAIL_RE.match(v):
            raise PydanticCustomError("email", "not a valid email address")
        return v

    @field_validator("payload")
    @classmethod
    def _payload(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        validator = _PAYLOAD_VALIDATORS.get(info.data.get("type"))  # type: ignore[arg-type]
        if validator is None:  # type itself invalid: reported on its own field
            return v
        try:
            validator.validate_python(v)
        except ValidationError as exc:
            errors = field_errors(exc)
            raise PydanticCustomError("payload", "{summary}",
                                      {"summary": "; ".join(f"{f}: {r}" for f, r in errors), "errors": errors})
        return v

    @model_validator(mode="after")
    def _subject_and_source(self) -> "Envelope":
        if self.lead_id is None and self.anonymous_id is None and self.email is None:
            raise PydanticCustomError("subject", "one of lead_id, anonymous_id or email is required",
                                      {"field": "lead_id"})
        if self.source is None:
            self.source = DEFAULT_SOURCE.get(self.type, "unknown")
        return self


def as_utc(v: Union[datetime, str, None]) -> Optional[datetime]:
    """A timestamp (datetime or RFC 3339 string) as an aware datetime; naive ones are taken as UTC."""
    if v is None:
        return None
    if isinstance(v, str):
        v = datetime.fromisoformat(v)
    return v if v.tzinfo is not None else v.replace(tzinfo=timezone.utc)


def format_ts(dt: Optional[datetime]) -> Optional[str]:
    """RFC 3339 UTC with microseconds (``2026-03-01T09:00:00.123000+00:00``), or None."""
    if dt is None:
        return None
    if dt.tzinfo is not timezone.utc:
        dt = dt.astimezone(timezone.utc)
    # orjson formats a UTC datetime ~5x faster than isoformat(); it only omits a zero fraction.
    s = orjson.dumps(dt).decode()[1:-1]
    return s if dt.microsecond else f"{s[:19]}.000000+00:00"


def field_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """``[(field_path, reason)]`` of a validation error; payload errors are expanded to ``payload.<field>``."""
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        ctx = err.get("ctx") or {}
        if err["type"] == "payload" and "errors" in ctx:
            out.extend((f"{loc}.{f}" if f else loc, r) for f, r in ctx["errors"])
        elif not loc and "field" in ctx:
            out.append((ctx["field"], err["msg"]))
        else:
            out.append((loc, err["msg"]))
    return out

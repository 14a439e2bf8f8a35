"""Per-type payload models of the touchpoint contract (PRODUCT.md §3).

Every model keeps unknown extra fields (``extra="allow"``) for forward compatibility; the fold never trusts
them for scoring. Required fields: ``page_viewed.url``, ``content_downloaded.asset_id``, ``stage_changed.to``.
"""

from __future__ import annotations

from typing import Annotated, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Name = Annotated[str, StringConstraints(max_length=256)]
Url = Annotated[str, StringConstraints(max_length=2048)]
Text = Annotated[str, StringConstraints(max_length=4000)]
AttrName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
AttrValue = Union[Text, int, float, bool, None]
Attributes = Annotated[dict[AttrName, AttrValue], Field(max_length=200)]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="allow")


class PageViewed(_Payload):
    url: Url
    referrer: Optional[Url] = None
    title: Optional[Text] = None


class FormSubmitted(_Payload):
    form_id: Optional[Id] = None
    fields: Attributes = Field(default_factory=dict)


class AttributeUpdated(_Payload):
    attributes: Attributes = Field(default_factory=dict)


class ContentDownloaded(_Payload):
    asset_id: Id
    title: Optional[Text] = None


class EmailOpened(_Payload):
    campaign: Optional[Name] = None


class EmailClicked(_Payload):
    url: Optional[Url] = None
    campaign: Optional[Name] = None


class EventAttended(_Payload):
    event: Optional[Name] = None


class MeetingBooked(_Payload):
    slot: Optional[Name] = None


class Qualification(BaseModel):
    """Qualification facts from an inside-sales call; any non-empty value counts."""

    model_config = ConfigDict(extra="allow")
    problem: Optional[Text] = None
    role: Optional[Text] = None
    schedule: Optional[Text] = None
    timing: Optional[Text] = None


class CallLogged(_Payload):
    note: Optional[Text] = None
    outcome: Optional[Name] = None
    qualification: Optional[Qualification] = None


class StageChanged(_Payload):
    to: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    reason: Optional[Text] = None
    by: Optional[Name] = None


class Unsubscribed(_Payload):
    pass


PAYLOAD_MODELS: dict[str, type[BaseModel]] = {
    "page_viewed": PageViewed,
    "form_submitted": FormSubmitted,
    "attribute_updated": AttributeUpdated,
    "content_downloaded": ContentDownloaded,
    "email_opened": EmailOpened,
    "email_clicked": EmailClicked,
    "event_attended": EventAttended,
    "meeting_booked": MeetingBooked,
    "call_logged": CallLogged,
    "stage_changed": StageChanged,
    "unsubscribed": Unsubscribed,
}

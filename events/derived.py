"""Names of the derived events written by the processor (docs/design.md); constants only."""

from __future__ import annotations

LEAD_SCORED = "lead_scored"
LEAD_STAGE_CHANGED = "lead_stage_changed"
LEAD_HANDED_OFF = "lead_handed_off"
INTENT_ALERT = "intent_alert"
EVENT_REJECTED = "event_rejected"

DERIVED_TYPES: tuple[str, ...] = (LEAD_SCORED, LEAD_STAGE_CHANGED, LEAD_HANDED_OFF, INTENT_ALERT, EVENT_REJECTED)

#: derived type -> attribute of ``services.config.Topics`` naming its topic
TOPIC_ATTR: dict[str, str] = {
    LEAD_SCORED: "scores",
    LEAD_STAGE_CHANGED: "stages",
    LEAD_HANDED_OFF: "handoffs",
    INTENT_ALERT: "intent_alerts",
    EVENT_REJECTED: "rejected",
}

#: deterministic event_id templates (str.format fields)
ID_FORMAT: dict[str, str] = {
    LEAD_SCORED: "{lead}:scored:{seq}",
    LEAD_STAGE_CHANGED: "{lead}:stage:{n}",
    LEAD_HANDED_OFF: "{lead}:handoff:{episode}",
    INTENT_ALERT: "{lead}:intent:{rule}:{first_event_id}",
    EVENT_REJECTED: "rejected:{event_id}",
}

"""Crypto-shredding of PII in touchpoints (issue #7): which values are PII, how they are sealed and revealed.

PII values are encrypted with a per-person key (AES-256-GCM) by the ingest service before an event is produced,
so the log, the archive, the projections and the derived topics only ever hold ciphertext. Destroying the key
(``leadledger forget``) erases the values everywhere at once; nothing in the immutable log is rewritten.

What is PII here (the pragmatic scope of the issue):

* ``form_submitted.payload.fields`` and ``attribute_updated.payload.attributes``: ``name``, ``email``, ``phone``;
* ``call_logged.payload.note`` (free text).

Fit conditions read title / department / company_size / industry, which stay in clear; name / email / phone are
only needed for their *presence* (lead completeness, required attributes), and a ciphertext is a non-empty
string, so the fold computes exactly the same scores and stages on sealed events. ``""`` and ``null`` mean
"absent / cleared" and are left as they are. The envelope's subject (``email``, ``lead_id``) is **not** sealed: it
is the Kafka key and the lead key of PRODUCT.md §4 (see docs/audit.md for the limitation and a pseudonymous
scheme).

A sealed value is the string ``pii:v1:<key_id>:<base64url(nonce ‖ ciphertext ‖ tag)>`` where the plaintext is
the orjson of the original value (so numbers stay numbers) and the associated data binds it to its key id.
Pure: no I/O, no clock; keys are passed in by the caller (``services/keystore.py`` holds them).
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional

import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "pii:v1:"
ERASED = "[erased]"           # shown for a value whose key was destroyed
SEALED = "[encrypted]"        # shown for a value whose key is unknown to the keystore at hand
PII_ATTRIBUTES = ("name", "email", "phone")
#: event type -> (payload field holding an attribute mapping, or None) and free-text payload fields
PII_FIELDS: dict[str, tuple[Optional[str], tuple[str, ...]]] = {
    "form_submitted": ("fields", ()),
    "attribute_updated": ("attributes", ()),
    "call_logged": (None, ("note",)),
}
_TOKEN = re.compile(r"^pii:v1:([0-9a-f]{32}):([A-Za-z0-9_-]+)$")


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def _aad(key_id: str) -> bytes:
    return b"leadledger-pii:" + key_id.encode("ascii")


def seal(value: Any, key_id: str, key: bytes) -> Any:
    """The sealed form of one value (``""`` and ``None`` are returned as they are)."""
    if value is None or value == "":
        return value
    nonce = os.urandom(12)
    ct = AESGCM(key).encrypt(nonce, orjson.dumps(value), _aad(key_id))
    return PREFIX + key_id + ":" + base64.urlsafe_b64encode(nonce + ct).decode().rstrip("=")


def token_key_id(v: Any) -> Optional[str]:
    """The key id of a sealed value, else None."""
    if isinstance(v, str) and v.startswith(PREFIX):
        m = _TOKEN.match(v)
        if m:
            return m.group(1)
    return None


def unseal(token: str, key: bytes) -> Any:
    m = _TOKEN.match(token)
    if not m:
        raise ValueError("not a sealed value")
    blob = base64.urlsafe_b64decode(m.group(2) + "=" * (-len(m.group(2)) % 4))
    return orjson.loads(AESGCM(key).decrypt(blob[:12], blob[12:], _aad(m.group(1))))


def seal_payload(etype: str, payload: Any, key_id: str, key: bytes) -> Any:
    """A copy of ``payload`` with its PII values sealed (the payload itself is not changed)."""
    spec = PII_FIELDS.get(etype)
    if spec is None or not isinstance(payload, dict):
        return payload
    mapping_field, text_fields = spec
    out = dict(payload)
    if mapping_field is not None and isinstance(out.get(mapping_field), dict):
        attrs = dict(out[mapping_field])
        for name in PII_ATTRIBUTES:
            if name in attrs and token_key_id(attrs[name]) is None:
                attrs[name] = seal(attrs[name], key_id, key)
        out[mapping_field] = attrs
    for f in text_fields:
        if f in out and token_key_id(out[f]) is None:
            out[f] = seal(out[f], key_id, key)
    return out


def has_pii(etype: str, payload: Any) -> bool:
    spec = PII_FIELDS.get(etype)
    if spec is None or not isinstance(payload, dict):
        return False
    mapping_field, text_fields = spec
    m = payload.get(mapping_field) if mapping_field else None
    if isinstance(m, dict) and any(m.get(n) not in (None, "") for n in PII_ATTRIBUTES):
        return True
    return any(payload.get(f) not in (None, "") for f in text_fields)


def key_ids(obj: Any) -> set[str]:
    """Every key id sealed anywhere in ``obj`` (nested dicts/lists)."""
    found: set[str] = set()
    _walk(obj, lambda v: found.add(v) if v else None)
    return found


def _walk(obj: Any, on_key: Callable[[Optional[str]], Any]) -> None:
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, str):
            k = token_key_id(v)
            if k is not None:
                on_key(k)


def reveal(obj: Any, keys: Mapping[str, Optional[bytes]]) -> Any:
    """A copy of ``obj`` with every sealed value opened: the plaintext when its key is in ``keys``,
    ``ERASED`` when ``keys`` maps its id to ``None`` (destroyed), ``SEALED`` when the id is unknown."""
    if isinstance(obj, dict):
        return {k: reveal(v, keys) for k, v in obj.items()}
    if isinstance(obj, list):
        return [reveal(v, keys) for v in obj]
    if isinstance(obj, tuple):
        return tuple(reveal(v, keys) for v in obj)
    kid = token_key_id(obj)
    if kid is None:
        return obj
    if kid not in keys:
        return SEALED
    key = keys[kid]
    if key is None:
        return ERASED
    try:
        return unseal(obj, key)
    except Exception:  # noqa: BLE001 - a corrupted token reads as sealed, never as an error with its content
        return SEALED


def collect_key_ids(objs: Iterable[Any]) -> set[str]:
    out: set[str] = set()
    for o in objs:
        out |= key_ids(o)
    return out

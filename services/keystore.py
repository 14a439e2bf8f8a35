"""The PII key store: one AES-256 key per person, kept outside the log (SQL table ``pii_keys``).

Its own database (``LEADLEDGER_KEYSTORE_URL``; any SQLAlchemy URL — PostgreSQL in production), so that the keys
never travel with the projections, the archive or a Kafka backup. The table is created on first use.

* ``key_for(subject)`` — the live key of a subject (lead key, or anonymous id for anonymous-only events),
  created on first use; safe with several ingest instances (unique subject, insert-or-select).
* ``keys(ids)`` — ``{key_id: key}`` for live keys and ``{key_id: None}`` for destroyed ones (ids never seen are
  left out): the input of ``projections.pii.reveal``.
* ``destroy(subjects, key_ids)`` — crypto-shredding: the key bytes and the subject are overwritten with NULL,
  a tombstone (key id, destroyed_at) stays so readers can say "erased" rather than "unknown". A later event of
  the same person gets a fresh key.

``PiiSealer`` is what the ingest service calls before producing (``seal(envs)``): keys are cached per subject
for ``LEADLEDGER_KEYSTORE_CACHE_S`` seconds (default 30). Key material and PII are never logged.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Iterable, Optional

import sqlalchemy as sa

from projections import pii
from projections.sql_schema import make_engine

ks_metadata = sa.MetaData()
pii_keys = sa.Table(
    "pii_keys", ks_metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("subject", sa.String(512), unique=True),  # NULL once destroyed
    sa.Column("key", sa.LargeBinary),                   # NULL once destroyed
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("destroyed_at", sa.DateTime(timezone=True)),
)


def keystore_url() -> Optional[str]:
    return os.environ.get("LEADLEDGER_KEYSTORE_URL") or None


class Keystore:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._ready = False  # the table is created on first use: a key store that is down fails requests, not startup

    def _ensure(self) -> None:
        if not self._ready:
            ks_metadata.create_all(self.engine, checkfirst=True)
            self._ready = True

    def close(self) -> None:
        self.engine.dispose()

    def key_for(self, subject: str) -> tuple[str, bytes]:
        k = pii_keys
        self._ensure()
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(k.c.key_id, k.c.key).where(k.c.subject == subject)).first()
            if row is not None:
                return row[0], row[1]
        key_id, key = uuid.uuid4().hex, pii.new_key()
        try:
            with self.engine.begin() as conn:
                conn.execute(k.insert().values(key_id=key_id, subject=subject, key=key,
                                               created_at=datetime.now(timezone.utc)))
            return key_id, key
        except sa.exc.IntegrityError:  # another instance created it first
            with self.engine.begin() as conn:
                row = conn.execute(sa.select(k.c.key_id, k.c.key).where(k.c.subject == subject)).one()
                return row[0], row[1]

    def keys(self, key_ids: Iterable[str]) -> dict[str, Optional[bytes]]:
        ids = sorted(set(key_ids))
        self._ensure()
        out: dict[str, Optional[bytes]] = {}
        k = pii_keys
        with self.engine.connect() as conn:
            for i in range(0, len(ids), 500):
                for kid, key in conn.execute(sa.select(k.c.key_id, k.c.key).where(k.c.key_id.in_(ids[i:i + 500]))):
                    out[kid] = bytes(key) if key is not None else None
        return out

    def destroy(self, subjects: Iterable[str] = (), key_ids: Iterable[str] = ()) -> int:
        """Destroy the keys of ``subjects`` and the keys ``key_ids``; returns how many live keys were destroyed."""
        subjects, key_ids = sorted(set(subjects)), sorted(set(key_ids))
        self._ensure()
        k = pii_keys
        conds = []
        if subjects:
            conds.append(k.c.subject.in_(subjects))
        if key_ids:
            conds.append(k.c.key_id.in_(key_ids))
        if not conds:
            return 0
        with self.engine.begin() as conn:
            res = conn.execute(k.update().where(sa.or_(*conds), k.c.key.isnot(None))
                               .values(key=None, subject=None, destroyed_at=datetime.now(timezone.utc)))
            return res.rowcount or 0


class PiiSealer:
    """Seals the PII of envelopes before they are produced (the ingest hook)."""

    def __init__(self, keystore: Keystore, cache_s: float = 30.0) -> None:
        self.keystore = keystore
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, str, bytes]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> Optional["PiiSealer"]:
        url = keystore_url()
        if not url:
            return None
        return cls(Keystore(url), float(os.environ.get("LEADLEDGER_KEYSTORE_CACHE_S", "30")))

    def _key(self, subject: str) -> tuple[str, bytes]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(subject)
            if hit is not None and now - hit[0] < self.cache_s:
                return hit[1], hit[2]
        key_id, key = self.keystore.key_for(subject)
        with self._lock:
            self._cache[subject] = (now, key_id, key)
            if len(self._cache) > 100_000:
                self._cache.clear()
        return key_id, key

    def seal_sync(self, envs: list[Any]) -> None:
        """Seal ``env.payload`` of each envelope (pydantic ``Envelope`` or wire dict) in place."""
        for env in envs:
            is_dict = isinstance(env, dict)
            etype = env["type"] if is_dict else env.type
            payload = env.get("payload") if is_dict else env.payload
            if not pii.has_pii(etype, payload):
                continue
            subject = _subject(env)
            key_id, key = self._key(subject)
            sealed = pii.seal_payload(etype, payload, key_id, key)
            if is_dict:
                env["payload"] = sealed
            else:
                env.payload = sealed

    async def seal(self, envs: list[Any]) -> None:
        await asyncio.to_thread(self.seal_sync, envs)

    def close(self) -> None:
        self.keystore.close()


def _subject(env: Any) -> str:
    """Whose key seals the event: its lead key (lead_id, else normalised email), else its anonymous id."""
    from projections.fold import subject_of

    d = env if isinstance(env, dict) else {"lead_id": env.lead_id, "email": env.email,
                                           "anonymous_id": env.anonymous_id}
    lead, anon = subject_of(d)
    subject = lead or anon
    if not subject:
        raise ValueError("event has no subject")
    return subject


def reveal_records(records: list[Any], keystore: Optional[Keystore]) -> list[Any]:
    """Records (derived events, envelopes, rows) with their sealed values opened as far as the keystore allows."""
    ids = pii.collect_key_ids(records)
    keys = keystore.keys(ids) if (keystore is not None and ids) else {}
    return [pii.reveal(r, keys) for r in records]

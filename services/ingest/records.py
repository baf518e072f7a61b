"""Turning validation results into records for identity, or rows of the error store
(pure: no NATS, no SQLite)."""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import msgspec

from services.ingest.validation import Accepted, Problem
from shared.config import ConfigError, _phone_region
from shared.messages import Record, RecordEnvelope, encode_fitting, msgpack_encoder
from shared.normalize import normalize_phone

MAX_RECORDS_PER_MESSAGE = 500
"""Accepted records travel to identity in messages of at most this many records."""

_problems_encoder = msgspec.json.Encoder()

ROW_OVERHEAD = 256
"""Bytes a rejected record counts for beyond its payload and problems (its other columns,
its keys, the indexes), in the error store's size limit."""
MAX_STORED_PAYLOAD = 1_048_576
"""Bytes of a rejected record's payload the error store keeps: the default record limit,
so a record that failed only its schema is kept whole and can be fixed and sent again.
Only a payload already over that limit is cut, with a marker saying how long it was
(the reason is kept whole)."""
MAX_KEYS = 256
"""Identity keys a rejected record is findable by (for a privacy delete), at most."""
MAX_KEY_LENGTH = 1024
_TOKEN_SPLIT = re.compile(r"[\s\"',;:{}\[\]()<>|=\\]+")
_FIELD_SPLIT = re.compile(r"[,;\t\n\r\"{}\[\]|=]+")
_PHONE_LIKE = re.compile(r"^\+?[\d\s().\-/]{6,40}$")


@functools.cache
def _region() -> str:
    try:
        return _phone_region(os.environ)
    except ConfigError:
        return "US"


def truncated(payload: bytes, limit: int = MAX_STORED_PAYLOAD) -> bytes:
    if len(payload) <= limit:
        return payload
    return payload[:limit] + f"\n[truncated: {len(payload)} bytes in all]".encode()


def identity_keys(value: str, region: str | None = None) -> set[str]:
    """The keys one value is found by: trimmed and lower-cased (emails, ids), and its E.164
    form when it reads as a valid phone number (as identity normalises phones)."""
    text = value.strip()
    if not text or len(text) > MAX_KEY_LENGTH:
        return set()
    keys = {text.lower()}
    if _PHONE_LIKE.match(text):
        phone = normalize_phone(text, region or _region())
        if phone is not None:
            keys.add(phone)
    return keys


MAX_DEPTH = 64
"""Values nested deeper than this in a rejected JSON payload are not keys."""


def _leaves(node: Any, out: list[str], depth: int = 0) -> None:
    """Add the string and integer values of a decoded JSON value at `depth` to `out`,
    depth first in document order, down to `MAX_DEPTH` (strings of an object or array
    taken in its own loop: most values are)."""
    if isinstance(node, dict):
        if depth < MAX_DEPTH:
            for v in node.values():
                if v.__class__ is str:
                    out.append(v)
                else:
                    _leaves(v, out, depth + 1)
    elif isinstance(node, list):
        if depth < MAX_DEPTH:
            for v in node:
                if v.__class__ is str:
                    out.append(v)
                else:
                    _leaves(v, out, depth + 1)
    elif isinstance(node, str):
        out.append(node)
    elif isinstance(node, int) and not isinstance(node, bool):
        out.append(str(node))


def payload_keys(payload: bytes, region: str | None = None) -> list[str]:
    """What a rejected record can be found by for a privacy delete, exactly, never by a
    substring: each value of a JSON payload; for a payload that is not JSON, each token
    (split on white space and punctuation) and each field (split on separators).

    Each distinct value is looked at once: `identity_keys` inlined (trimmed, lower-cased,
    and the E.164 form of what reads as a phone number)."""
    keys: set[str] = set()
    values: list[str] = []
    try:
        _leaves(msgspec.json.decode(payload), values)
    except (msgspec.DecodeError, RecursionError, ValueError):
        text = payload.decode("utf-8", "replace")
        values = [*_TOKEN_SPLIT.split(text), *_FIELD_SPLIT.split(text)]
    seen: set[str] = set()
    phone_like = _PHONE_LIKE.match
    for value in values:
        if value in seen:
            continue
        seen.add(value)
        text = value.strip()
        if not text or len(text) > MAX_KEY_LENGTH:
            continue
        keys.add(text.lower())
        if phone_like(text):
            phone = normalize_phone(text, region or _region())
            if phone is not None:
                keys.add(phone)
        if len(keys) >= MAX_KEYS:
            break
    return sorted(keys)[:MAX_KEYS]


def unknown_dataset(name: str) -> list[Problem]:
    return [Problem("unknown dataset", "", "a configured dataset", repr(name)[:200])]


class Rejected(msgspec.Struct, frozen=True, kw_only=True):
    """A rejected record as the error store keeps it."""

    record_id: str
    dataset: str
    source: str
    reason: str
    path: str
    expected: str
    got: str
    problems: bytes
    """The problems, JSON."""
    payload: bytes
    rejected_at: float
    size: int
    """What it counts for in the store's size limit."""
    keys: list[str]
    """The identity keys it is found by, for a privacy delete."""
    batch_id: str | None = None
    row_number: int | None = None


def rejected(
    *,
    record_id: str,
    dataset: str,
    problems: list[Problem],
    payload: bytes,
    source: str,
    now: float,
    batch_id: str | None = None,
    row_number: int | None = None,
) -> Rejected:
    """A rejected record as the error store keeps it: its first problem as the reason, its
    payload (cut if huge), its size and the identity keys it is found by."""
    first = problems[0]
    payload = truncated(payload)
    encoded_problems = _problems_encoder.encode(problems)
    found_by = payload_keys(payload)
    size = len(payload) + len(encoded_problems) + len(_problems_encoder.encode(found_by))
    return Rejected(
        record_id=record_id,
        dataset=dataset,
        batch_id=batch_id,
        row_number=row_number,
        source=source,
        reason=first.reason,
        path=first.path,
        expected=first.expected,
        got=first.got,
        problems=encoded_problems,
        payload=payload,
        rejected_at=now,
        size=size + ROW_OVERHEAD,
        keys=found_by,
    )


def to_record(
    accepted: Accepted,
    *,
    record_id: str,
    dataset: str,
    record_class: str,
    now: float,
    msg_id: str | None = None,
    batch_id: str | None = None,
) -> Record:
    return Record(
        record_id=record_id,
        dataset=dataset,
        ingested_at=now,
        payload=accepted.payload,
        identities=accepted.identities,
        source_msg_id=msg_id,
        record_class=record_class,
        timestamp=accepted.timestamp,
        event_type=accepted.event_type,
        primary_identity=accepted.primary_identity,
        batch_id=batch_id,
    )


def encoded(records: list[Record]) -> list[bytes]:
    """Records as the messages that carry them to identity: at most
    `MAX_RECORDS_PER_MESSAGE` records and `MAX_MESSAGE_BYTES` bytes each, in order."""
    return encode_fitting(
        records,
        lambda part: msgpack_encoder.encode(RecordEnvelope(part)),
        max_items=MAX_RECORDS_PER_MESSAGE,
    )

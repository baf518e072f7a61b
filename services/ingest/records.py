"""Turning validation results into records for identity, or rows of the error store."""

from __future__ import annotations

import msgspec

from services.ingest.store import INSERT_REJECTED
from services.ingest.validation import Accepted, Problem
from shared.db import Tx
from shared.messages import Record, RecordBatch, encode_fitting, msgpack_encoder

MAX_RECORDS_PER_MESSAGE = 500
"""Accepted records travel to identity in messages of at most this many records."""

_problems_encoder = msgspec.json.Encoder()


def unknown_dataset(name: str) -> list[Problem]:
    return [Problem("unknown dataset", "", "a configured dataset", repr(name)[:200])]


def reject_row(
    tx: Tx,
    *,
    record_id: str,
    dataset: str,
    problems: list[Problem],
    payload: bytes,
    source: str,
    now: float,
    batch_id: str | None = None,
    row_number: int | None = None,
) -> None:
    first = problems[0]
    tx.add(
        INSERT_REJECTED,
        (
            record_id,
            dataset,
            batch_id,
            row_number,
            source,
            first.reason,
            first.path,
            first.expected,
            first.got,
            _problems_encoder.encode(problems),
            payload,
            now,
        ),
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
        lambda part: msgpack_encoder.encode(RecordBatch(part)),
        max_items=MAX_RECORDS_PER_MESSAGE,
    )

"""The ingest rules, pure: a whole batch in, its effects out (no NATS, no SQLite).

`route` decides a batch of messages from the ingest stream: each record is validated
against its dataset's compiled schema; an accepted record of a profile-enabled dataset
goes to identity (`Forward`), one of another dataset is only counted; a rejected record
is kept with its reason (`Reject`). A privacy delete (`Forget`) and a probe (`Pass`) go
on behind the records before them; a privacy delete also removes the records rejected
earlier in the same batch that carry the person's identity (`Forget.pending`), since those
are not stored yet when the handler looks. The effects come in the order the handler
applies them.

`sort_rows` decides a chunk of a batch file's rows the same way (records, rejected rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec

from services.ingest.files import Row
from services.ingest.records import Rejected, identity_keys, rejected, to_record, unknown_dataset
from services.ingest.validation import Accepted, CompiledSchema, Problem
from shared import subjects
from shared.messages import PrivacyDelete, Probe, Record, probe_decoder
from shared.resources import Dataset

Lookup = Callable[[str], tuple[Dataset, CompiledSchema] | None]
"""A dataset's configuration and compiled schema by name, or None if there is none."""

_delete_decoder = msgspec.json.Decoder(PrivacyDelete)


class Incoming(msgspec.Struct, frozen=True):
    """A message of the ingest stream, with the record id its sequence gives it."""

    subject: str
    data: bytes
    record_id: str
    msg_id: str | None = None


class Forward(msgspec.Struct, frozen=True):
    """Accepted records, in order, for identity."""

    records: list[Record]


class Reject(msgspec.Struct, frozen=True):
    """A rejected record to keep in the error store."""

    row: Rejected


class Forget(msgspec.Struct, frozen=True):
    """A privacy delete: remove the rejected records found by `keys` (the identity's value
    as identity normalises it), pass the request on and report."""

    request: PrivacyDelete
    keys: list[str]
    pending: list[str]
    """Records rejected earlier in this batch that carry one of `keys`."""


class Pass(msgspec.Struct, frozen=True):
    """A probe, passed on behind the records before it."""

    probe: Probe


class Ignored(msgspec.Struct, frozen=True):
    """A control message that could not be read."""

    subject: str
    error: str


Effect = Forward | Reject | Forget | Pass | Ignored


class Effects(msgspec.Struct):
    steps: list[Effect]
    """In the order they apply."""
    counts: dict[str, tuple[int, int]]
    """Dataset -> (accepted, rejected) in this batch."""
    rejected_bytes: int = 0
    """What the rejected records add to the error store."""


class _Target:
    """A subject's dataset in a batch: its configuration, looked up once, and counts."""

    __slots__ = ("accepted", "dataset", "found", "rejected")

    def __init__(self, dataset: str, found: tuple[Dataset, CompiledSchema] | None) -> None:
        self.dataset = dataset
        self.found = found
        self.accepted = 0
        self.rejected = 0


def route(messages: Iterable[Incoming], lookup: Lookup, now: float, region: str) -> Effects:
    """The effects of a batch of messages from the ingest stream, in order."""
    steps: list[Effect] = []
    targets: dict[str, _Target] = {}  # subject -> its dataset, looked up once per batch
    added = 0
    accepted: list[Record] = []
    pending: dict[str, set[str]] = {}  # rejected in this batch: record id -> identity keys

    def flush() -> None:
        nonlocal accepted
        if accepted:
            steps.append(Forward(accepted))
            accepted = []

    for m in messages:
        if m.subject == subjects.PRIVACY_DELETE:
            flush()
            try:
                request = _delete_decoder.decode(m.data)
            except msgspec.DecodeError as exc:
                steps.append(Ignored(m.subject, str(exc)))
                continue
            # Exactly the records that carry the value (as identity normalises it), never
            # one that merely contains it.
            wanted = identity_keys(request.identity.value, region)
            found = [rid for rid, keys in pending.items() if keys & wanted]
            for rid in found:
                del pending[rid]
            steps.append(Forget(request, sorted(wanted), found))
            continue
        if m.subject == subjects.PROBE:
            flush()
            try:
                steps.append(Pass(probe_decoder.decode(m.data)))
            except msgspec.DecodeError as exc:
                steps.append(Ignored(m.subject, str(exc)))
            continue
        target = targets.get(m.subject)
        if target is None:  # once per subject and batch, not per record
            dataset = subjects.dataset_of(m.subject)
            target = targets[m.subject] = _Target(dataset, lookup(dataset))
        dataset, found_ds = target.dataset, target.found
        result = found_ds[1].validate_json(m.data) if found_ds else unknown_dataset(dataset)
        if isinstance(result, Accepted):
            assert found_ds is not None
            ds, compiled = found_ds
            target.accepted += 1
            if ds.profile_enabled:
                accepted.append(
                    to_record(
                        result,
                        record_id=m.record_id,
                        dataset=dataset,
                        record_class=compiled.record_class,
                        now=now,
                        msg_id=m.msg_id,
                    )
                )
            continue
        target.rejected += 1
        row = rejected(
            record_id=m.record_id,
            dataset=dataset,
            problems=result,
            payload=m.data,
            source="http" if (m.msg_id or "").startswith("http:") else "nats",
            now=now,
        )
        added += row.size
        pending[m.record_id] = set(row.keys)
        steps.append(Reject(row))
    flush()
    counts = {t.dataset: (t.accepted, t.rejected) for t in targets.values()}
    return Effects(steps, counts, added)


Validated = list[tuple[Row, Accepted | list[Problem]]]


def validate_rows(rows: list[Row], compiled: CompiledSchema) -> Validated:
    """Validate a chunk of a batch file's rows (runs in a worker thread)."""
    out: Validated = []
    for row in rows:
        result: Accepted | list[Problem]
        if row.kind == "flat":
            value = row.value
            error = value.get("__error__") if isinstance(value, dict) else None
            if error:
                result = [Problem("malformed row", "", "as many cells as the header", str(error))]
            else:
                result = compiled.validate_row(value)
        elif row.kind == "raw":
            result = compiled.validate_json(row.value)
        else:
            result = compiled.validate_object(row.value)
        out.append((row, result))
    return out


def sort_rows(
    validated: Validated, *, batch_id: str, dataset: str, record_class: str, now: float
) -> tuple[list[Record], list[Rejected]]:
    """A validated chunk of a batch file as records for identity and rows of the error
    store; record ids come from the batch and the row number."""
    records: list[Record] = []
    rows: list[Rejected] = []
    for row, result in validated:
        record_id = f"b{batch_id}-{row.number}"
        if isinstance(result, Accepted):
            records.append(
                to_record(
                    result,
                    record_id=record_id,
                    dataset=dataset,
                    record_class=record_class,
                    now=now,
                    batch_id=batch_id,
                )
            )
        else:
            rows.append(
                rejected(
                    record_id=record_id,
                    dataset=dataset,
                    problems=result,
                    payload=row.original,
                    source="batch",
                    now=now,
                    batch_id=batch_id,
                    row_number=row.number,
                )
            )
    return records, rows

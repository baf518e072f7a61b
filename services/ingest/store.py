"""The ingest service's SQLite state: configuration objects, batches and the error store.

`Store` names every read and write: reads return structs decoded from the rows by column
name; writes are added to a `Tx` (a handler's step, or one the caller applies) so that
they commit with whatever else the caller commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite
import msgspec

from services.ingest.records import Rejected
from shared.admin import BatchInfo, RejectedRecord
from shared.db import Migration, Tx, apply, rows
from shared.runtime.actor import Outgoing, to_outbox

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "ingest",
        1,
        """
        CREATE TABLE config_objects (
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            spec BLOB NOT NULL,
            version INTEGER NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (kind, name)
        );
        CREATE TABLE rejected_records (
            record_id TEXT PRIMARY KEY,
            dataset TEXT NOT NULL,
            batch_id TEXT,
            row_number INTEGER,
            source TEXT NOT NULL,
            reason TEXT NOT NULL,
            path TEXT NOT NULL,
            expected TEXT NOT NULL,
            got TEXT NOT NULL,
            problems BLOB NOT NULL,
            payload BLOB NOT NULL,
            rejected_at REAL NOT NULL
        );
        CREATE INDEX rejected_by_dataset ON rejected_records (dataset, rejected_at);
        CREATE INDEX rejected_by_batch ON rejected_records (batch_id, row_number);
        CREATE TABLE dataset_counts (
            dataset TEXT PRIMARY KEY,
            accepted INTEGER NOT NULL DEFAULT 0,
            rejected INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE batches (
            batch_id TEXT PRIMARY KEY,
            dataset TEXT NOT NULL,
            file_name TEXT NOT NULL,
            format TEXT NOT NULL,
            status TEXT NOT NULL,
            input_rows INTEGER NOT NULL DEFAULT 0,
            accepted INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            threshold REAL NOT NULL,
            error TEXT,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL
        )
        """,
    ),
    Migration(
        "ingest",
        2,
        """
        CREATE TABLE rejected_keys (
            key TEXT NOT NULL,
            record_id TEXT NOT NULL,
            PRIMARY KEY (key, record_id)
        ) WITHOUT ROWID;
        CREATE INDEX rejected_keys_by_record ON rejected_keys (record_id);
        ALTER TABLE rejected_records ADD COLUMN keyed INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE rejected_records ADD COLUMN keys TEXT NOT NULL DEFAULT '[]';
        ALTER TABLE rejected_records ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
        UPDATE rejected_records SET size = length(payload) + length(problems) + 256;
        CREATE INDEX rejected_by_age ON rejected_records (rejected_at);
        CREATE TABLE error_store (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            dropped INTEGER NOT NULL DEFAULT 0
        );
        INSERT INTO error_store (id, dropped) VALUES (1, 0)
        """,
    ),
)

KEY_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS rejected_keys_added AFTER INSERT ON rejected_records BEGIN
    INSERT OR IGNORE INTO rejected_keys (key, record_id)
    SELECT value, NEW.record_id FROM json_each(NEW.keys);
END;
CREATE TRIGGER IF NOT EXISTS rejected_keys_gone AFTER DELETE ON rejected_records BEGIN
    DELETE FROM rejected_keys WHERE record_id = OLD.record_id;
END;
"""
"""A rejected record's identity keys (its `keys`, a JSON list) fill `rejected_keys` as it is
stored and leave with it, whatever deletes it (a privacy delete, retention): one statement
per stored record. Created at start (a migration's statements are split on semicolons)."""

_UPSERT_CONFIG = (
    "INSERT INTO config_objects (kind, name, spec, version, updated_at) VALUES (?, ?, ?, 1, ?) "
    "ON CONFLICT (kind, name) DO UPDATE SET spec = excluded.spec, "
    "version = version + 1, updated_at = excluded.updated_at"
)
_INSERT_REJECTED = (
    "INSERT OR IGNORE INTO rejected_records (record_id, dataset, batch_id, row_number, source, "
    "reason, path, expected, got, problems, payload, rejected_at, keyed, size, keys) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)"
)
_KEYS = "SELECT value FROM json_each(?)"
_SELECT_BY_KEYS = f"SELECT DISTINCT record_id FROM rejected_keys WHERE key IN ({_KEYS})"
_DELETE_BY_KEYS = f"DELETE FROM rejected_records WHERE record_id IN ({_SELECT_BY_KEYS})"
_DELETE_IDS = f"DELETE FROM rejected_records WHERE record_id IN ({_KEYS})"
_INSERT_REJECTED_KEY = "INSERT OR IGNORE INTO rejected_keys (key, record_id) VALUES (?, ?)"
_DOOMED = (
    "WITH doomed(id) AS ("
    "SELECT rowid FROM rejected_records WHERE rejected_at < ?1 "
    "UNION SELECT id FROM (SELECT rowid AS id, sum(size) OVER "
    "(ORDER BY rejected_at DESC, rowid DESC) AS kept FROM rejected_records) "
    "WHERE kept > ?2 AND (SELECT sum(size) FROM rejected_records) > ?3) "
)
"""The rejected records retention drops: older than the cutoff, and, when the store is
past its size limit, the oldest beyond the newest `keep` bytes. Parameters: ?1 the
cutoff time, ?2 the bytes to keep, ?3 the size limit."""
_COUNT_DROPPED = (
    _DOOMED + "UPDATE error_store SET dropped = dropped + (SELECT count(*) FROM doomed) "
    "WHERE id = 1"
)
_DROP_REJECTED = _DOOMED + "DELETE FROM rejected_records WHERE rowid IN doomed"
_BUMP_COUNTS = (
    "INSERT INTO dataset_counts (dataset, accepted, rejected) VALUES (?, ?, ?) "
    "ON CONFLICT (dataset) DO UPDATE SET accepted = accepted + excluded.accepted, "
    "rejected = rejected + excluded.rejected"
)
_INSERT_BATCH = (
    "INSERT INTO batches (batch_id, dataset, file_name, format, status, threshold, created_at) "
    "VALUES (?, ?, ?, ?, 'queued', ?, ?)"
)
_UPDATE_BATCH = (
    "UPDATE batches SET status = ?, input_rows = ?, accepted = ?, failed = ?, error = ?, "
    "started_at = coalesce(started_at, ?), finished_at = ? WHERE batch_id = ?"
)
_BATCH_COLUMNS = (
    "batch_id, dataset, file_name, format, status, input_rows, accepted, failed, threshold, "
    "error, created_at, started_at, finished_at"
)
_REJECTED_COLUMNS = (
    "record_id, dataset, batch_id, row_number, source, reason, path, expected, got, "
    "problems, payload, rejected_at"
)
_FINISHED = ("success", "partial", "failed")
MAX_SHOWN_PAYLOAD = 4096
"""Characters of a rejected record's payload an error listing shows."""

_keys_encoder = msgspec.json.Encoder()
_problems_decoder = msgspec.json.Decoder(list[dict[str, str]])


class ConfigObject(msgspec.Struct, frozen=True):
    """A configuration object as stored: its kind, name, JSON spec and version."""

    kind: str
    name: str
    spec: bytes
    version: int


class ErrorStats(msgspec.Struct, frozen=True):
    size: int
    """Bytes the rejected records count for."""
    dropped: int
    """Rejected records retention dropped, ever."""


class Unkeyed(msgspec.Struct, frozen=True):
    record_id: str
    payload: bytes


class Store:
    """The ingest service's named reads and writes over its SQLite connection."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return await rows(self.db, sql, params)

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any]:
        rows = await self._rows(sql, params)
        return rows[0]

    async def apply(self, tx: Tx) -> None:
        await apply(self.db, tx)

    async def prepare(self) -> None:
        """What a migration cannot create (triggers), and keys for rows stored before."""
        await self.db.executescript(KEY_TRIGGERS)

    # -- configuration -----------------------------------------------------------------
    async def config_objects(self) -> list[ConfigObject]:
        rows = await self._rows("SELECT kind, name, spec, version FROM config_objects")
        return [msgspec.convert(r, ConfigObject) for r in rows]

    def put_config(self, tx: Tx, kind: str, name: str, spec: bytes, now: float) -> None:
        tx.add(_UPSERT_CONFIG, (kind, name, spec, now))

    def add_outbox(self, tx: Tx, out: Iterable[Outgoing], now: float) -> None:
        """Messages to publish once `tx` commits (the runtime's outbox)."""
        to_outbox(tx, out, now)

    # -- the error store -------------------------------------------------------------------
    def add_rejected(self, tx: Tx, rows: Iterable[Rejected]) -> None:
        """Keep rejected records (a record id kept already stays as it is)."""
        tx.add_many(
            _INSERT_REJECTED,
            (
                (
                    r.record_id,
                    r.dataset,
                    r.batch_id,
                    r.row_number,
                    r.source,
                    r.reason,
                    r.path,
                    r.expected,
                    r.got,
                    r.problems,
                    r.payload,
                    r.rejected_at,
                    r.size,
                    _keys_encoder.encode(r.keys),
                )
                for r in rows
            ),
        )

    def count(self, tx: Tx, dataset: str, accepted: int, rejected: int) -> None:
        """Add to a dataset's counts of accepted and rejected records."""
        tx.add(_BUMP_COUNTS, (dataset, accepted, rejected))

    async def rejected_ids_by_keys(self, keys: list[str]) -> set[str]:
        """The rejected records found by any of `keys` (exactly, never by a substring)."""
        rows = await self._rows(_SELECT_BY_KEYS, (_keys_encoder.encode(keys),))
        return {str(r["record_id"]) for r in rows}

    def delete_by_keys(self, tx: Tx, keys: list[str]) -> None:
        """Delete every rejected record found by any of `keys` when `tx` runs (those added
        to `tx` before included)."""
        tx.add(_DELETE_BY_KEYS, (_keys_encoder.encode(keys),))

    def delete_rejected(self, tx: Tx, record_ids: Iterable[str]) -> None:
        """Delete these rejected records when `tx` runs."""
        tx.add(_DELETE_IDS, (_keys_encoder.encode(sorted(record_ids)),))

    def drop_old(self, tx: Tx, cutoff: float, keep: float, limit: int) -> None:
        """Retention: drop the records older than `cutoff` and, past `limit` bytes, the
        oldest beyond the newest `keep` bytes; count them as dropped."""
        for sql in (_COUNT_DROPPED, _DROP_REJECTED):
            tx.add(sql, (cutoff, keep, limit))

    async def error_stats(self) -> ErrorStats:
        row = await self._one(
            "SELECT (SELECT coalesce(sum(size), 0) FROM rejected_records) AS size, "
            "(SELECT dropped FROM error_store WHERE id = 1) AS dropped"
        )
        return msgspec.convert(row, ErrorStats)

    async def unkeyed(self, limit: int) -> list[Unkeyed]:
        """Rejected records stored before they were keyed."""
        rows = await self._rows(
            "SELECT record_id, payload FROM rejected_records WHERE keyed = 0 LIMIT ?", (limit,)
        )
        return [msgspec.convert(r, Unkeyed) for r in rows]

    def add_keys(self, tx: Tx, keys: dict[str, list[str]]) -> None:
        """Give rejected records (by record id) their identity keys."""
        tx.add_many(_INSERT_REJECTED_KEY, ((k, rid) for rid, ks in keys.items() for k in ks))
        tx.add_many(
            "UPDATE rejected_records SET keyed = 1 WHERE record_id = ?", ((r,) for r in keys)
        )

    async def errors(self, column: str, target: str, limit: int) -> list[RejectedRecord]:
        """The rejected records of a dataset or a batch (`column`), oldest first."""
        where = _target_column(column)
        rows = await self._rows(
            f"SELECT {_REJECTED_COLUMNS} FROM rejected_records WHERE {where} = ? "
            "ORDER BY rejected_at, row_number, record_id LIMIT ?",
            (target, limit),
        )
        for r in rows:
            r["problems"] = _problems_decoder.decode(r["problems"])
            r["payload"] = bytes(r["payload"]).decode("utf-8", "replace")[:MAX_SHOWN_PAYLOAD]
        return [msgspec.convert(r, RejectedRecord) for r in rows]

    async def count_errors(self, column: str, target: str) -> int:
        where = _target_column(column)
        row = await self._one(
            f"SELECT count(*) AS n FROM rejected_records WHERE {where} = ?", (target,)
        )
        return int(row["n"])

    async def dropped(self) -> int:
        rows = await self._rows("SELECT dropped FROM error_store WHERE id = 1")
        return int(rows[0]["dropped"]) if rows else 0

    # -- batches ---------------------------------------------------------------------------
    async def is_batch(self, batch_id: str) -> bool:
        return bool(await self._rows("SELECT 1 FROM batches WHERE batch_id = ?", (batch_id,)))

    async def batches(self, limit: int) -> list[BatchInfo]:
        """The latest batches, newest first."""
        rows = await self._rows(
            f"SELECT {_BATCH_COLUMNS} FROM batches ORDER BY created_at DESC LIMIT ?", (limit,)
        )
        return [_batch(r) for r in rows]

    async def unfinished_batches(self) -> list[BatchInfo]:
        """Batches a previous run did not finish, oldest first."""
        rows = await self._rows(
            f"SELECT {_BATCH_COLUMNS} FROM batches WHERE status IN ('queued', 'validating', "
            "'ingesting') ORDER BY created_at"
        )
        return [_batch(r) for r in rows]

    async def add_batch(self, info: BatchInfo) -> None:
        """Register a queued batch; raises if its id is taken."""
        tx = Tx()
        tx.add(
            _INSERT_BATCH,
            (
                info.batch_id,
                info.dataset,
                info.file_name,
                info.format,
                info.threshold,
                info.created_at,
            ),
        )
        await apply(self.db, tx)

    def save_batch(self, tx: Tx, info: BatchInfo) -> None:
        tx.add(
            _UPDATE_BATCH,
            (
                info.status,
                info.input_rows,
                info.accepted,
                info.failed,
                info.error,
                info.started_at,
                info.finished_at,
                info.batch_id,
            ),
        )


def _target_column(column: str) -> str:
    if column not in ("dataset", "batch_id"):
        raise ValueError(f"rejected records are listed by dataset or batch_id, not {column!r}")
    return column


def _batch(row: dict[str, Any]) -> BatchInfo:
    info = msgspec.convert(row, BatchInfo)
    info.progress = 1.0 if info.status in _FINISHED else 0.0
    return info

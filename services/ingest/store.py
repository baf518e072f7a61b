"""The ingest service's SQLite state: configuration, batches, and the error store."""

from __future__ import annotations

from shared.db import Migration

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

UPSERT_CONFIG = (
    "INSERT INTO config_objects (kind, name, spec, version, updated_at) VALUES (?, ?, ?, 1, ?) "
    "ON CONFLICT (kind, name) DO UPDATE SET spec = excluded.spec, "
    "version = version + 1, updated_at = excluded.updated_at"
)
INSERT_REJECTED = (
    "INSERT OR IGNORE INTO rejected_records (record_id, dataset, batch_id, row_number, source, "
    "reason, path, expected, got, problems, payload, rejected_at, keyed, size, keys) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)"
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
DELETE_BY_KEYS = (
    "DELETE FROM rejected_records WHERE record_id IN (SELECT record_id FROM rejected_keys "
    "WHERE key IN (SELECT value FROM json_each(?)))"
)
INSERT_REJECTED_KEY = "INSERT OR IGNORE INTO rejected_keys (key, record_id) VALUES (?, ?)"
ROW_OVERHEAD = 256
"""Bytes a rejected record counts for beyond its payload and problems (its other columns,
its keys, the indexes), in the error store's size limit."""
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
COUNT_DROPPED = (
    _DOOMED + "UPDATE error_store SET dropped = dropped + (SELECT count(*) FROM doomed) "
    "WHERE id = 1"
)
DROP_REJECTED = _DOOMED + "DELETE FROM rejected_records WHERE rowid IN doomed"
RETENTION = (COUNT_DROPPED, DROP_REJECTED)
"""Retention, set-based, in this order, each with the same parameters."""
BUMP_COUNTS = (
    "INSERT INTO dataset_counts (dataset, accepted, rejected) VALUES (?, ?, ?) "
    "ON CONFLICT (dataset) DO UPDATE SET accepted = accepted + excluded.accepted, "
    "rejected = rejected + excluded.rejected"
)
INSERT_BATCH = (
    "INSERT INTO batches (batch_id, dataset, file_name, format, status, threshold, created_at) "
    "VALUES (?, ?, ?, ?, 'queued', ?, ?)"
)
UPDATE_BATCH = (
    "UPDATE batches SET status = ?, input_rows = ?, accepted = ?, failed = ?, error = ?, "
    "started_at = coalesce(started_at, ?), finished_at = ? WHERE batch_id = ?"
)
BATCH_COLUMNS = (
    "batch_id, dataset, file_name, format, status, input_rows, accepted, failed, threshold, "
    "error, created_at, started_at, finished_at"
)

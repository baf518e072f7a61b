"""The ingest service's SQLite state: the error store for rejected records."""

from __future__ import annotations

from shared.db import Migration

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "ingest",
        1,
        """
        CREATE TABLE rejected_records (
            record_id TEXT PRIMARY KEY,
            dataset TEXT NOT NULL,
            batch_id TEXT,
            reason TEXT NOT NULL,
            path TEXT,
            expected TEXT,
            got TEXT,
            payload BLOB NOT NULL,
            rejected_at REAL NOT NULL
        );
        CREATE INDEX rejected_by_dataset ON rejected_records (dataset, rejected_at);
        CREATE TABLE dataset_counts (
            dataset TEXT PRIMARY KEY,
            accepted INTEGER NOT NULL DEFAULT 0,
            rejected INTEGER NOT NULL DEFAULT 0
        )
        """,
    ),
)

INSERT_REJECTED = (
    "INSERT OR IGNORE INTO rejected_records "
    "(record_id, dataset, batch_id, reason, path, expected, got, payload, rejected_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
BUMP_COUNTS = (
    "INSERT INTO dataset_counts (dataset, accepted, rejected) VALUES (?, ?, ?) "
    "ON CONFLICT (dataset) DO UPDATE SET accepted = accepted + excluded.accepted, "
    "rejected = rejected + excluded.rejected"
)

"""The profile service's SQLite state: profile fragments, one row per record."""

from __future__ import annotations

from shared.db import Migration

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "profile",
        1,
        """
        CREATE TABLE fragments (
            record_id TEXT PRIMARY KEY,
            profile_id TEXT NOT NULL,
            dataset TEXT NOT NULL,
            ingested_at REAL NOT NULL,
            payload BLOB NOT NULL
        );
        CREATE INDEX fragments_by_profile ON fragments (profile_id, ingested_at)
        """,
    ),
)

INSERT_FRAGMENT = (
    "INSERT OR IGNORE INTO fragments (record_id, profile_id, dataset, ingested_at, payload) "
    "VALUES (?, ?, ?, ?, ?)"
)

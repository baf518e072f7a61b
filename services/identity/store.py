"""The identity service's SQLite state: which profile each identity belongs to."""

from __future__ import annotations

from shared.db import Migration

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "identity",
        1,
        """
        CREATE TABLE identities (
            namespace TEXT NOT NULL,
            value TEXT NOT NULL,
            profile_id TEXT NOT NULL,
            first_seen REAL NOT NULL,
            PRIMARY KEY (namespace, value)
        );
        CREATE INDEX identities_by_profile ON identities (profile_id)
        """,
    ),
)

UPSERT_IDENTITY = (
    "INSERT OR IGNORE INTO identities (namespace, value, profile_id, first_seen) "
    "VALUES (?, ?, ?, ?)"
)

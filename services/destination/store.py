"""The destination service's SQLite state: membership changes received, per segment."""

from __future__ import annotations

from shared.db import Migration

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "destination",
        1,
        """
        CREATE TABLE memberships_seen (
            segment TEXT NOT NULL,
            profile_id TEXT NOT NULL,
            status TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (segment, profile_id)
        )
        """,
    ),
)

UPSERT_MEMBERSHIP = (
    "INSERT INTO memberships_seen (segment, profile_id, status, at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (segment, profile_id) DO UPDATE SET status = excluded.status, at = excluded.at"
)

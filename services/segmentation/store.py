"""The segmentation service's SQLite state: the profiles it has seen change."""

from __future__ import annotations

from shared.db import Migration

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "segmentation",
        1,
        """
        CREATE TABLE profile_state (
            profile_id TEXT PRIMARY KEY,
            changes INTEGER NOT NULL,
            last_change_at REAL NOT NULL
        )
        """,
    ),
)

BUMP_PROFILE = (
    "INSERT INTO profile_state (profile_id, changes, last_change_at) VALUES (?, ?, ?) "
    "ON CONFLICT (profile_id) DO UPDATE SET changes = changes + excluded.changes, "
    "last_change_at = excluded.last_change_at"
)

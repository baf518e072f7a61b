"""The scheduler's SQLite state: job events it has seen."""

from __future__ import annotations

from shared.db import Migration

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "scheduler",
        1,
        """
        CREATE TABLE job_events (
            seq INTEGER PRIMARY KEY,
            subject TEXT NOT NULL,
            payload BLOB NOT NULL
        )
        """,
    ),
)

INSERT_JOB_EVENT = "INSERT OR IGNORE INTO job_events (seq, subject, payload) VALUES (?, ?, ?)"

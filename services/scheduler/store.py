"""The scheduler's SQLite state: job events it has seen, and the runs of each schedule."""

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
        );
        CREATE TABLE schedule_runs (
            schedule TEXT NOT NULL,
            due REAL NOT NULL,
            started_at REAL NOT NULL,
            job_id TEXT,
            status TEXT NOT NULL,
            detail TEXT,
            PRIMARY KEY (schedule, due)
        );
        CREATE TABLE schedules (
            name TEXT PRIMARY KEY,
            spec BLOB NOT NULL
        )
        """,
    ),
)

INSERT_JOB_EVENT = "INSERT OR IGNORE INTO job_events (seq, subject, payload) VALUES (?, ?, ?)"
INSERT_RUN = (
    "INSERT OR REPLACE INTO schedule_runs (schedule, due, started_at, job_id, status, detail) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)

"""The destination service's SQLite state: destinations, the profile view it activates
(identities, attributes), memberships, the delivery queue (an outbox that survives
restarts), the dead-letter store, and per-destination counters."""

from __future__ import annotations

from shared.db import Migration

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "destination",
        1,
        """
        CREATE TABLE destinations (
            name TEXT PRIMARY KEY,
            spec BLOB NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE connections (
            destination TEXT NOT NULL,
            segment TEXT NOT NULL,
            connected_at REAL NOT NULL,
            remote_id TEXT,
            existing_pending INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (destination, segment)
        );
        CREATE TABLE profiles (
            profile_id TEXT PRIMARY KEY,
            attributes BLOB NOT NULL,
            identities BLOB NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE memberships (
            segment TEXT NOT NULL,
            profile_id TEXT NOT NULL,
            status TEXT NOT NULL,
            at REAL NOT NULL,
            method TEXT NOT NULL,
            PRIMARY KEY (segment, profile_id)
        );
        CREATE INDEX memberships_by_profile ON memberships (profile_id);
        CREATE TABLE queue (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            destination TEXT NOT NULL,
            segment TEXT NOT NULL,
            profile_id TEXT NOT NULL,
            payload BLOB NOT NULL,
            enqueued_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt REAL NOT NULL,
            last_error TEXT
        );
        CREATE INDEX queue_by_destination ON queue (destination, next_attempt, id);
        CREATE TABLE dlq (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            destination TEXT NOT NULL,
            segment TEXT NOT NULL,
            profile_id TEXT NOT NULL,
            payload BLOB NOT NULL,
            attempts INTEGER NOT NULL,
            error TEXT NOT NULL,
            failed_at REAL NOT NULL
        );
        CREATE TABLE stats (
            destination TEXT PRIMARY KEY,
            delivered INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            skipped INTEGER NOT NULL DEFAULT 0,
            last_delivery REAL,
            last_error TEXT
        )
        """,
    ),
    Migration(
        "destination",
        2,
        """
        CREATE TABLE export_state (
            destination TEXT NOT NULL,
            segment TEXT NOT NULL,
            profile_id TEXT NOT NULL,
            status TEXT NOT NULL,
            PRIMARY KEY (destination, segment, profile_id)
        );
        CREATE TABLE export_jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            destination TEXT NOT NULL,
            trigger TEXT NOT NULL,
            status TEXT NOT NULL,
            started_at REAL NOT NULL,
            finished_at REAL NOT NULL,
            rows INTEGER NOT NULL,
            result BLOB NOT NULL
        )
        """,
    ),
)

UPSERT_MEMBERSHIP = (
    "INSERT INTO memberships (segment, profile_id, status, at, method) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (segment, profile_id) DO UPDATE SET status = excluded.status, "
    "at = excluded.at, method = excluded.method WHERE excluded.at >= memberships.at"
)
UPSERT_PROFILE = (
    "INSERT INTO profiles (profile_id, attributes, identities, updated_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (profile_id) DO UPDATE SET attributes = excluded.attributes, "
    "identities = excluded.identities, updated_at = excluded.updated_at"
)
ENQUEUE = (
    "INSERT INTO queue (destination, segment, profile_id, payload, enqueued_at, next_attempt) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
BUMP_STATS = (
    "INSERT INTO stats (destination, delivered, failed, skipped, last_delivery, last_error) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (destination) DO UPDATE SET "
    "delivered = delivered + excluded.delivered, failed = failed + excluded.failed, "
    "skipped = skipped + excluded.skipped, "
    "last_delivery = coalesce(excluded.last_delivery, last_delivery), "
    "last_error = coalesce(excluded.last_error, last_error)"
)

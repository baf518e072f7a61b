"""The segmentation service's SQLite state: segment definitions, the profile view it
evaluates (attributes, identities, events), memberships, timers for time-based exits,
and job records."""

from __future__ import annotations

from shared.db import Migration

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "segmentation",
        1,
        """
        CREATE TABLE segments (
            name TEXT PRIMARY KEY,
            spec BLOB NOT NULL,
            ast BLOB NOT NULL,
            method TEXT NOT NULL,
            reason TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE facts (
            profile_id TEXT PRIMARY KEY,
            attributes BLOB NOT NULL,
            identities BLOB NOT NULL,
            updated_at REAL NOT NULL,
            views BLOB
        );
        CREATE TABLE events (
            record_id TEXT PRIMARY KEY,
            profile_id TEXT NOT NULL,
            dataset TEXT NOT NULL,
            event_type TEXT,
            ts REAL NOT NULL,
            payload BLOB NOT NULL
        );
        CREATE INDEX events_by_profile ON events (profile_id, ts);
        CREATE TABLE memberships (
            profile_id TEXT NOT NULL,
            segment TEXT NOT NULL,
            status TEXT NOT NULL,
            since REAL NOT NULL,
            last_qualified REAL,
            method TEXT NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (profile_id, segment)
        );
        CREATE INDEX memberships_by_segment ON memberships (segment, status);
        CREATE TABLE timers (
            profile_id TEXT NOT NULL,
            segment TEXT NOT NULL,
            due REAL NOT NULL,
            PRIMARY KEY (profile_id, segment)
        );
        CREATE INDEX timers_by_due ON timers (due);
        CREATE TABLE jobs (
            job_id TEXT PRIMARY KEY,
            trigger TEXT NOT NULL,
            status TEXT NOT NULL,
            started_at REAL NOT NULL,
            finished_at REAL,
            total INTEGER NOT NULL,
            scanned INTEGER NOT NULL DEFAULT 0,
            counts BLOB NOT NULL,
            error TEXT
        )
        """,
    ),
    Migration(
        "segmentation",
        2,
        """
        CREATE TABLE events_v2 (
            record_id TEXT NOT NULL,
            profile_id TEXT NOT NULL,
            dataset TEXT NOT NULL,
            event_type TEXT,
            ts REAL NOT NULL,
            payload BLOB NOT NULL,
            PRIMARY KEY (profile_id, record_id)
        );
        INSERT INTO events_v2 (record_id, profile_id, dataset, event_type, ts, payload)
            SELECT record_id, profile_id, dataset, event_type, ts, payload FROM events;
        DROP TABLE events;
        ALTER TABLE events_v2 RENAME TO events;
        CREATE INDEX events_by_profile ON events (profile_id, ts)
        """,
    ),
)
"""Version 2: an event row per (profile, event), so that the two halves of a move (left
one profile, arrived on another) apply in either order."""

UPSERT_FACTS = (
    "INSERT INTO facts (profile_id, attributes, identities, updated_at, views) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (profile_id) DO UPDATE SET "
    "attributes = excluded.attributes, identities = excluded.identities, "
    "updated_at = excluded.updated_at, views = excluded.views"
)
INSERT_EVENT = (
    "INSERT INTO events (record_id, profile_id, dataset, event_type, ts, payload) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (profile_id, record_id) DO NOTHING"
)
"""An event arrives on a profile (new, or moved to it with its anchor identity)."""
REMOVE_EVENT = "DELETE FROM events WHERE record_id = ? AND profile_id = ?"
"""An event left a profile. Each profile's copy is its own row, so an arrival and a
departure of one event on two profiles apply in either order."""
MOVE_EVENTS = "UPDATE OR REPLACE events SET profile_id = ? WHERE profile_id = ?"
"""A merge: the folded profile's events are the survivor's (a copy it has already is kept once)."""
UPSERT_MEMBERSHIP = (
    "INSERT INTO memberships (profile_id, segment, status, since, last_qualified, method, "
    "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (profile_id, segment) DO UPDATE SET "
    "status = excluded.status, since = excluded.since, last_qualified = excluded.last_qualified, "
    "method = excluded.method, updated_at = excluded.updated_at"
)
UPSERT_TIMER = (
    "INSERT INTO timers (profile_id, segment, due) VALUES (?, ?, ?) "
    "ON CONFLICT (profile_id, segment) DO UPDATE SET due = excluded.due"
)
DELETE_TIMER = "DELETE FROM timers WHERE profile_id = ? AND segment = ?"
UPSERT_SEGMENT = (
    "INSERT INTO segments (name, spec, ast, method, reason, created_at, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, "
    "ast = excluded.ast, method = excluded.method, reason = excluded.reason, "
    "updated_at = excluded.updated_at"
)
CAP_EVENTS = (
    "DELETE FROM events WHERE rowid IN (SELECT rowid FROM events WHERE profile_id = ? "
    "ORDER BY ts DESC, record_id DESC LIMIT -1 OFFSET ?)"
)

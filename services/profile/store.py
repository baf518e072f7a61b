"""The profile service's SQLite state: attributes per dataset, events, identities,
profiles, merge policies and the dataset and namespace configuration it follows."""

from __future__ import annotations

from shared.db import Migration

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "profile",
        1,
        """
        CREATE TABLE profiles (
            profile_id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            folded_into TEXT
        );
        CREATE TABLE attributes (
            profile_id TEXT NOT NULL,
            dataset TEXT NOT NULL,
            path TEXT NOT NULL,
            value BLOB NOT NULL,
            ts REAL NOT NULL,
            record_id TEXT NOT NULL,
            PRIMARY KEY (profile_id, dataset, path)
        );
        CREATE TABLE events (
            record_id TEXT PRIMARY KEY,
            profile_id TEXT NOT NULL,
            dataset TEXT NOT NULL,
            event_type TEXT,
            ts REAL NOT NULL,
            identity_keys TEXT NOT NULL,
            payload BLOB NOT NULL
        );
        CREATE INDEX events_by_profile ON events (profile_id, ts);
        CREATE INDEX events_by_dataset ON events (dataset, ts);
        CREATE TABLE identities (
            namespace TEXT NOT NULL,
            value TEXT NOT NULL,
            profile_id TEXT NOT NULL,
            PRIMARY KEY (namespace, value)
        );
        CREATE INDEX identities_by_profile ON identities (profile_id);
        CREATE TABLE memberships (
            profile_id TEXT NOT NULL,
            segment TEXT NOT NULL,
            status TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (profile_id, segment)
        );
        CREATE TABLE datasets (
            name TEXT PRIMARY KEY,
            spec BLOB NOT NULL
        );
        CREATE TABLE schemas (
            name TEXT PRIMARY KEY,
            spec BLOB NOT NULL
        );
        CREATE TABLE merge_policies (
            name TEXT PRIMARY KEY,
            spec BLOB NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
    ),
    Migration(
        "profile",
        2,
        """
        ALTER TABLE events ADD COLUMN anchor TEXT;
        CREATE INDEX events_by_anchor ON events (anchor) WHERE anchor IS NOT NULL;
        CREATE TABLE carried (
            key TEXT NOT NULL,
            record_id TEXT NOT NULL,
            profile_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            PRIMARY KEY (key, record_id)
        )
        """,
    ),
    Migration(
        "profile",
        3,
        """
        CREATE TABLE namespaces (
            symbol TEXT PRIMARY KEY,
            spec BLOB NOT NULL
        )
        """,
    ),
    Migration(
        "profile",
        4,
        """
        CREATE INDEX profiles_folded ON profiles (folded_into) WHERE folded_into IS NOT NULL
        """,
    ),
)
"""Version 2: an event's anchor (the identity it follows), and `carried`: the records that
carry a person identity they are not anchored on (a privacy delete of that person reaches
them). Events stored before version 2 have no anchor and stay where they are. Version 3:
the identity namespaces the profile service follows (lookups normalise as identity does)."""

UPSERT_PROFILE = (
    "INSERT INTO profiles (profile_id, created_at, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (profile_id) DO UPDATE SET updated_at = excluded.updated_at"
)
FOLD_PROFILE = "UPDATE profiles SET folded_into = ? WHERE profile_id = ?"
FOLLOW_FOLDS = (
    "WITH RECURSIVE chain(id, survivor) AS (SELECT profile_id, folded_into FROM profiles "
    "WHERE profile_id IN (SELECT value FROM json_each(?)) UNION "
    "SELECT p.profile_id, p.folded_into FROM profiles p JOIN chain c ON p.profile_id = c.survivor) "
    "SELECT id, survivor FROM chain"
)
"""Each of these profiles and the ones they were folded into, to the live survivor: id and
folded_into (None for a live one)."""
UPSERT_ATTRIBUTE = (
    "INSERT INTO attributes (profile_id, dataset, path, value, ts, record_id) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (profile_id, dataset, path) DO UPDATE SET "
    "value = excluded.value, ts = excluded.ts, record_id = excluded.record_id"
)
DELETE_ATTRIBUTES = "DELETE FROM attributes WHERE profile_id = ?"
DELETE_ATTRIBUTE = "DELETE FROM attributes WHERE profile_id = ? AND dataset = ? AND path = ?"
INSERT_EVENT = (
    "INSERT OR IGNORE INTO events (record_id, profile_id, dataset, event_type, ts, "
    "identity_keys, payload, anchor) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
DELETE_EVENT = "DELETE FROM events WHERE record_id = ?"
MOVE_EVENTS = "UPDATE events SET profile_id = ? WHERE profile_id = ?"
MOVE_EVENTS_BY_ANCHOR = "UPDATE events SET profile_id = ? WHERE anchor = ?"
PIN_EVENTS = "UPDATE events SET anchor = NULL WHERE anchor = ?"
INSERT_CARRIED = (
    "INSERT OR IGNORE INTO carried (key, record_id, profile_id, kind) VALUES (?, ?, ?, ?)"
)
DELETE_CARRIED = "DELETE FROM carried WHERE key = ?"
CARRY_PINNED = (
    "INSERT OR IGNORE INTO carried (key, record_id, profile_id, kind) "
    "SELECT ?, record_id, profile_id, 'event' FROM events WHERE anchor = ?"
)
"""Events whose anchor the size limit drops stay where they are, indexed by it: a delete of
that identity still reaches them."""
_GONE = (
    "WITH RECURSIVE gone(id) AS (SELECT value FROM json_each(?) UNION "
    "SELECT p.profile_id FROM profiles p JOIN gone ON p.folded_into = gone.id) "
    "SELECT id FROM gone"
)
DELETE_PROFILES_CARRIED = f"DELETE FROM carried WHERE profile_id IN ({_GONE})"
"""The index rows of deleted profiles and of every profile folded into them."""
DELETE_PROFILES = f"DELETE FROM profiles WHERE profile_id IN ({_GONE})"
"""Deleted profiles and every profile folded into them (chains included)."""
DELETE_MEMBERSHIPS = "DELETE FROM memberships WHERE profile_id = ?"
UPSERT_IDENTITY = (
    "INSERT INTO identities (namespace, value, profile_id) VALUES (?, ?, ?) "
    "ON CONFLICT (namespace, value) DO UPDATE SET profile_id = excluded.profile_id"
)
DELETE_IDENTITY = "DELETE FROM identities WHERE namespace = ? AND value = ?"
CAP_EVENTS = (
    "DELETE FROM events WHERE record_id IN (SELECT record_id FROM events WHERE profile_id = ? "
    "ORDER BY ts DESC, record_id DESC LIMIT -1 OFFSET ?)"
)
UPSERT_MEMBERSHIP = (
    "INSERT INTO memberships (profile_id, segment, status, at) SELECT ?1, ?2, ?3, ?4 "
    "WHERE EXISTS (SELECT 1 FROM profiles WHERE profile_id = ?1 AND folded_into IS NULL) "
    "ON CONFLICT (profile_id, segment) DO UPDATE SET status = excluded.status, "
    "at = excluded.at WHERE excluded.at >= memberships.at"
)
"""A membership change written back onto a live profile; a change of a profile folded or
deleted meanwhile (by the other consumer, between this batch's read and its commit) is
no one's and is dropped in the same statement."""
UPSERT_DATASET = (
    "INSERT INTO datasets (name, spec) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
    "spec = excluded.spec"
)
UPSERT_SCHEMA = (
    "INSERT INTO schemas (name, spec) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
    "spec = excluded.spec"
)
UPSERT_POLICY = (
    "INSERT INTO merge_policies (name, spec, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at"
)
UPSERT_NAMESPACE = (
    "INSERT INTO namespaces (symbol, spec) VALUES (?, ?) ON CONFLICT (symbol) DO UPDATE SET "
    "spec = excluded.spec"
)

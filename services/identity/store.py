"""The identity service's SQLite state: the identity graph, profiles, refused links."""

from __future__ import annotations

from shared.db import Migration

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "identity",
        1,
        """
        CREATE TABLE nodes (
            key TEXT PRIMARY KEY,
            namespace TEXT NOT NULL,
            value TEXT NOT NULL,
            profile_id TEXT NOT NULL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL
        );
        CREATE INDEX nodes_by_profile ON nodes (profile_id);
        CREATE TABLE edges (
            a TEXT NOT NULL,
            b TEXT NOT NULL,
            created_at REAL NOT NULL,
            dataset TEXT NOT NULL,
            record_id TEXT NOT NULL,
            PRIMARY KEY (a, b)
        );
        CREATE INDEX edges_by_b ON edges (b);
        CREATE TABLE profiles (
            profile_id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            folded_into TEXT
        );
        CREATE TABLE refused_links (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            record_id TEXT NOT NULL,
            dataset TEXT NOT NULL,
            a TEXT NOT NULL,
            b TEXT NOT NULL,
            reason TEXT NOT NULL
        );
        CREATE INDEX refused_by_a ON refused_links (a);
        CREATE INDEX refused_by_b ON refused_links (b);
        CREATE TABLE namespaces (
            symbol TEXT PRIMARY KEY,
            spec BLOB NOT NULL
        )
        """,
    ),
    Migration(
        "identity",
        2,
        """
        CREATE INDEX profiles_folded ON profiles (folded_into) WHERE folded_into IS NOT NULL
        """,
    ),
)

UPSERT_NODE = (
    "INSERT INTO nodes (key, namespace, value, profile_id, first_seen, last_seen) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET profile_id = excluded.profile_id, "
    "first_seen = excluded.first_seen, last_seen = excluded.last_seen"
)
DELETE_NODE = "DELETE FROM nodes WHERE key = ?"
INSERT_EDGE = (
    "INSERT OR REPLACE INTO edges (a, b, created_at, dataset, record_id) VALUES (?, ?, ?, ?, ?)"
)
DELETE_EDGE = "DELETE FROM edges WHERE a = ? AND b = ?"
INSERT_PROFILE = "INSERT OR IGNORE INTO profiles (profile_id, created_at) VALUES (?, ?)"
FOLD_PROFILE = "UPDATE profiles SET folded_into = ? WHERE profile_id = ?"
DELETE_PROFILE = (
    "DELETE FROM profiles WHERE profile_id IN (WITH RECURSIVE gone(id) AS (SELECT ? UNION "
    "SELECT p.profile_id FROM profiles p JOIN gone ON p.folded_into = gone.id) "
    "SELECT id FROM gone)"
)
"""A deleted profile, and every profile folded into it (chains included)."""
INSERT_REFUSED = (
    "INSERT INTO refused_links (at, record_id, dataset, a, b, reason) VALUES (?, ?, ?, ?, ?, ?)"
)
UPSERT_NAMESPACE = (
    "INSERT INTO namespaces (symbol, spec) VALUES (?, ?) "
    "ON CONFLICT (symbol) DO UPDATE SET spec = excluded.spec"
)

NODE_COLUMNS = "key, namespace, value, profile_id, first_seen, last_seen"
EDGE_COLUMNS = "a, b, created_at, dataset, record_id"

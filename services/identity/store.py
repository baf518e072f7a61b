"""The identity service's SQLite state: the identity graph, profiles, refused links and
the namespaces it links by; its named reads and writes (`IdentityStore`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite
import msgspec

from services.identity.graph import Edge, Effects, Forgotten, Node, RefusedLink, WorkingSet
from shared.db import Migration, Tx, rows
from shared.resources import Namespace

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


_UPSERT_NODE = (
    "INSERT INTO nodes (key, namespace, value, profile_id, first_seen, last_seen) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET profile_id = excluded.profile_id, "
    "first_seen = excluded.first_seen, last_seen = excluded.last_seen"
)
_DELETE_NODE = "DELETE FROM nodes WHERE key = ?"
_INSERT_EDGE = (
    "INSERT OR REPLACE INTO edges (a, b, created_at, dataset, record_id) VALUES (?, ?, ?, ?, ?)"
)
_DELETE_EDGE = "DELETE FROM edges WHERE a = ? AND b = ?"
_INSERT_PROFILE = "INSERT OR IGNORE INTO profiles (profile_id, created_at) VALUES (?, ?)"
_FOLD_PROFILE = "UPDATE profiles SET folded_into = ? WHERE profile_id = ?"
_DELETE_PROFILE = (
    "DELETE FROM profiles WHERE profile_id IN (WITH RECURSIVE gone(id) AS (SELECT ? UNION "
    "SELECT p.profile_id FROM profiles p JOIN gone ON p.folded_into = gone.id) "
    "SELECT id FROM gone)"
)
"""A deleted profile, and every profile folded into it (chains included)."""
_INSERT_REFUSED = (
    "INSERT INTO refused_links (at, record_id, dataset, a, b, reason) VALUES (?, ?, ?, ?, ?, ?)"
)
_DELETE_REFUSED = (
    "DELETE FROM refused_links WHERE a IN (SELECT value FROM json_each(?)) "
    "OR b IN (SELECT value FROM json_each(?))"
)
_UPSERT_NAMESPACE = (
    "INSERT INTO namespaces (symbol, spec) VALUES (?, ?) "
    "ON CONFLICT (symbol) DO UPDATE SET spec = excluded.spec"
)

LISTINGS: dict[str, str] = {
    "nodes": "SELECT rowid, key, profile_id FROM nodes WHERE rowid > ? ORDER BY rowid LIMIT ?",
}
"""Named listings of the graph for `cdp check`."""

_keys = msgspec.json.Encoder()
_namespace = msgspec.json.Decoder(Namespace)


def _json_list(values: Iterable[str]) -> bytes:
    return _keys.encode(list(values))


class IdentityStore:
    """Reads return structs decoded by column name; writes are added to a step's `Tx`."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return await rows(self.db, sql, params)

    # -- reads --
    async def namespaces(self) -> list[Namespace]:
        """The namespaces configured so far (the built-in ones are not stored)."""
        rows = await self._rows("SELECT spec FROM namespaces")
        return [_namespace.decode(r["spec"]) for r in rows]

    async def has_offset(self, consumer: str) -> bool:
        """Whether `consumer` applied anything yet (a new or lost identity.db has not)."""
        rows = await self._rows("SELECT 1 AS found FROM rt_offsets WHERE consumer = ?", (consumer,))
        return bool(rows)

    async def load(self, keys: Iterable[str]) -> WorkingSet:
        """The graphs of every profile that holds one of `keys`: nodes, edges, profiles."""
        ws = WorkingSet()
        keys = list(keys)
        if not keys:
            return ws
        rows = await self._rows(
            "SELECT DISTINCT profile_id FROM nodes WHERE key IN (SELECT value FROM json_each(?))",
            (_json_list(keys),),
        )
        if not rows:
            return ws
        pids = _json_list(str(r["profile_id"]) for r in rows)
        for r in await self._rows(
            "SELECT key, namespace, value, profile_id, first_seen, last_seen FROM nodes "
            "WHERE profile_id IN (SELECT value FROM json_each(?))",
            (pids,),
        ):
            ws.nodes[r["key"]] = Node(**r)
        members = _json_list(ws.nodes)
        for r in await self._rows(
            "SELECT a, b, created_at, dataset, record_id FROM edges "
            "WHERE a IN (SELECT value FROM json_each(?)) OR b IN (SELECT value FROM json_each(?))",
            (members, members),
        ):
            ws.edges[(r["a"], r["b"])] = Edge(**r)
        for r in await self._rows(
            "SELECT profile_id, created_at FROM profiles "
            "WHERE profile_id IN (SELECT value FROM json_each(?))",
            (pids,),
        ):
            ws.profiles[str(r["profile_id"])] = float(r["created_at"])
        return ws

    async def refused(self, keys: Iterable[str], limit: int = 100) -> list[RefusedLink]:
        """The latest links refused to or from one of `keys`, newest first."""
        members = _json_list(keys)
        rows = await self._rows(
            "SELECT at, record_id, dataset, a, b, reason FROM refused_links "
            "WHERE a IN (SELECT value FROM json_each(?)) OR b IN (SELECT value FROM json_each(?)) "
            "ORDER BY at DESC LIMIT ?",
            (members, members, limit),
        )
        return [RefusedLink(**r) for r in rows]

    # -- writes --
    @staticmethod
    def save_namespace(tx: Tx, symbol: str, spec: bytes) -> None:
        tx.add(_UPSERT_NAMESPACE, (symbol, spec))

    @staticmethod
    def forget(tx: Tx, gone: Forgotten) -> None:
        """The stored part of a privacy delete: the profile, the profiles folded into it
        (stored chains and this fetch's), and the links its identities were refused."""
        tx.add_many(_DELETE_PROFILE, [(p,) for p in (*gone.profile_ids, *gone.folded)])
        if gone.identities:
            members = _json_list(gone.identities)
            tx.add(_DELETE_REFUSED, (members, members))

    @staticmethod
    def persist(tx: Tx, fx: Effects) -> None:
        """Apply a batch's effects to the stored graph (see `Effects`)."""
        tx.add_many(_DELETE_EDGE, list(fx.delete_edges))
        tx.add_many(_DELETE_NODE, [(k,) for k in fx.delete_nodes])
        tx.add_many(_INSERT_PROFILE, list(fx.new_profiles.items()))
        tx.add_many(
            _UPSERT_NODE,
            [
                (n.key, n.namespace, n.value, n.profile_id, n.first_seen, n.last_seen)
                for n in fx.upsert_nodes.values()
            ],
        )
        tx.add_many(
            _INSERT_EDGE,
            [(e.a, e.b, e.created_at, e.dataset, e.record_id) for e in fx.add_edges.values()],
        )
        tx.add_many(_FOLD_PROFILE, [(s, f) for f, s in fx.folded_profiles.items()])
        tx.add_many(
            _INSERT_REFUSED,
            [(r.at, r.record_id, r.dataset, r.a, r.b, r.reason) for r in fx.refused],
        )

"""The profile service's SQLite state: attributes per dataset, events, identities,
profiles, memberships, merge policies and the dataset and namespace configuration it
follows; its schema and every query on it (`ProfileStore`).

Reads return structs decoded by column name; writes are added to a `Tx` (the step's, or
one the store applies itself). A list of ids travels as one JSON parameter read with
`json_each` (`_IN`), so that a query per table serves a whole batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

import aiosqlite
import msgspec

from services.profile.merge import AttributeValue
from services.profile.rules import (
    MAX_EVENTS_PER_PROFILE,
    Effects,
    Forget,
    Loaded,
    MoveAnchored,
    MoveEvents,
    PinAnchored,
    StoredEvent,
    follow,
)
from shared.db import Migration, Tx, apply
from shared.messages import (
    Awaits,
    Deleted,
    ExperienceEvent,
    Fragment,
    HandedEvent,
    HandedRow,
    Handoff,
    HandOver,
    Identity,
    MembershipEvent,
    Merged,
    ProfileItem,
    Reassigned,
    Sweep,
    msgpack_encoder,
)
from shared.resources import Dataset, MergePolicy, Namespace
from shared.runtime.actor import Outgoing, to_outbox

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
    Migration("profile", 5, "DROP TABLE IF EXISTS schemas"),
)
"""Version 2: an event's anchor (the identity it follows), and `carried`: the records that
carry a person identity they are not anchored on (a privacy delete of that person reaches
them). Events stored before version 2 have no anchor and stay where they are. Version 3:
the identity namespaces the profile service follows (lookups normalise as identity does).
Version 5: the `schemas` table goes (nothing ever wrote it)."""


_LIST = "SELECT value FROM json_each(?)"
"""The values of a list given as one JSON parameter (see `_ids`)."""
_IN = f"IN ({_LIST})"
"""`<column> IN` such a list."""
_ids_encoder = msgspec.json.Encoder()
_value_decoder = msgspec.msgpack.Decoder()
_dataset_decoder = msgspec.json.Decoder(Dataset)
_namespace_decoder = msgspec.json.Decoder(Namespace)
_policy_decoder = msgspec.json.Decoder(MergePolicy)


def _ids(values: Iterable[str]) -> bytes:
    """The parameter of an `_IN` list."""
    return _ids_encoder.encode(sorted(values))


FORGOTTEN = ("attributes", "events", "identities", "memberships")
"""The tables a privacy delete removes a profile's rows from (and counts them in)."""

UPSERT_PROFILE = (
    "INSERT INTO profiles (profile_id, created_at, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (profile_id) DO UPDATE SET updated_at = excluded.updated_at"
)
FOLD_PROFILE = (
    "INSERT INTO profiles (profile_id, created_at, updated_at, folded_into) "
    "VALUES (?1, ?2, ?2, ?3) ON CONFLICT (profile_id) DO UPDATE SET folded_into = ?3"
)
"""A profile folded into a survivor; its row is made if the same fetch created it."""
FOLLOW_FOLDS = (
    "WITH RECURSIVE chain(id, survivor) AS (SELECT profile_id, folded_into FROM profiles "
    f"WHERE profile_id {_IN} UNION "
    "SELECT p.profile_id, p.folded_into FROM profiles p JOIN chain c ON p.profile_id = c.survivor) "
    "SELECT id AS profile_id, survivor AS folded_into FROM chain"
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
    f"WITH RECURSIVE gone(id) AS ({_LIST} UNION "
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
EXPIRE_EVENTS = "DELETE FROM events WHERE dataset = ? AND ts < ?"
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
UPSERT_POLICY = (
    "INSERT INTO merge_policies (name, spec, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at"
)
UPSERT_NAMESPACE = (
    "INSERT INTO namespaces (symbol, spec) VALUES (?, ?) ON CONFLICT (symbol) DO UPDATE SET "
    "spec = excluded.spec"
)

INSERT_HANDOFF = "INSERT OR IGNORE INTO handoffs (key, body, applied) VALUES (?, ?, 0)"
PARTITION_MIGRATIONS: tuple[Migration, ...] = (
    *MIGRATIONS,
    Migration(
        "profile-partition",
        1,
        """
        CREATE TABLE handoffs (
            key TEXT PRIMARY KEY,
            body BLOB NOT NULL,
            applied INTEGER NOT NULL
        )
        """,
    ),
)
"""A partition file (several instances): the profile tables and `handoffs`, the state
handed over from other partitions (by the key of the `Awaits` it answers), kept until
that point of the partition's items applies it."""

LISTINGS: dict[str, str] = {
    "profiles": "SELECT rowid, profile_id FROM profiles WHERE folded_into IS NULL "
    "AND rowid > ? ORDER BY rowid LIMIT ?",
    "identities": "SELECT rowid, namespace || ':' || value, profile_id FROM identities "
    "WHERE rowid > ? ORDER BY rowid LIMIT ?",
    "events": "SELECT rowid, record_id, profile_id, anchor FROM events WHERE rowid > ? "
    "ORDER BY rowid LIMIT ?",
    "members": "SELECT rowid, profile_id, segment FROM memberships WHERE status IN "
    "('realized', 'existing') AND rowid > ? ORDER BY rowid LIMIT ?",
}
"""The listings `cdp check` reads (see shared.listing)."""


# -- rows, by column name -----------------------------------------------------------------
class _Fold(NamedTuple):
    profile_id: str
    folded_into: str | None


class _Attribute(NamedTuple):
    profile_id: str
    dataset: str
    path: str
    value: bytes
    ts: float
    record_id: str

    def decoded(self) -> AttributeValue:
        return AttributeValue(
            self.dataset, self.path, _value_decoder.decode(self.value), self.ts, self.record_id
        )


class _IdentityRow(NamedTuple):
    namespace: str
    value: str
    profile_id: str


class _Event(NamedTuple):
    record_id: str
    profile_id: str
    anchor: str | None
    dataset: str
    event_type: str | None
    ts: float
    payload: bytes

    def decoded(self) -> ExperienceEvent:
        return ExperienceEvent(
            record_id=self.record_id,
            dataset=self.dataset,
            event_type=self.event_type,
            timestamp=self.ts,
            payload=_value_decoder.decode(self.payload),
        )


class _Carried(NamedTuple):
    key: str
    record_id: str
    kind: str
    profile_id: str


class _Count(NamedTuple):
    profile_id: str
    n: int


class _Spec(NamedTuple):
    spec: bytes


class StoredPolicy(NamedTuple):
    """A merge policy as stored: decoded, its JSON, when it was applied."""

    name: str
    spec: bytes
    updated_at: float

    def decoded(self) -> MergePolicy:
        return _policy_decoder.decode(self.spec)


class MembershipRow(NamedTuple):
    segment: str
    status: str
    at: float


_R = TypeVar("_R", bound=tuple[Any, ...])


class ProfileStore:
    """The named reads and writes of the profile service's database."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def _select(self, row: type[_R], sql: str, params: Sequence[Any] = ()) -> list[_R]:
        """The rows of `sql` as `row` (a NamedTuple), its fields taken by column name."""
        async with self.db.execute(sql, params) as cursor:
            names = [c[0] for c in cursor.description]
            found = await cursor.fetchall()
        fields: tuple[str, ...] = row._fields  # type: ignore[attr-defined]
        if tuple(names) == fields:  # the columns are the fields, in order
            return [row(*r) for r in found]
        at = [names.index(f) for f in fields]
        return [row(*(r[i] for i in at)) for r in found]

    # -- configuration ---------------------------------------------------------------
    async def datasets(self) -> list[Dataset]:
        rows = await self._select(_Spec, "SELECT spec FROM datasets ORDER BY name")
        return [_dataset_decoder.decode(r.spec) for r in rows]

    async def namespaces(self) -> list[Namespace]:
        rows = await self._select(_Spec, "SELECT spec FROM namespaces ORDER BY symbol")
        return [_namespace_decoder.decode(r.spec) for r in rows]

    async def policies(self) -> list[StoredPolicy]:
        return await self._select(
            StoredPolicy, "SELECT name, spec, updated_at FROM merge_policies ORDER BY name"
        )

    @staticmethod
    def put_dataset(tx: Tx, name: str, spec: bytes) -> None:
        tx.add(UPSERT_DATASET, (name, spec))

    @staticmethod
    def put_namespace(tx: Tx, symbol: str, spec: bytes) -> None:
        tx.add(UPSERT_NAMESPACE, (symbol, spec))

    @staticmethod
    def put_policy(tx: Tx, name: str, spec: bytes, at: float) -> None:
        tx.add(UPSERT_POLICY, (name, spec, at))

    async def save_policies(
        self, policies: Sequence[tuple[str, bytes]], out: Sequence[Outgoing], at: float
    ) -> None:
        """Store applied policies (name, JSON) and their messages to publish, in one
        transaction (the outbox of an admin request)."""
        tx = Tx()
        for name, spec in policies:
            self.put_policy(tx, name, spec, at)
        to_outbox(tx, out, at)
        await apply(self.db, tx)

    # -- the unified profile: what a batch touches -----------------------------------
    async def load(self, items: Sequence[ProfileItem]) -> Loaded:
        """The state `items` touch, as stored: a handful of set-based queries."""
        loaded = Loaded()
        ids: set[str] = set()
        moving: set[str] = set()
        persons: set[str] = set()
        deleted: set[str] = set()
        for item in items:
            match item:
                case Fragment():
                    ids.add(item.profile_id)
                case Merged():
                    ids.add(item.profile_id)
                    ids.update(item.folded)
                case Reassigned():
                    ids.add(item.profile_id)
                    if item.to_profile:
                        ids.add(item.to_profile)
                        moving.update(f"{i.namespace}:{i.value}" for i in item.identities)
                case Deleted():
                    ids.update(item.profile_ids)
                    deleted.update(item.profile_ids)
                    persons.update(item.person_keys)
                case Sweep():
                    ids.update(item.profile_ids)
                    deleted.update(item.profile_ids)
                    persons.update(item.person_keys)
                case HandOver():
                    ids.add(item.profile_id)
                    ids.add(item.source)
                case Awaits():
                    ids.add(item.profile_id)
        if persons:
            for c in await self._select(
                _Carried,
                f"SELECT key, record_id, kind, profile_id FROM carried WHERE key {_IN}",
                (_ids(persons),),
            ):
                loaded.carried[c.key].append((c.record_id, c.kind, c.profile_id))
                ids.add(c.profile_id)
            event_ids = {
                rid for v in loaded.carried.values() for rid, kind, _ in v if kind == "event"
            }
            for stored in await self._events("record_id", event_ids):
                loaded.events[stored.event.record_id] = stored
                ids.add(stored.profile_id)
        if not ids:
            return loaded
        # The rows of these profiles and of the profiles they were folded into, chains
        # followed to their survivors, in one query.
        for f in await self._select(_Fold, FOLLOW_FOLDS, (_ids(ids),)):
            if f.folded_into is None:
                loaded.known.add(f.profile_id)
            else:
                loaded.redirect[f.profile_id] = f.folded_into
            ids.add(f.profile_id)
        plist = _ids(ids)
        for a in await self._select(
            _Attribute,
            "SELECT profile_id, dataset, path, value, ts, record_id FROM attributes "
            f"WHERE profile_id {_IN}",
            (plist,),
        ):
            loaded.rows[a.profile_id][(a.dataset, a.path)] = a.decoded()
        for i in await self._select(
            _IdentityRow,
            f"SELECT namespace, value, profile_id FROM identities WHERE profile_id {_IN}",
            (plist,),
        ):
            loaded.identities[i.profile_id].add((i.namespace, i.value))
        if moving:
            for stored in await self._events("anchor", moving):
                if stored.anchor is not None:
                    loaded.anchored[stored.anchor].append(stored)
        if deleted:
            gone = _ids({follow(loaded.redirect, p) for p in deleted})
            for table in FORGOTTEN:
                for n in await self._select(
                    _Count,
                    f"SELECT profile_id, count(*) AS n FROM {table} WHERE profile_id {_IN} "
                    "GROUP BY profile_id",
                    (gone,),
                ):
                    loaded.counts.setdefault(n.profile_id, {})[table] = n.n
        return loaded

    async def _events(self, column: str, values: set[str]) -> list[StoredEvent]:
        if not values:
            return []
        rows = await self._select(
            _Event,
            "SELECT record_id, profile_id, anchor, dataset, event_type, ts, payload FROM events "
            f"WHERE {column} {_IN}",
            (_ids(values),),
        )
        return [StoredEvent(e.profile_id, e.anchor, e.decoded()) for e in rows]

    # -- the unified profile: what a batch does --------------------------------------
    @staticmethod
    def persist(tx: Tx, fx: Effects) -> None:
        """The writes of `fx`, in its order (see `Effects`)."""
        for w in fx.ordered:
            match w:
                case MoveEvents():
                    tx.add(MOVE_EVENTS, (w.survivor, w.folded))
                case MoveAnchored():
                    tx.add(MOVE_EVENTS_BY_ANCHOR, (w.target, w.anchor))
                case PinAnchored():
                    tx.add(CARRY_PINNED, (w.anchor, w.anchor))
                    tx.add(PIN_EVENTS, (w.anchor,))
                case Forget():
                    plist = _ids(w.profile_ids)
                    for table in FORGOTTEN:
                        tx.add(f"DELETE FROM {table} WHERE profile_id {_IN}", (plist,))
                    tx.add_many(DELETE_EVENT, [(rid,) for rid in w.events])
                    tx.add_many(DELETE_CARRIED, [(k,) for k in w.persons])
                    tx.add(DELETE_PROFILES_CARRIED, (plist,))
                    tx.add(DELETE_PROFILES, (plist,))
        tx.add_many(DELETE_ATTRIBUTES, [(f,) for f, _, _ in fx.folds])
        tx.add_many(DELETE_MEMBERSHIPS, [(f,) for f, _, _ in fx.folds])
        tx.add_many(FOLD_PROFILE, [(f, created, survivor) for f, survivor, created in fx.folds])
        tx.add_many(UPSERT_PROFILE, [(pid, created, fx.now) for pid, created in fx.profiles])
        tx.add_many(DELETE_ATTRIBUTE, fx.dropped_rows)
        tx.add_many(
            UPSERT_ATTRIBUTE,
            [
                (pid, r.dataset, r.path, msgpack_encoder.encode(r.value), r.ts, r.record_id)
                for pid, r in fx.rows
            ],
        )
        tx.add_many(DELETE_IDENTITY, fx.dropped_identities)
        tx.add_many(UPSERT_IDENTITY, fx.identities)
        tx.add_many(INSERT_EVENT, fx.events)
        tx.add_many(INSERT_CARRIED, fx.carried)
        tx.add_many(CAP_EVENTS, [(pid, MAX_EVENTS_PER_PROFILE) for pid in fx.capped])
        if fx.outgoing:  # handed over to another partition's owner: nothing of it stays
            far = _ids(fx.outgoing)
            sources = _ids(s for out in fx.outgoing.values() for s in out.sources)
            tx.add(f"DELETE FROM events WHERE profile_id {_IN}", (far,))
            tx.add(f"DELETE FROM events WHERE profile_id {_IN}", (sources,))
            tx.add(f"DELETE FROM carried WHERE profile_id {_IN}", (sources,))
            tx.add(f"DELETE FROM carried WHERE profile_id {_IN}", (far,))

    async def handoffs(self, fx: Effects) -> list[Handoff]:
        """What `fx` hands over, with the stored events and carried rows of the profiles
        folded into another partition's (read before `fx` is committed)."""
        out: list[Handoff] = []
        for target, o in fx.outgoing.items():
            events = [
                HandedEvent(
                    r.record_id,
                    r.dataset,
                    r.event_type,
                    r.ts,
                    r.identity_keys,
                    r.payload,
                    r.anchor,
                    announce,
                )
                for r, announce in o.events
            ]
            carried = list(o.carried)
            if o.sources:
                seen = {e.record_id for e in events} | fx.decided
                for row in await self.db.execute_fetchall(
                    "SELECT record_id, dataset, event_type, ts, identity_keys, payload, anchor "
                    f"FROM events WHERE profile_id {_IN}",
                    (_ids(o.sources),),
                ):
                    if row[0] in seen:
                        continue
                    ik = row[4]
                    events.append(
                        HandedEvent(
                            row[0],
                            row[1],
                            row[2],
                            float(row[3]),
                            ik.encode() if isinstance(ik, str) else bytes(ik),
                            bytes(row[5]),
                            row[6],
                            False,
                        )
                    )
                carried += [
                    (str(r[0]), str(r[1]), str(r[2]))
                    for r in await self.db.execute_fetchall(
                        f"SELECT key, record_id, kind FROM carried WHERE profile_id {_IN}",
                        (_ids(o.sources),),
                    )
                ]
            out.append(
                Handoff(
                    target,
                    keys=sorted(set(o.keys)),
                    sources=sorted(set(o.sources)),
                    rows=[
                        HandedRow(
                            r.dataset, r.path, msgpack_encoder.encode(r.value), r.ts, r.record_id
                        )
                        for r in o.rows
                    ],
                    identities=[Identity(ns, v) for ns, v in o.identities],
                    events=events,
                    carried=carried,
                )
            )
        return out

    async def handed(self, keys: Sequence[str]) -> dict[str, tuple[bytes, bool]]:
        """The handoffs received for `keys`: key -> (the handoff, applied already)."""
        if not keys:
            return {}
        return {
            str(r[0]): (bytes(r[1]), bool(r[2]))
            for r in await self.db.execute_fetchall(
                f"SELECT key, body, applied FROM handoffs WHERE key {_IN}", (_ids(keys),)
            )
        }

    @staticmethod
    def put_handoff(tx: Tx, keys: Iterable[str], body: bytes) -> None:
        tx.add_many(INSERT_HANDOFF, [(k, body) for k in keys])

    @staticmethod
    def applied_handoff(tx: Tx, keys: Iterable[str]) -> None:
        tx.add_many("UPDATE handoffs SET applied = 1 WHERE key = ?", [(k,) for k in keys])

    @staticmethod
    def put_memberships(tx: Tx, events: Iterable[MembershipEvent]) -> None:
        """Membership changes written back onto live profiles (see `UPSERT_MEMBERSHIP`)."""
        tx.add_many(UPSERT_MEMBERSHIP, [(e.profile_id, e.segment, e.status, e.at) for e in events])

    async def expire_events(self, expirations: Sequence[tuple[str, float]]) -> None:
        """Drop the events of each dataset older than its time, (dataset, time) each."""
        if expirations:
            tx = Tx()
            tx.add_many(EXPIRE_EVENTS, expirations)
            await apply(self.db, tx)

    # -- one profile, for a lookup ---------------------------------------------------
    async def survivor(self, profile_id: str) -> str | None:
        """The live profile `profile_id` names: itself, or the one it was folded into
        (chains followed); None if there is none."""
        for f in await self._select(_Fold, FOLLOW_FOLDS, (_ids([profile_id]),)):
            if f.folded_into is None:
                return f.profile_id
        return None

    async def folded_elsewhere(self, profile_id: str) -> str | None:
        """The profile `profile_id`'s fold chain leads to when that one has no row here
        (it sits on another partition); None otherwise."""
        chain = await self._select(_Fold, FOLLOW_FOLDS, (_ids([profile_id]),))
        here = {f.profile_id for f in chain}
        for f in chain:
            if f.folded_into is not None and f.folded_into not in here:
                return f.folded_into
        return None

    async def holder(self, namespace: str, value: str) -> str | None:
        """The profile that holds the identity, if any."""
        rows = await self._select(
            _IdentityRow,
            "SELECT namespace, value, profile_id FROM identities WHERE namespace = ? AND value = ?",
            (namespace, value),
        )
        return rows[0].profile_id if rows else None

    async def attributes(self, profile_id: str) -> list[AttributeValue]:
        rows = await self._select(
            _Attribute,
            "SELECT profile_id, dataset, path, value, ts, record_id FROM attributes "
            "WHERE profile_id = ?",
            (profile_id,),
        )
        return [a.decoded() for a in rows]

    async def identities(self, profile_id: str) -> list[Identity]:
        rows = await self._select(
            _IdentityRow,
            "SELECT namespace, value, profile_id FROM identities WHERE profile_id = ? "
            "ORDER BY namespace, value",
            (profile_id,),
        )
        return [Identity(i.namespace, i.value) for i in rows]

    async def recent_events(self, profile_id: str, limit: int) -> list[ExperienceEvent]:
        """The profile's `limit` most recent events, newest first."""
        rows = await self._select(
            _Event,
            "SELECT record_id, profile_id, anchor, dataset, event_type, ts, payload FROM events "
            "WHERE profile_id = ? ORDER BY ts DESC, record_id DESC LIMIT ?",
            (profile_id, limit),
        )
        return [e.decoded() for e in rows]

    async def memberships(self, profile_id: str) -> list[MembershipRow]:
        return await self._select(
            MembershipRow,
            "SELECT segment, status, at FROM memberships WHERE profile_id = ? ORDER BY segment",
            (profile_id,),
        )

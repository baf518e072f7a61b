"""The destination service's SQLite state, with its named reads and writes: destinations
and their connections to segments, the segments as their owner published them, the
profile view it activates (identities, attributes), memberships, the delivery queue (an
outbox that survives restarts), the dead-letter store, per-destination counters, and
file exports (their jobs and the state an incremental export starts from).

Reads return structs decoded by column name; writes are added to a transaction (`Tx`)
that the caller commits: a consumer's step, or `apply` for the API and the worker."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import aiosqlite
import msgspec

from services.destination.activation import Queued, View
from services.destination.model import Activation, SegmentMeta
from shared.admin import DeadLetter, ExportFile, ExportResult
from shared.db import Migration, Tx, apply, rows
from shared.messages import Identity, MembershipEvent
from shared.resources import Destination
from shared.runtime.actor import Outgoing, to_outbox

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
    Migration(
        "destination",
        3,
        """
        CREATE TABLE segments (
            name TEXT PRIMARY KEY,
            description TEXT NOT NULL,
            method TEXT NOT NULL,
            deleted INTEGER NOT NULL DEFAULT 0
        );
        ALTER TABLE export_jobs ADD COLUMN job_id TEXT;
        CREATE INDEX export_jobs_by_job ON export_jobs (job_id)
        """,
    ),
    Migration(
        "destination",
        4,
        """
        CREATE TABLE exclusions (
            destination TEXT NOT NULL,
            reason TEXT NOT NULL,
            n INTEGER NOT NULL,
            PRIMARY KEY (destination, reason)
        );
        INSERT INTO exclusions (destination, reason, n)
            SELECT destination, 'unrecorded', skipped FROM stats WHERE skipped > 0;
        CREATE TABLE export_files (
            destination TEXT NOT NULL,
            name TEXT NOT NULL,
            rows INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (destination, name)
        );
        CREATE INDEX export_files_by_time ON export_files (destination, created_at)
        """,
    ),
)
"""Version 4: profiles not activated per destination and reason (`exclusions`; the skips
counted before are kept as `unrecorded`), and the files exports wrote (`export_files`,
the latest `FILES_KEPT` per destination)."""
FILES_KEPT = 100
FILES_LISTED = 20

MEMBER = ("realized", "existing")
T = TypeVar("T")

_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()
_any_msgpack = msgspec.msgpack.Decoder()
_identities = msgspec.msgpack.Decoder(list[Identity])
_activation = msgspec.msgpack.Decoder(Activation)
_destination = msgspec.json.Decoder(Destination)
_export_result = msgspec.json.Decoder(ExportResult)

_UPSERT_MEMBERSHIP = (
    "INSERT INTO memberships (segment, profile_id, status, at, method) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (segment, profile_id) DO UPDATE SET status = excluded.status, "
    "at = excluded.at, method = excluded.method WHERE excluded.at >= memberships.at"
)
_UPSERT_PROFILE = (
    "INSERT INTO profiles (profile_id, attributes, identities, updated_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (profile_id) DO UPDATE SET attributes = excluded.attributes, "
    "identities = excluded.identities, updated_at = excluded.updated_at"
)
_ENQUEUE = (
    "INSERT INTO queue (destination, segment, profile_id, payload, enqueued_at, next_attempt) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_BUMP_STATS = (
    "INSERT INTO stats (destination, delivered, failed, skipped, last_delivery, last_error) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (destination) DO UPDATE SET "
    "delivered = delivered + excluded.delivered, failed = failed + excluded.failed, "
    "skipped = skipped + excluded.skipped, "
    "last_delivery = coalesce(excluded.last_delivery, last_delivery), "
    "last_error = coalesce(excluded.last_error, last_error)"
)
_IN_JSON = "(SELECT value FROM json_each(?))"
_EXCLUDE = (
    "INSERT INTO exclusions (destination, reason, n) VALUES (?, ?, ?) "
    "ON CONFLICT (destination, reason) DO UPDATE SET n = n + excluded.n"
)
_PUT_FILE = (
    "INSERT INTO export_files (destination, name, rows, bytes, created_at) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (destination, name) DO UPDATE SET "
    "rows = excluded.rows, bytes = excluded.bytes, created_at = excluded.created_at"
)


class SegmentRow(msgspec.Struct, frozen=True):
    name: str
    description: str
    method: str
    deleted: int

    @property
    def meta(self) -> SegmentMeta:
        return SegmentMeta(name=self.name, description=self.description, method=self.method)


class Connection(msgspec.Struct, frozen=True):
    destination: str
    segment: str
    connected_at: float
    remote_id: str | None = None


class Waiting(msgspec.Struct, frozen=True):
    """An item of the delivery queue that is due."""

    id: int
    segment: str
    payload: bytes
    enqueued_at: float
    attempts: int

    @property
    def activation(self) -> Activation:
        return _activation.decode(self.payload)


class Stats(msgspec.Struct, frozen=True):
    destination: str
    delivered: int = 0
    failed: int = 0
    skipped: int = 0
    last_delivery: float | None = None
    last_error: str | None = None


class Counts(msgspec.Struct, frozen=True):
    destination: str
    queued: int
    retrying: int


class _ViewRow(msgspec.Struct, frozen=True):
    profile_id: str
    attributes: bytes
    identities: bytes


class _Status(msgspec.Struct, frozen=True):
    profile_id: str
    status: str


class _Named(msgspec.Struct, frozen=True):
    destination: str
    n: int


class _Excluded(msgspec.Struct, frozen=True):
    destination: str
    reason: str
    n: int


class _File(msgspec.Struct, frozen=True):
    destination: str
    name: str
    rows: int
    bytes: int
    created_at: float


class DestinationStore:
    """Named reads and writes of the destination service's database."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def _rows(self, type_: type[T], sql: str, params: Sequence[Any] = ()) -> list[T]:
        return [msgspec.convert(r, type_) for r in await rows(self.db, sql, params)]

    async def _scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = list(await self.db.execute_fetchall(sql, params))
        return rows[0][0] if rows else None

    async def apply(self, tx: Tx) -> None:
        """Commit writes made outside a consumer's step (the API, the delivery worker)."""
        if tx:
            await apply(self.db, tx)

    # -- destinations, connections, segments -------------------------------------------------
    async def destinations(self) -> list[Destination]:
        rows = await self.db.execute_fetchall("SELECT spec FROM destinations ORDER BY name")
        return [_destination.decode(r[0]) for r in rows]

    async def destination_versions(self) -> dict[str, float]:
        rows = await self.db.execute_fetchall("SELECT name, updated_at FROM destinations")
        return {str(r[0]): float(r[1]) for r in rows}

    def put_destination(self, tx: Tx, dest: Destination, now: float) -> None:
        tx.add(
            "INSERT INTO destinations (name, spec, created_at, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, "
            "updated_at = excluded.updated_at",
            (dest.name, _json.encode(dest), now, now),
        )

    def connect(
        self, tx: Tx, destination: str, segments: Iterable[str], now: float, *, pending: bool
    ) -> None:
        """Connect a destination to segments; `pending`: its existing members are sent
        after the next batch job (audience managers)."""
        tx.add_many(
            "INSERT OR IGNORE INTO connections (destination, segment, connected_at, "
            "existing_pending) VALUES (?, ?, ?, ?)",
            [(destination, s, now, int(pending)) for s in segments],
        )

    async def synced(self) -> list[Connection]:
        """Connections whose segment the audience manager knows (with its remote id)."""
        return await self._rows(
            Connection,
            "SELECT destination, segment, connected_at, remote_id FROM connections "
            "WHERE remote_id IS NOT NULL",
        )

    def set_remote(self, tx: Tx, destination: str, segment: str, remote: str) -> None:
        tx.add(
            "UPDATE connections SET remote_id = ? WHERE destination = ? AND segment = ?",
            (remote, destination, segment),
        )

    async def pending_existing(self) -> list[Connection]:
        """Connections whose existing members are still to be sent."""
        return await self._rows(
            Connection,
            "SELECT destination, segment, connected_at, remote_id FROM connections "
            "WHERE existing_pending = 1",
        )

    def existing_sent(self, tx: Tx, destination: str, segment: str) -> None:
        tx.add(
            "UPDATE connections SET existing_pending = 0 WHERE destination = ? AND segment = ?",
            (destination, segment),
        )

    async def segments(self) -> list[SegmentRow]:
        return await self._rows(
            SegmentRow, "SELECT name, description, method, deleted FROM segments ORDER BY name"
        )

    def put_segment(self, tx: Tx, meta: SegmentMeta) -> None:
        tx.add(
            "INSERT INTO segments (name, description, method, deleted) VALUES (?, ?, ?, 0) "
            "ON CONFLICT (name) DO UPDATE SET description = excluded.description, "
            "method = excluded.method, deleted = 0",
            (meta.name, meta.description, meta.method),
        )

    def delete_segment(self, tx: Tx, name: str) -> None:
        """A removed segment: remembered as deleted, and nothing of it is delivered."""
        tx.add(
            "INSERT INTO segments (name, description, method, deleted) VALUES (?, '', '', 1) "
            "ON CONFLICT (name) DO UPDATE SET deleted = 1",
            (name,),
        )
        tx.add("DELETE FROM queue WHERE segment = ?", (name,))

    # -- the profile view and memberships -----------------------------------------------------
    async def views(self, profile_ids: Iterable[str]) -> dict[str, View]:
        rows = await self._rows(
            _ViewRow,
            "SELECT profile_id, attributes, identities FROM profiles "
            f"WHERE profile_id IN {_IN_JSON}",
            (_json.encode(sorted(set(profile_ids))),),
        )
        return {
            r.profile_id: View(_any_msgpack.decode(r.attributes), _identities.decode(r.identities))
            for r in rows
        }

    def put_views(
        self, tx: Tx, views: dict[str, tuple[dict[str, Any], list[Identity], float]]
    ) -> None:
        tx.add_many(
            _UPSERT_PROFILE,
            [
                (pid, _msgpack.encode(attributes), _msgpack.encode(identities), at)
                for pid, (attributes, identities, at) in views.items()
            ],
        )

    def drop_views(self, tx: Tx, profile_ids: Iterable[str]) -> None:
        tx.add_many("DELETE FROM profiles WHERE profile_id = ?", [(p,) for p in profile_ids])

    def put_memberships(self, tx: Tx, events: Iterable[MembershipEvent]) -> None:
        tx.add_many(
            _UPSERT_MEMBERSHIP,
            [(e.segment, e.profile_id, e.status, e.at, e.method) for e in events],
        )

    async def members(
        self, segments: Iterable[str], *, before: float | None = None
    ) -> list[MembershipEvent]:
        """The current members of `segments` (realized or existing), joined at or before
        `before` if given."""
        return await self._rows(
            MembershipEvent,
            "SELECT profile_id, segment, status, at, method FROM memberships "
            f"WHERE status IN ('realized', 'existing') AND segment IN {_IN_JSON} AND at <= ? "
            "ORDER BY segment, profile_id",
            (_json.encode(list(segments)), before if before is not None else float("inf")),
        )

    async def statuses_of(
        self, profile_ids: Iterable[str]
    ) -> dict[tuple[str, str], tuple[str, float]]:
        """(segment, profile) -> (status, at) of every membership these profiles have."""
        rows = await self._rows(
            MembershipEvent,
            "SELECT profile_id, segment, status, at, method FROM memberships "
            f"WHERE profile_id IN {_IN_JSON}",
            (_json.encode(sorted(set(profile_ids))),),
        )
        return {(m.segment, m.profile_id): (m.status, m.at) for m in rows}

    async def held(self, profile_ids: Iterable[str]) -> list[MembershipEvent]:
        """The memberships these profiles hold now."""
        return await self._rows(
            MembershipEvent,
            "SELECT profile_id, segment, status, at, method FROM memberships "
            f"WHERE status IN ('realized', 'existing') AND profile_id IN {_IN_JSON}",
            (_json.encode(list(profile_ids)),),
        )

    async def statuses(self, segment: str) -> dict[str, str]:
        """Profile id -> status of the current members of `segment`."""
        rows = await self._rows(
            _Status,
            "SELECT profile_id, status FROM memberships WHERE segment = ? AND status IN "
            "('realized', 'existing') ORDER BY profile_id",
            (segment,),
        )
        return {r.profile_id: r.status for r in rows}

    # -- the delivery queue, dead letters, counters -----------------------------------------
    def enqueue(self, tx: Tx, queued: Iterable[Queued], now: float) -> None:
        tx.add_many(
            _ENQUEUE,
            [
                (
                    q.destination,
                    q.activation.segment,
                    q.activation.profile_id,
                    _msgpack.encode(q.activation),
                    now,
                    now,
                )
                for q in queued
            ],
        )

    async def due(self, destination: str, now: float, limit: int) -> list[Waiting]:
        return await self._rows(
            Waiting,
            "SELECT id, segment, payload, enqueued_at, attempts FROM queue WHERE "
            "destination = ? AND next_attempt <= ? ORDER BY id LIMIT ?",
            (destination, now, limit),
        )

    async def next_attempt(self, destination: str) -> float | None:
        value = await self._scalar(
            "SELECT min(next_attempt) FROM queue WHERE destination = ?", (destination,)
        )
        return None if value is None else float(value)

    def sent(self, tx: Tx, ids: Sequence[int]) -> None:
        tx.add_many("DELETE FROM queue WHERE id = ?", [(i,) for i in ids])

    def retry(self, tx: Tx, ids: Sequence[int], attempts: int, at: float, error: str) -> None:
        tx.add_many(
            "UPDATE queue SET attempts = ?, next_attempt = ?, last_error = ? WHERE id = ?",
            [(attempts, at, error, i) for i in ids],
        )

    def dead_letter(
        self, tx: Tx, ids: Sequence[int], attempts: int, error: str, now: float
    ) -> None:
        tx.add_many(
            "INSERT INTO dlq (destination, segment, profile_id, payload, attempts, error, "
            "failed_at) SELECT destination, segment, profile_id, payload, ?, ?, ? "
            "FROM queue WHERE id = ?",
            [(attempts, error, now, i) for i in ids],
        )
        self.sent(tx, ids)

    def bump(
        self,
        tx: Tx,
        destination: str,
        *,
        delivered: int = 0,
        failed: int = 0,
        skipped: int = 0,
        last_delivery: float | None = None,
        last_error: str | None = None,
    ) -> None:
        tx.add(_BUMP_STATS, (destination, delivered, failed, skipped, last_delivery, last_error))

    def exclude(self, tx: Tx, destination: str, reasons: Mapping[str, int]) -> None:
        """Profiles not activated by `destination`, by reason (also counted as skipped)."""
        if not reasons:
            return
        self.bump(tx, destination, skipped=sum(reasons.values()))
        tx.add_many(_EXCLUDE, [(destination, r, n) for r, n in sorted(reasons.items())])

    async def exclusions(self) -> dict[str, dict[str, int]]:
        """Per destination: profiles not activated, by reason."""
        out: dict[str, dict[str, int]] = {}
        for r in await self._rows(
            _Excluded, "SELECT destination, reason, n FROM exclusions ORDER BY destination, reason"
        ):
            out.setdefault(r.destination, {})[r.reason] = r.n
        return out

    async def stats(self) -> dict[str, Stats]:
        rows = await self._rows(
            Stats,
            "SELECT destination, delivered, failed, skipped, last_delivery, last_error FROM stats",
        )
        return {r.destination: r for r in rows}

    async def queue_counts(self) -> dict[str, Counts]:
        rows = await self._rows(
            Counts,
            "SELECT destination, count(*) AS queued, sum(attempts > 0) AS retrying FROM queue "
            "GROUP BY destination",
        )
        return {r.destination: r for r in rows}

    async def dead_counts(self) -> dict[str, int]:
        rows = await self._rows(
            _Named, "SELECT destination, count(*) AS n FROM dlq GROUP BY destination"
        )
        return {r.destination: r.n for r in rows}

    async def dead_letters(self, destination: str, limit: int) -> list[DeadLetter]:
        return await self._rows(
            DeadLetter,
            "SELECT id, segment, profile_id, attempts, error, failed_at FROM dlq "
            "WHERE destination = ? ORDER BY id LIMIT ?",
            (destination, limit),
        )

    async def dead_count(self, destination: str) -> int:
        return int(
            await self._scalar("SELECT count(*) FROM dlq WHERE destination = ?", (destination,))
        )

    def replay(self, tx: Tx, destination: str, now: float) -> None:
        """Dead letters back in the queue, in their order."""
        tx.add(
            "INSERT INTO queue (destination, segment, profile_id, payload, enqueued_at, "
            "next_attempt) SELECT destination, segment, profile_id, payload, ?, ? FROM dlq "
            "WHERE destination = ? ORDER BY id",
            (now, now, destination),
        )
        tx.add("DELETE FROM dlq WHERE destination = ?", (destination,))

    # -- file exports ----------------------------------------------------------------------
    async def exported_before(self, destination: str) -> bool:
        return (
            await self._scalar(
                "SELECT 1 FROM export_jobs WHERE destination = ? AND status = 'succeeded' LIMIT 1",
                (destination,),
            )
            is not None
        )

    async def exported_statuses(self, destination: str, segment: str) -> dict[str, str]:
        """What the last succeeded export of `destination` held of `segment`."""
        rows = await self._rows(
            _Status,
            "SELECT profile_id, status FROM export_state WHERE destination = ? AND segment = ? "
            "ORDER BY profile_id",
            (destination, segment),
        )
        return {r.profile_id: r.status for r in rows}

    async def export_of_job(self, job_id: str) -> ExportResult | None:
        raw = await self._scalar(
            "SELECT result FROM export_jobs WHERE job_id = ? LIMIT 1", (job_id,)
        )
        return None if raw is None else _export_result.decode(raw)

    async def exports(self, limit: int) -> list[tuple[int, ExportResult]]:
        """Export jobs, newest first: (id, result)."""
        rows = await self.db.execute_fetchall(
            "SELECT id, result FROM export_jobs ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [(int(r[0]), _export_result.decode(r[1])) for r in rows]

    async def export_files(self, limit: int = FILES_LISTED) -> dict[str, list[ExportFile]]:
        """Per destination: the files its exports wrote, newest first, at most `limit`."""
        out: dict[str, list[ExportFile]] = {}
        for r in await self._rows(
            _File,
            "SELECT destination, name, rows, bytes, created_at FROM (SELECT *, row_number() "
            "OVER (PARTITION BY destination ORDER BY created_at DESC, name) AS k "
            "FROM export_files) WHERE k <= ? ORDER BY destination, k",
            (limit,),
        ):
            out.setdefault(r.destination, []).append(
                ExportFile(name=r.name, rows=r.rows, bytes=r.bytes, created_at=r.created_at)
            )
        return out

    def record_export(
        self,
        tx: Tx,
        result: ExportResult,
        state: Sequence[tuple[str, str, str]],
        files: Sequence[ExportFile] = (),
    ) -> None:
        """An export's job record and the files it wrote (a file of the same name as an
        earlier one replaces it; the latest `FILES_KEPT` are kept). If it succeeded,
        `state` (segment, profile, status) is what the next incremental export starts
        from, and its exclusions by reason are the destination's."""
        name = result.destination
        if files:
            tx.add_many(_PUT_FILE, [(name, f.name, f.rows, f.bytes, f.created_at) for f in files])
            tx.add(
                "DELETE FROM export_files WHERE destination = ? AND name NOT IN (SELECT name "
                "FROM export_files WHERE destination = ? ORDER BY created_at DESC, name "
                "LIMIT ?)",
                (name, name, FILES_KEPT),
            )
        if result.status == "succeeded":
            tx.add("DELETE FROM export_state WHERE destination = ?", (name,))
            tx.add_many(
                "INSERT INTO export_state (destination, segment, profile_id, status) "
                "VALUES (?, ?, ?, ?)",
                [(name, *row) for row in state],
            )
            tx.add("DELETE FROM exclusions WHERE destination = ?", (name,))
            tx.add_many(_EXCLUDE, [(name, r, n) for r, n in sorted(result.excluded.items()) if n])
        tx.add(
            "INSERT INTO export_jobs (destination, trigger, status, started_at, finished_at, "
            "rows, result, job_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                name,
                result.trigger,
                result.status,
                result.started_at,
                result.finished_at,
                result.rows,
                _json.encode(result),
                result.job_id,
            ),
        )

    # -- the runtime's outbox, for what the API publishes ---------------------------------------
    def outbox(self, tx: Tx, out: Iterable[Outgoing], now: float | None = None) -> None:
        at = time.time() if now is None else now
        to_outbox(tx, out, at)

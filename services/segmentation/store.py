"""The segmentation service's SQLite state: segment definitions, the merge policies it
knows, the profile view it evaluates (attributes, identities, events), memberships, timers
for time-based exits, and job records.

`SegmentationStore` names every read and write: reads return structs decoded from the
rows by column name; writes are added to a `Writes` (a step's `Tx`, or a buffer the step
filters) so that they commit with whatever else the caller commits."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import aiosqlite
import msgspec

from shared.admin import JobInfo
from shared.db import Migration, Tx, apply, rows
from shared.messages import ExperienceEvent, Identity, msgpack_encoder
from shared.runtime.actor import Outgoing, to_outbox

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
    Migration(
        "segmentation",
        3,
        """
        CREATE TABLE merge_policies (
            name TEXT PRIMARY KEY,
            spec BLOB NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
    ),
    Migration(
        "segmentation",
        4,
        "CREATE INDEX memberships_by_since ON memberships (since, segment, status)",
    ),
)
"""Version 2: an event row per (profile, event), so that the two halves of a move (left
one profile, arrived on another) apply in either order.
Version 3: the merge policies profile publishes on the config stream, by name (a segment
may name only a known one).
Version 4: memberships by the time of their last change (`since`), with segment and
status, so that the last day's entries and exits are counted from the index alone."""

TABLES_OF_PROFILES = ("facts", "events", "memberships", "timers")
"""The tables keyed by profile id: what a privacy delete removes."""
MEMBER = ("realized", "existing")
HOURS = 24
HOUR_S = 3600.0

_IDS = "SELECT value FROM json_each(?)"
_UPSERT_FACTS = (
    "INSERT INTO facts (profile_id, attributes, identities, updated_at, views) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (profile_id) DO UPDATE SET "
    "attributes = excluded.attributes, identities = excluded.identities, "
    "updated_at = excluded.updated_at, views = excluded.views"
)
_INSERT_EVENT = (
    "INSERT INTO events (record_id, profile_id, dataset, event_type, ts, payload) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (profile_id, record_id) DO NOTHING"
)
"""An event arrives on a profile (new, or moved to it with its anchor identity)."""
_REMOVE_EVENT = "DELETE FROM events WHERE record_id = ? AND profile_id = ?"
"""An event left a profile. Each profile's copy is its own row, so an arrival and a
departure of one event on two profiles apply in either order."""
_MOVE_EVENTS = "UPDATE OR REPLACE events SET profile_id = ? WHERE profile_id = ?"
"""A merge: the folded profile's events are the survivor's (a copy it has already is kept once)."""
_UPSERT_MEMBERSHIP = (
    "INSERT INTO memberships (profile_id, segment, status, since, last_qualified, method, "
    "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (profile_id, segment) DO UPDATE SET "
    "status = excluded.status, since = excluded.since, last_qualified = excluded.last_qualified, "
    "method = excluded.method, updated_at = excluded.updated_at"
)
_UPSERT_TIMER = (
    "INSERT INTO timers (profile_id, segment, due) VALUES (?, ?, ?) "
    "ON CONFLICT (profile_id, segment) DO UPDATE SET due = excluded.due"
)
_DELETE_TIMER = "DELETE FROM timers WHERE profile_id = ? AND segment = ?"
_UPSERT_SEGMENT = (
    "INSERT INTO segments (name, spec, ast, method, reason, created_at, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, "
    "ast = excluded.ast, method = excluded.method, reason = excluded.reason, "
    "updated_at = excluded.updated_at"
)
_CAP_EVENTS = (
    "DELETE FROM events WHERE rowid IN (SELECT rowid FROM events WHERE profile_id = ? "
    "ORDER BY ts DESC, record_id DESC LIMIT -1 OFFSET ?)"
)
_UPSERT_POLICY = (
    "INSERT INTO merge_policies (name, spec, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at"
)
_INSERT_JOB = (
    "INSERT INTO jobs (job_id, trigger, status, started_at, finished_at, total, counts, error) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE_JOB = (
    "UPDATE jobs SET scanned = ?, counts = ?, status = ?, finished_at = ? WHERE job_id = ?"
)
_JOB_COLUMNS = "job_id, trigger, status, started_at, finished_at, total, scanned, counts, error"

LISTINGS: dict[str, str] = {
    "profiles": "SELECT rowid, profile_id FROM facts WHERE rowid > ? ORDER BY rowid LIMIT ?",
    "events": "SELECT rowid, record_id, profile_id, dataset, ts FROM events WHERE rowid > ? "
    "ORDER BY rowid LIMIT ?",
    "members": "SELECT rowid, profile_id, segment FROM memberships WHERE status IN "
    "('realized', 'existing') AND rowid > ? ORDER BY rowid LIMIT ?",
}
"""Named listings of the state for `cdp check`."""

_json = msgspec.json.Encoder()
_any_msgpack = msgspec.msgpack.Decoder()
_identities_decoder = msgspec.msgpack.Decoder(list[Identity])
_counts_decoder = msgspec.json.Decoder(dict[str, dict[str, int]])


class Writes(Protocol):
    """Where writes go: a step's `Tx`, or a buffer the handler filters before it."""

    def add(self, sql: str, row: tuple[Any, ...]) -> None: ...

    def add_many(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None: ...


class StoredSegment(msgspec.Struct, frozen=True):
    name: str
    spec: bytes
    ast: bytes
    updated_at: float


class StoredFacts(msgspec.Struct):
    """A profile's view as segmentation keeps it."""

    profile_id: str
    attributes: dict[str, Any]
    identities: list[Identity]
    views: dict[str, dict[str, Any]]


class StoredMembership(msgspec.Struct, frozen=True):
    profile_id: str
    segment: str
    status: str
    since: float


class StoredTimer(msgspec.Struct, frozen=True):
    profile_id: str
    segment: str
    due: float


class MemberCounts(msgspec.Struct, frozen=True):
    """A segment's memberships by status, and when one of them last changed."""

    realized: int = 0
    existing: int = 0
    exited: int = 0
    last: float | None = None


class HourlyChanges(msgspec.Struct):
    """A segment's entries and exits per hour over the last `HOURS` hours, oldest first."""

    entered: list[int]
    exited: list[int]


def _ids(values: Iterable[str]) -> bytes:
    return _json.encode(list(values))


class SegmentationStore:
    """Named reads (rows decoded by column name) and writes (added to a `Writes`)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return await rows(self.db, sql, args)

    async def _one(self, sql: str, args: Sequence[Any] = ()) -> dict[str, Any]:
        return (await self._rows(sql, args))[0]

    # -- segments ---------------------------------------------------------------------
    async def segments(self) -> list[StoredSegment]:
        return [
            StoredSegment(str(r["name"]), bytes(r["spec"]), bytes(r["ast"]), float(r["updated_at"]))
            for r in await self._rows(
                "SELECT name, spec, ast, updated_at FROM segments ORDER BY name"
            )
        ]

    @staticmethod
    def put_segment(
        w: Writes, name: str, *, spec: bytes, ast: bytes, method: str, reason: str, now: float
    ) -> None:
        w.add(_UPSERT_SEGMENT, (name, spec, ast, method, reason, now, now))

    async def member_counts(self) -> dict[str, MemberCounts]:
        """Per segment: its memberships by status now, and when one of them last changed."""
        rows = await self._rows(
            "SELECT segment, sum(status = 'realized') AS realized, "
            "sum(status = 'existing') AS existing, sum(status = 'exited') AS exited, "
            "max(updated_at) AS last FROM memberships GROUP BY segment"
        )
        return {
            str(r["segment"]): MemberCounts(
                realized=int(r["realized"]),
                existing=int(r["existing"]),
                exited=int(r["exited"]),
                last=None if r["last"] is None else float(r["last"]),
            )
            for r in rows
        }

    async def hourly_changes(self, now: float) -> dict[str, HourlyChanges]:
        """Per segment: the memberships that entered and that exited in each of the 24
        clock hours up to `now` (oldest first, the last one the current hour).

        Read from the memberships as they are now (a membership keeps the time of its last
        change, `since`; a confirmation by a batch job keeps it): an entry is a member whose
        membership began in the hour (realized then, `existing` since if a job confirmed
        it); an exit is a membership that left in the hour and has not come back since. A
        profile that entered and left within the day counts as one exit only, and one that
        came back as one entry only. Exits are kept `EXITED_KEPT_S` (30 days), far longer
        than the day counted. One query over the index by time."""
        first = (now // HOUR_S - (HOURS - 1)) * HOUR_S
        rows = await self._rows(
            "SELECT segment, status = 'exited' AS gone, "
            "CAST((since - ?) / ? AS INTEGER) AS hour, count(*) AS n FROM memberships "
            "WHERE since >= ? AND since < ? GROUP BY segment, gone, hour",
            (first, HOUR_S, first, first + HOURS * HOUR_S),
        )
        out: dict[str, HourlyChanges] = {}
        for r in rows:
            counts = out.get(r["segment"])
            if counts is None:
                counts = out[str(r["segment"])] = HourlyChanges([0] * HOURS, [0] * HOURS)
            (counts.exited if r["gone"] else counts.entered)[int(r["hour"])] += int(r["n"])
        return out

    # -- merge policies ---------------------------------------------------------------
    @staticmethod
    def put_policy(w: Writes, name: str, spec: bytes, now: float) -> None:
        w.add(_UPSERT_POLICY, (name, spec, now))

    async def has_policy(self, name: str) -> bool:
        return bool(
            await self._rows("SELECT 1 AS found FROM merge_policies WHERE name = ?", (name,))
        )

    # -- profiles ---------------------------------------------------------------------
    async def facts(self, profile_ids: Iterable[str], *, views: bool) -> list[StoredFacts]:
        """The stored views of these profiles (the views under other merge policies only
        when `views`: only segments with a merge policy read them)."""
        rows = await self._rows(
            "SELECT profile_id, attributes, identities, views FROM facts "
            f"WHERE profile_id IN ({_IDS})",
            (_ids(profile_ids),),
        )
        return [
            StoredFacts(
                profile_id=r["profile_id"],
                attributes=_any_msgpack.decode(r["attributes"]),
                identities=_identities_decoder.decode(r["identities"]),
                views=_any_msgpack.decode(r["views"]) if views and r["views"] else {},
            )
            for r in rows
        ]

    async def events(
        self, profile_ids: Iterable[str], since: float | None = None
    ) -> list[tuple[str, ExperienceEvent]]:
        """(profile id, event) of these profiles, from `since` on (all of them if None)."""
        sql = (
            "SELECT profile_id, record_id, dataset, event_type, ts, payload FROM events "
            f"WHERE profile_id IN ({_IDS})"
        )
        args: tuple[Any, ...] = (_ids(profile_ids),)
        if since is not None:
            sql += " AND ts >= ?"
            args = (*args, since)
        return [
            (
                r["profile_id"],
                ExperienceEvent(
                    record_id=r["record_id"],
                    dataset=r["dataset"],
                    event_type=r["event_type"],
                    timestamp=r["ts"],
                    payload=_any_msgpack.decode(r["payload"]),
                ),
            )
            for r in await self._rows(sql + " ORDER BY ts", args)
        ]

    async def memberships(
        self, profile_ids: Iterable[str], *, members_only: bool = False
    ) -> list[StoredMembership]:
        sql = (
            "SELECT profile_id, segment, status, since FROM memberships "
            f"WHERE profile_id IN ({_IDS})"
        )
        if members_only:
            sql += " AND status IN ('realized', 'existing')"
        return [
            StoredMembership(r["profile_id"], r["segment"], r["status"], r["since"])
            for r in await self._rows(sql, (_ids(profile_ids),))
        ]

    async def timers(self, profile_ids: Iterable[str]) -> list[StoredTimer]:
        return [
            StoredTimer(r["profile_id"], r["segment"], r["due"])
            for r in await self._rows(
                f"SELECT profile_id, segment, due FROM timers WHERE profile_id IN ({_IDS})",
                (_ids(profile_ids),),
            )
        ]

    async def profile_count(self) -> tuple[int, int]:
        """How many profiles are held, and the largest rowid of their rows."""
        r = await self._one("SELECT count(*) AS n, max(rowid) AS top FROM facts")
        return int(r["n"]), int(r["top"] or 0)

    async def profile_ids(self) -> list[str]:
        """Every profile held, in the order the rows are stored (rowid)."""
        rows = await self.db.execute_fetchall("SELECT profile_id FROM facts ORDER BY rowid")
        return [str(r[0]) for r in rows]

    async def sample(self, rowids: Iterable[int] | None) -> list[tuple[str, dict[str, Any]]]:
        """(profile id, attributes) of the profiles at these rowids (all of them if None)."""
        if rowids is None:
            rows = await self._rows("SELECT profile_id, attributes FROM facts")
        else:
            rows = await self._rows(
                f"SELECT profile_id, attributes FROM facts WHERE rowid IN ({_IDS})",
                (_json.encode(list(rowids)),),
            )
        return [(str(r["profile_id"]), _any_msgpack.decode(r["attributes"])) for r in rows]

    @staticmethod
    def put_facts(
        w: Writes,
        profile_id: str,
        *,
        attributes: dict[str, Any],
        identities: list[Identity],
        views: dict[str, dict[str, Any]],
        at: float,
    ) -> None:
        w.add(
            _UPSERT_FACTS,
            (
                profile_id,
                msgpack_encoder.encode(attributes),
                msgpack_encoder.encode(identities),
                at,
                msgpack_encoder.encode(views),
            ),
        )

    @staticmethod
    def add_events(w: Writes, profile_id: str, events: Iterable[ExperienceEvent]) -> None:
        w.add_many(
            _INSERT_EVENT,
            [
                (
                    e.record_id,
                    profile_id,
                    e.dataset,
                    e.event_type,
                    e.timestamp,
                    msgpack_encoder.encode(e.payload),
                )
                for e in events
            ],
        )

    @staticmethod
    def remove_events(w: Writes, profile_id: str, record_ids: Iterable[str]) -> None:
        w.add_many(_REMOVE_EVENT, [(rid, profile_id) for rid in record_ids])

    @staticmethod
    def move_events(w: Writes, survivor: str, folded: str) -> None:
        w.add(_MOVE_EVENTS, (survivor, folded))

    @staticmethod
    def cap_events(w: Writes, profile_id: str, keep: int) -> None:
        """Keep the `keep` newest events of the profile."""
        w.add(_CAP_EVENTS, (profile_id, keep))

    @staticmethod
    def drop_profile(w: Writes, profile_id: str) -> None:
        """A folded profile leaves (its events moved to the survivor already)."""
        for table in ("facts", "memberships", "timers"):
            w.add(f"DELETE FROM {table} WHERE profile_id = ?", (profile_id,))

    @staticmethod
    def put_membership(
        w: Writes,
        profile_id: str,
        segment: str,
        status: str,
        *,
        since: float,
        last_qualified: float | None,
        method: str,
        now: float,
    ) -> None:
        w.add(
            _UPSERT_MEMBERSHIP,
            (profile_id, segment, status, since, last_qualified, method, now),
        )

    @staticmethod
    def put_timer(w: Writes, profile_id: str, segment: str, due: float) -> None:
        w.add(_UPSERT_TIMER, (profile_id, segment, due))

    @staticmethod
    def drop_timer(w: Writes, profile_id: str, segment: str) -> None:
        w.add(_DELETE_TIMER, (profile_id, segment))

    # -- timers -----------------------------------------------------------------------
    async def due_profiles(self, now: float, limit: int) -> list[str]:
        rows = await self._rows(
            "SELECT DISTINCT profile_id FROM timers WHERE due <= ? LIMIT ?", (now, limit)
        )
        return [str(r["profile_id"]) for r in rows]

    async def first_due(self) -> float | None:
        r = await self._one("SELECT min(due) AS first FROM timers")
        return None if r["first"] is None else float(r["first"])

    @staticmethod
    def postpone_timers(w: Writes, profile_ids: Iterable[str], now: float, until: float) -> None:
        """The due timers of these profiles are due again at `until`."""
        w.add(
            f"UPDATE timers SET due = ? WHERE due <= ? AND profile_id IN ({_IDS})",
            (until, now, _ids(profile_ids)),
        )

    @staticmethod
    def forget_exits(w: Writes, before: float) -> None:
        """Exited memberships last changed before `before` are not kept."""
        w.add("DELETE FROM memberships WHERE status = 'exited' AND updated_at < ?", (before,))

    # -- jobs ---------------------------------------------------------------------------
    @staticmethod
    def add_job(w: Writes, info: JobInfo) -> None:
        w.add(
            _INSERT_JOB,
            (
                info.job_id,
                info.trigger,
                info.status,
                info.started_at,
                info.finished_at,
                info.total,
                _json.encode(info.counts),
                info.error,
            ),
        )

    @staticmethod
    def update_job(w: Writes, info: JobInfo) -> None:
        """A job's progress: profiles scanned, counts, status, when it finished."""
        w.add(
            _UPDATE_JOB,
            (info.scanned, _json.encode(info.counts), info.status, info.finished_at, info.job_id),
        )

    async def job(self, job_id: str) -> JobInfo | None:
        rows = await self._rows(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    async def running_job(self) -> str | None:
        rows = await self._rows("SELECT job_id FROM jobs WHERE status IN ('queued', 'running')")
        return str(rows[0]["job_id"]) if rows else None

    async def jobs(self, limit: int) -> list[JobInfo]:
        rows = await self._rows(
            f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY started_at DESC LIMIT ?", (limit,)
        )
        return [_job(r) for r in rows]

    # -- publishing -------------------------------------------------------------------
    @staticmethod
    def to_outbox(w: Writes, out: Iterable[Outgoing], now: float) -> None:
        """Messages to publish once this commits (a write made outside a step)."""
        to_outbox(w, out, now)

    async def commit(self, tx: Tx) -> None:
        """Writes made outside a step (the admin API, the timers), in one transaction."""
        await apply(self.db, tx)


def _job(r: dict[str, Any]) -> JobInfo:
    return JobInfo(
        job_id=r["job_id"],
        kind="segmentation",
        trigger=r["trigger"],
        status=r["status"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
        total=r["total"],
        scanned=r["scanned"],
        counts=_counts_decoder.decode(r["counts"]),
        error=r["error"],
    )

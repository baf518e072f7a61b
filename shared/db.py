"""SQLite helpers: open a service's database (WAL), apply its migrations, batch writes.

Each service owns one SQLite file. Migrations are numbered per component (the runtime's
own tables and the service's tables are separate components), applied in order, once.
A `Tx` collects the writes of one batch so that they reach SQLite in a handful of calls
(one `executemany` per statement), never one await per record.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiosqlite
import msgspec


class Migration(msgspec.Struct, frozen=True):
    component: str
    version: int
    sql: str


async def open_db(path: Path | str, migrations: Sequence[Migration] = ()) -> aiosqlite.Connection:
    """Open (creating if needed) a SQLite file in WAL mode and bring its schema up to date."""
    if str(path) != ":memory:":
        # Personal data: the folder and the file are the owner's alone (SQLite gives its
        # -wal and -shm files the database file's mode).
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        if os.stat(path).st_mode & 0o077:  # created by an older version: narrowed
            with contextlib.suppress(PermissionError):  # not ours to change: keep running
                os.chmod(path, 0o600)
    db = await aiosqlite.connect(str(path), isolation_level=None)
    try:
        await db.executescript(
            """
            PRAGMA journal_mode=WAL;
            PRAGMA synchronous=NORMAL;
            PRAGMA foreign_keys=ON;
            PRAGMA busy_timeout=5000;
            PRAGMA cache_size=-65536;
            CREATE TABLE IF NOT EXISTS schema_migrations (
                component TEXT NOT NULL,
                version INTEGER NOT NULL,
                PRIMARY KEY (component, version)
            );
            """
        )
        await migrate(db, migrations)
    except BaseException:
        await db.close()
        raise
    return db


def _read_only_uri(path: Path | str) -> str:
    return f"file:{quote(str(Path(path).absolute()))}?mode=ro"


async def open_reader(
    path: Path | str, migrations: Sequence[Migration] = ()
) -> aiosqlite.Connection:
    """A read-only connection to a service's SQLite file, for reads that must not wait
    behind a write batch (WAL: readers and the writer do not block each other).

    Opened after `open_db` brought the schema up to date: a `migrations` not applied yet
    is refused (a reader never creates nor changes the schema). Read through `snapshot`."""
    db = await aiosqlite.connect(_read_only_uri(path), uri=True, isolation_level=None)
    try:
        await db.executescript(
            """
            PRAGMA query_only=ON;
            PRAGMA busy_timeout=5000;
            PRAGMA cache_size=-16384;
            """
        )
        found = await db.execute_fetchall("SELECT component, version FROM schema_migrations")
    except BaseException:
        await db.close()
        raise
    done = {(str(r[0]), int(r[1])) for r in found}
    missing = sorted({(m.component, m.version) for m in migrations} - done)
    if missing:
        await db.close()
        raise RuntimeError(f"{path}: migrations not applied yet: {missing}")
    return db


_snapshot_locks: weakref.WeakKeyDictionary[aiosqlite.Connection, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _snapshot_lock(db: aiosqlite.Connection) -> asyncio.Lock:
    lock = _snapshot_locks.get(db)
    if lock is None:
        lock = _snapshot_locks[db] = asyncio.Lock()
    return lock


@contextlib.asynccontextmanager
async def snapshot(db: aiosqlite.Connection) -> AsyncIterator[aiosqlite.Connection]:
    """One read transaction on `db` (a reader from `open_reader`): every query inside reads
    the same committed state, whatever commits meanwhile. Snapshots of one connection
    take turns."""
    async with _snapshot_lock(db):
        await db.execute("BEGIN")
        try:
            yield db
        finally:
            await rollback(db)


async def close_reader(db: aiosqlite.Connection) -> None:
    """Close a reader once the snapshot under way, if any, is over."""
    async with _snapshot_lock(db):
        await db.close()


async def rows(
    db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()
) -> list[dict[str, Any]]:
    """The rows of a query, each a dict by column name (stores read columns by name,
    never by position)."""
    async with db.execute(sql, params) as cursor:
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]


async def migrate(db: aiosqlite.Connection, migrations: Sequence[Migration]) -> list[Migration]:
    """Apply the migrations not applied yet, each in its own transaction. Returns them."""
    rows = await db.execute_fetchall("SELECT component, version FROM schema_migrations")
    done = {(str(r[0]), int(r[1])) for r in rows}
    applied: list[Migration] = []
    for m in sorted(migrations, key=lambda m: (m.component, m.version)):
        if (m.component, m.version) in done:
            continue
        statements = [s for s in m.sql.split(";") if s.strip()]
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                await db.execute(statement)
            await db.execute(
                "INSERT INTO schema_migrations (component, version) VALUES (?, ?)",
                (m.component, m.version),
            )
            await db.execute("COMMIT")
        except BaseException:
            await rollback(db)
            raise
        applied.append(m)
    return applied


async def rollback(db: aiosqlite.Connection) -> None:
    """Roll back the open transaction, if any, without hiding the error that caused it.

    SQLite rolls a transaction back by itself after some errors (a full disk during
    COMMIT, an I/O error): a ROLLBACK then fails with "no transaction is active", which
    would replace the real error. Called from an `except` block: the error that caused
    the rollback is the one that propagates, whatever the ROLLBACK does.
    """
    if not db.in_transaction:
        return
    with contextlib.suppress(sqlite3.Error):
        await db.execute("ROLLBACK")


class Tx:
    """The writes of one batch, applied atomically by `apply`, in the order they were added.

    Consecutive rows of one statement are sent in one `executemany`; a statement added
    again after another one runs again, after it. Handlers that want one call per table
    therefore add their writes table by table, not record by record.
    """

    __slots__ = ("_ops",)

    def __init__(self) -> None:
        self._ops: list[tuple[str, list[Sequence[Any]]]] = []

    def add(self, sql: str, row: Sequence[Any]) -> None:
        ops = self._ops
        if ops and ops[-1][0] == sql:
            ops[-1][1].append(row)
        else:
            ops.append((sql, [row]))

    def add_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        batch = list(rows)
        if not batch:
            return
        ops = self._ops
        if ops and ops[-1][0] == sql:
            ops[-1][1].extend(batch)
        else:
            ops.append((sql, batch))

    def extend(self, other: Tx) -> None:
        """Add every write of `other` after those of this one, in its order."""
        for sql, rows in other._ops:
            self.add_many(sql, rows)

    def steps(self) -> list[tuple[str, list[Sequence[Any]]]]:
        """(statement, rows) in execution order."""
        return list(self._ops)

    def __bool__(self) -> bool:
        return bool(self._ops)

    @property
    def statements(self) -> int:
        """How many calls `apply` makes (one per run of one statement)."""
        return len(self._ops)


_locks: weakref.WeakKeyDictionary[aiosqlite.Connection, asyncio.Lock] = weakref.WeakKeyDictionary()


def write_lock(db: aiosqlite.Connection) -> asyncio.Lock:
    """The lock every writer of `db` holds, so that transactions never interleave
    (a consumer's batch and an HTTP request share one connection)."""
    lock = _locks.get(db)
    if lock is None:
        lock = _locks[db] = asyncio.Lock()
    return lock


async def apply(
    db: aiosqlite.Connection, tx: Tx, *, before_commit: Callable[[], None] | None = None
) -> None:
    """Run every write of `tx` in one transaction: all of them or none. `before_commit`
    runs right before COMMIT: if it raises, the transaction is rolled back (a fence: the
    partition's lease is no longer held)."""
    async with write_lock(db):
        await db.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in tx._ops:
                if len(rows) == 1:
                    await db.execute(sql, rows[0])
                else:
                    await db.executemany(sql, rows)
            if before_commit is not None:
                before_commit()
            await db.execute("COMMIT")
        except BaseException:
            await rollback(db)
            raise

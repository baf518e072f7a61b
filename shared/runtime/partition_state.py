"""A partition's SQLite file: the runtime's tables (offset, outbox, failed messages), the
service's own, and the row `rt_partition` (partition number, fencing token, applied
sequence). The applied sequence follows the offset the runtime commits with the handler's
writes, in the same transaction (a trigger)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import aiosqlite
import msgspec

from shared.db import Migration, open_db, write_lock
from shared.runtime.actor import RUNTIME_MIGRATIONS

PARTITION_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "partition",
        1,
        """
        CREATE TABLE rt_partition (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            partition INTEGER NOT NULL,
            token INTEGER NOT NULL,
            applied_seq INTEGER NOT NULL
        )
        """,
    ),
)

# The applied sequence follows the offset the runtime commits with the handler's writes,
# in the same transaction (a trigger: the migration runner splits statements on ';'). Only
# the partition's main consumer (`<service>-pNN`) counts: a partition's further inputs
# (`<service>-pNN-<input>`) keep their own offsets in rt_offsets.
_TRIGGERS = """
DROP TRIGGER IF EXISTS rt_partition_applied_insert;
DROP TRIGGER IF EXISTS rt_partition_applied_update;
CREATE TRIGGER IF NOT EXISTS rt_partition_main_insert AFTER INSERT ON rt_offsets
WHEN NEW.consumer NOT GLOB '*-p[0-9]*-*'
BEGIN UPDATE rt_partition SET applied_seq = NEW.stream_seq WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS rt_partition_main_update AFTER UPDATE ON rt_offsets
WHEN NEW.consumer NOT GLOB '*-p[0-9]*-*'
BEGIN UPDATE rt_partition SET applied_seq = NEW.stream_seq WHERE id = 1; END;
"""


def partition_path(data_dir: Path, service: str, partition: int) -> Path:
    return data_dir / service / f"p{partition:02d}.db"


def partition_consumer(service: str, partition: int, input_name: str = "") -> str:
    """The partition's name: its offset row, its outgoing ids (whoever holds it); a
    further input of the partition (`input_name`) is `<service>-pNN-<input>`."""
    base = f"{service}-p{partition:02d}"
    return f"{base}-{input_name}" if input_name else base


class PartitionFileState(msgspec.Struct, frozen=True):
    """What a partition file says of itself (its `rt_partition` row)."""

    partition: int
    token: int
    applied_seq: int


def read_state(path: Path) -> PartitionFileState | None:
    """The `rt_partition` row of a partition file; None if missing or not one."""
    if not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            row = conn.execute(
                "SELECT partition, token, applied_seq FROM rt_partition WHERE id = 1"
            ).fetchone()
    except sqlite3.Error:
        return None
    if row is None:
        return None
    return PartitionFileState(int(row[0]), int(row[1]), int(row[2]))


async def open_partition_db(
    path: Path, migrations: Sequence[Migration] = ()
) -> aiosqlite.Connection:
    db = await open_db(path, RUNTIME_MIGRATIONS + PARTITION_MIGRATIONS + tuple(migrations))
    try:
        await db.executescript(_TRIGGERS)
    except BaseException:
        await db.close()
        raise
    return db


async def hold(db: aiosqlite.Connection, partition: int, consumer: str, token: int) -> int:
    """Mark the file as held under `token`; returns its applied sequence."""
    async with write_lock(db):
        rows = list(
            await db.execute_fetchall(
                "SELECT partition FROM rt_partition WHERE id = 1 AND partition != ?", (partition,)
            )
        )
        if rows:
            raise RuntimeError(f"partition file of partition {rows[0][0]}, not {partition}")
        offset = list(
            await db.execute_fetchall(
                "SELECT stream_seq FROM rt_offsets WHERE consumer = ?", (consumer,)
            )
        )
        seq = int(offset[0][0]) if offset else 0
        await db.execute(
            "INSERT INTO rt_partition (id, partition, token, applied_seq) VALUES (1, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET token = excluded.token, "
            "applied_seq = excluded.applied_seq",
            (partition, token, seq),
        )
    return seq

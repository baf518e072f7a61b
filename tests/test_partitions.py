"""Partitions that move between instances: snapshots against a real server, and the
partitioned counter (tests.actors.pcounter) run as several processes, handed over
gracefully, killed, and stopped until its leases expire."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from ops.natsd import NatsServer
from shared.runtime.actor import Committer, Delivery, Step
from shared.runtime.partition_state import hold, open_partition_db, read_state
from shared.runtime.snapshots import (
    LeaseLost,
    SnapshotRefused,
    Snapshots,
    ensure_snapshot_buckets,
    object_name,
)
from tests.actors.pcounter import PCounterActor

pytestmark = [pytest.mark.asyncio]

MIGRATIONS = PCounterActor.partition_migrations


async def _rows(db: aiosqlite.Connection) -> list[tuple[object, ...]]:
    return [tuple(r) for r in await db.execute_fetchall("SELECT * FROM applied ORDER BY seq")]


async def _partition_file(path: Path, partition: int, token: int, seqs: range) -> None:
    """A partition file held under `token` that applied `seqs` (one row per message)."""
    db = await open_partition_db(path, MIGRATIONS)
    try:
        await hold(db, partition, f"pcounter-p{partition:02d}", token)

        async def handler(step: Step) -> None:
            for d in step.deliveries:
                step.tx.add(
                    "INSERT INTO applied (id, key, seq) VALUES (?, ?, ?)", (d.seq, "k", d.seq)
                )

        committer = Committer(f"pcounter-p{partition:02d}", handler, db)
        await committer.handle([Delivery("test.pcount.3", b"{}", s) for s in seqs])
    finally:
        await db.close()


async def test_a_restored_snapshot_has_the_same_rows_and_sequence(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    js = nc.jetstream()
    await ensure_snapshot_buckets(js)
    snaps = Snapshots(js, "pcounter")
    await snaps.open()
    src = tmp_path / "a" / "p03.db"
    await _partition_file(src, 3, 5, range(1, 11))
    db = await open_partition_db(src, MIGRATIONS)
    try:
        entry = await snaps.take(db, 3, lambda: True)
        original = await _rows(db)
    finally:
        await db.close()
    assert (entry.seq, entry.token, entry.object) == (10, 5, object_name("pcounter", 3, 5, 10))
    latest = await snaps.latest(3)
    assert latest is not None and latest[0] == entry

    dst = tmp_path / "b" / "p03.db"
    await snaps.restore(entry, dst)
    state = read_state(dst)
    assert state is not None and (state.partition, state.token, state.applied_seq) == (3, 5, 10)
    db = await open_partition_db(dst, MIGRATIONS)
    try:
        assert await _rows(db) == original
        assert len(original) == 10
        offsets = await db.execute_fetchall("SELECT consumer, stream_seq FROM rt_offsets")
        assert [tuple(r) for r in offsets] == [("pcounter-p03", 10)]
    finally:
        await db.close()

    # A newer snapshot replaces the older one: its object is deleted.
    await _partition_file(src, 3, 5, range(11, 13))
    db = await open_partition_db(src, MIGRATIONS)
    try:
        newer = await snaps.take(db, 3, lambda: True)
    finally:
        await db.close()
    assert newer.seq == 12
    with pytest.raises(NotFoundError):
        await snaps.store.get_info(entry.object)


async def test_a_snapshot_under_a_lower_token_or_a_lost_lease_is_refused(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    js = nc.jetstream()
    await ensure_snapshot_buckets(js)
    snaps = Snapshots(js, "pcounter")
    await snaps.open()
    new_owner = tmp_path / "new" / "p01.db"
    stale_owner = tmp_path / "stale" / "p01.db"
    await _partition_file(new_owner, 1, 9, range(1, 6))
    await _partition_file(stale_owner, 1, 4, range(1, 21))  # further on, but a stale token

    db = await open_partition_db(new_owner, MIGRATIONS)
    try:
        with pytest.raises(LeaseLost) as lost:
            await snaps.take(db, 1, lambda: False)
    finally:
        await db.close()
    assert (lost.value.partition, lost.value.token) == (1, 9)
    assert await snaps.latest(1) is None, "a snapshot taken without a valid lease was indexed"

    db = await open_partition_db(new_owner, MIGRATIONS)
    try:
        indexed = await snaps.take(db, 1, lambda: True)
    finally:
        await db.close()
    db = await open_partition_db(stale_owner, MIGRATIONS)
    try:
        with pytest.raises(SnapshotRefused) as refused:
            await snaps.take(db, 1, lambda: True)
    finally:
        await db.close()
    assert (refused.value.token, refused.value.index_token) == (4, 9)
    latest = await snaps.latest(1)
    assert latest is not None and latest[0] == indexed
    names = {o.name for o in await snaps.store.list()}
    assert names == {indexed.object}, "the refused snapshot's object was left behind"


def _count(path: Path, sql: str) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as conn:
        return int(conn.execute(sql).fetchone()[0] or 0)

"""Snapshots of a partition's SQLite file in the JetStream object store.

A snapshot is a consistent copy of the file (SQLite's online backup), stored as the
object `<service>/<partition>/<token>-<seq>`: `seq` is the last stream sequence it has
applied, `token` the fencing token (lease revision) its owner held it under. The index
(a KV bucket, key `<service>.<partition>`) names the latest one; it is written with
compare-and-set on its revision, and refuses:
- a snapshot whose token is lower than the one the index holds (a stale owner's), and
- a snapshot taken while its lease is no longer valid (checked right before the index
  is written).
Once a newer snapshot is indexed, the object of the previous one is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiosqlite
import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.errors import NotFoundError as JsNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from shared.db import write_lock
from shared.subjects import SNAPSHOT_BUCKET, SNAPSHOT_INDEX_BUCKET


class PartitionError(Exception):
    """Root of the partition runtime's errors: which service and partition."""

    def __init__(self, service: str, partition: int, message: str) -> None:
        super().__init__(f"{service} partition {partition}: {message}")
        self.service = service
        self.partition = partition


class LeaseLost(PartitionError):
    """A commit, a publish or a snapshot of a partition whose lease is no longer valid."""

    def __init__(self, service: str, partition: int, token: int) -> None:
        super().__init__(service, partition, f"lease {token} is no longer held")
        self.token = token


class SnapshotRefused(PartitionError):
    """A snapshot the index does not take: a newer owner's token is there already."""

    def __init__(self, service: str, partition: int, token: int, index_token: int) -> None:
        super().__init__(
            service, partition, f"snapshot under token {token} refused: index at {index_token}"
        )
        self.token = token
        self.index_token = index_token


class SnapshotEntry(msgspec.Struct, frozen=True):
    """The index's entry of a partition: its latest snapshot."""

    object: str
    seq: int
    token: int
    at: float
    """Unix time the snapshot was taken."""


_entry = msgspec.json.Decoder(SnapshotEntry)
_encode = msgspec.json.Encoder()


def object_name(service: str, partition: int, token: int, seq: int) -> str:
    return f"{service}/{partition}/{token}-{seq}"


def index_key(service: str, partition: int) -> str:
    return f"{service}.{partition}"


async def ensure_snapshot_buckets(js: JetStreamContext, replicas: int = 1) -> None:
    """Create the snapshot store and its index if missing (the admin's step, with the
    streams)."""
    try:
        await js.object_store(SNAPSHOT_BUCKET)
    except (BucketNotFoundError, JsNotFoundError):
        await js.create_object_store(
            SNAPSHOT_BUCKET, ObjectStoreConfig(bucket=SNAPSHOT_BUCKET, replicas=replicas)
        )
    try:
        await js.key_value(SNAPSHOT_INDEX_BUCKET)
    except (BucketNotFoundError, JsNotFoundError):
        await js.create_key_value(
            KeyValueConfig(bucket=SNAPSHOT_INDEX_BUCKET, history=1, replicas=replicas)
        )


class Snapshots:
    """Take, index and restore the snapshots of one service's partitions."""

    def __init__(self, js: JetStreamContext, service: str) -> None:
        self._js = js
        self.service = service
        self._store: ObjectStore | None = None
        self._index: KeyValue | None = None
        self._log = structlog.get_logger(service=service)

    async def open(self) -> None:
        self._store = await self._js.object_store(SNAPSHOT_BUCKET)
        self._index = await self._js.key_value(SNAPSHOT_INDEX_BUCKET)

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            raise RuntimeError("snapshots: not opened")
        return self._store

    @property
    def index(self) -> KeyValue:
        if self._index is None:
            raise RuntimeError("snapshots: not opened")
        return self._index

    async def latest(self, partition: int) -> tuple[SnapshotEntry, int] | None:
        """The index's entry of `partition` and its revision; None if there is none."""
        try:
            e = await self.index.get(index_key(self.service, partition))
        except KeyNotFoundError:
            return None
        if e.value is None or e.revision is None:
            return None
        return _entry.decode(e.value), e.revision

    async def take(
        self,
        db: aiosqlite.Connection,
        partition: int,
        valid: Callable[[], bool],
    ) -> SnapshotEntry:
        """Copy `db` (a partition file, consistent: no commit runs during the copy), store
        the copy and index it. Raises `LeaseLost` if `valid()` is false before the index
        is written, `SnapshotRefused` if the index holds a higher token."""
        with tempfile.TemporaryDirectory(prefix="cdp-snapshot-") as tmp:
            copy = Path(tmp) / "copy.db"
            target = sqlite3.connect(str(copy), check_same_thread=False)
            try:
                async with write_lock(db):
                    await db.backup(target)
                row = target.execute(
                    "SELECT partition, token, applied_seq FROM rt_partition WHERE id = 1"
                ).fetchone()
            finally:
                target.close()
            if row is None or int(row[0]) != partition:
                raise PartitionError(self.service, partition, "not a partition file")
            token, seq = int(row[1]), int(row[2])
            current = await self.latest(partition)
            self._check(partition, token, valid, current)
            if current is not None and current[0].seq == seq and current[0].token == token:
                return current[0]  # nothing applied since the last one
            name = object_name(self.service, partition, token, seq)
            with copy.open("rb") as f:
                await self.store.put(name, f)
            entry = SnapshotEntry(name, seq, token, time.time())
            while True:
                self._check(partition, token, valid, current)
                try:
                    await self.index.update(
                        index_key(self.service, partition),
                        _encode.encode(entry),
                        last=current[1] if current is not None else 0,
                    )
                    break
                except KeyWrongLastSequenceError:
                    current = await self.latest(partition)  # someone else indexed: check again
                    continue
                except BaseException:
                    with contextlib.suppress(Exception):
                        await self.store.delete(name)
                    raise
        if current is not None and current[0].object != name:
            with contextlib.suppress(Exception):
                await self.store.delete(current[0].object)
        self._log.info("snapshot taken", partition=partition, seq=seq, fencing=token)
        return entry

    def _check(
        self,
        partition: int,
        token: int,
        valid: Callable[[], bool],
        current: tuple[SnapshotEntry, int] | None,
    ) -> None:
        if not valid():
            raise LeaseLost(self.service, partition, token)
        if current is not None and current[0].token > token:
            raise SnapshotRefused(self.service, partition, token, current[0].token)

    async def restore(self, entry: SnapshotEntry, path: Path) -> None:
        """Replace the file at `path` (closed) by the snapshot `entry`."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                await self.store.get(entry.object, writeinto=f)
            for suffix in ("-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240
            await asyncio.to_thread(os.replace, tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # noqa: ASYNC240
        self._log.info("snapshot restored", object=entry.object, seq=entry.seq, fencing=entry.token)

    async def delete_all(self, partition: int) -> None:
        """Drop a partition's index entry and its object (tests, a reset)."""
        current = await self.latest(partition)
        if current is None:
            return
        with contextlib.suppress(Exception):
            await self.store.delete(current[0].object)
        with contextlib.suppress(KeyNotFoundError):
            await self.index.delete(index_key(self.service, partition))

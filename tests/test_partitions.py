"""Partitions that move between instances: snapshots against a real server, and the
partitioned counter (tests.actors.pcounter) run as several processes, handed over
gracefully, killed, and stopped until its leases expire."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiosqlite
import pytest
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, NotFoundError

from ops.natsd import NatsServer, free_port
from shared import admin, subjects
from shared.runtime.actor import Committer, Delivery, Step
from shared.runtime.coordination import ensure_buckets
from shared.runtime.partition_state import hold, open_partition_db, partition_path, read_state
from shared.runtime.partitions import lease_key
from shared.runtime.snapshots import (
    LeaseLost,
    SnapshotRefused,
    Snapshots,
    ensure_snapshot_buckets,
    object_name,
)
from shared.streams import ensure_streams
from shared.subjects import LEASES_BUCKET, partition_of
from tests.actors.pcounter import IN_STREAM, OUT_STREAM, PCounterActor, input_subject
from tests.helpers import eventually

pytestmark = [pytest.mark.asyncio]

ROOT = Path(__file__).resolve().parent.parent
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


async def test_a_commit_refused_by_its_guard_leaves_nothing_behind(tmp_path: Path) -> None:
    """The fence on commit: once the guard refuses, the step's writes, its outgoing
    messages and its offset are rolled back together."""
    path = tmp_path / "p02.db"
    await _partition_file(path, 2, 3, range(1, 4))
    db = await open_partition_db(path, MIGRATIONS)
    held = True

    def guard() -> None:
        if not held:
            raise LeaseLost("pcounter", 2, 3)

    async def handler(step: Step) -> None:
        for d in step.deliveries:
            step.tx.add("INSERT INTO applied (id, key, seq) VALUES (?, ?, ?)", (d.seq, "k", d.seq))
            step.emit("test.pout.2", b"x")

    try:
        committer = Committer("pcounter-p02", handler, db, guard=guard)
        done = await committer.handle([Delivery("test.pcount.2", b"{}", 4)])
        assert [len(out) for out, _ in done.rounds] == [1]
        held = False
        with pytest.raises(LeaseLost):
            await committer.handle([Delivery("test.pcount.2", b"{}", 5)])
        assert [r[0] for r in await _rows(db)] == [1, 2, 3, 4]
        outbox = await db.execute_fetchall("SELECT count(*) FROM rt_outbox")
        assert next(iter(outbox))[0] == 1  # the committed step's, not the refused one's
    finally:
        await db.close()
    state = read_state(path)
    assert state is not None and (state.token, state.applied_seq) == (3, 4)


# -- several processes --------------------------------------------------------------------
PARTITIONS = 8
KEYS = 40
TTL = 4.0
"""Seconds an instance stays live and a lease held without a heartbeat (the buckets')."""


class Instance:
    """One pcounter process, its own data folder and log."""

    def __init__(self, name: str, nats_url: str, tmp: Path) -> None:
        self.name = name
        self.dir = tmp / name
        self.log = tmp / f"{name}.log"
        self.env = {
            **os.environ,
            "CDP_NATS_URL": nats_url,
            "CDP_DATA_DIR": str(self.dir),
            "CDP_PCOUNTER_PORT": str(free_port()),
            "CDP_INSTANCE": name,
            "CDP_PARTITIONS": str(PARTITIONS),
            "CDP_FETCH_BATCH": "40",
            "CDP_SNAPSHOT_INTERVAL": "1",
            "CDP_SNAPSHOT_EVERY": "150",
            "CDP_LOG_FORMAT": "json",
            "CDP_LOG_LEVEL": "info",
            "PYTHONPATH": str(ROOT),
        }
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.actors.pcounter",
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.returncode is None
        os.kill(self.proc.pid, sig)

    async def stop(self) -> int:
        """SIGTERM, as an operator stops it: its exit status."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 30)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            await self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


async def _setup(nc: Client) -> None:
    js = nc.jetstream()
    await ensure_streams(js, (IN_STREAM, OUT_STREAM), buckets=())
    await ensure_snapshot_buckets(js)
    await ensure_buckets(js, instance_ttl=TTL, lease_ttl=TTL)


async def _owners(nc: Client) -> dict[int, tuple[str, int]]:
    """Each held partition's holder and its lease's revision (the last renewal's)."""
    kv = await nc.jetstream().key_value(LEASES_BUCKET)
    out: dict[int, tuple[str, int]] = {}
    for p in range(PARTITIONS):
        try:
            e = await kv.get(lease_key("pcounter", p))
        except KeyNotFoundError:
            continue
        if e.value:
            out[p] = (e.value.decode(), int(e.revision or 0))
    return out


class Producer:
    """Publishes TOTAL numbered items over KEYS keys, each to its key's partition, at a
    steady pace; remembers the last stream sequence of each partition."""

    def __init__(self, nc: Client, total: int, seconds: float) -> None:
        self.js = nc.jetstream()
        self.total = total
        self.pause = seconds / (total / 20)
        self.sent = 0
        self.last_seq: dict[int, int] = {}
        self.totals: dict[str, int] = {}

    async def run(self) -> None:
        for i in range(self.total):
            key = f"k{i % KEYS}"
            p = partition_of(key, PARTITIONS)
            ack = await self.js.publish(
                input_subject(p), json.dumps({"id": i, "key": key, "n": 1 + i % 3}).encode()
            )
            self.last_seq[p] = ack.seq
            self.totals[key] = self.totals.get(key, 0) + 1 + i % 3
            self.sent = i + 1
            if self.sent % 20 == 0:
                await asyncio.sleep(self.pause)


def _file(tmp: Path, owner: str, p: int) -> Path:
    return partition_path(tmp / owner, "pcounter", p)


async def _drained(nc: Client, tmp: Path, producer: Producer, live: set[str]) -> bool:
    """Every partition held by a live instance, which has applied its last message."""
    owners = await _owners(nc)
    for p, last in producer.last_seq.items():
        if p not in owners or owners[p][0] not in live:
            return False
        state = read_state(_file(tmp, owners[p][0], p))
        if state is None or state.applied_seq != last:
            return False
    return True


def _query(path: Path, sql: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as c:
        return [tuple(r) for r in c.execute(sql).fetchall()]


async def _outputs(nc: Client, expected: int) -> list[int]:
    """Every output in the output stream (ids), in order."""
    js = nc.jetstream()
    await eventually(lambda: _at_least(nc, OUT_STREAM.name, expected), timeout=30, interval=0.2)
    sub = await js.subscribe("test.pout.*", ordered_consumer=True)
    ids: list[int] = []
    try:
        total = (await js.stream_info(OUT_STREAM.name)).state.messages
        while len(ids) < total:
            msg = await sub.next_msg(timeout=5)
            ids.append(int(msg.data))
    finally:
        await sub.unsubscribe()
    return ids


async def _at_least(nc: Client, stream: str, n: int) -> bool:
    return bool((await nc.jetstream().stream_info(stream)).state.messages >= n)


async def _check_final(nc: Client, tmp: Path, producer: Producer) -> None:
    owners = await _owners(nc)
    totals: dict[str, int] = {}
    applied: list[int] = []
    for p in range(PARTITIONS):
        if p not in owners:
            continue
        path = _file(tmp, owners[p][0], p)
        for key, total in _query(path, "SELECT key, total FROM totals"):
            assert isinstance(key, str) and isinstance(total, int)
            assert key not in totals, f"{key} counted in two partitions"
            totals[key] = total
        applied += [int(r[0]) for r in _query(path, "SELECT id FROM applied")]  # type: ignore[call-overload]
    assert len(applied) == len(set(applied)), "an input was applied twice"
    assert sorted(applied) == list(range(producer.total)), "an input was lost"
    assert totals == producer.totals
    ids = await _outputs(nc, producer.total)
    assert len(ids) == len(set(ids)), "an output was published twice"
    assert sorted(ids) == list(range(producer.total)), "an output is missing"


async def _holding(nc: Client, names: set[str], exactly: bool = False) -> bool:
    """Every partition held, by instances among `names` (each of them, with `exactly`)."""
    owners = await _owners(nc)
    holders = {o for o, _ in owners.values()}
    if len(owners) != PARTITIONS or not holders <= names:
        return False
    return not exactly or holders == names


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_handover_join_leave_and_kill_apply_every_input_and_output_once(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    await _setup(nc)
    a, b, c = (Instance(n, nats_server.url, tmp_path) for n in ("a", "b", "c"))
    producer = Producer(nc, total=6000, seconds=20)
    try:
        await a.start()
        await b.start()
        await eventually(lambda: _holding(nc, {"a", "b"}, exactly=True), timeout=30)
        running = asyncio.create_task(producer.run())

        async def sent(n: int) -> bool:
            return producer.sent >= n

        await eventually(lambda: sent(1000), timeout=30)
        await c.start()  # joins: takes its share from a and b
        await eventually(lambda: _holding(nc, {"a", "b", "c"}, exactly=True), timeout=30)
        await eventually(lambda: sent(3000), timeout=30)
        assert await b.stop() == 0, b.text()[-3000:]  # leaves: hands its partitions over
        await eventually(lambda: _holding(nc, {"a", "c"}, exactly=True), timeout=30)
        await eventually(lambda: sent(4500), timeout=30)
        await a.kill()  # crashes: its leases expire, c restores and replays
        await running
        await eventually(lambda: _drained(nc, tmp_path, producer, {"c"}), timeout=60, interval=0.2)
        await _check_final(nc, tmp_path, producer)
        status = await admin.request(
            nc, subjects.admin("pcounter", "status"), admin.StatusRequest(), admin.ServiceStatus
        )
        assert status.instance == "c"
        assert [(p.partition, p.owner, p.pending) for p in status.partitions] == [
            (p, "c", 0) for p in range(PARTITIONS)
        ]
        assert all(p.snapshot_seq is not None for p in status.partitions)
    finally:
        for i in (a, b, c):
            await i.kill()
    assert "caught up with published outputs" in c.text() or "snapshot restored" in c.text()


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_a_stopped_owner_is_fenced_and_the_new_owner_wins(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    await _setup(nc)
    a, b = (Instance(n, nats_server.url, tmp_path) for n in ("a", "b"))
    producer = Producer(nc, total=4000, seconds=20)
    try:
        await a.start()
        await b.start()
        await eventually(lambda: _holding(nc, {"a", "b"}, exactly=True), timeout=30)
        running = asyncio.create_task(producer.run())
        await eventually(lambda: _true(producer.sent >= 800), timeout=30)
        stale = {p: token for p, (o, token) in (await _owners(nc)).items() if o == "a"}
        a.signal(signal.SIGSTOP)
        await eventually(lambda: _holding(nc, {"b"}), timeout=30)
        await eventually(lambda: _true(producer.sent >= 2000), timeout=30)
        a.signal(signal.SIGCONT)
        # It finds its leases gone: it drops those partitions, then takes its share again
        # from b (restored from b's snapshots, under new tokens).
        await eventually(lambda: _true(a.text().count("partition dropped") >= len(stale)))
        await running
        await eventually(
            lambda: _drained(nc, tmp_path, producer, {"a", "b"}), timeout=60, interval=0.2
        )
        await _check_final(nc, tmp_path, producer)
        js = nc.jetstream()
        snaps = Snapshots(js, "pcounter")
        await snaps.open()
        for p, token in stale.items():
            latest = await snaps.latest(p)
            assert latest is not None and latest[0].token > token, (p, latest, token)
    finally:
        for i in (a, b):
            await i.kill()


async def _true(value: bool) -> bool:
    return value

"""Services whose state is split into partitions that move between instances.

A partition's state is its own SQLite file, `<data dir>/<service>/p<NN>.db`, with the
runtime's tables (offset, outbox, failed messages) and the row `rt_partition`: the
partition number, the fencing token it is held under (its lease's revision at
acquisition) and the stream sequence it has applied, the last one written by the same
transaction as the handler's writes. Its messages come from its own subject (one filter
subject per partition) through a durable consumer named per partition and instance;
its offset and its outgoing message ids carry the partition's name only, so whoever holds
it next continues the same offset and publishes the same ids for the same step.

An instance registers in the live set (`coordination.Registry`), computes the owners of
every partition (`coordination.assign`, the same in every instance) and, when the live
set changes:
- releases each partition it holds and no longer owns (planned): it stops fetching,
  finishes the batch in flight, commits, snapshots, gives the lease up and deletes its
  consumer;
- acquires each partition it owns and does not hold: it takes the lease (retrying while
  the previous owner still holds it), restores the latest snapshot unless its own file
  is that snapshot or newer under the same token, publishes what the file's outbox still
  holds, catches up with the outputs its predecessor published (below), and consumes
  from the applied sequence + 1.

Fencing: every commit and every publish of a partition first checks that its lease is
still valid (`Lease.valid()`, a local deadline before the server's expiry), and is refused
with `LeaseLost` (rolled back) if not; the partition is then dropped at once, nothing more
committed or published (its lease key is deleted only if the server still has it as this
holding's revision). A snapshot is refused the same way, and the snapshot index refuses a
token lower than the one it holds.

Catch-up after a crash: outputs carry deterministic ids `<consumer>:<first>-<last>:<i>`
(the partition's consumer and the stream sequences of the step that emitted them). The new
owner reads the last output published on the partition's output subject, takes the step
(first, last) from its id, applies the messages before `first` without publishing their
outputs (they were published), applies `first..last` as one step, exactly as its
predecessor did, so that its outputs carry the same ids and JetStream drops them
(duplicate window), then runs normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import aiosqlite
import nats.errors
import structlog
from nats.js.errors import NotFoundError

from shared import admin
from shared.db import Migration
from shared.runtime.actor import (
    BLOCKED_RETRY_S,
    Committer,
    ConsumerRunner,
    ConsumerSpec,
    Delivery,
    Step,
    StepRef,
    flush_outbox,
    publish_outbox,
    step_of,
)
from shared.runtime.coordination import Lease, Registry, assign
from shared.runtime.partition_state import (
    hold,
    open_partition_db,
    partition_consumer,
    partition_path,
    read_state,
)
from shared.runtime.service import Service
from shared.runtime.snapshots import (
    LeaseLost,
    PartitionError,
    SnapshotEntry,
    SnapshotRefused,
    Snapshots,
)
from shared.runtime.tasks import cancel, cancel_all
from shared.subjects import StreamSpec

RETRY_S = 0.5
"""How often an instance tries again to take a partition whose lease someone holds."""


def lease_key(service: str, partition: int) -> str:
    return f"{service}.p{partition:02d}"


@dataclass(frozen=True)
class PartitionInput:
    """One input of a partition: its messages (`stream`, filtered on `subject`), the step
    that applies them (bound to the partition) and, if the step publishes per partition,
    where its outputs land (`output`, for the catch-up after a crash: only this input's
    step ids may be last there). `name` is empty for the partition's main input (consumer
    `<service>-pNN`, whose applied sequence the snapshots carry); a further input has a
    name of its own (consumer `<service>-pNN-<name>`), its own durable consumer and its
    own offset row in the partition's file."""

    stream: StreamSpec
    subject: str
    handler: Callable[[Step], Awaitable[None]]
    name: str = ""
    output: tuple[StreamSpec, str] | None = None


class _Feed:
    """One input of a held partition: its consumer's names and its runner."""

    def __init__(self, held: HeldPartition, spec: PartitionInput) -> None:
        svc = held.service
        self.spec = spec
        self.consumer = partition_consumer(svc.name, held.partition, spec.name)
        self.durable = f"{self.consumer}-{svc.instance}"
        self.runner: ConsumerRunner | None = None


class HeldPartition:
    """One partition this instance holds: its lease, file, consumer and snapshots."""

    def __init__(self, service: PartitionedService, partition: int, lease: Lease) -> None:
        self.service = service
        self.partition = partition
        self.lease = lease
        assert lease.token is not None
        self.token: int = lease.token
        self.consumer = partition_consumer(service.name, partition)
        self.durable = f"{self.consumer}-{service.instance}"
        self.path = partition_path(service.settings.data_dir, service.name, partition)
        self.db: aiosqlite.Connection | None = None
        self.feeds: list[_Feed] = []
        self._bound = False
        self.last_snapshot: SnapshotEntry | None = None
        self._timer: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._lost = False
        self._closed = False
        self.log = structlog.get_logger(
            service=service.name, partition=partition, fencing=self.token
        )

    # -- fencing --------------------------------------------------------------------
    def valid(self) -> bool:
        return not self._lost and self.lease.valid()

    def guard(self) -> None:
        """Right before each commit and publish: refuse them once the lease is not valid."""
        if not self.valid():
            self.log.warning("commit refused: lease no longer valid")
            raise LeaseLost(self.service.name, self.partition, self.token)

    # -- acquisition --------------------------------------------------------------------
    async def open(self) -> None:
        svc = self.service
        snaps = svc.snapshots
        latest = await snaps.latest(self.partition)
        local = read_state(self.path)
        if latest is not None:
            entry = latest[0]
            self.last_snapshot = entry
            if (
                local is None
                or local.token != entry.token
                or local.applied_seq < entry.seq
                or local.partition != self.partition
            ):
                await snaps.restore(entry, self.path)
        elif local is not None and local.partition != self.partition:
            raise PartitionError(svc.name, self.partition, f"{self.path} is another partition's")
        self.db = await open_partition_db(self.path, svc.partition_migrations)
        seq = await hold(self.db, self.partition, self.consumer, self.token)
        self.log.info("partition acquired", applied_seq=seq, instance=svc.instance)
        self.guard()
        await flush_outbox(svc.js, self.db, self.log, lambda: not self.valid())
        await svc.partition_opened(self.partition, self.db)
        self._bound = True
        self.feeds = [_Feed(self, spec) for spec in svc.partition_inputs(self.partition)]
        names = {f.consumer for f in self.feeds}
        if len(names) != len(self.feeds) or self.consumer not in names:
            raise PartitionError(svc.name, self.partition, "inputs need one main, unique names")
        s = svc.settings
        for feed in self.feeds:
            spec = feed.spec
            await self._delete_stale_consumers(feed)
            applied = await self._offset(feed.consumer)
            last = await self._last_published(feed, applied)
            if last is not None:
                await self._catch_up(feed, applied, last)
            feed.runner = ConsumerRunner(
                ConsumerSpec(
                    feed.consumer,
                    spec.stream,
                    spec.handler,
                    filter_subjects=(spec.subject,),
                    description=f"{svc.name} partition {self.partition}"
                    + (f" ({spec.name})" if spec.name else ""),
                    durable=feed.durable,
                ),
                service=svc.name,
                nc=svc.nc,
                js=svc.js,
                db=self.db,
                metrics=svc.metrics,
                fetch_batch=s.fetch_batch,
                ack_wait=s.ack_wait,
                step_max_bytes=s.step_max_bytes,
                guard=self.guard,
            )
            await feed.runner.prepare()
            # Started before the next input's catch-up: an input may wait for another
            # (`Blocked`), listed before it.
            feed.runner.start()
            assert feed.runner.task is not None
            feed.runner.task.add_done_callback(self._runner_done)
        self._timer = asyncio.create_task(self._snapshots(), name=f"snapshots:{self.consumer}")

    @property
    def runner(self) -> ConsumerRunner | None:
        """The main input's runner."""
        for feed in self.feeds:
            if feed.consumer == self.consumer:
                return feed.runner
        return None

    def progress(self) -> int:
        """Messages applied so far over every input (offsets summed)."""
        return sum(f.runner.offset for f in self.feeds if f.runner is not None)

    async def _offset(self, consumer: str) -> int:
        assert self.db is not None
        rows = list(
            await self.db.execute_fetchall(
                "SELECT stream_seq FROM rt_offsets WHERE consumer = ?", (consumer,)
            )
        )
        return int(rows[0][0]) if rows else 0

    async def _delete_stale_consumers(self, feed: _Feed) -> None:
        """Consumers of this input left by instances that died (named per instance)."""
        js = self.service.js
        stream = feed.spec.stream
        others = [f"{f.consumer}-" for f in self.feeds if f is not feed]
        try:
            infos = await js.consumers_info(stream.name)
        except (TimeoutError, nats.errors.Error) as exc:
            self.log.warning("cannot list consumers", error=repr(exc))
            return
        for info in infos:
            name = info.name or ""
            if (
                name.startswith(f"{feed.consumer}-")
                and name != feed.durable
                and not any(name.startswith(o) for o in others)
            ):
                with contextlib.suppress(NotFoundError):
                    await js.delete_consumer(stream.name, name)

    async def _last_published(self, feed: _Feed, applied: int) -> StepRef | None:
        """The step whose outputs were published last on the input's output subject,
        if it lies past `applied` (see the module's description); else None."""
        output = feed.spec.output
        if output is None:
            return None
        out_stream, out_subject = output
        try:
            msg = await self.service.js.get_last_msg(out_stream.name, out_subject)
        except NotFoundError:
            return None
        step = step_of((msg.headers or {}).get("Nats-Msg-Id"))
        if step is None or step.consumer != feed.consumer or step.last <= applied:
            return None
        if step.first <= applied:
            self.log.warning(
                "snapshot inside a published step: its outputs may be published again",
                applied=applied,
                step=f"{step.first}-{step.last}",
            )
            return None
        return step

    async def _catch_up(self, feed: _Feed, applied: int, step: StepRef) -> None:
        """Apply the partition's messages up to `step` silently (its predecessor published
        their outputs), then `step` itself as one step, publishing: the same ids as its
        predecessor's, which JetStream drops. The messages are read one by one by
        sequence (the partition's subject has gaps: it shares its stream with others)."""
        svc = self.service
        assert self.db is not None
        stream, subject, handler = feed.spec.stream, feed.spec.subject, feed.spec.handler
        silent = Committer(
            feed.consumer,
            handler,
            self.db,
            self.log,
            max_step_bytes=svc.settings.step_max_bytes,
            guard=self.guard,
        )
        silent.silent = True
        exact = Committer(feed.consumer, handler, self.db, self.log, guard=self.guard)
        before: list[Delivery] = []
        again: list[Delivery] = []
        replayed = 0
        seq = applied + 1
        while seq <= step.last:
            try:
                msg = await svc.js.get_msg(stream.name, seq=seq, subject=subject, next=True)
            except NotFoundError:
                break
            if msg.seq is None or msg.seq > step.last:
                break
            seq = msg.seq + 1
            h = msg.headers or {}
            d = Delivery(msg.subject or subject, msg.data or b"", msg.seq, h.get("Nats-Msg-Id"))
            if d.seq >= step.first:
                again.append(d)
                continue
            before.append(d)
            if len(before) >= svc.settings.fetch_batch:
                await self._apply_all(silent, before)
                replayed += len(before)
                before = []
        if before:
            await self._apply_all(silent, before)
            replayed += len(before)
        if again:
            await self._apply_all(exact, again, one_step=True)
        self.log.info(
            "caught up with published outputs",
            consumer=feed.consumer,
            silent=replayed,
            step=f"{step.first}-{step.last}",
            again=len(again),
        )

    async def _apply_all(
        self, committer: Committer, deliveries: list[Delivery], *, one_step: bool = False
    ) -> None:
        """Apply every delivery, publishing what is not silent; a message left for later
        (`Blocked`: what it waits for comes through another input, already running) is
        applied again shortly."""
        svc = self.service
        assert self.db is not None
        while deliveries:
            done = await committer.handle(deliveries, one_step=one_step)
            for out, _notes in done.rounds:
                if out:
                    self.guard()
                    await publish_outbox(svc.js, self.db, out, self.log, lambda: not self.valid())
            if done.blocked is None:
                return
            deliveries = [d for d in deliveries if d.seq >= done.blocked]
            await asyncio.sleep(BLOCKED_RETRY_S)

    # -- snapshots ------------------------------------------------------------------------
    async def snapshot(self) -> SnapshotEntry:
        assert self.db is not None
        entry = await self.service.snapshots.take(self.db, self.partition, self.valid)
        self.last_snapshot = entry
        return entry

    async def _snapshots(self) -> None:
        s = self.service.settings
        check = min(1.0, s.snapshot_interval)
        taken_at = time.monotonic()
        done = self.progress()
        # Ends when `_stop` is set, not only when cancelled: a cancellation that lands in
        # the NATS client's I/O may be swallowed there.
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), check)
                return
            if not self.valid():
                self.service.lost(self.partition, "lease no longer valid")
                return
            now = self.progress()
            if now <= done:
                continue
            if now - done < s.snapshot_every and (
                time.monotonic() - taken_at < s.snapshot_interval
            ):
                continue
            try:
                await self.snapshot()
                done = now
            except (LeaseLost, SnapshotRefused) as exc:
                self.log.warning("snapshot refused", error=str(exc))
                self.service.lost(self.partition, str(exc))
                return
            except Exception as exc:
                self.log.warning("snapshot failed", error=repr(exc))
            taken_at = time.monotonic()

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._closed:
            return
        exc = task.exception()
        if isinstance(exc, LeaseLost):
            self.service.lost(self.partition, str(exc))
        elif exc is not None:
            self.service.partition_died(self.partition, exc)

    # -- release ----------------------------------------------------------------------------
    async def release(self) -> None:
        """Planned: stop fetching, finish the batch in flight (committed, published),
        snapshot, give the lease up, delete the consumer."""
        if self._closed:
            return
        self._closed = True
        await self._stop_timer()
        await self._stop_runners()
        try:
            if self.db is not None and self.valid():
                await self.snapshot()
        except (LeaseLost, SnapshotRefused) as exc:
            self.log.warning("snapshot refused at release", error=str(exc))
        except Exception as exc:
            self.log.warning("snapshot failed at release", error=repr(exc))
        await self._close_db()
        await self.lease.release()
        await self._delete_consumer()
        self.log.info("partition released")

    async def drop(self, reason: str) -> None:
        """The lease is lost: stop now, commit nothing more, keep nothing of it."""
        self._lost = True
        if self._closed:
            return
        self._closed = True
        self.log.warning("partition dropped", reason=reason)
        await self._stop_timer()
        await self._stop_runners()
        await self._close_db()
        await self.lease.release()  # only deletes the key if it is still this holding's
        await self._delete_consumer()

    async def _stop_timer(self) -> None:
        self._stop.set()
        timer, self._timer = self._timer, None
        if timer is not None and timer is not asyncio.current_task():
            await cancel(timer)

    async def _stop_runners(self) -> None:
        for feed in self.feeds:
            if feed.runner is not None:
                await feed.runner.stop()

    async def _close_db(self) -> None:
        if self._bound:
            self._bound = False
            try:
                await self.service.partition_closed(self.partition)
            except Exception as exc:
                self.log.warning("partition close hook failed", error=repr(exc))
        db, self.db = self.db, None
        if db is not None:
            await db.close()

    async def _delete_consumer(self) -> None:
        for feed in self.feeds:
            with contextlib.suppress(Exception):
                await self.service.js.delete_consumer(feed.spec.stream.name, feed.durable)

    async def status(self) -> admin.PartitionStatus:
        pending = 0
        error = None
        for feed in self.feeds:
            try:
                info = await self.service.js.consumer_info(
                    feed.spec.stream.name, feed.durable, timeout=2
                )
                pending += int(info.num_pending or 0)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        snap = self.last_snapshot
        return admin.PartitionStatus(
            partition=self.partition,
            owner=self.service.instance,
            token=self.token,
            applied_seq=self.runner.offset if self.runner is not None else 0,
            pending=pending,
            snapshot_seq=snap.seq if snap is not None else None,
            snapshot_age_s=round(time.time() - snap.at, 3) if snap is not None else None,
            error=error,
        )


class PartitionedService(Service):
    """A service whose state is split into `settings.partitions` partitions, each held by
    one live instance at a time (see the module's description).

    Subclasses set `partition_migrations` (their tables, in every partition file) and
    provide either `partition_inputs` (every input of a partition, `PartitionInput`: the
    main one first, then any further ones, each its own consumer and offset in the
    partition's file and its own output subject for the catch-up) or, for one input,
    `partition_input` (the stream and the subject of a partition's messages),
    `handle_partition` and, if they publish per partition, `partition_output` (the
    stream and subject where a partition's outputs land, for the catch-up after a crash).
    `partition_opened`/`partition_closed` bracket a held partition's open file (to bind
    per-partition objects to it). Service-wide inputs are ordinary `consumers()` on the
    service's own SQLite file (`Service`), which every instance has.
    They call `super()` in `on_start`/`on_stop` if they override them."""

    partition_migrations: ClassVar[tuple[Migration, ...]] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.instance = self.settings.instance_id
        self.held: dict[int, HeldPartition] = {}
        self._registry: Registry | None = None
        self._snapshots: Snapshots | None = None
        self._balancer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._live: list[str] = []
        self._chores: set[asyncio.Task[None]] = set()
        self._releasing = False
        self.log = self.log.bind(instance=self.instance)

    # -- what subclasses provide ---------------------------------------------------------
    def partition_input(self, partition: int) -> tuple[StreamSpec, str]:
        raise NotImplementedError

    def partition_output(self, partition: int) -> tuple[StreamSpec, str] | None:
        return None

    async def handle_partition(self, partition: int, step: Step) -> None:
        raise NotImplementedError

    def partition_inputs(self, partition: int) -> Sequence[PartitionInput]:
        """Every input of `partition`, the main one first (called once its file is open,
        after `partition_opened`)."""
        stream, subject = self.partition_input(partition)

        async def handle(step: Step) -> None:
            await self.handle_partition(partition, step)

        return (PartitionInput(stream, subject, handle, output=self.partition_output(partition)),)

    async def partition_opened(self, partition: int, db: aiosqlite.Connection) -> None:
        """A held partition's file is open (restored, migrated), before its inputs run."""

    async def partition_closed(self, partition: int) -> None:
        """A held partition's inputs have stopped; its file closes next."""

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def snapshots(self) -> Snapshots:
        if self._snapshots is None:
            raise RuntimeError(f"{self.name}: snapshots not open")
        return self._snapshots

    async def on_start(self) -> None:
        self._snapshots = Snapshots(self.js, self.name)
        await self._snapshots.open()
        self._registry = Registry(self.js, self.name, self.instance, on_change=self._changed)
        await self._registry.start()
        self._live = self._registry.known
        self._balancer = asyncio.create_task(self._balance(), name=f"{self.name}:balance")

    async def on_stop(self) -> None:
        """Release every partition (planned handover), then leave the live set."""
        self._releasing = True
        await cancel(self._balancer)
        await cancel_all(self._chores)
        held = list(self.held.values())
        self.held.clear()
        await asyncio.gather(*(h.release() for h in held), return_exceptions=True)
        if self._registry is not None:
            await self._registry.stop(leave=True)

    def _changed(self, live: list[str]) -> None:
        self._live = live
        self._wake.set()

    async def _balance(self) -> None:
        while True:
            self._wake.clear()
            try:
                waiting = await self._rebalance()
            except Exception as exc:
                self.log.warning("rebalance failed", error=repr(exc))
                waiting = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RETRY_S if waiting else None)

    def owned(self) -> set[int]:
        """The partitions the live set gives this instance."""
        # A running instance counts itself live: a view of the live set that misses it
        # (its own heartbeat late) must not make it hand everything over; the leases
        # decide who holds what.
        live = sorted({*self._live, self.instance})
        owners = assign(self.settings.partitions, live, self.name)
        return {p for p, owner in owners.items() if owner == self.instance}

    async def _rebalance(self) -> bool:
        """Release what is not ours, take what is; True while a partition is still to
        take (its lease held by its previous owner)."""
        mine = self.owned()
        leaving = [self.held.pop(p) for p in sorted(set(self.held) - mine)]
        if leaving:
            self.log.info("releasing partitions", partitions=[h.partition for h in leaving])
            await asyncio.gather(*(h.release() for h in leaving), return_exceptions=True)
        waiting = False
        for p in sorted(mine - set(self.held)):
            lease = Lease(
                self.js,
                lease_key(self.name, p),
                self.instance,
                margin=self.settings.lease_margin,
                on_lost=lambda p=p: self.lost(p, "lease lost"),  # type: ignore[misc]
            )
            if not await lease.try_acquire():
                waiting = True
                continue
            held = HeldPartition(self, p, lease)
            self.held[p] = held
            try:
                await held.open()
            except Exception as exc:
                self.log.warning("partition not opened", partition=p, error=repr(exc))
                self.held.pop(p, None)
                await held.drop(f"not opened: {exc!r}")
                waiting = True
        return waiting

    def lost(self, partition: int, reason: str) -> None:
        """The lease of `partition` is lost (or a commit was refused): drop it now."""
        held = self.held.get(partition)
        if held is None or held._closed:
            return
        self.held.pop(partition, None)
        held._lost = True
        self._spawn(held.drop(reason))
        self._wake.set()

    def partition_died(self, partition: int, exc: BaseException) -> None:
        """A partition's consumer died of an unknown error: the process must restart."""
        self.log.error("partition consumer died", partition=partition, error=repr(exc))
        self._fatal_reason = f"partition {partition} died: {type(exc).__name__}: {exc}"
        self._ready = False
        self.exit_code = 1
        self._fatal.set()

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.create_task(run())
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def status(self, request: admin.StatusRequest) -> admin.ServiceStatus:
        base = await super().status(request)
        parts = [await h.status() for h in sorted(self.held.values(), key=lambda h: h.partition)]
        base.instance = self.instance
        base.partitions = parts
        return base

    async def readiness(self) -> str | None:
        reason = await super().readiness()
        if reason is not None:
            return reason
        for held in list(self.held.values()):
            if held.runner is not None and held.runner.fault is not None:
                return f"partition {held.partition}: {held.runner.fault}"
        return None

    async def snapshot_all(self) -> list[SnapshotEntry]:
        """Snapshot every partition held now (an operator's request, tests)."""
        return [await h.snapshot() for h in list(self.held.values())]

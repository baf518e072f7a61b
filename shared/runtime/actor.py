"""What a handler sees (`Step`, `Delivery`), what a service declares (`ConsumerSpec`),
and the loop that feeds one durable consumer to its handler (`ConsumerRunner`).

The effect of each message is applied exactly once:
- the stream sequence of the last applied message (the consumer's offset) is committed in
  the same SQLite transaction as the handler's writes and its outgoing messages (outbox);
- at start-up, after a reconnect, or when a delivery is missing (a gap in the consumer
  sequence), the durable consumer is re-created to start right after the committed offset;
- a redelivered message at or below the offset is acknowledged and skipped;
- outgoing messages are published from the outbox after the commit, with a deterministic
  Nats-Msg-Id, so a re-publish after a crash is de-duplicated by JetStream;
- that id is `<consumer>:<first seq>-<last seq>:<n>`: it names the step (the first and
  last stream sequences it applied) and depends on nothing else, so whoever applies the
  same step on the same state emits the same ids. A standby that takes over someone's
  input finds, in the last message the other published, the step it was in (`StepRef`),
  applies what came before it without publishing, and replays exactly that step: what
  was already published is dropped by JetStream's duplicate window;
- the batch is acknowledged (AckAll, one ack) only after commit and publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiosqlite
import msgspec
import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from shared.db import Migration, Tx, apply, write_lock
from shared.metrics import ServiceMetrics
from shared.runtime.puller import Puller
from shared.subjects import StreamSpec

RUNTIME_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "runtime",
        1,
        """
        CREATE TABLE rt_offsets (
            consumer TEXT PRIMARY KEY,
            stream_seq INTEGER NOT NULL
        );
        CREATE TABLE rt_outbox (
            msg_id TEXT PRIMARY KEY,
            subject TEXT NOT NULL,
            payload BLOB NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE rt_failed (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            consumer TEXT NOT NULL,
            stream_seq INTEGER NOT NULL,
            subject TEXT NOT NULL,
            payload BLOB NOT NULL,
            error TEXT NOT NULL,
            failed_at REAL NOT NULL
        )
        """,
    ),
)

_SET_OFFSET = (
    "INSERT INTO rt_offsets (consumer, stream_seq) VALUES (?, ?) "
    "ON CONFLICT (consumer) DO UPDATE SET stream_seq = excluded.stream_seq"
)
_OUTBOX_INSERT = "INSERT INTO rt_outbox (msg_id, subject, payload, created_at) VALUES (?, ?, ?, ?)"
_OUTBOX_DELETE = "DELETE FROM rt_outbox WHERE msg_id = ?"
_OUTBOX_INSERT_NEW = (
    "INSERT OR IGNORE INTO rt_outbox (msg_id, subject, payload, created_at) VALUES (?, ?, ?, ?)"
)


class RowWriter(Protocol):
    """Where writes go: a `Tx`, or a buffer a handler filters before it."""

    def add_many(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None: ...


def to_outbox(w: RowWriter, out: Iterable[Outgoing], at: float, *, if_new: bool = False) -> None:
    """Add messages to the runtime's outbox in `w`: published once it commits (for what a
    service publishes outside a consumer's step: an admin request, a timer). `if_new`:
    a message whose id is already there is left as it is (a request made twice)."""
    w.add_many(
        _OUTBOX_INSERT_NEW if if_new else _OUTBOX_INSERT,
        [(o.msg_id, o.subject, o.payload, at) for o in out],
    )


_FAILED_INSERT = (
    "INSERT INTO rt_failed (consumer, stream_seq, subject, payload, error, failed_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


class StepRef(msgspec.Struct, frozen=True):
    """A committed step of a consumer: the stream sequences it applied, first to last."""

    consumer: str
    first: int
    last: int

    def msg_id(self, n: int) -> str:
        return f"{self.consumer}:{self.first}-{self.last}:{n}"


_STEP_ID = re.compile(r"^(?P<consumer>[^:]+):(?P<first>[0-9]+)-(?P<last>[0-9]+):[0-9]+$")


_LEGACY_STEP_ID = re.compile(r"^(?P<consumer>[^:]+):(?P<last>[0-9]+):[0-9]+$")


def step_of(msg_id: str | None) -> StepRef | None:
    """The step that emitted a message, from its Nats-Msg-Id (none: not a step's output,
    e.g. an admin request's). An id of an earlier version (`<consumer>:<last seq>:<n>`)
    names only its last sequence: it reads as a step of that one message."""
    m = _STEP_ID.match(msg_id or "")
    if m is not None:
        return StepRef(m["consumer"], int(m["first"]), int(m["last"]))
    legacy = _LEGACY_STEP_ID.match(msg_id or "")
    if legacy is None:
        return None
    last = int(legacy["last"])
    return StepRef(legacy["consumer"], last, last)


async def last_step(js: JetStreamContext, stream: str, consumer: str) -> StepRef | None:
    """The step of `consumer` that published the last message of `stream` (none: the
    stream is empty, or its last message is not one of that consumer's steps')."""
    info = await js.stream_info(stream)
    seq = info.state.last_seq
    if not seq or not info.state.messages:
        return None
    try:
        msg = await js.get_msg(stream, seq)
    except NotFoundError:
        return None
    step = step_of((msg.headers or {}).get("Nats-Msg-Id"))
    return step if step is not None and step.consumer == consumer else None


class Delivery(msgspec.Struct, frozen=True):
    """One message from a stream, as a handler sees it."""

    subject: str
    data: bytes
    seq: int
    msg_id: str | None = None


class Outgoing(msgspec.Struct, frozen=True):
    msg_id: str
    subject: str
    payload: bytes


class Step:
    """The messages of one fetch, the writes they cause and the messages they emit.

    A handler reads what it needs from `db` (one query per batch, not per record), adds
    its writes to `tx`, calls `emit` for downstream messages and registers in-memory
    updates with `after_commit`: nothing of it takes effect unless the batch commits.
    `notify` sends a core NATS message (not stored) once the batch is committed and its
    outbox published: for signals that only matter to whoever listens now (probe reports).
    """

    __slots__ = ("_after", "_notes", "_out", "consumer", "db", "deliveries", "tx")

    def __init__(self, consumer: str, deliveries: list[Delivery], db: aiosqlite.Connection):
        self.consumer = consumer
        self.deliveries = deliveries
        self.db = db
        self.tx = Tx()
        self._out: list[tuple[str, bytes, str | None]] = []
        self._after: list[Callable[[], None]] = []
        self._notes: list[tuple[str, bytes]] = []

    def emit(self, subject: str, payload: bytes, *, key: str | None = None) -> None:
        """Send `payload` once the step commits. Its message id comes from the step's
        last sequence and the emit's place in the step, unless `key` is given: then it
        is `<consumer>:<key>`, so a key derived from the input alone gives the same id
        whatever else the step holds (competing consumers: see `competing`)."""
        self._out.append((subject, payload, key))

    def after_commit(self, fn: Callable[[], None]) -> None:
        self._after.append(fn)

    def notify(self, subject: str, payload: bytes) -> None:
        self._notes.append((subject, payload))


Handler = Callable[[Step], Awaitable[None]]


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable consumer of a service: which stream and subjects, and its handler."""

    name: str
    stream: StreamSpec
    handler: Handler
    filter_subjects: tuple[str, ...] = ()
    max_batch: int | None = None
    max_step_bytes: int | None = None
    """Most payload bytes one step takes (none: the service's `step_max_bytes`)."""
    max_wait: float = 5.0
    description: str = field(default="")
    durable: str | None = None
    """The JetStream durable's name (none: `name`). Instances of a service that each read
    the whole stream (a writer and its standby) need one each; `name` stays the logical
    consumer, in the offsets and the message ids, the same for all of them."""

    @property
    def durable_name(self) -> str:
        return self.durable or self.name

    competing: bool = False
    """Several processes share this consumer, each taking what it fetches (explicit
    acks, no offset, no re-creation): see `shared.runtime.competing`."""
    barriers: tuple[str, ...] = ()
    """Subjects of messages that wait, when competing, until every earlier message of
    the stream was applied by whichever process took it."""


class _Stop(Exception):
    pass


class ConsumerRunner:
    """Feeds one durable pull consumer to its handler, batch by batch, in stream order."""

    def __init__(
        self,
        spec: ConsumerSpec,
        *,
        service: str,
        nc: Client,
        js: JetStreamContext,
        db: aiosqlite.Connection,
        metrics: ServiceMetrics,
        fetch_batch: int,
        ack_wait: float,
        step_max_bytes: int | None = None,
        guard: Callable[[], None] | None = None,
    ) -> None:
        """`guard` runs right before each commit and each publish; it raises to refuse
        them (a partition whose lease is lost)."""
        self.spec = spec
        self._guard = guard
        self._service = service
        self._nc = nc
        self._js = js
        self._db = db
        self._metrics = metrics
        self._max_batch = spec.max_batch or fetch_batch
        self._ack_wait = ack_wait
        self._offset = 0
        self._expect_cseq = 1
        self._puller: Puller | None = None
        self._resync_needed = True
        self._busy = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._follow: Callable[[], Awaitable[StepRef | None]] | None = None
        self._follow_poll = 0.2
        self._replay: StepRef | None = None
        self._wake = asyncio.Event()
        self._exact: list[Delivery] = []
        self.fault: str | None = None
        """Why the consumer cannot apply what it fetched now (a full disk), else None."""
        self._log = structlog.get_logger(service=service, consumer=spec.name)
        self._labels = (service, spec.name)
        self._step = Committer(
            spec.name,
            spec.handler,
            db,
            self._log,
            self._committed,
            max_step_bytes=spec.max_step_bytes or step_max_bytes,
            guard=guard,
        )

    @property
    def offset(self) -> int:
        return self._offset

    def _committed(self, seq: int) -> None:
        self._offset = seq

    async def prepare(self) -> None:
        """Load the committed offset and (re)create the durable consumer right after it."""
        rows = await self._db.execute_fetchall(
            "SELECT stream_seq FROM rt_offsets WHERE consumer = ?", (self.spec.name,)
        )
        self._offset = int(next(iter(rows))[0]) if rows else 0
        await self._resync()

    def request_resync(self) -> None:
        """Re-create the consumer from the committed offset before the next fetch."""
        self._resync_needed = True

    async def _resync(self) -> None:
        if self._puller is not None:
            await self._puller.close()
        spec = self.spec
        with contextlib.suppress(NotFoundError):
            await self._js.delete_consumer(spec.stream.name, spec.durable_name)
        subjects = list(spec.filter_subjects)
        config = ConsumerConfig(
            durable_name=spec.durable_name,
            description=spec.description or None,
            ack_policy=AckPolicy.ALL,
            ack_wait=self._ack_wait,
            max_ack_pending=max(10_000, self._max_batch * 4),
            max_waiting=64,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if self._offset else DeliverPolicy.ALL,
            opt_start_seq=self._offset + 1 if self._offset else None,
        )
        if len(subjects) == 1:
            config.filter_subject = subjects[0]
        elif subjects:
            config.filter_subjects = subjects
        await self._js.add_consumer(spec.stream.name, config)
        self._puller = Puller(self._nc, spec.stream.name, spec.durable_name)
        await self._puller.start()
        self._exact = []
        self._expect_cseq = 1
        self._resync_needed = False
        self._log.info("consumer ready", stream=spec.stream.name, from_seq=self._offset + 1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.spec.name}")

    # -- a standby and its take-over -----------------------------------------------------
    def follow(self, last_step: Callable[[], Awaitable[StepRef | None]], poll: float) -> None:
        """Run as a standby (call before `start`): apply the stream silently (commit,
        publish nothing), but never the step `last_step()` names (the last one the active
        instance published) nor anything after it, so that a take-over can replay it."""
        self._follow, self._follow_poll = last_step, poll

    @property
    def following(self) -> bool:
        return self._follow is not None

    def take_over(self, last: StepRef | None) -> None:
        """Become the active instance: apply silently up to the step `last` (the last one
        the previous active instance published; none: nothing published), replay exactly
        that step, publishing (JetStream drops the ids it already has), then run as usual.
        """
        self._follow = None
        self._replay = last
        self._wake.set()

    async def _limit(self) -> tuple[int | None, bool, bool] | None:
        """What the next fetch may apply: (last sequence or none, silent, as one step);
        none when stopping. A standby waits here until there is something to apply."""
        while not self._stopping:
            follow = self._follow
            if follow is not None:
                try:
                    last = await follow()
                    limit = last.first - 1 if last is not None else 0
                except (TimeoutError, nats.errors.Error) as exc:
                    self._log.warning("cannot read the active instance's progress", error=repr(exc))
                    limit = self._offset  # nothing applied until it can be read again
                if self._follow is None:  # taken over meanwhile
                    continue
                if limit > self._offset:
                    return limit, True, False
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._follow_poll)
                continue
            replay = self._replay
            if replay is not None:
                if self._offset < replay.first - 1:
                    return replay.first - 1, True, False
                if self._offset < replay.last:
                    return replay.last, False, True
                self._replay = None
                self._log.info("took over", replayed=f"{replay.first}-{replay.last}")
            return None, False, False
        return None

    async def stop(self) -> None:
        """Stop fetching, let the batch in flight finish, then return. Idempotent."""
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        self._wake.set()
        if not self._busy:
            task.cancel()
        # A task that died has reported its error already (the service's done callback):
        # raising it again here would stop the shutdown half-way and keep the process up.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if self._puller is not None:
            await self._puller.close()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    async def _run(self) -> None:
        backoff = full_backoff = 0.05
        while not self._stopping:
            try:
                limits = await self._limit()
                if limits is None:
                    return
                limit, silent, one_step = limits
                if self._resync_needed:
                    await self._resync()
                assert self._puller is not None
                batch = self._max_batch
                if limit is not None:
                    batch = max(1, min(batch, limit - self._offset - len(self._exact)))
                msgs = await self._puller.fetch(batch, self.spec.max_wait)
            except (TimeoutError, nats.errors.Error) as exc:
                # Disconnected, or the server is restarting: try again from the offset.
                self._log.warning("fetch failed", error=repr(exc), retry_in=backoff)
                self._resync_needed = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            if not msgs:
                continue
            self._busy = True
            self._step.silent = silent
            try:
                await self._process(msgs, limit, one_step)
            except _Stop:
                return
            except Exception as exc:
                fault = storage_fault(exc)
                if fault is None:
                    raise  # unknown: the consumer dies, the service exits, it is restarted
                # A full disk: nothing was committed or acknowledged. Report it (readiness)
                # and apply the same messages again from the offset once there is room.
                if self.fault is None:
                    self._log.error("cannot commit", error=fault)
                self.fault = fault
                self._resync_needed = True
                await asyncio.sleep(full_backoff)
                full_backoff = min(full_backoff * 2, 2.0)
                continue
            finally:
                self._busy = False
            full_backoff = 0.05
            if self.fault is not None:
                self._log.info("committing again", was=self.fault)
                self.fault = None

    async def _process(
        self, msgs: list[Msg], limit: int | None = None, one_step: bool = False
    ) -> None:
        """Apply `msgs` in order: those up to `limit` (the rest is fetched again later);
        `one_step`: gathered until `limit`, then applied as one step."""
        started = time.perf_counter()
        fresh: list[Delivery] = []
        last: Msg | None = None
        skipped = 0
        for msg in msgs:
            meta = msg.metadata
            if limit is not None and meta.sequence.stream > limit:
                self._resync_needed = True  # not ours to apply yet: fetched again later
                break
            if meta.sequence.consumer != self._expect_cseq:
                # A delivery went missing (lost in a reconnect): start over from the offset.
                self._log.warning(
                    "delivery gap", expected=self._expect_cseq, got=meta.sequence.consumer
                )
                self._resync_needed = True
                break
            self._expect_cseq += 1
            last = msg
            seq = meta.sequence.stream
            if seq <= self._offset:
                skipped += 1
                continue
            headers = msg.headers
            fresh.append(
                Delivery(
                    msg.subject, msg.data, seq, headers.get("Nats-Msg-Id") if headers else None
                )
            )
        if last is None:
            return
        if skipped:
            self._metrics.skipped.labels(*self._labels).inc(skipped)
        if one_step:
            self._exact.extend(fresh)
            if not self._exact or self._exact[-1].seq < (limit or 0):
                return  # the rest of the step is still to come (acknowledged with it)
            fresh, self._exact = self._exact, []
        if fresh and await self._commit(fresh, one_step=one_step):
            # Left for later: fetched again from the committed offset, shortly.
            self._resync_needed = True
            await asyncio.sleep(BLOCKED_RETRY_S)
            return
        await self._ack(last)
        self._metrics.lag.labels(*self._labels).set(last.metadata.num_pending)
        self._metrics.batch_size.labels(*self._labels).observe(len(msgs))
        self._metrics.latency.labels(*self._labels).observe(time.perf_counter() - started)

    async def _commit(self, deliveries: list[Delivery], *, one_step: bool = False) -> bool:
        """Apply and publish; True if a message was left for later (`Blocked`)."""
        applied = await self._step.handle(deliveries, one_step=one_step)
        if applied.handled:
            self._metrics.handled.labels(*self._labels).inc(applied.handled)
        if applied.failed:
            self._metrics.failed.labels(*self._labels).inc(applied.failed)
        for out, notes in applied.rounds:
            if out and self._guard is not None:
                self._guard()
            if out:
                await publish_outbox(self._js, self._db, out, self._log, lambda: self._stopping)
            if notes:
                await send_notes(self._nc, notes, self._log)
        return applied.blocked is not None

    async def _ack(self, msg: Msg) -> None:
        try:
            await msg.ack()
        except nats.errors.Error as exc:
            # The offset is committed; the next resync starts after it either way.
            self._log.warning("ack failed", error=repr(exc))
            self._resync_needed = True


def split_steps(deliveries: list[Delivery], max_bytes: int | None) -> list[list[Delivery]]:
    """`deliveries` in order, cut into steps of at most `max_bytes` of payload each (a
    message larger than that is a step alone); everything in one step without a limit.

    The bound on a step's payload bounds what its handler decodes, loads and emits at
    once, whatever the fetch size and however many records a message carries."""
    if max_bytes is None:
        return [deliveries]
    steps: list[list[Delivery]] = []
    step: list[Delivery] = []
    size = 0
    for d in deliveries:
        if step and size + len(d.data) > max_bytes:
            steps.append(step)
            step, size = [], 0
        step.append(d)
        size += len(d.data)
    if step:
        steps.append(step)
    return steps


class Applied(msgspec.Struct):
    """What applying deliveries committed: per commit, its outbox and its notifications."""

    rounds: list[tuple[list[Outgoing], list[tuple[str, bytes]]]]
    handled: int = 0
    failed: int = 0
    blocked: int | None = None
    """The stream sequence of the first message left for later (`Blocked`), if any."""


class Blocked(Exception):
    """Raised by a handler: the step's message at stream sequence `seq` must wait for
    something another input brings. The messages before it are applied and committed;
    it and those after it are fetched again shortly (nothing of them committed)."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"message {seq} waits: {reason}")
        self.seq = seq
        self.reason = reason


class Committer:
    """Applies deliveries to a handler and commits the result: the handler's writes, its
    outbox, the failed messages and the offset, in one SQLite transaction; then runs its
    after-commit updates. No NATS here: the runner publishes what `handle` returns, and
    the handler-level harness (shared.runtime.harness) returns it to a test."""

    def __init__(
        self,
        consumer: str,
        handler: Handler,
        db: aiosqlite.Connection,
        log: structlog.typing.FilteringBoundLogger | None = None,
        committed: Callable[[int], None] | None = None,
        *,
        max_step_bytes: int | None = None,
        guard: Callable[[], None] | None = None,
    ) -> None:
        self.consumer = consumer
        self.guard = guard
        """Runs right before each commit; raises to refuse it (rolled back)."""
        self.max_step_bytes = max_step_bytes
        self._committed = committed
        self.handler = handler
        self.db = db
        self.log = log or structlog.get_logger(consumer=consumer)
        self.silent = False
        """Apply and commit, but emit nothing (a standby's steps: its outbox stays empty
        and it sends no notifications)."""

    async def handle(self, deliveries: list[Delivery], *, one_step: bool = False) -> Applied:
        """Apply `deliveries` in steps of at most `max_step_bytes` of payload (a step takes
        at least one message), each step committed before the next, in order; `one_step`:
        all of them as one step (a replay of a step someone else committed)."""
        applied = Applied([])
        steps = [deliveries] if one_step else split_steps(deliveries, self.max_step_bytes)
        for step in steps:
            await self._handle_step(step, applied)
            if applied.blocked is not None:
                break
        return applied

    async def _handle_step(self, deliveries: list[Delivery], applied: Applied) -> None:
        """Run the handler on the whole step; if it raises, on each message alone, in
        order, each committed before the next so that each sees what came before it; a
        message that fails alone is kept in `rt_failed` with its error."""
        batch = Step(self.consumer, deliveries, self.db)
        try:
            with structlog.contextvars.bound_contextvars(
                consumer=self.consumer, first_seq=deliveries[0].seq, last_seq=deliveries[-1].seq
            ):
                await self.handler(batch)
        except Blocked as blocked:
            before = [d for d in deliveries if d.seq < blocked.seq]
            if before:
                await self._handle_step(before, applied)
            if applied.blocked is None:
                applied.blocked = blocked.seq
            return
        except Exception:
            self.log.warning("batch failed, retrying message by message", size=len(deliveries))
            for d in deliveries:
                single = Step(self.consumer, [d], self.db)
                with structlog.contextvars.bound_contextvars(
                    consumer=self.consumer, subject=d.subject, seq=d.seq, msg_id=d.msg_id
                ):
                    try:
                        await self.handler(single)
                    except Blocked:
                        applied.blocked = d.seq
                        return
                    except Exception as exc:
                        self.log.exception("message failed")
                        error = f"{type(exc).__name__}: {exc}"
                        await self._apply(applied, None, [(d, error)], d.seq, d.seq)
                        continue
                await self._apply(applied, single, [], d.seq, d.seq)
            return
        await self._apply(applied, batch, [], deliveries[0].seq, deliveries[-1].seq)

    async def _apply(
        self,
        applied: Applied,
        batch: Step | None,
        failed: list[tuple[Delivery, str]],
        first_seq: int,
        last_seq: int,
    ) -> None:
        tx = Tx()
        out: list[Outgoing] = []
        if batch is not None:
            tx.extend(batch.tx)
            ref = StepRef(self.consumer, first_seq, last_seq)
            out = [
                Outgoing(
                    ref.msg_id(i) if key is None else f"{self.consumer}:{key}",
                    subject,
                    payload,
                )
                for i, (subject, payload, key) in enumerate(batch._out)
            ]
            if self.silent:
                out = []  # a standby: the active instance publishes these
        now = time.time()
        tx.add_many(_OUTBOX_INSERT, ((o.msg_id, o.subject, o.payload, now) for o in out))
        tx.add_many(
            _FAILED_INSERT,
            ((self.consumer, d.seq, d.subject, d.data, err, now) for d, err in failed),
        )
        tx.add(_SET_OFFSET, (self.consumer, last_seq))
        await apply(self.db, tx, before_commit=self.guard)
        if self._committed is not None:
            self._committed(last_seq)
        if batch is not None:
            applied.handled += len(batch.deliveries)
            for fn in batch._after:
                fn()
        applied.failed += len(failed)
        notes = list(batch._notes) if batch is not None and not self.silent else []
        applied.rounds.append((out, notes))


async def send_notes(
    nc: Client, notes: list[tuple[str, bytes]], log: structlog.typing.FilteringBoundLogger
) -> None:
    """Core NATS notifications of a committed batch; whoever waits asks again if lost."""
    for subject, payload in notes:
        try:
            await nc.publish(subject, payload)
        except nats.errors.Error as exc:
            log.warning("notification not sent", subject=subject, error=repr(exc))


def storage_fault(exc: BaseException) -> str | None:
    """The reason to report when `exc` means the disk is full (it heals when space is
    freed), else None."""
    if isinstance(exc, sqlite3.Error) and (
        getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "is full" in str(exc)
    ):
        return f"sqlite: {exc}"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"disk full: {exc.strerror}"
    return None


PUBLISH_ACK_TIMEOUT = 10.0
BLOCKED_RETRY_S = 0.1
"""How soon a consumer whose handler left a message for later (`Blocked`) fetches again."""
"""Seconds to wait for JetStream's acknowledgements of one outbox round."""


async def publish_outbox(
    js: JetStreamContext,
    db: aiosqlite.Connection,
    out: list[Outgoing],
    log: structlog.typing.FilteringBoundLogger,
    stopping: Callable[[], bool],
) -> bool:
    """Publish committed outgoing messages in their order, then remove them from the outbox.

    The messages are written to the connection one after the other, in order, without
    waiting for each acknowledgement (they are gathered once per round). If any is not
    acknowledged, the round is repeated from the first one that was not: the ones after
    it are published again, and JetStream drops those it already stored (same
    Nats-Msg-Id), so the stream keeps the outbox's order. Returns False if asked to stop
    first; the rest stays in the outbox and is published at the next start.
    """
    pending = list(out)
    backoff = 0.05
    while pending:
        first_failed: int | None = None
        error: BaseException | None = None
        futures: list[asyncio.Future[Any]] = []
        try:
            for o in pending:
                futures.append(
                    await js.publish_async(o.subject, o.payload, headers={"Nats-Msg-Id": o.msg_id})
                )
        except Exception as exc:  # not connected, or too many publishes pending
            first_failed, error = len(futures), exc
        if futures:
            _done, late = await asyncio.wait(futures, timeout=PUBLISH_ACK_TIMEOUT)
            for fut in late:
                fut.cancel()
            for i, fut in enumerate(futures):
                if fut in late:
                    problem: BaseException | None = TimeoutError("no acknowledgement")
                elif fut.cancelled():
                    problem = asyncio.CancelledError()
                else:
                    problem = fut.exception()
                # Every failure is looked at (a future whose error is never retrieved is
                # reported by asyncio as an error); the first one decides the retry.
                if problem is not None and (first_failed is None or i < first_failed):
                    first_failed, error = i, problem
        stored = pending if first_failed is None else pending[:first_failed]
        if stored:
            async with write_lock(db):
                await db.executemany(_OUTBOX_DELETE, [(o.msg_id,) for o in stored])
        pending = [] if first_failed is None else pending[first_failed:]
        if pending:
            if stopping():
                return False
            log.warning(
                "publish failed, retrying",
                pending=len(pending),
                error=repr(error),
                retry_in=backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
    return True


async def flush_outbox(
    js: JetStreamContext,
    db: aiosqlite.Connection,
    log: structlog.typing.FilteringBoundLogger,
    stopping: Callable[[], bool],
) -> int:
    """Publish whatever a previous run committed but did not publish. Returns the count."""
    rows = await db.execute_fetchall(
        "SELECT msg_id, subject, payload FROM rt_outbox ORDER BY created_at, rowid"
    )
    out = [Outgoing(str(r[0]), str(r[1]), bytes(r[2])) for r in rows]
    if out:
        log.info("publishing leftover outbox", count=len(out))
        await publish_outbox(js, db, out, log, stopping)
    return len(out)

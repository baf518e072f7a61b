"""The identity service's wiring: its store, its steps, its admin API and its consumers.

The actor's steps are in `handlers` (the graph rules they call in `graph`), the admin API
in `api`, the SQLite state in `store`, and what a start without a graph does in `rebuild`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar

from services.identity import rebuild
from services.identity.api import IdentityApi
from services.identity.errors import WriterLeaseLost
from services.identity.handlers import NAMESPACES_CONSUMER, RECORDS_CONSUMER, IdentityHandlers
from services.identity.store import LISTINGS, MIGRATIONS, IdentityStore
from shared import subjects
from shared.config import ConfigError
from shared.db import write_lock
from shared.runtime import ConsumerSpec, Service
from shared.runtime.actor import StepRef
from shared.runtime.coordination import Lease


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, raw, "a positive integer") from None
    if value < 2:
        raise ConfigError(name, raw, "an integer of at least 2")
    return value


WRITER = "writer"
STANDBY = "standby"


class IdentityService(Service):
    """One writer, any number of warm standbys (`CDP_INSTANCE` names each instance).

    The writer holds the lease `identity.writer` and runs as a single identity always
    did. A standby tails the records stream into its own SQLite with the same handler but
    publishes nothing, and never applies the step the writer published last (nor what
    follows it): it learns where the writer is from the last message on the profiles
    stream, whose id names the writer's step (`<consumer>:<first>-<last>:<n>`). Reading
    that is what the profile service reads too: no second record of progress to keep in
    step, and what was published is exactly what matters for a replay. When the lease
    expires (the writer died), the standby takes it, reads the writer's last step again,
    applies everything before it silently, replays exactly that step, publishing (what the
    writer had published of it is dropped by JetStream's duplicate window: the same ids),
    and runs as the writer. Lookups (the admin API) are the writer's alone."""

    name = "identity"
    migrations = MIGRATIONS
    listings: ClassVar[dict[str, str]] = LISTINGS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_identities = _env_int("CDP_IDENTITY_MAX_GRAPH_SIZE", 50)
        self._handlers: IdentityHandlers | None = None
        self._api: IdentityApi | None = None
        self._lease: Lease | None = None
        self._role: str | None = None
        self._waiting: asyncio.Task[None] | None = None
        self.took_over_at: float | None = None
        """When this instance became the writer by taking over (monotonic), if it did."""

    @property
    def handlers(self) -> IdentityHandlers:
        if self._handlers is None:
            raise RuntimeError("identity: not started")
        return self._handlers

    @property
    def role(self) -> str | None:
        return self._role

    def _durable(self, suffix: str) -> str | None:
        """Each instance's own durables; the default instance keeps the historic names."""
        instance = self.settings.instance_id
        return None if instance == self.name else f"{instance}{suffix}"

    def consumers(self) -> Sequence[ConsumerSpec]:
        handlers = self.handlers
        return (
            ConsumerSpec(
                NAMESPACES_CONSUMER,
                subjects.STREAM_CONFIG,
                handlers.on_namespaces,
                filter_subjects=(subjects.config("namespace", "*"),),
                description="identity namespaces (linking rules), from ingest's configuration",
                durable=self._durable("-namespaces"),
            ),
            ConsumerSpec(
                RECORDS_CONSUMER,
                subjects.STREAM_RECORDS,
                handlers.on_records,
                description="accepted records and privacy deletes, from ingest",
                durable=self._durable(""),
            ),
        )

    def standby_of(self, spec: ConsumerSpec) -> Callable[[], Awaitable[StepRef | None]] | None:
        if self._role != STANDBY or spec.name != RECORDS_CONSUMER:
            return None
        return lambda: rebuild.last_published_step(self.js)

    def guard_of(self, spec: ConsumerSpec) -> Callable[[], None] | None:
        """The writer's commits and publishes of records are fenced by its lease: once its
        local deadline passed (it may have been stopped past the lease's expiry while a
        standby took over), nothing more is committed or published, and it stops."""
        if spec.name != RECORDS_CONSUMER:
            return None

        def guard() -> None:
            lease = self._lease
            if lease is not None and self._role == WRITER and not lease.valid():
                raise WriterLeaseLost(self.settings.instance_id, lease.token or 0)

        return guard

    async def on_connected(self) -> bool:
        self._lease, acquired = await self.role_lease(subjects.IDENTITY_WRITER_LEASE, self._lost)
        if acquired:
            self._role = WRITER
            return True
        self._role = STANDBY
        # What a previous run committed but did not publish: the writer does those steps
        # (again, with its own ids); published from here, they would be duplicates.
        async with write_lock(self.db):
            await self.db.execute("DELETE FROM rt_outbox")
            await self.db.commit()
        self.log.info("standby: another instance is the writer")
        return False

    async def on_start(self) -> None:
        store = IdentityStore(self.db)
        quiet = await rebuild.announced_until(self.js, store, str(self.settings.db_path))
        if self._role == STANDBY:
            quiet = 0  # the runtime keeps a standby quiet, and a take-over must replay
        if quiet:
            self.log.warning(
                "no identity graph: rebuilding it from the records stream; the records up to "
                "this sequence are not announced again (the profile service has them)",
                records_seq=quiet,
            )
        handlers = IdentityHandlers(
            store,
            partitions=self.settings.partitions,
            max_identities=self.max_identities,
            phone_region=self.settings.phone_region,
            announced_until=quiet,
        )
        handlers.install(await store.namespaces())
        self._handlers = handlers
        self._api = IdentityApi(store, lambda: handlers.graph)
        if self._role == WRITER:
            await self._api.start(self.nc)

    async def start(self) -> None:
        await super().start()
        if self._role == STANDBY:
            self._waiting = asyncio.create_task(self._wait_for_lease(), name="identity:standby")

    async def _wait_for_lease(self) -> None:
        lease = self._lease
        assert lease is not None
        await lease.acquire()
        started = time.monotonic()
        last = await rebuild.last_published_step(self.js)
        self.log.info(
            "taking over as the writer",
            fencing=lease.token,
            replay=f"{last.first}-{last.last}" if last is not None else None,
        )
        await self.take_over(RECORDS_CONSUMER, last)
        self._role = WRITER
        self.took_over_at = started
        if self._api is not None:
            await self._api.start(self.nc)

    async def _lost(self) -> None:
        # Another instance may be the writer now: this one must publish nothing more.
        self.fail("identity: lost the writer lease")

    async def on_stop(self) -> None:
        task, self._waiting = self._waiting, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._api is not None:
            await self._api.stop()
        if self._lease is not None:
            await self._lease.release()  # a planned stop: a standby takes over at once

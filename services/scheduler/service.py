"""The scheduler's wiring: its store, its timers and job-event step, its admin API.

Schedules are configuration (`cdp apply`, kind schedule): the daily segmentation job and
file destinations' exports, each a cron expression in a time zone. Without a configured
segmentation schedule, `CDP_SEGMENTATION_SCHEDULE` (default `0 2 * * *`) in
`CDP_SCHEDULE_TZ` (default UTC) applies. The scheduler asks for jobs on `CDP_JOBS` and
learns there how they ended (see `handlers`); it calls no other service.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from services.scheduler.api import SchedulerApi
from services.scheduler.handlers import JOBS_CONSUMER, JOBS_SUBJECTS, JobEvents, Timers
from services.scheduler.schedules import SEGMENTATION_SCHEDULE, check
from services.scheduler.store import MIGRATIONS, SchedulerStore
from shared import subjects
from shared.db import Tx
from shared.resources import Schedule
from shared.runtime import ConsumerSpec, Service
from shared.runtime.actor import Outgoing, publish_outbox
from shared.runtime.coordination import Lease

__all__ = ["SEGMENTATION_SCHEDULE", "SchedulerService"]


ACTIVE = "active"
STANDBY = "standby"


class SchedulerService(Service):
    """One active instance runs the schedules: the holder of the lease `scheduler.active`.
    Any other is a standby: ready, running no schedule, serving no admin request, until
    the lease expires (the active one died) or is released (it stopped); then it takes the
    lease, reads the configured schedules from the config stream, and runs them from the
    next due time on. A job request's id is its schedule's and due time's, so the same run
    asked for by both (an overlap) is stored once by JetStream and runs once."""

    name = "scheduler"
    migrations = MIGRATIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        default = Schedule(
            name=SEGMENTATION_SCHEDULE,
            job="segmentation",
            cron=os.environ.get("CDP_SEGMENTATION_SCHEDULE", "0 2 * * *"),
            timezone=os.environ.get("CDP_SCHEDULE_TZ", "UTC"),
            description="the daily batch segmentation job (from the environment)",
        )
        check(default.cron, default.timezone)
        self.default = default
        self._events: JobEvents | None = None
        self._timers: Timers | None = None
        self._api: SchedulerApi | None = None
        self._lease: Lease | None = None
        self._role: str | None = None
        self._waiting: asyncio.Task[None] | None = None

    @property
    def role(self) -> str | None:
        return self._role

    def consumers(self) -> Sequence[ConsumerSpec]:
        if self._events is None:
            raise RuntimeError("scheduler: not started")
        instance = self.settings.instance_id
        return (
            ConsumerSpec(
                JOBS_CONSUMER,
                subjects.STREAM_JOBS,
                self._events.on_job_events,
                filter_subjects=JOBS_SUBJECTS,
                description="the done events of jobs: how the runs the scheduler asked for ended",
                durable=None if instance == self.name else instance,
            ),
        )

    async def _publish(self, out: list[Outgoing]) -> bool:
        return await publish_outbox(self.js, self.db, out, self.log, lambda: self._stopping)

    async def on_connected(self) -> bool:
        self._lease, acquired = await self.role_lease(
            subjects.SCHEDULER_ACTIVE_LEASE,
            lambda: self.fail("scheduler: lost the lease of the active instance"),
        )
        self._role = ACTIVE if acquired else STANDBY
        return True  # its own job requests: ids per run, a repeat is dropped

    async def on_start(self) -> None:
        store = SchedulerStore(self.db)
        self._events = JobEvents(store)
        self._timers = Timers(store, self._publish)
        if self._role == ACTIVE:
            await self._activate(store)

    async def _activate(self, store: SchedulerStore) -> None:
        assert self._timers is not None
        self._api = api = SchedulerApi(
            store,
            self._timers,
            self._publish,
            default=self.default,
            configured=await store.schedules(),
        )
        await api.start(self.nc)
        for schedule in api.active().values():
            await self._timers.begin(schedule)

    async def start(self) -> None:
        await super().start()
        if self._role == STANDBY:
            self._waiting = asyncio.create_task(self._wait_for_lease(), name="scheduler:standby")

    async def _wait_for_lease(self) -> None:
        assert self._lease is not None
        await self._lease.acquire()
        self.log.info("taking over as the active scheduler", fencing=self._lease.token)
        store = SchedulerStore(self.db)
        # The schedules the other instance was given: the config stream holds the latest.
        tx = Tx()
        for schedule, spec in await configured_schedules(self.js):
            store.save_schedule(tx, schedule, spec)
        await store.commit(tx)
        self._role = ACTIVE
        await self._activate(store)

    async def on_stop(self) -> None:
        task, self._waiting = self._waiting, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._api is not None:
            await self._api.stop()
        if self._timers is not None:
            await self._timers.end_all()
        if self._lease is not None:
            await self._lease.release()


_schedule_decoder = msgspec.json.Decoder(Schedule)


async def configured_schedules(js: JetStreamContext) -> list[tuple[Schedule, bytes]]:
    """Every schedule on the config stream (its latest version), with its JSON."""
    stream = subjects.STREAM_CONFIG.name
    info = await js.stream_info(stream, subjects_filter=subjects.config("schedule", "*"))
    out = []
    for subject in info.state.subjects or {}:
        try:
            msg = await js.get_last_msg(stream, subject)
            schedule = _schedule_decoder.decode(msg.data or b"")
        except (NotFoundError, msgspec.DecodeError):
            continue
        if subject == subjects.config("schedule", schedule.name):
            out.append((schedule, bytes(msg.data or b"")))
    return out

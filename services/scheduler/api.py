"""The scheduler's admin API (for people and the CLI): apply and get schedules.

A schedule is configuration (`cdp apply`, kind schedule), owned by the scheduler: an
applied schedule is stored and published on `cdp.config.schedule.<name>` (CDP_CONFIG)
through the outbox, in one transaction, and followed from then on.
"""

from __future__ import annotations

import time

import msgspec
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from services.scheduler.handlers import Publish, Timers
from services.scheduler.schedules import active, problem
from services.scheduler.store import SchedulerStore
from shared import admin, subjects
from shared.admin import (
    ApplyMany,
    ApplyManyResult,
    GetRequest,
    GetResult,
    Invalid,
    NotFound,
    apply_result,
    decode_object,
)
from shared.db import Tx
from shared.resources import PLURALS, Schedule, to_builtins
from shared.runtime.actor import Outgoing

KIND = "schedule"
_encoder = msgspec.json.Encoder()


class SchedulerApi:
    """`cdp.admin.scheduler.apply` and `.get`; holds the configured schedules."""

    def __init__(
        self,
        store: SchedulerStore,
        timers: Timers,
        publish: Publish,
        *,
        default: Schedule,
        configured: list[Schedule],
    ) -> None:
        self.store = store
        self.timers = timers
        self.publish = publish
        self.default = default
        self.schedules: dict[str, Schedule] = {s.name: s for s in configured}
        self._subs: list[Subscription] = []

    def active(self) -> dict[str, Schedule]:
        return active(self.schedules, self.default)

    async def start(self, nc: Client) -> None:
        self._subs = await admin.serve_all(
            nc,
            [
                (subjects.admin("scheduler", "apply"), ApplyMany, self.apply),
                (subjects.admin("scheduler", "get"), GetRequest, self.get),
            ],
        )

    async def stop(self) -> None:
        await admin.unsubscribe_all(self._subs)

    async def apply(self, request: ApplyMany) -> ApplyManyResult:
        planned = []
        for obj in request.objects:
            schedule = decode_object(obj, KIND, "scheduler", Schedule)
            wrong = problem(schedule)
            if wrong is not None:
                field, message = wrong
                raise Invalid(message, kind=KIND, name=schedule.name, field=field)
            current = self.schedules.get(schedule.name)
            planned.append((schedule, apply_result(KIND, schedule.name, current, schedule)))
        if request.dry_run:
            return ApplyManyResult([r for _, r in planned])
        for schedule, result in planned:
            if result.action == "unchanged":
                continue
            now = time.time()
            spec = _encoder.encode(schedule)
            out = Outgoing(
                f"scheduler:config:{schedule.name}:{now!r}",
                subjects.config(KIND, schedule.name),
                spec,
            )
            tx = Tx()
            self.store.save_schedule(tx, schedule, spec)
            self.store.send(tx, [out], now)
            await self.store.commit(tx)
            await self.publish([out])
            before = set(self.active())
            self.schedules[schedule.name] = schedule
            for gone in before - set(self.active()):  # e.g. the default daily job, replaced
                await self.timers.end(gone)
            await self.timers.end(schedule.name)
            await self.timers.begin(schedule)
        return ApplyManyResult([r for _, r in planned])

    async def get(self, request: GetRequest) -> GetResult:
        kind = PLURALS.get(request.kind, request.kind)
        if kind != KIND:
            raise Invalid(f"the scheduler does not own {kind!r}", code="unknown_kind")
        schedules = self.active()
        if request.name is not None:
            if request.name not in schedules:
                raise NotFound(f"no schedule named {request.name!r}", kind=KIND)
            return GetResult(KIND, [to_builtins(schedules[request.name])])
        return GetResult(KIND, [to_builtins(schedules[n]) for n in sorted(schedules)])

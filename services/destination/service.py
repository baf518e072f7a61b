"""The destination service's wiring: it builds the store, the in-memory state, the
handlers, the delivery worker, the exporter and the admin API, and hands each what it
uses. No rule lives here.

What the service does (activating audiences to external systems) is told by its parts:
handlers.py (the actor steps), activation.py (from changes to activations), delivery.py
(sending, one worker per streaming destination), retry.py (sent, retried or
dead-lettered), exporter.py (file exports), api.py (the admin API), store.py (SQLite)
and state.py (what they share in memory).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

from services.destination.api import DestinationApi
from services.destination.delivery import DeliveryWorker
from services.destination.exporter import Exporter
from services.destination.handlers import Handlers
from services.destination.retry import MAX_AGE_S
from services.destination.state import State
from services.destination.store import MIGRATIONS, DestinationStore
from shared import subjects
from shared.runtime import ConsumerSpec, Service


def _max_age() -> float:
    raw = os.environ.get("CDP_DELIVERY_MAX_AGE", "")
    return float(raw) if raw else MAX_AGE_S


class DestinationService(Service):
    name = "destination"
    migrations = MIGRATIONS
    listings: ClassVar[dict[str, str]] = {
        "profiles": "SELECT rowid, profile_id FROM profiles WHERE rowid > ? ORDER BY rowid LIMIT ?",
        "members": "SELECT rowid, profile_id, segment FROM memberships WHERE status IN "
        "('realized', 'existing') AND rowid > ? ORDER BY rowid LIMIT ?",
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = State()
        self._started = False

    async def on_start(self) -> None:
        store = DestinationStore(self.db)
        self.state.load(
            await store.destinations(),
            [(row.meta, bool(row.deleted)) for row in await store.segments()],
            [(c.destination, c.segment, c.remote_id or "") for c in await store.synced()],
        )
        self.delivery = DeliveryWorker(
            store, self.state, self.settings, self.log, max_age=_max_age(), nc=lambda: self.nc
        )
        exporter = Exporter(store, self.settings, self.log)
        self.handlers = Handlers(store, self.state, exporter, self.delivery.wake, self.log)
        self.api = DestinationApi(
            store,
            self.state,
            self.delivery,
            exporter,
            settings=self.settings,
            log=self.log,
            js=lambda: self.js,
        )
        self._started = True
        await self.delivery.start()
        await self.api.start(self.nc)
        await self.api.publish_all()

    async def on_stop(self) -> None:
        if self._started:
            await self.delivery.stop()
            await self.api.stop()

    def consumers(self) -> Sequence[ConsumerSpec]:
        h = self.handlers
        return (
            ConsumerSpec(
                "destination-segments",
                subjects.STREAM_CONFIG,
                h.segments,
                filter_subjects=(subjects.config("segment", "*"),),
                description="segments as segmentation publishes them (names, methods, deletes)",
            ),
            ConsumerSpec(
                "destination-profiles",
                subjects.STREAM_CHANGES,
                h.profiles,
                description="profile changes: the identities and attributes to activate",
            ),
            ConsumerSpec(
                "destination-jobs",
                subjects.STREAM_JOBS,
                h.jobs,
                filter_subjects=(subjects.SEGMENTATION_JOB_DONE, subjects.export_run("*")),
                description="export requests, and batch segmentation jobs that ended",
            ),
            ConsumerSpec(
                "destination-members",
                subjects.STREAM_MEMBERS,
                h.memberships,
                description="segment membership changes in batches, and privacy deletes",
            ),
        )

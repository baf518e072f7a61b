"""The segmentation service: the wiring (nothing but `__main__` imports it).

The store, the catalog of segments, the actor's steps (`handlers`), the admin API (`api`)
and the timers of time-based re-checks (`timers`), built on the runtime's connections;
three consumers: profile changes and rechecks (CDP_CHANGES), merge policies (CDP_CONFIG)
and job requests (CDP_JOBS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from nats.aio.subscription import Subscription

from services.segmentation.api import POLICIES_CONSUMER, SegmentationApi
from services.segmentation.catalog import Catalog
from services.segmentation.handlers import Handlers
from services.segmentation.store import LISTINGS, MIGRATIONS, SegmentationStore
from services.segmentation.timers import Timers
from shared import admin, subjects
from shared.runtime import ConsumerSpec, Service


class SegmentationService(Service):
    name = "segmentation"
    migrations = MIGRATIONS
    listings: ClassVar[dict[str, str]] = LISTINGS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.catalog = Catalog()
        self.handlers: Handlers | None = None
        self._timers: Timers | None = None
        self._subs: list[Subscription] = []

    def consumers(self) -> Sequence[ConsumerSpec]:
        assert self.handlers is not None, "consumers are built once the service started"
        h = self.handlers
        return (
            ConsumerSpec(
                "segmentation",
                subjects.STREAM_CHANGES,
                h.changes,
                description="profile changes (from profile), rechecks (timers, batch jobs)",
            ),
            ConsumerSpec(
                POLICIES_CONSUMER,
                subjects.STREAM_CONFIG,
                h.policies,
                filter_subjects=(subjects.config("merge_policy", "*"),),
                description="merge policy names, as profile publishes them",
            ),
            ConsumerSpec(
                "segmentation-jobs",
                subjects.STREAM_JOBS,
                h.job_requests,
                filter_subjects=(subjects.SEGMENTATION_JOB_RUN,),
                description="batch segmentation job requests",
            ),
        )

    async def on_start(self) -> None:
        store = SegmentationStore(self.db)
        self.catalog.load((s.spec, s.ast) for s in await store.segments())
        timers = self._timers = Timers(store, self.js, self.settings.partitions)
        self.handlers = Handlers(
            store, self.catalog, partitions=self.settings.partitions, timer_set=timers.wake
        )
        api = SegmentationApi(store, self.catalog, self.js)
        await api.publish_all()
        self._subs = await admin.serve_all(self.nc, api.endpoints())
        timers.start()

    async def on_stop(self) -> None:
        if self._timers is not None:
            await self._timers.stop()
        await admin.unsubscribe_all(self._subs)

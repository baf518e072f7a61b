"""The profile service, wired: its store, configuration, handlers, admin API and lookups,
and the consumers that feed the handlers. Nothing but `__main__` imports this module.

The profile actor merges every fragment of a person into one unified profile and tells
segmentation what changed (see handlers and rules).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, ClassVar

import aiosqlite
from aiohttp import web
from nats.aio.subscription import Subscription

from services.profile.api import ProfileAdmin
from services.profile.config import ProfileConfig
from services.profile.handlers import ProfileHandlers
from services.profile.lookup import ProfileLookups
from services.profile.store import LISTINGS, MIGRATIONS, ProfileStore
from shared import admin, subjects
from shared.admin import ApplyMany, GetRequest
from shared.db import close_reader, open_reader
from shared.runtime import ConsumerSpec, Service
from shared.runtime.actor import RUNTIME_MIGRATIONS

EXPIRY_EVERY_S = 600.0


class ProfileService(Service):
    name = "profile"
    migrations = MIGRATIONS
    listings: ClassVar[dict[str, str]] = LISTINGS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config = ProfileConfig(self.settings.phone_region)
        self.handlers: ProfileHandlers | None = None
        self.lookups: ProfileLookups | None = None
        self._reader: aiosqlite.Connection | None = None
        self._subs: list[Subscription] = []
        self._expiry: asyncio.Task[None] | None = None
        self.health.app.router.add_get("/v1/profiles", self._http_lookup)

    async def on_start(self) -> None:
        store = ProfileStore(self.db)
        self.config.update(
            datasets=await store.datasets(),
            namespaces=await store.namespaces(),
            policies=[p.decoded() for p in await store.policies()],
        )
        self.handlers = ProfileHandlers(
            store, self.config, partitions=self.settings.partitions, log=self.log
        )
        api = ProfileAdmin(store, self.config, self.js, self.log)
        # Lookups read on a connection of their own, opened once the schema is migrated.
        self._reader = await open_reader(self.settings.db_path, RUNTIME_MIGRATIONS + MIGRATIONS)
        self.lookups = ProfileLookups(
            ProfileStore(self._reader), self.config, self.settings.profile_token, self.log
        )
        await api.publish_stored()
        nc = self.nc
        self._subs = [
            await admin.serve(nc, subjects.admin(self.name, "apply"), ApplyMany, api.apply),
            await admin.serve(nc, subjects.admin(self.name, "get"), GetRequest, api.get),
            await nc.subscribe(
                subjects.PROFILE_LOOKUP, queue="profile-lookup", cb=self.lookups.on_request
            ),
        ]
        self._expiry = asyncio.create_task(self._expire_events(), name="expire-events")

    def consumers(self) -> Sequence[ConsumerSpec]:
        h = self.handlers
        assert h is not None, "consumers are made after on_start"
        return (
            ConsumerSpec(
                "profile-datasets",
                subjects.STREAM_CONFIG,
                h.on_datasets,
                filter_subjects=(subjects.config("dataset", "*"),),
                description="datasets (event expiration), from ingest's configuration",
            ),
            ConsumerSpec(
                "profile-namespaces",
                subjects.STREAM_CONFIG,
                h.on_namespaces,
                filter_subjects=(subjects.config("namespace", "*"),),
                description="identity namespaces (how lookups read an identity), from ingest",
            ),
            ConsumerSpec(
                "profile-policies",
                subjects.STREAM_CONFIG,
                h.on_policies,
                filter_subjects=(subjects.config("merge_policy", "*"),),
                description="merge policies, as this service published them on the config stream",
            ),
            ConsumerSpec(
                "profile-members",
                subjects.STREAM_MEMBERS,
                h.on_memberships,
                description="segment membership changes in batches, written back to the profile",
            ),
            ConsumerSpec(
                "profile",
                subjects.STREAM_PROFILES,
                h.on_items,
                description="records with their profile ids, merges, splits, deletes",
            ),
        )

    async def on_stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        self.lookups = None
        await admin.unsubscribe_all(self._subs)
        reader, self._reader = self._reader, None
        if reader is not None:
            await close_reader(reader)

    async def _expire_events(self) -> None:
        """Events older than their dataset's expiration go, now and every ten minutes."""
        assert self.handlers is not None
        while True:
            await self.handlers.expire_events()
            await asyncio.sleep(EXPIRY_EVERY_S)

    async def _http_lookup(self, request: web.Request) -> web.Response:
        if self.lookups is None:
            return web.json_response(
                {"error": {"code": "unavailable", "message": "starting"}}, status=503
            )
        return await self.lookups.http_get(request)

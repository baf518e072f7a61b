"""The profile service as one of several instances (`CDP_INSTANCE` set): each instance
holds some of the `CDP_PARTITIONS` partitions (shared.runtime.partitions), and a profile's
state lives in its partition's file.

What is per partition, in `<data dir>/profile/pNN.db` (moved with the partition by
snapshot and replay): the profile tables (profiles, attributes, events, identities,
memberships, the carried index) and two inputs, each its own consumer and offset in that
file: the partition's items (`cdp.x.profiles.<p>`, CDP_PROFILES: records, merges,
reassignments, deletes, probes; its changes for segmentation land on `cdp.x.changes.<p>`,
which the catch-up after a crash reads) and its memberships (`cdp.x.members.<p>`,
CDP_MEMBERS). Expiration runs over every held partition.

What is per instance, in `<data dir>/profile.db` as in the single-instance service: the
configuration every instance follows (datasets, namespaces, merge policies, from
CDP_CONFIG, each instance with durable consumers of its own). It is kept there, not in
each partition file: it is the same for every partition, so a partition file carries none
of it (a partition that moves needs no configuration replayed, the new owner has it
already), and a handler reads it from memory (`ProfileConfig`), never per partition.

Lookups: every instance answers `cdp.profile.lookup` (one queue group) and routes it to
the owner of a partition, which answers on `cdp.profile.lookup.partition.<p>` from a
read-only connection to its file. A lookup by profile id asks the partition of the id; a
lookup by identity asks every partition at once and takes the one that holds it (the
identity-to-profile index lives in the profile's partition; the instance answering has no
index of its own, and asking the identity service would add a second hop and a second
service to every lookup). A partition nobody holds right now makes a lookup that found
nothing `unavailable` rather than `not_found`.

The listings `cdp check` reads cover the partitions this instance holds (cursor
`<partition>:<rowid>`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import aiosqlite
import msgspec
import nats.errors
from aiohttp import web
from nats.aio.subscription import Subscription

from services.profile.api import ProfileAdmin
from services.profile.config import ProfileConfig
from services.profile.handlers import ProfileHandlers
from services.profile.lookup import ProfileLookup, ProfileLookups, ProfileView
from services.profile.store import LISTINGS, MIGRATIONS, PARTITION_MIGRATIONS, ProfileStore
from shared import admin, subjects
from shared.admin import AdminError, AdminFailure, ApplyMany, GetRequest
from shared.db import close_reader, open_reader
from shared.listing import MAX_PAGE, ListPage, ListRequest
from shared.runtime import ConsumerSpec
from shared.runtime.actor import RUNTIME_MIGRATIONS
from shared.runtime.partition_state import PARTITION_MIGRATIONS as RUNTIME_PARTITION
from shared.runtime.partition_state import partition_path
from shared.runtime.partitions import PartitionedService, PartitionInput

EXPIRY_EVERY_S = 600.0
ASK_TIMEOUT_S = 5.0
"""How long a routed lookup waits for a partition's owner."""


class _PartReply(msgspec.Struct, omit_defaults=True):
    ok: bool
    result: ProfileView | None = None
    error: AdminError | None = None


_part_reply = msgspec.json.Decoder(_PartReply)
_encoder = msgspec.json.Encoder()


class _Held:
    """What this instance keeps for a partition it holds."""

    def __init__(
        self, handlers: ProfileHandlers, reader: aiosqlite.Connection, sub: Subscription
    ) -> None:
        self.handlers = handlers
        self.reader = reader
        self.sub = sub


MOVED = "moved"
"""A partition's answer for a profile folded into one of another partition (`name`)."""


class PartitionLookups(ProfileLookups):
    """A held partition's lookups: a profile id folded into a profile of another
    partition answers `moved`, naming it, and the routing asks that partition."""

    async def lookup(self, request: ProfileLookup) -> ProfileView:
        if request.profile_id is not None and await self.store.survivor(request.profile_id) is None:
            elsewhere = await self.store.folded_elsewhere(request.profile_id)
            if elsewhere is not None:
                raise AdminFailure(MOVED, f"folded into {elsewhere}", name=elsewhere)
        return await super().lookup(request)


class RoutedLookups(ProfileLookups):
    """`cdp.profile.lookup` and HTTP lookups, answered by the partitions' owners."""

    def __init__(self, service: PartitionedProfileService, token: str | None) -> None:
        super().__init__(service.store, service.config, token, service.log)
        self.service = service

    async def lookup(self, request: ProfileLookup) -> ProfileView:
        n = self.service.settings.partitions
        if request.profile_id is not None:
            targets: Sequence[int] = (subjects.partition_of(request.profile_id, n),)
        elif not request.identity:
            raise AdminFailure(
                "invalid",
                "a lookup names an identity (<namespace>:<value>) or a profile_id",
                field="identity",
            )
        else:
            targets = range(n)
        data = _encoder.encode(request)
        replies = await asyncio.gather(*(self._ask(p, data) for p in targets))
        hops = 0
        while (
            request.profile_id is not None
            and replies[0] is not None
            and replies[0].error is not None
            and replies[0].error.code == MOVED
            and replies[0].error.name
            and hops < 16
        ):  # folded into a profile of another partition: ask that one
            hops += 1
            request = msgspec.structs.replace(request, profile_id=replies[0].error.name)
            targets = (subjects.partition_of(replies[0].error.name, n),)
            replies = [await self._ask(targets[0], _encoder.encode(request))]
        refusal: AdminError | None = None
        missing = []
        for p, reply in zip(targets, replies, strict=True):
            if reply is None:
                missing.append(p)
            elif reply.ok and reply.result is not None:
                return reply.result
            elif reply.error is not None and (refusal is None or refusal.code == "not_found"):
                refusal = reply.error
        if refusal is not None and (refusal.code != "not_found" or not missing):
            raise AdminFailure(
                refusal.code,
                refusal.message,
                kind=refusal.kind,
                name=refusal.name,
                field=refusal.field,
            )
        raise AdminFailure(
            "unavailable",
            f"partitions {', '.join(map(str, missing))} have no owner right now; try again",
        )

    async def _ask(self, partition: int, data: bytes) -> _PartReply | None:
        try:
            msg = await self.service.nc.request(
                subjects.profile_partition_lookup(partition), data, timeout=ASK_TIMEOUT_S
            )
        except (TimeoutError, nats.errors.Error):
            return None
        try:
            return _part_reply.decode(msg.data)
        except msgspec.DecodeError:
            return None


class PartitionedProfileService(PartitionedService):
    name = "profile"
    migrations = MIGRATIONS
    partition_migrations = PARTITION_MIGRATIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config = ProfileConfig(self.settings.phone_region)
        self.config_handlers: ProfileHandlers | None = None
        self.lookups: RoutedLookups | None = None
        self.parts: dict[int, _Held] = {}
        self._subs: list[Subscription] = []
        self._expiry: asyncio.Task[None] | None = None
        self.health.app.router.add_get("/v1/profiles", self._http_lookup)

    @property
    def store(self) -> ProfileStore:
        """The instance's own store: the configuration it follows."""
        return ProfileStore(self.db)

    # -- service-wide ------------------------------------------------------------------
    async def on_start(self) -> None:
        store = self.store
        self.config.update(
            datasets=await store.datasets(),
            namespaces=await store.namespaces(),
            policies=[p.decoded() for p in await store.policies()],
        )
        self.config_handlers = ProfileHandlers(
            store, self.config, partitions=self.settings.partitions, log=self.log
        )
        api = ProfileAdmin(store, self.config, self.js, self.log)
        await api.publish_stored()
        self.lookups = RoutedLookups(self, self.settings.profile_token)
        nc = self.nc
        self._subs = [
            await admin.serve(nc, subjects.admin(self.name, "apply"), ApplyMany, api.apply),
            await admin.serve(nc, subjects.admin(self.name, "get"), GetRequest, api.get),
            await admin.serve(
                nc, subjects.admin(self.name, "check.list"), ListRequest, self._listing
            ),
            await nc.subscribe(
                subjects.PROFILE_LOOKUP, queue="profile-lookup", cb=self.lookups.on_request
            ),
        ]
        self._expiry = asyncio.create_task(self._expire_events(), name="expire-events")
        await super().on_start()

    def consumers(self) -> Sequence[ConsumerSpec]:
        h = self.config_handlers
        assert h is not None, "consumers are made after on_start"
        mine = self.instance
        return (
            ConsumerSpec(
                "profile-datasets",
                subjects.STREAM_CONFIG,
                h.on_datasets,
                filter_subjects=(subjects.config("dataset", "*"),),
                description="datasets (event expiration), from ingest's configuration",
                durable=f"profile-datasets-{mine}",
            ),
            ConsumerSpec(
                "profile-namespaces",
                subjects.STREAM_CONFIG,
                h.on_namespaces,
                filter_subjects=(subjects.config("namespace", "*"),),
                description="identity namespaces (how lookups read an identity), from ingest",
                durable=f"profile-namespaces-{mine}",
            ),
            ConsumerSpec(
                "profile-policies",
                subjects.STREAM_CONFIG,
                h.on_policies,
                filter_subjects=(subjects.config("merge_policy", "*"),),
                description="merge policies, as the profile service published them",
                durable=f"profile-policies-{mine}",
            ),
        )

    async def on_stop(self) -> None:
        await super().on_stop()  # every partition released (planned handover)
        expiry, self._expiry = self._expiry, None
        if expiry is not None:
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
        self.lookups = None
        await admin.unsubscribe_all(self._subs)

    # -- per partition -------------------------------------------------------------------
    async def partition_opened(self, partition: int, db: aiosqlite.Connection) -> None:
        handlers = ProfileHandlers(
            ProfileStore(db),
            self.config,
            partitions=self.settings.partitions,
            log=self.log.bind(partition=partition),
            held=(partition,),
        )
        path = partition_path(self.settings.data_dir, self.name, partition)
        reader = await open_reader(
            path, RUNTIME_MIGRATIONS + RUNTIME_PARTITION + PARTITION_MIGRATIONS
        )
        local = PartitionLookups(ProfileStore(reader), self.config, None, self.log)
        try:
            sub = await self.nc.subscribe(
                subjects.profile_partition_lookup(partition), cb=local.on_request
            )
        except BaseException:
            await close_reader(reader)
            raise
        self.parts[partition] = _Held(handlers, reader, sub)

    def partition_inputs(self, partition: int) -> Sequence[PartitionInput]:
        h = self.parts[partition].handlers
        return (
            # First: the main input may wait for a handoff (`Blocked`), so it runs first.
            PartitionInput(
                subjects.STREAM_HANDOFFS,
                subjects.handoffs(partition),
                h.on_handoffs,
                name="handoff",
            ),
            PartitionInput(
                subjects.STREAM_PROFILES,
                subjects.profiles(partition),
                h.on_items,
                output=(subjects.STREAM_CHANGES, subjects.changes(partition)),
            ),
            PartitionInput(
                subjects.STREAM_MEMBERS,
                subjects.members(partition),
                h.on_memberships,
                name="members",
            ),
        )

    async def partition_closed(self, partition: int) -> None:
        held = self.parts.pop(partition, None)
        if held is None:
            return
        with contextlib.suppress(Exception):
            await held.sub.unsubscribe()
        await close_reader(held.reader)

    async def _expire_events(self) -> None:
        """Events older than their dataset's expiration go, in every partition held, now
        and every ten minutes."""
        while True:
            for partition, held in list(self.parts.items()):
                try:
                    await held.handlers.expire_events()
                except Exception as exc:  # a partition closing meanwhile
                    self.log.warning("expiration failed", partition=partition, error=repr(exc))
            await asyncio.sleep(EXPIRY_EVERY_S)

    async def _listing(self, request: ListRequest) -> ListPage:
        """A listing over the partitions held, partition after partition."""
        sql = LISTINGS.get(request.what)
        if sql is None:
            raise AdminFailure(
                "invalid",
                f"unknown listing {request.what!r} (one of {', '.join(sorted(LISTINGS))})",
                field="what",
            )
        if not 0 < request.limit <= MAX_PAGE:
            raise AdminFailure("invalid", f"limit must be in 1..{MAX_PAGE}", field="limit")
        try:
            first, _, after = (request.after or "0:0").partition(":")
            start, cursor = int(first), int(after or 0)
        except ValueError:
            raise AdminFailure(
                "invalid", "after must be a cursor of a page", field="after"
            ) from None
        rows: list[list[Any]] = []
        for partition in sorted(p for p in self.parts if p >= start):
            held = self.parts.get(partition)
            if held is None:
                continue
            after_here = cursor if partition == start else 0
            want = request.limit - len(rows)
            got = await held.reader.execute_fetchall(sql, (after_here, want))
            rows += [[f"{partition}:{r[0]}", *r[1:]] for r in got]
            if len(rows) >= request.limit:
                return ListPage(rows=rows, next=str(rows[-1][0]))
        return ListPage(rows=rows, next=None)

    async def _http_lookup(self, request: web.Request) -> web.Response:
        if self.lookups is None:
            return web.json_response(
                {"error": {"code": "unavailable", "message": "starting"}}, status=503
            )
        return await self.lookups.http_get(request)

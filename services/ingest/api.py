"""The ingest service's admin API (request/reply, for people and the CLI): apply and get
configuration, start and list batches, read the error store, wait until data has landed.

When several instances share the ingest stream (`shared`), each answers the reads of its
own records (`errors`, `batch.list`: the CLI and the console gather every answer), each
applies configuration (`apply`: every instance holds the whole configuration), and each
removes a person's rejected records when the instance carrying out a privacy delete
asks (`forget`). A batch is started by one of them (a queue group)."""

from __future__ import annotations

import msgspec
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from services.ingest.batches import BatchJobs
from services.ingest.catalog import Catalog, own_kind
from services.ingest.landing import wait_landed
from services.ingest.store import Store
from shared import admin, subjects
from shared.admin import (
    ApplyMany,
    ApplyManyResult,
    BatchListResult,
    ErrorsQuery,
    ErrorsResult,
    GetRequest,
    GetResult,
    LandedRequest,
    LandedResult,
    ListRequest,
    NotFound,
)
from shared.db import Tx
from shared.resources import to_builtins

MAX_LISTED_BATCHES = 1000
MAX_LISTED_ERRORS = 10_000
FORGET_TIMEOUT_S = 5.0


class ForgetRequest(msgspec.Struct):
    """From the instance carrying out a privacy delete to the others: remove the rejected
    records these identity keys find."""

    instance: str
    request_id: str
    keys: list[str]
    before_seq: int
    """Only what came before the delete in the stream: later records stay."""


class ForgetResult(msgspec.Struct):
    instance: str
    removed: int


class IngestApi:
    def __init__(
        self,
        nc: Client,
        store: Store,
        catalog: Catalog,
        batches: BatchJobs,
        *,
        instance: str = "ingest",
        shared: bool = False,
    ) -> None:
        self.nc = nc
        self.store = store
        self.catalog = catalog
        self.batches = batches
        self.instance = instance
        self.shared = shared
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        nc = self.nc

        def at(verb: str) -> str:
            return subjects.admin("ingest", verb)

        every = self.shared
        self._subs = [
            await admin.serve(nc, at("apply"), ApplyMany, self.apply, every=every),
            await admin.serve(nc, at("get"), GetRequest, self.get),
            await admin.serve(nc, at("batch.start"), admin.BatchStart, self.batches.start_batch),
            await admin.serve(nc, at("batch.list"), ListRequest, self.list_batches, every=every),
            await admin.serve(nc, at("errors"), ErrorsQuery, self.errors, every=every),
            await admin.serve(nc, at("landed"), LandedRequest, self.landed),
        ]
        if self.shared:
            self._subs.append(
                await admin.serve(nc, at("forget"), ForgetRequest, self.forget, every=True)
            )

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        await admin.unsubscribe_all(subs)

    async def apply(self, request: ApplyMany) -> ApplyManyResult:
        return await self.catalog.apply(request)

    async def get(self, request: GetRequest) -> GetResult:
        kind = own_kind(request.kind)
        registry = self.catalog.state.registry
        if request.name is not None:
            spec = registry.get(kind, request.name)
            if spec is None:
                raise NotFound(f"no {kind} named {request.name!r}", kind=kind, name=request.name)
            return GetResult(kind, [to_builtins(spec)])
        return GetResult(kind, [to_builtins(s) for s in registry.items(kind)])

    async def list_batches(self, request: ListRequest) -> BatchListResult:
        """The latest batches, newest first; those running as they are now."""
        listed = await self.store.batches(max(1, min(request.limit, MAX_LISTED_BATCHES)))
        live = self.batches.live
        return BatchListResult([live.get(b.batch_id, b) for b in listed])

    async def errors(self, request: ErrorsQuery) -> ErrorsResult:
        """The rejected records of a batch, or else of a dataset."""
        target = request.target
        column = "batch_id" if await self.store.is_batch(target) else "dataset"
        limit = max(1, min(request.limit, MAX_LISTED_ERRORS))
        records = await self.store.errors(column, target, limit)
        total = await self.store.count_errors(column, target)
        known = target in self.catalog.state.registry.datasets
        if total == 0 and column == "dataset" and not known:
            raise NotFound(
                f"no dataset or batch named {target!r}",
                kind="dataset",
                name=target,
            )
        return ErrorsResult(target, total, records, dropped=await self.store.dropped())

    async def landed(self, request: LandedRequest) -> LandedResult:
        return await wait_landed(self.nc, request)

    async def forget(self, request: ForgetRequest) -> ForgetResult:
        """Another instance's privacy delete: remove the person's rejected records here
        (the asking instance removes its own in its step)."""
        if request.instance == self.instance:
            return ForgetResult(self.instance, 0)
        state = self.catalog.state
        ids = {
            i
            for i in await self.store.rejected_ids_by_keys(request.keys)
            if state.applied_before(i, request.before_seq)
        }
        if ids:
            tx = Tx()
            self.store.delete_rejected(tx, ids)
            await self.store.apply(tx)
        return ForgetResult(self.instance, len(ids))

    async def forget_elsewhere(self, request_id: str, keys: list[str], before_seq: int) -> int:
        """Ask every other instance to remove the rejected records `keys` find; how many
        they removed. An instance that does not answer (down) keeps them: see README."""
        try:
            gathered = await admin.gather(
                self.nc,
                subjects.admin("ingest", "forget"),
                ForgetRequest(self.instance, request_id, keys, before_seq),
                timeout=FORGET_TIMEOUT_S,
            )
        except TimeoutError:
            return 0
        if gathered.failures and not gathered.results:
            raise gathered.failures[0]
        return sum(r.removed for r in gathered.typed(ForgetResult))

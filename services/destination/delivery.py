"""The delivery worker: one task per streaming destination sends what is queued, as the
destination's aggregation policy says, through the destination's connector; what becomes
of a failed attempt is `retry.decide`'s (retry with backoff, or dead-letter). Nothing is
lost while a destination is down: the queue survives restarts.

Audience managers learn a segment's metadata (from the segments the state holds, as
segmentation published them) before its first members, once per segment and connector.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
import structlog
from nats.aio.client import Client

from services.destination.activation import MISSING_IDENTITY
from services.destination.connectors import CONNECTORS
from services.destination.connectors.base import REGION_SETTING
from services.destination.guard import ALLOW_PRIVATE_SETTING, SECRET_PREFIX
from services.destination.model import SegmentMeta
from services.destination.retry import DeadLetter, Retry, decide
from services.destination.state import State
from services.destination.store import DestinationStore, Waiting
from shared.config import Settings
from shared.db import Tx
from shared.resources import Destination
from shared.runtime.tasks import cancel_all


class DeliveryWorker:
    def __init__(
        self,
        store: DestinationStore,
        state: State,
        settings: Settings,
        log: structlog.typing.FilteringBoundLogger,
        *,
        max_age: float,
        nc: Callable[[], Client],
    ) -> None:
        self.store = store
        self.state = state
        self.settings = settings
        self.log = log
        self.max_age = max_age
        self._nc = nc
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._http: aiohttp.ClientSession | None = None
        self._connectors: dict[str, tuple[Destination, Any]] = {}

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        for name in self.state.destinations:
            self.ensure(name)

    async def stop(self) -> None:
        workers = list(self._workers.values())
        await cancel_all(workers)
        self._workers.clear()
        if self._http is not None:
            await self._http.close()

    def ensure(self, name: str) -> None:
        """A worker for `name` if it is a streaming destination and has none yet."""
        if self.state.streaming(name) is None or name in self._workers or self._http is None:
            return
        self._workers[name] = asyncio.create_task(self._loop(name), name=f"deliver:{name}")

    def wake(self, names: Iterable[str]) -> None:
        for name in names:
            self.ensure(name)
            self._wake[name].set()

    async def _loop(self, name: str) -> None:
        wake = self._wake[name]
        while True:
            dest = self.state.destinations.get(name)
            if dest is None:
                return
            wait = await self._deliver_once(dest)
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), wait)

    async def _connector(self, dest: Destination) -> Any:
        """The destination's connector, kept while its configuration stays the same (an
        audience manager's remote segment ids live in it)."""
        cached = self._connectors.get(dest.name)
        if cached is not None and cached[0] is dest:
            return cached[1]
        secrets = {
            k: os.environ.get(env, "") if env.startswith(SECRET_PREFIX) else ""
            for k, env in dest.secrets.items()
        }
        settings = {
            REGION_SETTING: self.settings.phone_region,
            **dest.connection,
            ALLOW_PRIVATE_SETTING: self.settings.allow_private_destinations,
        }
        if dest.type == "nats":
            settings["_nc"] = self._nc()
        try:
            connector = CONNECTORS[dest.type](settings, secrets)
        except Exception as exc:  # a secret's variable is not set: nothing can be sent
            self.log.warning("destination misconfigured", destination=dest.name, error=str(exc))
            tx = Tx()
            self.store.bump(tx, dest.name, last_error=f"misconfigured: {exc}")
            await self.store.apply(tx)
            return None
        self._connectors[dest.name] = (dest, connector)
        self.state.forget_sync(dest.name)  # a new connector syncs its segments again (idempotent)
        return connector

    async def _sync(self, dest: Destination, connector: Any, meta: SegmentMeta) -> None:
        """Audience sharing: segment metadata is synced first, once per segment."""
        if dest.type != "audience_sharing" or self.state.synced(dest.name, meta.name):
            return
        remote = await connector.sync_segment(self._http, meta)
        if remote is None:
            return
        tx = Tx()
        self.store.set_remote(tx, dest.name, meta.name, remote)
        await self.store.apply(tx)
        self.state.mark_synced(dest.name, meta.name, remote)

    async def _deliver_once(self, dest: Destination) -> float:
        """Send what is due; returns how long to wait before looking again."""
        connector = await self._connector(dest)
        if connector is None:
            return 60.0
        policy = dest.aggregation
        limit = min(policy.max_users_per_request, connector.max_per_request)
        now = time.time()
        if dest.type == "audience_sharing":  # segment metadata goes first, even with no members
            for segment in dest.segments:
                if self.state.live(segment) and not self.state.synced(dest.name, segment):
                    try:
                        await self._sync(dest, connector, self.state.meta(segment))
                    except Exception as exc:
                        self.log.warning(
                            "segment sync failed",
                            destination=dest.name,
                            segment=segment,
                            error=repr(exc),
                        )
                        return 5.0
        rows = await self.store.due(dest.name, now, max(limit, policy.max_events) * 4)
        if not rows:
            nxt = await self.store.next_attempt(dest.name)
            return 60.0 if nxt is None else max(0.05, nxt - now)
        if policy.mode == "configurable":
            oldest = min(r.enqueued_at for r in rows)
            if len(rows) < policy.max_events and now - oldest < policy.max_batch_age_s:
                return max(0.05, oldest + policy.max_batch_age_s - now)
        by_segment: dict[str, list[Waiting]] = defaultdict(list)
        for r in rows:
            by_segment[r.segment].append(r)
        for segment, items in by_segment.items():
            for i in range(0, len(items), limit):
                await self._send(dest, connector, segment, items[i : i + limit])
        return 0.0

    async def _send(
        self, dest: Destination, connector: Any, segment: str, chunk: list[Waiting]
    ) -> None:
        now = time.time()
        tx = Tx()
        items = [(w, w.activation) for w in chunk]
        sendable = [(w, a) for w, a in items if connector.addressable(a)]
        if len(sendable) < len(items):  # e.g. an email list and a profile without an email
            unsent = [w.id for w, a in items if not connector.addressable(a)]
            self.store.sent(tx, unsent)
            self.store.exclude(tx, dest.name, {MISSING_IDENTITY: len(unsent)})
            if not sendable:
                await self.store.apply(tx)
                return
        ids = [w.id for w, _ in sendable]
        error: BaseException | None = None
        try:
            meta = self.state.meta(segment)
            await self._sync(dest, connector, meta)
            await connector.send(self._http, meta, [a for _, a in sendable])
        except Exception as exc:
            error = exc
        attempts = max(w.attempts for w, _ in sendable) + 1
        age = now - min(w.enqueued_at for w, _ in sendable)
        outcome = decide(error, attempts, age, max_age=self.max_age)
        match outcome:
            case Retry():
                self.store.retry(tx, ids, outcome.attempts, now + outcome.delay, outcome.error)
                self.log.warning(
                    "delivery failed, retrying",
                    destination=dest.name,
                    status=getattr(error, "status", None),
                    retry_in=round(outcome.delay, 2),
                )
            case DeadLetter():
                self.store.dead_letter(tx, ids, outcome.attempts, outcome.error, now)
                self.store.bump(tx, dest.name, failed=len(ids), last_error=outcome.error)
                self.log.warning(
                    "delivery dead-lettered",
                    destination=dest.name,
                    items=len(ids),
                    error=outcome.error,
                )
            case _:
                self.store.sent(tx, ids)
                self.store.bump(tx, dest.name, delivered=len(ids), last_delivery=now)
        await self.store.apply(tx)

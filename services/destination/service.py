"""The destination actor: activates audiences to external systems.

- It keeps the profile view it activates from (identities, merged attributes) by following
  profile changes, and every membership it has seen.
- A membership change becomes, for each destination connected to its segment, an
  activation in the delivery queue (an outbox in SQLite, committed with the consumer's
  batch), or is counted as skipped (no identity the destination needs, no consent).
- One delivery worker per streaming destination sends what is queued, as the
  destination's aggregation policy says, with retries (exponential backoff with jitter,
  Retry-After honoured) on timeouts, 429 and 5xx; a batch that is still failing after the
  maximum age, or that a 4xx refused, goes to the dead-letter store. Nothing is lost while
  a destination is down: the queue survives restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import aiohttp
import msgspec

from services.destination.activation import backoff, build
from services.destination.admin import DestinationAdmin
from services.destination.connectors import CONNECTORS
from services.destination.connectors.base import REGION_SETTING
from services.destination.guard import ALLOW_PRIVATE_SETTING, SECRET_PREFIX
from services.destination.model import Activation, DeliveryError
from services.destination.store import (
    BUMP_STATS,
    ENQUEUE,
    MIGRATIONS,
    UPSERT_MEMBERSHIP,
    UPSERT_PROFILE,
)
from shared import subjects
from shared.admin import finished_segmentation_job
from shared.db import Tx, apply
from shared.messages import (
    Identity,
    MembershipEvent,
    PrivacyReport,
    Probe,
    ProfileChanged,
    ProfileDeleted,
    ProfileMerged,
    change_batch_decoder,
    json_encoder,
    membership_decoder,
    msgpack_encoder,
)
from shared.resources import Destination
from shared.runtime import ConsumerSpec, Service, Step
from shared.runtime.probes import decode_probe, report_probe

_deleted_decoder = msgspec.json.Decoder(ProfileDeleted)
_activation_decoder = msgspec.msgpack.Decoder(Activation)
_identities_decoder = msgspec.msgpack.Decoder(list[Identity])
_any_msgpack = msgspec.msgpack.Decoder()
_keys_encoder = msgspec.json.Encoder()
STREAMING_TYPES = frozenset(
    {"webhook", "email", "sms", "social", "ads", "audience_sharing", "nats"}
)


def _json_list(values: Iterable[str]) -> bytes:
    return _keys_encoder.encode(list(values))


def _max_age() -> float:
    raw = os.environ.get("CDP_DELIVERY_MAX_AGE", "")
    return float(raw) if raw else 4 * 3600.0


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
        self.destinations: dict[str, Destination] = {}
        self.admin = DestinationAdmin(self)
        self.max_age = _max_age()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._http: aiohttp.ClientSession | None = None
        self._connectors: dict[str, tuple[Destination, Any]] = {}

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (
            ConsumerSpec(
                "destination-profiles",
                subjects.STREAM_CHANGES,
                self.handle_profiles,
                description="profile changes: the identities and attributes to activate",
            ),
            ConsumerSpec(
                "destination-jobs",
                subjects.STREAM_JOBS,
                self.handle_jobs,
                filter_subjects=(subjects.SEGMENTATION_JOB_DONE,),
                description="batch segmentation jobs that ended",
            ),
            ConsumerSpec(
                "destination",
                subjects.STREAM_MEMBERSHIP,
                self.handle_memberships,
                description="segment membership changes and privacy deletes",
            ),
        )

    async def on_start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        await self.admin.start()
        for name in self.destinations:
            self.ensure_worker(name)

    async def on_stop(self) -> None:
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers.clear()
        await self.admin.stop()
        if self._http is not None:
            await self._http.close()

    def ensure_worker(self, name: str) -> None:
        dest = self.destinations.get(name)
        if dest is None or dest.type not in STREAMING_TYPES or name in self._workers:
            return
        task = asyncio.create_task(self._deliver_loop(name), name=f"deliver:{name}")
        self._workers[name] = task

    def wake(self, names: Iterable[str]) -> None:
        for name in names:
            self._wake[name].set()

    # -- the profile view ---------------------------------------------------------------------
    async def handle_profiles(self, batch: Step) -> None:
        upserts: dict[str, tuple[bytes, bytes, float]] = {}
        folded: list[str] = []
        """Profiles folded into others or deleted: their view goes."""
        for d in batch.deliveries:
            for item in change_batch_decoder.decode(d.data).items:
                match item:
                    case ProfileChanged():
                        upserts[item.profile_id] = (
                            msgpack_encoder.encode(item.attributes),
                            msgpack_encoder.encode(item.identities),
                            item.at,
                        )
                    case ProfileMerged():
                        for pid in item.folded:
                            upserts.pop(pid, None)
                            folded.append(pid)
                    case ProfileDeleted():
                        # The membership consumer forgets the person too (it sends the
                        # exits), at its own pace: whichever comes last, no view is left.
                        for pid in item.profile_ids:
                            upserts.pop(pid, None)
                            folded.append(pid)
                    case Probe():
                        report_probe(batch, item, "destination-profiles")
                    case _:
                        pass
        batch.tx.add_many("DELETE FROM profiles WHERE profile_id = ?", [(f,) for f in folded])
        batch.tx.add_many(UPSERT_PROFILE, [(pid, *view) for pid, view in upserts.items()])

    # -- batch jobs ------------------------------------------------------------------------------
    async def handle_jobs(self, batch: Step) -> None:
        """After a batch job, audience managers receive the members realised before their
        segment metadata was synced, with status `existing`. Only a message that decodes as
        a finished segmentation job counts, never the subject alone."""
        if not any(finished_segmentation_job(d.data) for d in batch.deliveries):
            return
        pending = list(
            await self.db.execute_fetchall(
                "SELECT destination, segment, connected_at FROM connections "
                "WHERE existing_pending = 1"
            )
        )
        now = time.time()
        touched: set[str] = set()
        for name, segment, connected_at in pending:
            dest = self.destinations.get(name)
            if dest is None or not self.admin.synced(name, segment):
                continue  # not synced yet: wait for a later job
            rows = list(
                await self.db.execute_fetchall(
                    "SELECT profile_id FROM memberships WHERE segment = ? AND status IN "
                    "('realized', 'existing') AND at <= ?",
                    (segment, connected_at),
                )
            )
            views = await self._views({str(r[0]) for r in rows})
            for (pid,) in rows:
                attributes, identities = views.get(pid, ({}, []))
                activation, _ = build(
                    dest,
                    profile_id=pid,
                    segment=segment,
                    status="existing",
                    at=now,
                    identities=identities,
                    attributes=attributes,
                    with_attributes=True,
                )
                if activation is not None:
                    batch.tx.add(
                        ENQUEUE,
                        (name, segment, pid, msgpack_encoder.encode(activation), now, now),
                    )
            batch.tx.add(
                "UPDATE connections SET existing_pending = 0 WHERE destination = ? AND segment = ?",
                (name, segment),
            )
            touched.add(name)
        batch.after_commit(lambda: self.wake(touched))

    # -- memberships -> activations -----------------------------------------------------------
    async def handle_memberships(self, batch: Step) -> None:
        events: list[MembershipEvent] = []
        for d in batch.deliveries:
            if d.subject == subjects.PRIVACY_MEMBERSHIP:
                await self._enqueue(batch, events)
                events = []
                await self._delete(batch, d.data)
                continue
            if d.subject == subjects.MEMBERSHIP_PROBE:
                if (probe := decode_probe(d.data)) is not None:
                    report_probe(batch, probe, self.name)
                continue
            try:
                events.append(membership_decoder.decode(d.data))
            except msgspec.DecodeError:
                self.log.warning("undecodable membership event", seq=d.seq)
        await self._enqueue(batch, events)

    async def _enqueue(self, batch: Step, events: list[MembershipEvent]) -> None:
        if not events:
            return
        views = await self._views({e.profile_id for e in events})
        tx = batch.tx
        now = time.time()
        touched: set[str] = set()
        skipped: dict[str, int] = defaultdict(int)
        for ev in events:
            tx.add(UPSERT_MEMBERSHIP, (ev.segment, ev.profile_id, ev.status, ev.at, ev.method))
            attributes, stored = views.get(ev.profile_id, ({}, []))
            identities = ev.identities or stored
            for dest in self.destinations.values():
                if ev.segment not in dest.segments or dest.type not in STREAMING_TYPES:
                    continue
                activation, why = build(
                    dest,
                    profile_id=ev.profile_id,
                    segment=ev.segment,
                    status=ev.status,
                    at=ev.at,
                    identities=identities,
                    attributes=attributes,
                    with_attributes=ev.method == "batch",
                )
                if activation is None:
                    skipped[dest.name] += 1
                    self.log.debug("activation skipped", destination=dest.name, reason=why)
                    continue
                tx.add(
                    ENQUEUE,
                    (
                        dest.name,
                        ev.segment,
                        ev.profile_id,
                        msgpack_encoder.encode(activation),
                        now,
                        now,
                    ),
                )
                touched.add(dest.name)
        for name, n in skipped.items():
            tx.add(BUMP_STATS, (name, 0, 0, n, None, None))
        batch.after_commit(lambda: self.wake(touched))

    async def _views(self, pids: set[str]) -> dict[str, tuple[dict[str, Any], list[Identity]]]:
        rows = await self.db.execute_fetchall(
            "SELECT profile_id, attributes, identities FROM profiles WHERE profile_id IN "
            "(SELECT value FROM json_each(?))",
            (_json_list(pids),),
        )
        return {
            str(pid): (_any_msgpack.decode(a), _identities_decoder.decode(i)) for pid, a, i in rows
        }

    async def enqueue_backfill(self, dest: Destination, segments: list[str]) -> int:
        """A destination newly connected to segments receives their current members."""
        rows = await self.db.execute_fetchall(
            "SELECT segment, profile_id, at, method FROM memberships WHERE status IN "
            "('realized', 'existing') AND segment IN (SELECT value FROM json_each(?))",
            (_json_list(segments),),
        )
        members = list(rows)
        views = await self._views({str(r[1]) for r in members})
        tx = Tx()
        now = time.time()
        queued = skipped = 0
        for segment, pid, at, _method in members:
            attributes, identities = views.get(pid, ({}, []))
            activation, _ = build(
                dest,
                profile_id=pid,
                segment=segment,
                status="realized",
                at=at,
                identities=identities,
                attributes=attributes,
                with_attributes=True,
            )
            if activation is None:
                skipped += 1
                continue
            tx.add(ENQUEUE, (dest.name, segment, pid, msgpack_encoder.encode(activation), now, now))
            queued += 1
        if skipped:
            tx.add(BUMP_STATS, (dest.name, 0, 0, skipped, None, None))
        if tx:
            await apply(self.db, tx)
        self.wake([dest.name])
        return queued

    async def _delete(self, batch: Step, data: bytes) -> None:
        """Privacy delete: tell destinations the person left, then forget them here."""
        try:
            item = _deleted_decoder.decode(data)
        except msgspec.DecodeError:
            self.log.warning("undecodable privacy delete")
            return
        plist = _json_list(item.profile_ids)
        held = await self.db.execute_fetchall(
            "SELECT segment, profile_id FROM memberships WHERE status IN ('realized', 'existing') "
            "AND profile_id IN (SELECT value FROM json_each(?))",
            (plist,),
        )
        now = time.time()
        exits = [
            MembershipEvent(profile_id=pid, segment=seg, status="exited", at=now, method="privacy")
            for seg, pid in held
        ]
        await self._enqueue(batch, exits)
        removed = {"memberships": len(list(held))}
        for table in ("memberships", "profiles"):
            batch.tx.add(
                f"DELETE FROM {table} WHERE profile_id IN (SELECT value FROM json_each(?))",
                (plist,),
            )
        report = PrivacyReport(
            request_id=item.request.request_id,
            service=self.name,
            identity=item.request.identity,
            profile_ids=item.profile_ids,
            removed=removed,
            at=now,
        )
        batch.emit(
            subjects.privacy_report(item.request.request_id, self.name), json_encoder.encode(report)
        )

    # -- delivery -------------------------------------------------------------------------------
    async def _deliver_loop(self, name: str) -> None:
        wake = self._wake[name]
        while True:
            dest = self.destinations.get(name)
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
            settings["_nc"] = self.nc
        try:
            connector = CONNECTORS[dest.type](settings, secrets)
        except Exception as exc:  # a secret's variable is not set: nothing can be sent
            self.log.warning("destination misconfigured", destination=dest.name, error=str(exc))
            tx = Tx()
            tx.add(BUMP_STATS, (dest.name, 0, 0, 0, None, f"misconfigured: {exc}"))
            await apply(self.db, tx)
            return None
        self._connectors[dest.name] = (dest, connector)
        self.admin.forget_sync(dest.name)  # a new connector syncs its segments again (idempotent)
        return connector

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
                if not self.admin.synced(dest.name, segment):
                    try:
                        meta = await self.admin.segment_meta(segment)
                        await self.admin.ensure_synced(dest, connector, meta, self._http)
                    except Exception as exc:
                        self.log.warning(
                            "segment sync failed",
                            destination=dest.name,
                            segment=segment,
                            error=repr(exc),
                        )
                        return 5.0
        rows = list(
            await self.db.execute_fetchall(
                "SELECT id, segment, payload, enqueued_at, attempts FROM queue WHERE "
                "destination = ? AND next_attempt <= ? ORDER BY id LIMIT ?",
                (dest.name, now, max(limit, policy.max_events) * 4),
            )
        )
        if not rows:
            nxt = next(
                iter(
                    await self.db.execute_fetchall(
                        "SELECT min(next_attempt) FROM queue WHERE destination = ?", (dest.name,)
                    )
                )
            )[0]
            return 60.0 if nxt is None else max(0.05, float(nxt) - now)
        if policy.mode == "configurable":
            oldest = min(float(r[3]) for r in rows)
            if len(rows) < policy.max_events and now - oldest < policy.max_batch_age_s:
                return max(0.05, oldest + policy.max_batch_age_s - now)
        by_segment: dict[str, list[tuple[int, Activation, float, int]]] = defaultdict(list)
        for rid, seg, payload, enq, attempts in rows:
            by_segment[seg].append((rid, _activation_decoder.decode(payload), enq, attempts))
        assert self._http is not None
        for segment, items in by_segment.items():
            for i in range(0, len(items), limit):
                chunk = items[i : i + limit]
                await self._send(dest, connector, segment, chunk)
        return 0.0

    async def _send(
        self,
        dest: Destination,
        connector: Any,
        segment: str,
        chunk: list[tuple[int, Activation, float, int]],
    ) -> None:
        ids = [c[0] for c in chunk]
        now = time.time()
        tx = Tx()
        sendable = [c for c in chunk if connector.addressable(c[1])]
        if len(sendable) < len(chunk):  # e.g. an email list and a profile without an email
            unsent = [c[0] for c in chunk if c not in sendable]
            tx.add_many("DELETE FROM queue WHERE id = ?", [(i,) for i in unsent])
            tx.add(BUMP_STATS, (dest.name, 0, 0, len(unsent), None, None))
            ids = [c[0] for c in sendable]
            chunk = sendable
            if not chunk:
                await apply(self.db, tx)
                return
        try:
            meta = await self.admin.segment_meta(segment)
            await self.admin.ensure_synced(dest, connector, meta, self._http)
            await connector.send(self._http, meta, [c[1] for c in chunk])
        except Exception as error:
            exc = (
                error
                if isinstance(error, DeliveryError)
                else DeliveryError(f"{type(error).__name__}: {error}", retryable=True)
            )
            attempts = max(c[3] for c in chunk) + 1
            expired = now - min(c[2] for c in chunk) > self.max_age
            if exc.retryable and not expired:
                delay = backoff(attempts, exc.retry_after)
                tx.add_many(
                    "UPDATE queue SET attempts = ?, next_attempt = ?, last_error = ? WHERE id = ?",
                    [(attempts, now + delay, str(exc), i) for i in ids],
                )
                self.log.warning(
                    "delivery failed, retrying",
                    destination=dest.name,
                    status=exc.status,
                    retry_in=round(delay, 2),
                )
            else:
                tx.add_many(
                    "INSERT INTO dlq (destination, segment, profile_id, payload, attempts, error, "
                    "failed_at) SELECT destination, segment, profile_id, payload, ?, ?, ? "
                    "FROM queue WHERE id = ?",
                    [(attempts, str(exc), now, i) for i in ids],
                )
                tx.add_many("DELETE FROM queue WHERE id = ?", [(i,) for i in ids])
                tx.add(BUMP_STATS, (dest.name, 0, len(ids), 0, None, str(exc)))
                self.log.warning(
                    "delivery dead-lettered", destination=dest.name, items=len(ids), error=str(exc)
                )
            await apply(self.db, tx)
            return
        tx.add_many("DELETE FROM queue WHERE id = ?", [(i,) for i in ids])
        tx.add(BUMP_STATS, (dest.name, len(ids), 0, 0, now, None))
        await apply(self.db, tx)

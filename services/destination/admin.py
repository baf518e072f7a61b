"""The destination service's admin API: destinations (apply, get, list), dead letters
(list, replay), and what delivery needs from other services (segment metadata)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
from nats.aio.subscription import Subscription

from services.destination.connectors import CONNECTORS
from services.destination.connectors.base import REGION_SETTING, ConnectorSettingsError
from services.destination.export_job import run_export
from services.destination.guard import (
    ALLOW_PRIVATE_SETTING,
    UnsafeDestination,
    check_resolved,
    check_secret_variable,
    export_folder,
)
from services.destination.model import SegmentMeta
from shared import admin, subjects
from shared.admin import (
    AdminFailure,
    ApplyMany,
    ApplyManyResult,
    ApplyResult,
    DeadLetter,
    DeadLetters,
    DestinationInfo,
    DestinationList,
    DestinationQuery,
    ExportResult,
    ExportRun,
    GetRequest,
    GetResult,
    JobInfo,
    JobList,
    ListRequest,
    ReplayResult,
    SegmentList,
    apply_result,
    decode_object,
)
from shared.db import Tx, apply
from shared.resources import NAME_RE, PLURALS, Destination, to_builtins

if TYPE_CHECKING:
    from services.destination.service import DestinationService

KIND = "destination"
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Destination)


async def _counts(db: Any, sql: str) -> dict[str, int]:
    return {str(r[0]): int(r[1]) for r in await db.execute_fetchall(sql)}


class DestinationAdmin:
    def __init__(self, service: DestinationService) -> None:
        self.svc = service
        self._subs: list[Subscription] = []
        self._meta: dict[str, SegmentMeta] = {}
        self._synced: dict[tuple[str, str], str] = {}
        self._exporting: set[str] = set()

    async def start(self) -> None:
        for (spec,) in await self.svc.db.execute_fetchall("SELECT spec FROM destinations"):
            dest = _decoder.decode(spec)
            self.svc.destinations[dest.name] = dest
        for dest, seg, remote in await self.svc.db.execute_fetchall(
            "SELECT destination, segment, remote_id FROM connections WHERE remote_id IS NOT NULL"
        ):
            self._synced[(dest, seg)] = remote
        nc = self.svc.nc

        def area(op: str) -> str:
            return subjects.admin("destination", op)

        self._subs = [
            await admin.serve(nc, area("apply"), ApplyMany, self.apply),
            await admin.serve(nc, area("get"), GetRequest, self.get),
            await admin.serve(nc, area("list"), ListRequest, self.list),
            await admin.serve(nc, area("dlq"), DestinationQuery, self.dlq),
            await admin.serve(nc, area("replay"), DestinationQuery, self.replay),
            await admin.serve(nc, area("export.run"), ExportRun, self.export),
            await admin.serve(nc, area("jobs"), ListRequest, self.jobs),
        ]

    async def stop(self) -> None:
        await admin.unsubscribe_all(self._subs)

    # -- configuration ---------------------------------------------------------------------------
    async def apply(self, request: ApplyMany) -> ApplyManyResult:
        planned: list[tuple[Destination, ApplyResult]] = []
        known = await self._segments() | request.known("segment")  # a dry run's too
        for obj in request.objects:
            dest = decode_object(obj, KIND, "destination", Destination)
            self._check(dest, known)
            await self._check_addresses(dest)
            current = self.svc.destinations.get(dest.name)
            planned.append((dest, apply_result(KIND, dest.name, current, dest)))
        if request.dry_run:
            return ApplyManyResult([r for _, r in planned])
        now = time.time()
        for dest, result in planned:
            if result.action == "unchanged":
                continue
            previous = self.svc.destinations.get(dest.name)
            new_segments = [
                s for s in dest.segments if previous is None or s not in previous.segments
            ]
            tx = Tx()
            tx.add(
                "INSERT INTO destinations (name, spec, created_at, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, "
                "updated_at = excluded.updated_at",
                (dest.name, _encoder.encode(dest), now, now),
            )
            sharing = dest.type == "audience_sharing"
            tx.add_many(
                "INSERT OR IGNORE INTO connections (destination, segment, connected_at, "
                "existing_pending) VALUES (?, ?, ?, ?)",
                [(dest.name, s, now, int(sharing)) for s in new_segments],
            )
            await apply(self.svc.db, tx)
            self.svc.destinations[dest.name] = dest
            self.svc.ensure_worker(dest.name)
            self.svc.wake([dest.name])
            if sharing:
                # The audience manager learns the segments first (the worker syncs them);
                # members realised before that reach it at the next batch job, as existing.
                continue
            if new_segments:
                queued = await self.svc.enqueue_backfill(dest, new_segments)
                self.svc.log.info(
                    "destination connected",
                    destination=dest.name,
                    segments=new_segments,
                    backfill=queued,
                )
        return ApplyManyResult([r for _, r in planned])

    async def _check_addresses(self, dest: Destination) -> None:
        """The addresses the URL's host resolves to now (checked again at every send)."""
        url = dest.connection.get("url")
        if dest.type in CONNECTORS and dest.type not in ("nats",) and isinstance(url, str):
            try:
                await check_resolved(url, self.svc.settings.allow_private_destinations)
            except UnsafeDestination as exc:
                raise AdminFailure(
                    "invalid", exc.message, kind=KIND, name=dest.name, field=exc.field
                ) from None

    def _check(self, dest: Destination, known: set[str]) -> None:
        def fail(field: str, message: str) -> AdminFailure:
            return AdminFailure("invalid", message, kind=KIND, name=dest.name, field=field)

        if not NAME_RE.match(dest.name):
            raise fail(
                "name", "must start with a lower-case letter and hold only a-z, 0-9, '_', '-'"
            )
        if not dest.segments:
            raise fail("segments", "a destination activates at least one segment")
        unknown = [s for s in dest.segments if s not in known]
        if unknown:
            raise fail("segments", f"unknown segments: {', '.join(unknown)}")
        for key, env in dest.secrets.items():
            try:
                check_secret_variable(env)
            except UnsafeDestination as exc:
                raise fail(f"secrets.{key}", exc.message) from None
        settings = self.svc.settings
        for key in dest.connection:
            if key.startswith("_"):
                raise fail(f"connection.{key}", "settings starting with `_` are the service's own")
        if dest.export is not None:
            try:
                export_folder(dest.export.folder, settings.data_dir, settings.exports_root)
            except UnsafeDestination as exc:
                raise fail(exc.field, exc.message) from None
        policy = dest.aggregation
        if policy.max_users_per_request < 1 or policy.max_events < 1 or policy.max_batch_age_s <= 0:
            raise fail("aggregation", "limits must be positive")
        needs_url = {"webhook", "email", "sms", "social", "ads", "audience_sharing"}
        if dest.type in needs_url and not isinstance(dest.connection.get("url"), str):
            raise fail("connection.url", f"a {dest.type} destination needs a url")
        if dest.type == "file" and dest.export is None:
            raise fail("export", "a file destination needs `export` (folder, format, mode, ...)")
        if dest.export is not None and dest.export.schedule not in ("after_segmentation", "manual"):
            raise fail(
                "export.schedule",
                'use "after_segmentation" or "manual" (a time of day: a schedule of job export)',
            )
        if dest.export is not None and dest.export.split_rows < 1:
            raise fail("export.split_rows", "must be at least 1")
        if dest.type == "nats" and not isinstance(dest.connection.get("subject"), str):
            raise fail("connection.subject", "a nats destination needs a subject")
        connector = CONNECTORS.get(dest.type)
        if connector is not None and dest.type != "nats":
            try:  # settings checked now; secret values are read only when sending
                connector(
                    {
                        REGION_SETTING: settings.phone_region,
                        **dest.connection,
                        ALLOW_PRIVATE_SETTING: settings.allow_private_destinations,
                    },
                    {k: "(set at delivery)" for k in dest.secrets},
                )
            except UnsafeDestination as exc:
                raise fail(exc.field, exc.message) from None
            except ConnectorSettingsError as exc:
                raise fail("connection", str(exc)) from None

    async def _segments(self) -> set[str]:
        listed = await admin.request(
            self.svc.nc, subjects.admin("segmentation", "list"), ListRequest(), SegmentList
        )
        for seg in listed.segments:
            self._meta[seg.name] = SegmentMeta(
                name=seg.name, description=seg.description, method=seg.method
            )
        return {s.name for s in listed.segments}

    async def segment_meta(self, name: str) -> SegmentMeta:
        meta = self._meta.get(name)
        if meta is None:
            try:
                await self._segments()
            except Exception as exc:
                self.svc.log.debug("segment metadata unavailable", error=repr(exc))
            meta = self._meta.get(name, SegmentMeta(name=name))
        return meta

    def forget_sync(self, dest: str) -> None:
        for key in [k for k in self._synced if k[0] == dest]:
            del self._synced[key]

    def synced(self, dest: str, segment: str) -> bool:
        return (dest, segment) in self._synced

    async def ensure_synced(
        self,
        dest: Destination,
        connector: Any,
        meta: SegmentMeta,
        http: aiohttp.ClientSession | None,
    ) -> None:
        """Audience sharing: segment metadata is synced first, once per segment."""
        if dest.type != "audience_sharing" or (dest.name, meta.name) in self._synced:
            return
        remote = await connector.sync_segment(http, meta)
        if remote is None:
            return
        self._synced[(dest.name, meta.name)] = remote
        tx = Tx()
        tx.add(
            "UPDATE connections SET remote_id = ? WHERE destination = ? AND segment = ?",
            (remote, dest.name, meta.name),
        )
        await apply(self.svc.db, tx)

    async def get(self, request: GetRequest) -> GetResult:
        kind = PLURALS.get(request.kind, request.kind)
        if kind != KIND:
            raise AdminFailure("unknown_kind", f"the destination service does not own {kind!r}")
        dests = self.svc.destinations
        if request.name is not None:
            dest = dests.get(request.name)
            if dest is None:
                raise AdminFailure("not_found", f"no destination named {request.name!r}", kind=KIND)
            return GetResult(KIND, [to_builtins(dest)])
        return GetResult(KIND, [to_builtins(dests[n]) for n in sorted(dests)])

    # -- status, dead letters ----------------------------------------------------------------------
    async def list(self, _request: ListRequest) -> DestinationList:
        db = self.svc.db
        stats = {
            r[0]: r[1:]
            for r in await db.execute_fetchall(
                "SELECT destination, delivered, failed, skipped, last_delivery, last_error "
                "FROM stats"
            )
        }
        queued = await _counts(db, "SELECT destination, count(*) FROM queue GROUP BY destination")
        retrying = await _counts(
            db, "SELECT destination, count(*) FROM queue WHERE attempts > 0 GROUP BY destination"
        )
        dead = await _counts(db, "SELECT destination, count(*) FROM dlq GROUP BY destination")
        out = []
        for name in sorted(self.svc.destinations):
            d = self.svc.destinations[name]
            delivered, failed, skipped, last, error = stats.get(name, (0, 0, 0, None, None))
            status = "retrying" if retrying.get(name) else "failing" if dead.get(name) else "active"
            out.append(
                DestinationInfo(
                    name=name,
                    type=d.type,
                    segments=d.segments,
                    status=status,
                    queued=int(queued.get(name, 0)),
                    delivered=delivered,
                    failed=failed,
                    skipped=skipped,
                    dead_letters=int(dead.get(name, 0)),
                    last_delivery=last,
                    last_error=error,
                    export_schedule=d.export.schedule if d.export else None,
                )
            )
        return DestinationList(out)

    async def export(self, request: ExportRun) -> ExportResult:
        dest = self.svc.destinations.get(request.destination)
        if dest is None or dest.export is None:
            raise AdminFailure(
                "not_found",
                f"no file destination named {request.destination!r}",
                kind=KIND,
                name=request.destination,
            )
        return await run_export(self.svc, dest, request.trigger)

    async def jobs(self, request: ListRequest) -> JobList:
        """Export jobs, newest first, as job records."""
        rows = await self.svc.db.execute_fetchall(
            "SELECT id, result FROM export_jobs ORDER BY id DESC LIMIT ?",
            (max(1, min(request.limit, 200)),),
        )
        out = []
        for job_id, raw in rows:
            r = msgspec.json.decode(raw, type=ExportResult)
            out.append(
                JobInfo(
                    job_id=f"export-{job_id}",
                    kind=f"export:{r.destination}",
                    trigger=r.trigger,
                    status=r.status,
                    started_at=r.started_at,
                    finished_at=r.finished_at,
                    total=r.rows,
                    scanned=r.rows,
                    counts=r.counts,
                    error=r.error,
                )
            )
        return JobList(out)

    async def dlq(self, request: DestinationQuery) -> DeadLetters:
        rows = await self.svc.db.execute_fetchall(
            "SELECT id, segment, profile_id, attempts, error, failed_at FROM dlq "
            "WHERE destination = ? ORDER BY id LIMIT ?",
            (request.name, max(1, min(request.limit, 10_000))),
        )
        return DeadLetters(
            request.name,
            [
                DeadLetter(
                    id=r[0],
                    segment=r[1],
                    profile_id=r[2],
                    attempts=r[3],
                    error=r[4],
                    failed_at=r[5],
                )
                for r in rows
            ],
        )

    async def replay(self, request: DestinationQuery) -> ReplayResult:
        if request.name not in self.svc.destinations:
            raise AdminFailure("not_found", f"no destination named {request.name!r}", kind=KIND)
        now = time.time()
        rows = await self.svc.db.execute_fetchall(
            "SELECT count(*) FROM dlq WHERE destination = ?", (request.name,)
        )
        n = int(next(iter(rows))[0])
        tx = Tx()
        tx.add(
            "INSERT INTO queue (destination, segment, profile_id, payload, enqueued_at, "
            "next_attempt) SELECT destination, segment, profile_id, payload, ?, ? FROM dlq "
            "WHERE destination = ? ORDER BY id",
            (now, now, request.name),
        )
        tx.add("DELETE FROM dlq WHERE destination = ?", (request.name,))
        await apply(self.svc.db, tx)
        self.svc.wake([request.name])
        return ReplayResult(request.name, n)

"""The destination service's admin API, for people and the CLI: destinations (apply, get,
list), dead letters (list, replay), and file exports (run now, list jobs).

An applied destination is committed with its message on the config stream
(`cdp.config.destination.<name>`, through the outbox) and then published. The segments it
names must be known: as segmentation published them (the state, or the config stream's
latest message for a segment the consumer has not read yet), or, in a dry run, in the
same file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from services.destination.activation import STREAMING_TYPES, plan
from services.destination.connectors import CONNECTORS
from services.destination.connectors.base import REGION_SETTING, ConnectorSettingsError
from services.destination.delivery import DeliveryWorker
from services.destination.exporter import Exporter
from services.destination.guard import (
    ALLOW_PRIVATE_SETTING,
    UnsafeDestination,
    check_resolved,
    check_secret_variable,
    export_folder,
)
from services.destination.state import State
from services.destination.store import DestinationStore
from shared import admin, subjects
from shared.admin import (
    ApplyMany,
    ApplyManyResult,
    ApplyResult,
    Conflict,
    DeadLetters,
    DestinationInfo,
    DestinationList,
    DestinationQuery,
    ExportResult,
    ExportRun,
    GetRequest,
    GetResult,
    Invalid,
    JobInfo,
    JobList,
    ListRequest,
    NotFound,
    PublishedSegment,
    ReplayResult,
    apply_result,
    decode_object,
)
from shared.config import Settings
from shared.db import Tx
from shared.resources import NAME_RE, PLURALS, Destination, to_builtins
from shared.runtime.actor import Outgoing, publish_outbox

KIND = "destination"
_json = msgspec.json.Encoder()
_segment_decoder = msgspec.json.Decoder(PublishedSegment)
NEEDS_URL = frozenset({"webhook", "email", "sms", "social", "ads", "audience_sharing"})


def published(dest: Destination, version: float) -> Outgoing:
    """A destination as it goes out on the config stream."""
    return Outgoing(
        f"config:{KIND}:{dest.name}:{version!r}",
        subjects.config(KIND, dest.name),
        _json.encode(dest),
    )


class DestinationApi:
    def __init__(
        self,
        store: DestinationStore,
        state: State,
        delivery: DeliveryWorker,
        exporter: Exporter,
        *,
        settings: Settings,
        log: structlog.typing.FilteringBoundLogger,
        js: Callable[[], JetStreamContext],
    ) -> None:
        self.store = store
        self.state = state
        self.delivery = delivery
        self.exporter = exporter
        self.settings = settings
        self.log = log
        self._js = js
        self._subs: list[Subscription] = []

    async def start(self, nc: Client) -> None:
        def area(op: str) -> str:
            return subjects.admin(KIND, op)

        self._subs = await admin.serve_all(
            nc,
            [
                (area("apply"), ApplyMany, self.apply),
                (area("get"), GetRequest, self.get),
                (area("list"), ListRequest, self.list),
                (area("dlq"), DestinationQuery, self.dlq),
                (area("replay"), DestinationQuery, self.replay),
                (area("export.run"), ExportRun, self.export),
                (area("jobs"), ListRequest, self.jobs),
            ],
        )

    async def stop(self) -> None:
        await admin.unsubscribe_all(self._subs)

    async def publish_all(self) -> None:
        """Every destination on the config stream (a fresh consumer sees all of them)."""
        versions = await self.store.destination_versions()
        out = [
            published(d, versions.get(n, 0.0)) for n, d in sorted(self.state.destinations.items())
        ]
        await self._publish(Tx(), out)

    async def _publish(self, tx: Tx, out: list[Outgoing]) -> None:
        """Commit `tx` with `out` in the outbox, then publish `out`."""
        self.store.outbox(tx, out)
        await self.store.apply(tx)
        if out:
            await publish_outbox(self._js(), self.store.db, out, self.log, lambda: False)

    # -- configuration ---------------------------------------------------------------------------
    async def apply(self, request: ApplyMany) -> ApplyManyResult:
        planned: list[tuple[Destination, ApplyResult]] = []
        for obj in request.objects:
            dest = decode_object(obj, KIND, "destination", Destination)
            known = await self._known(dest.segments, request.known("segment"))
            self._check(dest, known)
            await self._check_addresses(dest)
            current = self.state.destinations.get(dest.name)
            planned.append((dest, apply_result(KIND, dest.name, current, dest)))
        if request.dry_run:
            return ApplyManyResult([r for _, r in planned])
        for dest, result in planned:
            if result.action != "unchanged":
                await self._put(dest)
        return ApplyManyResult([r for _, r in planned])

    async def _put(self, dest: Destination) -> None:
        now = time.time()
        previous = self.state.destinations.get(dest.name)
        new_segments = [s for s in dest.segments if previous is None or s not in previous.segments]
        sharing = dest.type == "audience_sharing"
        tx = Tx()
        self.store.put_destination(tx, dest, now)
        self.store.connect(tx, dest.name, new_segments, now, pending=sharing)
        await self._publish(tx, [published(dest, now)])
        self.state.put_destination(dest)
        self.delivery.wake([dest.name])
        if sharing:
            # The audience manager learns the segments first (the worker syncs them);
            # members realised before that reach it at the next batch job, as existing.
            return
        if new_segments:
            queued = await self._backfill(dest, new_segments)
            self.log.info(
                "destination connected",
                destination=dest.name,
                segments=new_segments,
                backfill=queued,
            )

    async def _backfill(self, dest: Destination, segments: list[str]) -> int:
        """A destination newly connected to segments receives their current members."""
        if dest.type not in STREAMING_TYPES:
            return 0
        live = [s for s in segments if self.state.live(s)]
        members = [
            msgspec.structs.replace(m, status="realized", method="batch")
            for m in await self.store.members(live)
        ]
        views = await self.store.views(m.profile_id for m in members)
        effects = plan(members, [dest], views)
        tx = Tx()
        self.store.enqueue(tx, effects.queued, time.time())
        if reasons := effects.skipped.get(dest.name):
            self.store.exclude(tx, dest.name, reasons)
        await self.store.apply(tx)
        self.delivery.wake([dest.name])
        return len(effects.queued)

    async def _known(self, names: Iterable[str], in_file: set[str]) -> set[str]:
        """Which of `names` are live segments: in the state, in the same file (a dry run),
        or, not read from the config stream yet, its latest message there."""
        known = {n for n in names if n in self.state.segments or n in in_file}
        for name in sorted(set(names) - known):
            try:
                msg = await self._js().get_last_msg(
                    subjects.STREAM_CONFIG.name, subjects.config("segment", name)
                )
                seg = _segment_decoder.decode(msg.data or b"")
            except (nats.errors.Error, msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.log.debug(
                    "segment not found on the config stream", segment=name, error=repr(exc)
                )
                continue
            if not seg.deleted:
                known.add(name)
        return known

    async def _check_addresses(self, dest: Destination) -> None:
        """The addresses the URL's host resolves to now (checked again at every send)."""
        url = dest.connection.get("url")
        if dest.type in CONNECTORS and dest.type not in ("nats",) and isinstance(url, str):
            try:
                await check_resolved(url, self.settings.allow_private_destinations)
            except UnsafeDestination as exc:
                raise Invalid(exc.message, kind=KIND, name=dest.name, field=exc.field) from None

    def _check(self, dest: Destination, known: set[str]) -> None:
        def fail(field: str, message: str) -> Invalid:
            return Invalid(message, kind=KIND, name=dest.name, field=field)

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
        settings = self.settings
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
        if dest.type in NEEDS_URL and not isinstance(dest.connection.get("url"), str):
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

    async def get(self, request: GetRequest) -> GetResult:
        kind = PLURALS.get(request.kind, request.kind)
        if kind != KIND:
            raise Invalid(f"the destination service does not own {kind!r}", code="unknown_kind")
        dests = self.state.destinations
        if request.name is not None:
            dest = dests.get(request.name)
            if dest is None:
                raise NotFound(f"no destination named {request.name!r}", kind=KIND)
            return GetResult(KIND, [to_builtins(dest)])
        return GetResult(KIND, [to_builtins(dests[n]) for n in sorted(dests)])

    # -- status, dead letters ----------------------------------------------------------------------
    async def list(self, _request: ListRequest) -> DestinationList:
        stats = await self.store.stats()
        queue = await self.store.queue_counts()
        dead = await self.store.dead_counts()
        excluded = await self.store.exclusions()
        files = await self.store.export_files()
        out = []
        for name, d in sorted(self.state.destinations.items()):
            s = stats.get(name)
            q = queue.get(name)
            retrying = q.retrying if q is not None else 0
            status = "retrying" if retrying else "failing" if dead.get(name) else "active"
            out.append(
                DestinationInfo(
                    name=name,
                    type=d.type,
                    segments=d.segments,
                    status=status,
                    queued=q.queued if q is not None else 0,
                    delivered=s.delivered if s is not None else 0,
                    failed=s.failed if s is not None else 0,
                    skipped=s.skipped if s is not None else 0,
                    dead_letters=dead.get(name, 0),
                    last_delivery=s.last_delivery if s is not None else None,
                    last_error=s.last_error if s is not None else None,
                    export_schedule=d.export.schedule if d.export else None,
                    excluded=excluded.get(name, {}),
                    files=files.get(name, []),
                )
            )
        return DestinationList(out)

    async def dlq(self, request: DestinationQuery) -> DeadLetters:
        limit = max(1, min(request.limit, 10_000))
        return DeadLetters(request.name, await self.store.dead_letters(request.name, limit))

    async def replay(self, request: DestinationQuery) -> ReplayResult:
        if request.name not in self.state.destinations:
            raise NotFound(f"no destination named {request.name!r}", kind=KIND)
        n = await self.store.dead_count(request.name)
        tx = Tx()
        self.store.replay(tx, request.name, time.time())
        await self.store.apply(tx)
        self.delivery.wake([request.name])
        return ReplayResult(request.name, n)

    # -- file exports ------------------------------------------------------------------------------
    async def export(self, request: ExportRun) -> ExportResult:
        """Run a file destination's export now (once per job id), and publish its result
        on the jobs stream as an export requested there would."""
        dest = self.state.destinations.get(request.destination)
        if dest is None or dest.export is None:
            raise NotFound(
                f"no file destination named {request.destination!r}",
                kind=KIND,
                name=request.destination,
            )
        if request.trigger == "after_segmentation":
            # The destination runs those itself when a segmentation job succeeds.
            raise Conflict(
                "exports after segmentation run when a segmentation job succeeds",
                kind=KIND,
                name=request.destination,
                field="trigger",
            )
        if request.job_id is not None:
            done = await self.store.export_of_job(request.job_id)
            if done is not None:
                return done
        tx = Tx()
        result = await self.exporter.run(tx, dest, request.trigger, request.job_id)
        msg_id = f"export:{dest.name}:{result.started_at!r}"
        await self._publish(
            tx, [Outgoing(msg_id, subjects.export_done(dest.name), _json.encode(result))]
        )
        return result

    async def jobs(self, request: ListRequest) -> JobList:
        """Export jobs, newest first, as job records."""
        rows = await self.store.exports(max(1, min(request.limit, 200)))
        return JobList(
            [
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
                for job_id, r in rows
            ]
        )

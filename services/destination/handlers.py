"""The destination service's actor steps, one per consumer. Each loads what it needs
through the store, calls the pure rules (activation.plan), adds its writes to the step's
transaction and emits through the step's outbox; in-memory state changes only after the
step commits.

- `profiles` (CDP_CHANGES): the profile view it activates from (identities, attributes).
- `memberships` (CDP_MEMBERS, `cdp.x.members.<partition>`): envelopes of membership
  changes from segmentation, a batch at a time (one read of the statuses and one of the
  views, one write per table): each change becomes, for every streaming destination
  connected to its segment, an activation in the delivery queue (committed with the
  step), or one more skipped; a privacy delete, in its place among the changes, sends the
  person's exits, then forgets them.
- `segments` (CDP_CONFIG, `cdp.config.segment.*`): the segments as segmentation publishes
  them; a deleted segment's queued deliveries go, and none of its changes is queued again.
- `jobs` (CDP_JOBS): an export request (`cdp.jobs.export.<d>.run`) runs the export once
  per job id and publishes its result (`cdp.jobs.export.<d>.done`); a segmentation job that
  succeeded runs the exports scheduled "after segmentation" and sends audience managers
  the members they had before their segment was synced, as `existing`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import msgspec
import structlog

from services.destination.activation import Plan, plan, unseen
from services.destination.exporter import Exporter
from services.destination.model import SegmentMeta
from services.destination.state import State
from services.destination.store import DestinationStore
from shared import subjects
from shared.admin import ExportResult, ExportRun, PublishedSegment, finished_segmentation_job
from shared.messages import (
    Identity,
    MembershipChange,
    MembershipEvent,
    Probe,
    ProfileDeleted,
    ProfileMerged,
    ProfileView,
    members_batch_decoder,
    view_batch_decoder,
)
from shared.runtime import Step
from shared.runtime.configs import published
from shared.runtime.privacy import forget
from shared.runtime.probes import report_probe

SERVICE = "destination"
_segment_decoder = msgspec.json.Decoder(PublishedSegment)
_export_run_decoder = msgspec.json.Decoder(ExportRun)
_json = msgspec.json.Encoder()
_EXPORT_RUN_PREFIX = subjects.EXPORT_JOB_PREFIX + "."


def export_request(subject: str) -> bool:
    return subject.startswith(_EXPORT_RUN_PREFIX) and subject.endswith(".run")


class Handlers:
    def __init__(
        self,
        store: DestinationStore,
        state: State,
        exporter: Exporter,
        wake: Callable[[Iterable[str]], None],
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.store = store
        self.state = state
        self.exporter = exporter
        self.wake = wake
        self.log = log or structlog.get_logger(service=SERVICE)

    # -- the profile view ---------------------------------------------------------------------
    async def profiles(self, step: Step) -> None:
        upserts: dict[str, tuple[dict[str, object], list[Identity], float]] = {}
        gone: list[str] = []
        """Profiles folded into others or deleted: their view goes."""
        for d in step.deliveries:
            for item in view_batch_decoder.decode(d.data).items:
                match item:
                    case ProfileView(same_view=False):
                        upserts[item.profile_id] = (item.attributes, item.identities, item.at)
                    case ProfileMerged():
                        for pid in item.folded:
                            upserts.pop(pid, None)
                            gone.append(pid)
                    case ProfileDeleted():
                        # The membership consumer forgets the person too (it sends the
                        # exits), at its own pace: whichever comes last, no view is left.
                        for pid in item.profile_ids:
                            upserts.pop(pid, None)
                            gone.append(pid)
                    case Probe():
                        report_probe(step, item, "destination-profiles")
                    case _:
                        pass
        self.store.drop_views(step.tx, gone)
        self.store.put_views(step.tx, upserts)

    # -- memberships -> activations -----------------------------------------------------------
    async def memberships(self, step: Step) -> None:
        """The changes of every envelope of the step as one batch, cut only by a privacy
        delete (the changes before it are queued first, then it sends the exits)."""
        events: list[MembershipEvent] = []
        earlier: list[MembershipEvent] = []
        """The changes this step queued already (not committed yet: the store does not
        see them)."""
        for d in step.deliveries:
            for item in members_batch_decoder.decode(d.data).items:
                match item:
                    case MembershipChange():
                        events.append(item.event)
                    case ProfileDeleted():
                        earlier += await self._enqueue(step, events)
                        events = []
                        earlier += await self._forget(step, item, earlier)
                    case Probe():
                        report_probe(step, item, SERVICE)
        await self._enqueue(step, events)

    async def _enqueue(self, step: Step, events: list[MembershipEvent]) -> list[MembershipEvent]:
        """Queue the activations of the changes not applied already; those changes."""
        if not events:
            return []
        events = unseen(events, await self.store.statuses_of(e.profile_id for e in events))
        self.store.put_memberships(step.tx, events)
        live = [e for e in events if self.state.live(e.segment)]
        views = await self.store.views(e.profile_id for e in live)
        self._queue(step, plan(live, self.state.destinations.values(), views))
        return events

    def _queue(self, step: Step, effects: Plan, *, count_skipped: bool = True) -> None:
        now = time.time()
        self.store.enqueue(step.tx, effects.queued, now)
        if count_skipped:
            for name, reasons in effects.skipped.items():
                self.store.exclude(step.tx, name, reasons)
        touched = effects.touched
        if touched:
            step.after_commit(lambda: self.wake(touched))

    async def _forget(
        self, step: Step, item: ProfileDeleted, earlier: list[MembershipEvent]
    ) -> list[MembershipEvent]:
        """Privacy delete: tell destinations the person left (the memberships stored, as
        the step's `earlier` changes left them), then forget them here; the exits sent."""
        now = time.time()
        ids = set(item.profile_ids)
        status = {(m.segment, m.profile_id): m.status for m in await self.store.held(ids)}
        for e in earlier:
            if e.profile_id in ids:
                status[(e.segment, e.profile_id)] = e.status
        exits = [
            MembershipEvent(
                profile_id=pid,
                segment=segment,
                status="exited",
                at=now,
                method="privacy",
            )
            for (segment, pid), st in status.items()
            if st in ("realized", "existing")
        ]
        sent = await self._enqueue(step, exits)
        await forget(
            step, SERVICE, item.request, item.profile_ids, ("memberships", "profiles"), at=now
        )
        return sent

    # -- segments, as their owner publishes them ----------------------------------------------
    async def segments(self, step: Step) -> None:
        changes: dict[str, SegmentMeta | None] = {}
        for _, seg in published(step.deliveries, "segment", _segment_decoder, self.log):
            changes[seg.name] = (
                None
                if seg.deleted
                else SegmentMeta(name=seg.name, description=seg.description, method=seg.method)
            )
        for name, meta in changes.items():
            if meta is None:
                self.store.delete_segment(step.tx, name)
            else:
                self.store.put_segment(step.tx, meta)

        def remember() -> None:
            for name, meta in changes.items():
                if meta is None:
                    self.state.delete_segment(name)
                else:
                    self.state.put_segment(meta)

        step.after_commit(remember)

    # -- jobs ------------------------------------------------------------------------------------
    async def jobs(self, step: Step) -> None:
        ran: set[str] = set()
        for d in step.deliveries:
            if d.subject == subjects.SEGMENTATION_JOB_DONE:
                info = finished_segmentation_job(d.data)
                if info is None:
                    self.log.warning(
                        "ignored a segmentation-done message that is not a finished job"
                    )
                    continue
                await self._send_existing(step)
                for dest in self.state.exporting_after_segmentation():
                    job_id = f"{info.job_id}:{dest.name}"
                    await self._export(step, dest.name, "after_segmentation", job_id, ran)
            elif export_request(d.subject):
                try:
                    request = _export_run_decoder.decode(d.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    self.log.warning("undecodable export request", subject=d.subject, seq=d.seq)
                    continue
                job_id = request.job_id or f"{step.consumer}:{d.seq}"
                await self._export(step, request.destination, request.trigger, job_id, ran)

    async def _export(
        self, step: Step, name: str, trigger: str, job_id: str, ran: set[str]
    ) -> None:
        """Run `name`'s export for `job_id` unless it ran already; publish its result."""
        if job_id in ran or await self.store.export_of_job(job_id) is not None:
            self.log.info("export already ran", destination=name, job_id=job_id)
            return
        ran.add(job_id)
        dest = self.state.destinations.get(name)
        if dest is None or dest.export is None:
            now = time.time()
            result = ExportResult(
                destination=name,
                trigger=trigger,
                status="failed",
                started_at=now,
                finished_at=now,
                mode="",
                files=[],
                rows=0,
                error=f"no file destination named {name!r}",
                job_id=job_id,
            )
        else:
            result = await self.exporter.run(step.tx, dest, trigger, job_id)
        step.emit(subjects.export_done(name), _json.encode(result))

    async def _send_existing(self, step: Step) -> None:
        """After a batch job, audience managers receive the members realised before their
        segment metadata was synced, with status `existing`."""
        now = time.time()
        for conn in await self.store.pending_existing():
            dest = self.state.destinations.get(conn.destination)
            if dest is None or not self.state.synced(conn.destination, conn.segment):
                continue  # not synced yet: wait for a later job
            if self.state.live(conn.segment):
                members = await self.store.members([conn.segment], before=conn.connected_at)
                existing = [
                    MembershipEvent(
                        profile_id=m.profile_id,
                        segment=m.segment,
                        status="existing",
                        at=now,
                        method="batch",
                    )
                    for m in members
                ]
                views = await self.store.views(m.profile_id for m in existing)
                self._queue(step, plan(existing, [dest], views), count_skipped=False)
            self.store.existing_sent(step.tx, conn.destination, conn.segment)

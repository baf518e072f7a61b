"""The segmentation actor.

It keeps the profile view it evaluates (attributes, identities, events) and, on each
profile change, re-evaluates only the streaming segments the change can affect (by the
event types and attribute paths each segment reads), then their inSegment dependants.
A membership that changes is published at once on `cdp.membership.<segment>`.

Time-based exits use timers: after an evaluation, the earliest time at which the result
could change with no new data is kept; a timer task sends the profile back through the
actor (a `Recheck`) when it is due. A batch job sends every profile through the actor the
same way, with its job id, and then every segment is evaluated: batch and streaming alike
use one evaluation path and the per-profile order of the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from services.segmentation.admin import SegmentationAdmin
from services.segmentation.catalog import Catalog, CompiledSegment, path_closure
from services.segmentation.evaluate import ProfileFacts, evaluate, next_change, resolve
from services.segmentation.store import (
    CAP_EVENTS,
    DELETE_TIMER,
    INSERT_EVENT,
    MIGRATIONS,
    UPSERT_FACTS,
    UPSERT_MEMBERSHIP,
    UPSERT_TIMER,
)
from shared import subjects
from shared.db import Tx, apply
from shared.messages import (
    ChangeBatch,
    ExperienceEvent,
    Identity,
    MembershipEvent,
    PrivacyReport,
    ProfileChanged,
    ProfileDeleted,
    ProfileMerged,
    Recheck,
    change_batch_decoder,
    json_encoder,
    msgpack_encoder,
)
from shared.runtime import Batch, ConsumerSpec, Service

MAX_EVENTS_PER_PROFILE = 5000
STREAMING_HORIZON_S = 24 * 3600.0
EXITED_KEPT_S = 30 * 24 * 3600.0
TIMER_RETRY_S = 30.0
MEMBER = ("realized", "existing")
_keys_encoder = msgspec.json.Encoder()
_any_msgpack = msgspec.msgpack.Decoder()
_identities_decoder = msgspec.msgpack.Decoder(list[Identity])


def _json_list(values: Iterable[str]) -> bytes:
    return _keys_encoder.encode(list(values))


def _memo_evaluate(
    seg: CompiledSegment, facts: ProfileFacts, now: float, memo: dict[tuple[Any, ...], bool]
) -> bool:
    """`evaluate` for a profile without events, remembered by what the segment reads."""
    try:
        key = (
            seg.name,
            *(resolve(facts.attributes, path) for path in seg.read_paths),
            *(name in facts.segments for name in seg.read_segments),
        )
        found = memo.get(key)
    except TypeError:  # an object or a list at a path: not hashable, evaluate it
        return evaluate(seg.node, facts, now)
    if found is None:
        found = memo[key] = evaluate(seg.node, facts, now)
    return found


@dataclass
class _Profile:
    """What a batch knows of one profile while evaluating it."""

    attributes: dict[str, Any] = field(default_factory=dict)
    views: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Attributes under other merge policies, by policy name."""
    identities: list[Identity] = field(default_factory=list)
    events: list[ExperienceEvent] = field(default_factory=list)
    memberships: dict[str, tuple[str, float]] = field(default_factory=dict)
    """segment -> (status, since)"""
    to_check: set[str] = field(default_factory=set)
    timers: dict[str, float] = field(default_factory=dict)
    """segment -> when the profile is due to be evaluated again"""
    job_id: str | None = None
    fresh_events: list[ExperienceEvent] = field(default_factory=list)


class SegmentationService(Service):
    name = "segmentation"
    migrations = MIGRATIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.catalog = Catalog()
        self.admin = SegmentationAdmin(self)
        self._timer_task: asyncio.Task[None] | None = None
        self._timer_wake = asyncio.Event()

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (
            ConsumerSpec(
                "segmentation",
                subjects.STREAM_CHANGES,
                self.handle_changes,
                description="profile changes (from profile), rechecks (timers, batch jobs)",
            ),
        )

    async def on_start(self) -> None:
        self.catalog.load(
            (bytes(s), bytes(a))
            for s, a in await self.db.execute_fetchall("SELECT spec, ast FROM segments")
        )
        await self.admin.start()
        self._timer_task = asyncio.create_task(self._timers(), name="segment-timers")

    async def on_stop(self) -> None:
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
        await self.admin.stop()

    def _part(self, profile_id: str) -> int:
        return subjects.partition_of(profile_id, self.settings.partitions)

    # -- the actor -------------------------------------------------------------------------
    async def handle_changes(self, batch: Batch) -> None:
        items = [i for d in batch.deliveries for i in change_batch_decoder.decode(d.data).items]
        now = time.time()
        profiles: dict[str, _Profile] = {}
        job_scanned: dict[str, int] = defaultdict(int)
        streaming = [s for s in self.catalog.segments.values() if s.streaming]
        for item in items:
            match item:
                case ProfileChanged():
                    p = profiles.setdefault(item.profile_id, _Profile())
                    self._store_view(batch, item)
                    p.attributes = item.attributes
                    p.views = item.views
                    p.identities = item.identities
                    p.fresh_events += item.events  # not committed yet: the query won't see them
                    types = {e.event_type for e in item.events}
                    changed = set(item.changed)
                    closure = path_closure(changed)
                    for seg in streaming:
                        if (
                            (
                                seg.spec.merge_policy
                                and item.record_ids
                                and seg.reads.attribute_paths
                            )
                            or seg.touches(changed, closure)
                            or any(seg.reads.touches_event(t) for t in types)
                        ):
                            p.to_check.add(seg.name)
                case ProfileMerged():
                    await self._fold(batch, item, now)
                    p = profiles.setdefault(item.profile_id, _Profile())
                    p.to_check |= set(self.catalog.segments)
                case ProfileDeleted():
                    for pid in item.profile_ids:
                        profiles.pop(pid, None)
                    await self._delete(batch, item)
                case Recheck():
                    for pid in item.profile_ids:
                        p = profiles.setdefault(pid, _Profile())
                        if item.job_id is not None:
                            p.job_id = item.job_id
                            p.to_check |= set(self.catalog.segments)
                            job_scanned[item.job_id] += 1
                        else:
                            p.to_check |= {s.name for s in streaming if s.reads.uses_events}
        todo = {pid: p for pid, p in profiles.items() if p.to_check}
        if todo:
            await self._load(todo, now)
            counts: dict[str, dict[str, dict[str, int]]] = defaultdict(
                lambda: defaultdict(lambda: {"members": 0, "realized": 0, "exited": 0})
            )
            memo: dict[tuple[Any, ...], bool] = {}
            by_job: dict[str, list[str]] = defaultdict(list)
            columns = not self.catalog.policies_used
            for pid, p in todo.items():
                if columns and p.job_id is not None and not p.events:
                    by_job[p.job_id].append(pid)  # evaluated segment by segment, below
                else:
                    self._evaluate(batch, pid, p, now, counts, memo=memo)
            for job_id, pids in by_job.items():
                self._evaluate_columns(
                    batch, job_id, [(pid, todo[pid]) for pid in pids], now, counts
                )
            if counts or job_scanned:
                await self.admin.jobs.record_progress(batch, job_scanned, counts, now)
        elif job_scanned:
            await self.admin.jobs.record_progress(batch, job_scanned, {}, now)

    def _evaluate(
        self,
        batch: Batch,
        pid: str,
        p: _Profile,
        now: float,
        counts: dict[str, dict[str, dict[str, int]]],
        *,
        memo: dict[tuple[Any, ...], bool],
    ) -> None:
        """Evaluate the segments to check (and their dependants), in dependency order.

        A profile without events qualifies for a segment or not by the values at the paths
        the segment reads and its memberships of the segments it names, nothing else (an
        event condition over no event has one answer at any time): `memo` keeps that answer
        for the batch, so that profiles alike (most of a batch job) are evaluated once."""
        check = p.to_check | self.catalog.dependants(p.to_check)
        member_of = {s for s, (status, _) in p.memberships.items() if status in MEMBER}
        facts = ProfileFacts(p.attributes, p.events, member_of)
        views = {name: ProfileFacts(attrs, p.events, member_of) for name, attrs in p.views.items()}
        tx = batch.tx
        for name in self.catalog.order:
            if name not in check:
                continue
            seg = self.catalog.segments[name]
            if p.job_id is None and not seg.streaming:
                continue  # batch segments change only in batch jobs
            policy = seg.spec.merge_policy
            seen = views.get(policy, facts) if policy else facts
            seen.segments = facts.segments
            if p.events:
                qualifies = evaluate(seg.node, seen, now)
            else:
                qualifies = _memo_evaluate(seg, seen, now, memo)
            status, since = p.memberships.get(name, ("", now))
            was = status in MEMBER
            method = "batch" if p.job_id is not None else "streaming"
            if qualifies and not was:
                self._set(
                    batch=batch, pid=pid, p=p, seg=seg, status="realized", now=now, method=method
                )
                facts.segments.add(name)
            elif was and not qualifies:
                self._set(
                    batch=batch, pid=pid, p=p, seg=seg, status="exited", now=now, method=method
                )
                facts.segments.discard(name)
            elif qualifies:
                new_status = "existing" if p.job_id is not None else status
                tx.add(UPSERT_MEMBERSHIP, (pid, name, new_status, since, now, method, now))
            if p.job_id is not None:
                c = counts[p.job_id][name]
                if qualifies:
                    c["members"] += 1
                    if not was:
                        c["realized"] += 1
                elif was:
                    c["exited"] += 1
            if seg.streaming and seg.reads.uses_events:
                # Without events, time alone changes nothing; write only what differs from
                # the timers the profile has (a batch job reaches every profile).
                due = next_change(seg.node, facts, now) if facts.events else None
                held = p.timers.get(name)
                if due is None:
                    if held is not None:
                        tx.add(DELETE_TIMER, (pid, name))
                elif due != held:
                    tx.add(UPSERT_TIMER, (pid, name, due))
                    batch.after_commit(self._timer_wake.set)

    def _evaluate_columns(
        self,
        batch: Batch,
        job_id: str,
        group: list[tuple[str, _Profile]],
        now: float,
        counts: dict[str, dict[str, dict[str, int]]],
    ) -> None:
        """A batch job's profiles without events, every segment, set by set: the same
        results and writes as `_evaluate` profile by profile, without its cost per profile
        and segment (a million profiles x 50 segments).

        Per segment, in dependency order: the values at the paths it reads (each path read
        once for every profile), its answer for each distinct combination of those values
        and of the memberships it reads (an event condition over no event has one answer),
        then who qualifies, compared with who was a member: realized and exited changes as
        `_set` makes them, and `existing` for those confirmed."""
        tx = batch.tx
        attrs = [p.attributes for _, p in group]
        member_of = [
            {s for s, (status, _) in p.memberships.items() if status in MEMBER} for _, p in group
        ]
        held: dict[str, set[int]] = defaultdict(set)
        timers: dict[str, list[int]] = defaultdict(list)
        for i, (_, p) in enumerate(group):
            for name in member_of[i]:
                held[name].add(i)
            for name in p.timers:
                timers[name].append(i)
        columns: dict[str, list[Any]] = {}
        job_counts = counts[job_id]
        for name in self.catalog.order:
            seg = self.catalog.segments[name]
            for path in seg.read_paths:
                if path not in columns:
                    columns[path] = [resolve(a, path) for a in attrs]
            keyed = [columns[path] for path in seg.read_paths]
            keyed += [[dep in m for m in member_of] for dep in seg.read_segments]
            qualified: set[int] = set()
            if not keyed:  # reads no attribute and no segment: one answer for all of them
                if self._answer(seg, {}, set(), now):
                    qualified = set(range(len(group)))
            else:
                answers: dict[tuple[Any, ...], bool] = {}
                for i, key in enumerate(zip(*keyed, strict=True)):
                    try:
                        answer = answers.get(key)
                        if answer is None:
                            answer = answers[key] = self._answer(seg, attrs[i], member_of[i], now)
                    except TypeError:  # an object or a list at a path: evaluate it alone
                        answer = self._answer(seg, attrs[i], member_of[i], now)
                    if answer:
                        qualified.add(i)
            was = held.get(name, set())
            for i in sorted(qualified - was):
                pid, p = group[i]
                self._set(
                    batch=batch, pid=pid, p=p, seg=seg, status="realized", now=now, method="batch"
                )
                member_of[i].add(name)
            for i in sorted(was - qualified):
                pid, p = group[i]
                self._set(
                    batch=batch, pid=pid, p=p, seg=seg, status="exited", now=now, method="batch"
                )
                member_of[i].discard(name)
            stays = sorted(qualified & was)
            if stays:
                tx.add_many(
                    UPSERT_MEMBERSHIP,
                    [
                        (
                            group[i][0],
                            name,
                            "existing",
                            group[i][1].memberships[name][1],
                            now,
                            "batch",
                            now,
                        )
                        for i in stays
                    ],
                )
            c = job_counts[name]
            c["members"] += len(qualified)
            c["realized"] += len(qualified - was)
            c["exited"] += len(was - qualified)
            if seg.streaming and seg.reads.uses_events and name in timers:
                # No events: no timer is due; remove those the profiles hold.
                tx.add_many(DELETE_TIMER, [(group[i][0], name) for i in timers[name]])

    @staticmethod
    def _answer(
        seg: CompiledSegment, attributes: dict[str, Any], segments: set[str], now: float
    ) -> bool:
        return evaluate(seg.node, ProfileFacts(attributes, [], set(segments)), now)

    def _set(
        self,
        *,
        batch: Batch,
        pid: str,
        p: _Profile,
        seg: CompiledSegment,
        status: str,
        now: float,
        method: str,
    ) -> None:
        qualified = now if status == "realized" else None
        batch.tx.add(UPSERT_MEMBERSHIP, (pid, seg.name, status, now, qualified, method, now))
        p.memberships[seg.name] = (status, now)
        event = MembershipEvent(
            profile_id=pid,
            segment=seg.name,
            status=status,
            at=now,
            method=method,
            identities=p.identities,
        )
        batch.emit(subjects.membership(seg.name), json_encoder.encode(event))
        # Debug, not info: every change is published on cdp.membership.<segment> already, and
        # a line per change cost a tenth of the service's time when many profiles arrive.
        self.log.debug("membership changed", profile_id=pid, segment=seg.name, status=status)

    async def _load(self, todo: dict[str, _Profile], now: float) -> None:
        """Facts not carried by the batch, events and memberships: one query each."""
        db = self.db
        missing = [pid for pid, p in todo.items() if not p.attributes and not p.identities]
        if missing:
            policies = self.catalog.policies_used
            for pid, attrs, idents, views in await db.execute_fetchall(
                "SELECT profile_id, attributes, identities, views FROM facts WHERE profile_id IN "
                "(SELECT value FROM json_each(?))",
                (_json_list(missing),),
            ):
                todo[pid].attributes = _any_msgpack.decode(attrs)
                todo[pid].identities = _identities_decoder.decode(idents)
                if views and policies:  # only segments with a merge policy read views
                    todo[pid].views = _any_msgpack.decode(views)
        full = [pid for pid, p in todo.items() if p.job_id is not None]
        recent = [pid for pid, p in todo.items() if p.job_id is None]
        for pids, since in ((full, None), (recent, now - STREAMING_HORIZON_S - 60.0)):
            if not pids:
                continue
            sql = (
                "SELECT profile_id, record_id, dataset, event_type, ts, payload FROM events "
                "WHERE profile_id IN (SELECT value FROM json_each(?))"
            )
            args: tuple[Any, ...] = (_json_list(pids),)
            if since is not None:
                sql += " AND ts >= ?"
                args = (*args, since)
            for pid, rid, ds, et, ts, payload in await db.execute_fetchall(
                sql + " ORDER BY ts", args
            ):
                todo[pid].events.append(
                    ExperienceEvent(
                        record_id=rid,
                        dataset=ds,
                        event_type=et,
                        timestamp=ts,
                        payload=_any_msgpack.decode(payload),
                    )
                )
        for p in todo.values():
            if p.fresh_events:
                seen = {e.record_id for e in p.events}
                p.events += [e for e in p.fresh_events if e.record_id not in seen]
                p.events.sort(key=lambda e: (e.timestamp, e.record_id))
        plist = _json_list(todo)
        for pid, seg, status, since_ in await db.execute_fetchall(
            "SELECT profile_id, segment, status, since FROM memberships WHERE profile_id IN "
            "(SELECT value FROM json_each(?))",
            (plist,),
        ):
            todo[pid].memberships[seg] = (status, since_)
        for pid, seg, due in await db.execute_fetchall(
            "SELECT profile_id, segment, due FROM timers WHERE profile_id IN "
            "(SELECT value FROM json_each(?))",
            (plist,),
        ):
            todo[pid].timers[seg] = due

    # -- keeping the view -------------------------------------------------------------------
    def _store_view(self, batch: Batch, item: ProfileChanged) -> None:
        tx = batch.tx
        tx.add(
            UPSERT_FACTS,
            (
                item.profile_id,
                msgpack_encoder.encode(item.attributes),
                msgpack_encoder.encode(item.identities),
                item.at,
                msgpack_encoder.encode(item.views),
            ),
        )
        for e in item.events:
            tx.add(
                INSERT_EVENT,
                (
                    e.record_id,
                    item.profile_id,
                    e.dataset,
                    e.event_type,
                    e.timestamp,
                    msgpack_encoder.encode(e.payload),
                ),
            )
        if item.events:
            tx.add(CAP_EVENTS, (item.profile_id, MAX_EVENTS_PER_PROFILE))

    async def _fold(self, batch: Batch, item: ProfileMerged, now: float) -> None:
        """The folded profiles leave their segments; the survivor is re-evaluated."""
        folded = _json_list(item.folded)
        survivor = item.profile_id
        rows = await self.db.execute_fetchall(
            "SELECT profile_id, segment, status FROM memberships WHERE profile_id IN "
            "(SELECT value FROM json_each(?)) OR profile_id = ?",
            (folded, survivor),
        )
        held = {str(seg) for pid, seg, status in rows if pid == survivor and status in MEMBER}
        tx = batch.tx
        for pid, seg, status in rows:
            if pid == survivor or status not in MEMBER:
                continue
            event = MembershipEvent(
                profile_id=pid, segment=seg, status="exited", at=now, method="streaming"
            )
            batch.emit(subjects.membership(seg), json_encoder.encode(event))
            compiled = self.catalog.get(seg)
            if compiled is not None and not compiled.streaming and seg not in held:
                # Batch memberships move to the survivor now; the next job re-checks them.
                held.add(seg)
                tx.add(UPSERT_MEMBERSHIP, (survivor, seg, "realized", now, now, "batch", now))
                moved = MembershipEvent(
                    profile_id=survivor, segment=seg, status="realized", at=now, method="batch"
                )
                batch.emit(subjects.membership(seg), json_encoder.encode(moved))
        for table in ("memberships", "timers", "facts"):
            tx.add(
                f"DELETE FROM {table} WHERE profile_id IN (SELECT value FROM json_each(?))",
                (folded,),
            )
        tx.add(
            "UPDATE events SET profile_id = ? WHERE profile_id IN (SELECT value FROM json_each(?))",
            (item.profile_id, folded),
        )

    async def _delete(self, batch: Batch, item: ProfileDeleted) -> None:
        plist = _json_list(item.profile_ids)
        removed: dict[str, int] = {}
        for table in ("facts", "events", "memberships", "timers"):
            rows = await self.db.execute_fetchall(
                f"SELECT count(*) FROM {table} WHERE profile_id IN "
                "(SELECT value FROM json_each(?))",
                (plist,),
            )
            removed[table] = int(next(iter(rows))[0])
            batch.tx.add(
                f"DELETE FROM {table} WHERE profile_id IN (SELECT value FROM json_each(?))",
                (plist,),
            )
        batch.emit(subjects.PRIVACY_MEMBERSHIP, json_encoder.encode(item))
        report = PrivacyReport(
            request_id=item.request.request_id,
            service=self.name,
            identity=item.request.identity,
            profile_ids=item.profile_ids,
            removed=removed,
            at=time.time(),
        )
        batch.emit(
            subjects.privacy_report(item.request.request_id, self.name), json_encoder.encode(report)
        )

    # -- time-based exits ---------------------------------------------------------------------
    async def _timers(self) -> None:
        """Send profiles whose timers are due back through the actor; tidy old exits."""
        while True:
            now = time.time()
            rows = await self.db.execute_fetchall(
                "SELECT DISTINCT profile_id FROM timers WHERE due <= ? LIMIT 5000", (now,)
            )
            due = [str(r[0]) for r in rows]
            if due:
                by_part: dict[int, list[str]] = defaultdict(list)
                for pid in due:
                    by_part[self._part(pid)].append(pid)
                for part, pids in by_part.items():
                    body = msgpack_encoder.encode(ChangeBatch([Recheck(pids, now)]))
                    await self.js.publish(subjects.changes(part), body)
                tx = Tx()  # not again until the actor has had time to act on them
                tx.add(
                    "UPDATE timers SET due = ? WHERE due <= ? AND profile_id IN "
                    "(SELECT value FROM json_each(?))",
                    (now + TIMER_RETRY_S, now, _json_list(due)),
                )
                tx.add(
                    "DELETE FROM memberships WHERE status = 'exited' AND updated_at < ?",
                    (now - EXITED_KEPT_S,),
                )
                await apply(self.db, tx)
                continue
            nxt = await self.db.execute_fetchall("SELECT min(due) FROM timers")
            first = next(iter(nxt))[0]
            wait = 60.0 if first is None else max(0.0, min(60.0, float(first) - now))
            self._timer_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), wait)

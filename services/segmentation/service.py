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
from typing import Any, ClassVar

import msgspec

from services.segmentation.admin import SegmentationAdmin
from services.segmentation.catalog import Catalog, CompiledSegment, path_closure
from services.segmentation.evaluate import ProfileFacts, evaluate, next_change, resolve
from services.segmentation.store import (
    CAP_EVENTS,
    DELETE_TIMER,
    INSERT_EVENT,
    MIGRATIONS,
    MOVE_EVENTS,
    REMOVE_EVENT,
    UPSERT_FACTS,
    UPSERT_MEMBERSHIP,
    UPSERT_TIMER,
)
from shared import subjects
from shared.db import Tx, apply
from shared.messages import (
    ChangeEnvelope,
    ChangeItem,
    ExperienceEvent,
    Identity,
    MembershipEvent,
    PrivacyReport,
    Probe,
    ProfileChanged,
    ProfileDeleted,
    ProfileMerged,
    Recheck,
    change_batch_decoder,
    json_encoder,
    msgpack_encoder,
)
from shared.runtime import ConsumerSpec, Service, Step
from shared.runtime.probes import report_probe

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
    """What a batch knows of one profile while applying its items and evaluating it."""

    attributes: dict[str, Any] = field(default_factory=dict)
    views: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Attributes under other merge policies, by policy name."""
    identities: list[Identity] = field(default_factory=list)
    events: dict[str, ExperienceEvent] = field(default_factory=dict)
    """Record id -> event (within the streaming horizon, or all of them for a batch job)."""
    memberships: dict[str, tuple[str, float]] = field(default_factory=dict)
    """segment -> (status, since)"""
    to_check: set[str] = field(default_factory=set)
    timers: dict[str, float] = field(default_factory=dict)
    """segment -> when the profile is due to be evaluated again"""
    job_id: str | None = None
    moved_in: set[str] = field(default_factory=set)
    """Step segments a merge moved onto this profile in this batch (not announced yet)."""
    capped: bool = False
    """Events arrived: the 5,000-event cap is applied."""
    known: bool = False
    """Segmentation has the profile's view (stored, or carried by a change of the batch)."""
    changed_at: float | None = None
    """Set when a change of this batch carried the profile's view: it is written back."""

    def sorted_events(self) -> list[ExperienceEvent]:
        return sorted(self.events.values(), key=lambda e: (e.timestamp, e.record_id))


class _Writes:
    """Writes whose relative order does not matter (one row per key, or the rows of one
    statement kept in order), grouped by statement so that each is one call."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[Any, ...]]] = {}

    def add(self, sql: str, row: tuple[Any, ...]) -> None:
        self.rows.setdefault(sql, []).append(row)

    def add_many(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
        self.rows.setdefault(sql, []).extend(rows)


class SegmentationService(Service):
    name = "segmentation"
    migrations = MIGRATIONS
    listings: ClassVar[dict[str, str]] = {
        "profiles": "SELECT rowid, profile_id FROM facts WHERE rowid > ? ORDER BY rowid LIMIT ?",
        "events": "SELECT rowid, record_id, profile_id, dataset, ts FROM events WHERE rowid > ? "
        "ORDER BY rowid LIMIT ?",
        "members": "SELECT rowid, profile_id, segment FROM memberships WHERE status IN "
        "('realized', 'existing') AND rowid > ? ORDER BY rowid LIMIT ?",
    }

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
    async def handle_changes(self, batch: Step) -> None:
        """Load every profile the items name (a query per table), apply the items in order
        in memory (changes, merges, deletes, rechecks) with the writes to events in the same
        order, evaluate what they may affect, and write the rest once per table."""
        items = [i for d in batch.deliveries for i in change_batch_decoder.decode(d.data).items]
        now = time.time()
        profiles = await self._load(items, now)
        job_scanned: dict[str, int] = defaultdict(int)
        streaming = [s for s in self.catalog.segments.values() if s.streaming]
        w = _Writes()
        tx = batch.tx
        folded: dict[str, str] = {}
        deleted: set[str] = set()
        probes: list[Probe] = []

        def survivor_of(pid: str) -> str:
            while pid in folded:
                pid = folded[pid]
            return pid

        for item in items:
            match item:
                case ProfileChanged():
                    p = profiles[item.profile_id]
                    p.attributes = item.attributes
                    p.views = item.views
                    p.identities = item.identities
                    p.changed_at = item.at
                    p.known = True
                    types = {e.event_type for e in item.events}
                    for e in item.events:
                        p.events[e.record_id] = e
                    tx.add_many(
                        INSERT_EVENT,
                        [
                            (
                                e.record_id,
                                item.profile_id,
                                e.dataset,
                                e.event_type,
                                e.timestamp,
                                msgpack_encoder.encode(e.payload),
                            )
                            for e in item.events
                        ],
                    )
                    if item.events:
                        p.capped = True
                    for rid in item.removed_events:
                        left = p.events.pop(rid, None)
                        if left is not None:
                            types.add(left.event_type)
                    tx.add_many(
                        REMOVE_EVENT, [(rid, item.profile_id) for rid in item.removed_events]
                    )
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
                            or (item.removed_events and seg.reads.uses_events)
                        ):
                            p.to_check.add(seg.name)
                    if item.folded:
                        p.to_check |= set(self.catalog.segments)
                case ProfileMerged():
                    survivor = survivor_of(item.profile_id)
                    for pid in item.folded:
                        if survivor_of(pid) == survivor or pid in deleted:
                            continue
                        self._fold(batch, profiles=profiles, folded=pid, survivor=survivor, now=now)
                        folded[pid] = survivor
                        tx.add(MOVE_EVENTS, (survivor, pid))
                    if profiles[survivor].known:
                        profiles[survivor].to_check |= set(self.catalog.segments)
                    # else its first change follows, naming the folded profiles
                case ProfileDeleted():
                    await self._delete(batch, item)
                    for pid in item.profile_ids:
                        deleted.add(pid)
                        profiles.pop(pid, None)
                case Recheck():
                    for pid in item.profile_ids:
                        p = profiles[pid]
                        if item.job_id is not None:
                            p.job_id = item.job_id
                            p.to_check |= set(self.catalog.segments)
                            job_scanned[item.job_id] += 1
                        else:
                            p.to_check |= {s.name for s in streaming if s.reads.uses_events}
                case Probe():
                    probes.append(item)
        gone = folded.keys() | deleted
        self._announce_moves(batch, w, profiles, gone, now)
        # Only profiles segmentation has a view of: a recheck that comes after a merge or a
        # delete names a profile that is no one any more.
        todo = {pid: p for pid, p in profiles.items() if p.to_check and p.known and pid not in gone}
        if todo:
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
                    self._evaluate(batch, w, pid=pid, p=p, now=now, counts=counts, memo=memo)
            for job_id, pids in by_job.items():
                self._evaluate_columns(
                    batch,
                    w,
                    job_id=job_id,
                    group=[(pid, todo[pid]) for pid in pids],
                    now=now,
                    counts=counts,
                )
            if counts or job_scanned:
                await self.admin.jobs.record_progress(batch, job_scanned, counts, now)
        elif job_scanned:
            await self.admin.jobs.record_progress(batch, job_scanned, {}, now)
        self._persist(batch, w, profiles=profiles, folded=folded, deleted=deleted)
        for probe in probes:
            batch.emit(subjects.MEMBERSHIP_PROBE, json_encoder.encode(probe))
            report_probe(batch, probe, self.name)

    def _evaluate(
        self,
        batch: Step,
        w: _Writes,
        *,
        pid: str,
        p: _Profile,
        now: float,
        counts: dict[str, dict[str, dict[str, int]]],
        memo: dict[tuple[Any, ...], bool],
    ) -> None:
        """Evaluate the segments to check (and their dependants), in dependency order.

        A profile without events qualifies for a segment or not by the values at the paths
        the segment reads and its memberships of the segments it names, nothing else (an
        event condition over no event has one answer at any time): `memo` keeps that answer
        for the batch, so that profiles alike (most of a batch job) are evaluated once."""
        check = p.to_check | self.catalog.dependants(p.to_check)
        member_of = {s for s, (status, _) in p.memberships.items() if status in MEMBER}
        events = p.sorted_events()
        facts = ProfileFacts(p.attributes, events, member_of)
        views = {name: ProfileFacts(attrs, events, member_of) for name, attrs in p.views.items()}
        tx = w
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
            if qualifies != was:
                status = "realized" if qualifies else "exited"
                self._set(batch, w, pid=pid, p=p, seg=seg, status=status, now=now, method=method)
                if qualifies:
                    facts.segments.add(name)
                else:
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
        batch: Step,
        w: _Writes,
        *,
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
        tx = w
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
            for i in sorted(qualified ^ was):
                pid, p = group[i]
                joins = i in qualified
                status = "realized" if joins else "exited"
                self._set(batch, w, pid=pid, p=p, seg=seg, status=status, now=now, method="batch")
                if joins:
                    member_of[i].add(name)
                else:
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
        batch: Step,
        w: _Writes,
        *,
        pid: str,
        p: _Profile,
        seg: CompiledSegment,
        status: str,
        now: float,
        method: str,
    ) -> None:
        qualified = now if status == "realized" else None
        w.add(UPSERT_MEMBERSHIP, (pid, seg.name, status, now, qualified, method, now))
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

    async def _load(self, items: list[ChangeItem], now: float) -> dict[str, _Profile]:
        """Every profile the items name, as stored: the view (unless a change of the batch
        carries it), the events (within the streaming horizon, or all of them when a batch
        job is in the batch), memberships and timers. One query per table."""
        profiles: dict[str, _Profile] = defaultdict(_Profile)
        carried: set[str] = set()
        job = False
        for item in items:
            match item:
                case ProfileChanged():
                    profiles[item.profile_id]  # creates it
                    carried.add(item.profile_id)
                case ProfileMerged():
                    for pid in (item.profile_id, *item.folded):
                        profiles[pid]
                case Recheck():
                    job = job or item.job_id is not None
                    for pid in item.profile_ids:
                        profiles[pid]
                case _:
                    pass
        if not profiles:
            return profiles
        db = self.db
        plist = _json_list(profiles)
        missing = [pid for pid in profiles if pid not in carried]
        if missing:
            policies = self.catalog.policies_used
            for pid, attrs, idents, views in await db.execute_fetchall(
                "SELECT profile_id, attributes, identities, views FROM facts WHERE profile_id IN "
                "(SELECT value FROM json_each(?))",
                (_json_list(missing),),
            ):
                p = profiles[pid]
                p.known = True
                p.attributes = _any_msgpack.decode(attrs)
                p.identities = _identities_decoder.decode(idents)
                if views and policies:  # only segments with a merge policy read views
                    p.views = _any_msgpack.decode(views)
        sql = (
            "SELECT profile_id, record_id, dataset, event_type, ts, payload FROM events "
            "WHERE profile_id IN (SELECT value FROM json_each(?))"
        )
        args: tuple[Any, ...] = (plist,)
        if not job:
            sql += " AND ts >= ?"
            args = (plist, now - STREAMING_HORIZON_S - 60.0)
        for pid, rid, ds, et, ts, payload in await db.execute_fetchall(sql, args):
            profiles[pid].events[rid] = ExperienceEvent(
                record_id=rid,
                dataset=ds,
                event_type=et,
                timestamp=ts,
                payload=_any_msgpack.decode(payload),
            )
        for pid, seg, status, since_ in await db.execute_fetchall(
            "SELECT profile_id, segment, status, since FROM memberships WHERE profile_id IN "
            "(SELECT value FROM json_each(?))",
            (plist,),
        ):
            profiles[pid].memberships[seg] = (status, since_)
        for pid, seg, due in await db.execute_fetchall(
            "SELECT profile_id, segment, due FROM timers WHERE profile_id IN "
            "(SELECT value FROM json_each(?))",
            (plist,),
        ):
            profiles[pid].timers[seg] = due
        return profiles

    # -- merges and deletes ---------------------------------------------------------------
    def _fold(
        self,
        batch: Step,
        *,
        profiles: dict[str, _Profile],
        folded: str,
        survivor: str,
        now: float,
    ) -> None:
        """`folded` leaves its segments (its exits name its identities and the survivor);
        its events are the survivor's now; its batch memberships move to the survivor until
        the next job checks them (announced once the batch knows who the survivor is)."""
        x = profiles.pop(folded, _Profile())
        s = profiles[survivor]
        held = {seg for seg, (status, _) in s.memberships.items() if status in MEMBER}
        for seg, (status, _since) in sorted(x.memberships.items()):
            if status not in MEMBER:
                continue
            if seg not in x.moved_in:  # announced: it exits (one moved here never was)
                event = MembershipEvent(
                    profile_id=folded,
                    segment=seg,
                    status="exited",
                    at=now,
                    method="streaming",
                    identities=x.identities,
                    merged_into=survivor,
                )
                batch.emit(subjects.membership(seg), json_encoder.encode(event))
            compiled = self.catalog.get(seg)
            if compiled is not None and not compiled.streaming and seg not in held:
                held.add(seg)
                s.memberships[seg] = ("realized", now)
                s.moved_in.add(seg)
        if not s.identities:
            s.identities = x.identities  # until the survivor's own view arrives
        for rid, e in x.events.items():
            s.events.setdefault(rid, e)
        s.capped = s.capped or x.capped

    def _announce_moves(
        self,
        batch: Step,
        w: _Writes,
        profiles: dict[str, _Profile],
        gone: set[str],
        now: float,
    ) -> None:
        """Step memberships moved by merges, on the profiles that hold them at the end of
        the batch, with the identities those profiles have then."""
        for pid, p in profiles.items():
            if pid in gone or not p.moved_in:
                continue
            for name in sorted(p.moved_in):
                seg = self.catalog.get(name)
                if seg is not None:
                    self._set(
                        batch, w, pid=pid, p=p, seg=seg, status="realized", now=now, method="batch"
                    )

    def _persist(
        self,
        batch: Step,
        w: _Writes,
        *,
        profiles: dict[str, _Profile],
        folded: dict[str, str],
        deleted: set[str],
    ) -> None:
        """The rest of the batch's outcome, once per table (the events were written in item
        order already): folded profiles leave, views are written, memberships and timers
        of profiles that are gone now are not."""
        tx = batch.tx
        gone = folded.keys() | deleted
        for table in ("facts", "memberships", "timers"):
            tx.add_many(f"DELETE FROM {table} WHERE profile_id = ?", [(f,) for f in folded])
        tx.add_many(
            UPSERT_FACTS,
            [
                (
                    pid,
                    msgpack_encoder.encode(p.attributes),
                    msgpack_encoder.encode(p.identities),
                    p.changed_at,
                    msgpack_encoder.encode(p.views),
                )
                for pid, p in profiles.items()
                if p.changed_at is not None and pid not in gone
            ],
        )
        tx.add_many(
            CAP_EVENTS,
            [
                (pid, MAX_EVENTS_PER_PROFILE)
                for pid, p in sorted(profiles.items())
                if p.capped and pid not in gone
            ],
        )
        for sql, rows in w.rows.items():
            tx.add_many(sql, [r for r in rows if r[0] not in gone])

    async def _delete(self, batch: Step, item: ProfileDeleted) -> None:
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
                    body = msgpack_encoder.encode(ChangeEnvelope([Recheck(pids, now)]))
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

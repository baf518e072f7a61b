"""The segmentation actor's steps.

- `Handlers.changes` (CDP_CHANGES, consumer `segmentation`): profile changes, merges,
  deletes (from profile) and rechecks (timers, batch jobs). It keeps the profile view it
  evaluates (attributes, identities, events) and, on each change, re-evaluates only the
  streaming segments the change can affect (by the event types and attribute paths each
  segment reads), then their inSegment dependants; a membership that changes is
  published at once on `cdp.membership.<segment>` (JSON, for applications) and, with the
  step's privacy deletes and probes in their causal position, in one msgpack envelope per
  partition on `cdp.x.members.<partition>` (what profile and destination read), both in
  the step's outbox. A batch job's recheck evaluates every
  segment. Load (a query per table), apply the items in order in memory, evaluate
  (`membership.evaluate_many`, segment by segment in dependency order, and
  `membership.step` for each member or qualifier), persist once per table.
- `Handlers.policies` (CDP_CONFIG, `segmentation-policies`): the merge policies profile
  publishes, so that a segment may name only a known one.
- `Handlers.job_requests` (CDP_JOBS, `segmentation-jobs`): start a batch job (`jobs`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from services.segmentation import jobs
from services.segmentation.catalog import Catalog, CompiledSegment, path_closure
from services.segmentation.evaluate import ProfileFacts, next_change_of
from services.segmentation.membership import MEMBER, Group, evaluate_many, step
from services.segmentation.store import TABLES_OF_PROFILES, SegmentationStore
from shared import subjects
from shared.admin import JobInfo, JobRun
from shared.messages import (
    ChangeItem,
    ExperienceEvent,
    Identity,
    MembershipChange,
    MembershipEnvelope,
    MembershipEvent,
    MembershipItem,
    Probe,
    ProfileChanged,
    ProfileDeleted,
    ProfileMerged,
    Recheck,
    change_batch_decoder,
    json_encoder,
    msgpack_encoder,
)
from shared.resources import MergePolicy
from shared.runtime import Step
from shared.runtime.configs import published
from shared.runtime.partitioned import PartitionedOutput
from shared.runtime.privacy import forget
from shared.runtime.probes import report_probe

SERVICE = "segmentation"
MAX_EVENTS_PER_PROFILE = 5000
STREAMING_HORIZON_S = 24 * 3600.0
_policy_decoder = msgspec.json.Decoder(MergePolicy)
_job_decoder = msgspec.json.Decoder(JobRun)


def _members_message(items: list[MembershipItem]) -> bytes:
    return msgpack_encoder.encode(MembershipEnvelope(items))


@dataclass
class _Profile:
    """What a step knows of one profile while applying its items and evaluating it."""

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
    """Batch segments a merge moved onto this profile in this step (not announced yet)."""
    capped: bool = False
    """Events arrived: the 5,000-event cap is applied."""
    known: bool = False
    """Segmentation has the profile's view (stored, or carried by a change of the step)."""
    changed_at: float | None = None
    """Set when a change of this step carried the profile's view: it is written back."""

    def sorted_events(self) -> list[ExperienceEvent]:
        return sorted(self.events.values(), key=lambda e: (e.timestamp, e.record_id))

    def members_of(self) -> set[str]:
        return {s for s, (status, _) in self.memberships.items() if status in MEMBER}


class _Writes:
    """Writes whose relative order does not matter (one row per key, or the rows of one
    statement kept in order), grouped by statement so that each is one call; those of
    profiles that are gone by the end of the step are left out."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[Any, ...]]] = {}

    def add(self, sql: str, row: tuple[Any, ...]) -> None:
        self.rows.setdefault(sql, []).append(row)

    def add_many(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
        self.rows.setdefault(sql, []).extend(rows)


class _ChangesStep:
    """One step of the changes consumer: the profiles it names and what it does to them."""

    def __init__(
        self,
        step: Step,
        store: SegmentationStore,
        catalog: Catalog,
        profiles: dict[str, _Profile],
        now: float,
        *,
        partitions: int,
    ) -> None:
        self.step = step
        self.store = store
        self.catalog = catalog
        self.profiles = profiles
        self.now = now
        self.w = _Writes()
        self.folded: dict[str, str] = {}
        self.deleted: set[str] = set()
        self.job_scanned: dict[str, int] = defaultdict(int)
        self.counts: jobs.Counts = defaultdict(
            lambda: defaultdict(lambda: {"members": 0, "realized": 0, "exited": 0})
        )
        self.timer_set = False
        self.streaming = [s for s in catalog.segments.values() if s.streaming]
        self.policy_readers = frozenset(
            s.name for s in self.streaming if s.spec.merge_policy and s.reads.attribute_paths
        )
        """Streaming segments that read attributes under another merge policy (any record
        may change that view)."""
        self.event_readers = frozenset(s.name for s in self.streaming if s.reads.uses_events)
        self._by_type: dict[str | None, frozenset[str]] = {}
        self._by_paths: dict[tuple[str, ...], frozenset[str]] = {}
        self.partitions = partitions
        self.members: PartitionedOutput[MembershipItem] = PartitionedOutput(
            subjects.members, _members_message, partitions
        )

    def part(self, profile_id: str) -> int:
        return subjects.partition_of(profile_id, self.partitions)

    def touched_by_type(self, event_type: str | None) -> frozenset[str]:
        """The streaming segments an event of this type can affect (once per step)."""
        found = self._by_type.get(event_type)
        if found is None:
            found = self._by_type[event_type] = frozenset(
                s.name for s in self.streaming if s.reads.touches_event(event_type)
            )
        return found

    def touched_by_paths(self, paths: list[str]) -> frozenset[str]:
        """The streaming segments a change at these attribute paths can affect (once per
        step for each list of paths: a batch's changes mostly name the same ones)."""
        key = tuple(paths)
        found = self._by_paths.get(key)
        if found is None:
            changed = set(paths)
            closure = path_closure(changed)
            found = self._by_paths[key] = frozenset(
                s.name for s in self.streaming if s.touches(changed, closure)
            )
        return found

    @property
    def gone(self) -> set[str]:
        return self.folded.keys() | self.deleted

    # -- items ---------------------------------------------------------------------------
    def changed(self, item: ProfileChanged) -> None:
        p = self.profiles[item.profile_id]
        if not item.same_view:  # else the view is the one stored (or an earlier item's)
            p.attributes = item.attributes
            p.views = item.views
            p.identities = item.identities
            p.changed_at = item.at
            p.known = True
        types = {e.event_type for e in item.events}
        for e in item.events:
            p.events[e.record_id] = e
        self.store.add_events(self.step.tx, item.profile_id, item.events)
        if item.events:
            p.capped = True
        for rid in item.removed_events:
            left = p.events.pop(rid, None)
            if left is not None:
                types.add(left.event_type)
        self.store.remove_events(self.step.tx, item.profile_id, item.removed_events)
        check = p.to_check
        if item.record_ids:
            check |= self.policy_readers
        if item.changed:
            check |= self.touched_by_paths(item.changed)
        for t in types:
            check |= self.touched_by_type(t)
        if item.removed_events:
            check |= self.event_readers
        if item.folded:
            p.to_check |= set(self.catalog.segments)

    def merged(self, item: ProfileMerged) -> None:
        survivor = self._survivor_of(item.profile_id)
        for pid in item.folded:
            if self._survivor_of(pid) == survivor or pid in self.deleted:
                continue
            self._fold(pid, survivor)
            self.folded[pid] = survivor
            self.store.move_events(self.step.tx, survivor, pid)
        if self.profiles[survivor].known:
            self.profiles[survivor].to_check |= set(self.catalog.segments)
        # else its first change follows, naming the folded profiles

    async def deleted_profiles(self, item: ProfileDeleted) -> None:
        self.step.emit(subjects.PRIVACY_MEMBERSHIP, json_encoder.encode(item))
        # Behind every earlier change of the profiles it removes; one that removes no
        # profile (the person's identity was no one's any more) still goes, for its report.
        host, *others = [self.part(pid) for pid in item.profile_ids] or [0]
        self.members.add_across(host, others, item)
        await forget(self.step, SERVICE, item.request, item.profile_ids, TABLES_OF_PROFILES)
        for pid in item.profile_ids:
            self.deleted.add(pid)
            self.profiles.pop(pid, None)

    def recheck(self, item: Recheck) -> None:
        for pid in item.profile_ids:
            p = self.profiles[pid]
            if item.job_id is not None:
                p.job_id = item.job_id
                p.to_check |= set(self.catalog.segments)
                self.job_scanned[item.job_id] += 1
            else:
                p.to_check |= self.event_readers

    def _survivor_of(self, pid: str) -> str:
        while pid in self.folded:
            pid = self.folded[pid]
        return pid

    def _fold(self, folded: str, survivor: str) -> None:
        """`folded` leaves its segments (its exits name its identities and the survivor);
        its events are the survivor's now; its batch memberships move to the survivor until
        the next job checks them (announced once the step knows who the survivor is)."""
        x = self.profiles.pop(folded, _Profile())
        s = self.profiles[survivor]
        held = s.members_of()
        for seg, (status, _since) in sorted(x.memberships.items()):
            if status not in MEMBER:
                continue
            if seg not in x.moved_in:  # announced: it exits (one moved here never was)
                event = MembershipEvent(
                    profile_id=folded,
                    segment=seg,
                    status="exited",
                    at=self.now,
                    method="streaming",
                    identities=x.identities,
                    merged_into=survivor,
                )
                self.step.emit(subjects.membership(seg), json_encoder.encode(event))
                # behind the survivor's earlier changes, before its realizations
                self.members.add_across(
                    self.part(folded), (self.part(survivor),), MembershipChange(event)
                )
            compiled = self.catalog.get(seg)
            if compiled is not None and not compiled.streaming and seg not in held:
                held.add(seg)
                s.memberships[seg] = ("realized", self.now)
                s.moved_in.add(seg)
        if not s.identities:
            s.identities = x.identities  # until the survivor's own view arrives
        for rid, e in x.events.items():
            s.events.setdefault(rid, e)
        s.capped = s.capped or x.capped

    def announce_moves(self) -> None:
        """Batch memberships moved by merges, on the profiles that hold them at the end of
        the step, with the identities those profiles have then."""
        gone = self.gone
        for pid, p in self.profiles.items():
            if pid in gone or not p.moved_in:
                continue
            for name in sorted(p.moved_in):
                if self.catalog.get(name) is not None:
                    self._set(pid, p, name, "realized", "batch")

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> None:
        """Evaluate what the items may affect: only profiles segmentation has a view of (a
        recheck that comes after a merge or a delete names a profile that is no one any
        more), segment by segment in dependency order, so that inSegment sees the
        memberships of the segments before it as they are now."""
        gone = self.gone
        todo = [
            (pid, p)
            for pid, p in self.profiles.items()
            if p.to_check and p.known and pid not in gone
        ]
        if not todo:
            return
        catalog = self.catalog
        ps = [p for _, p in todo]
        member_of = [p.members_of() for p in ps]
        events = [p.sorted_events() for p in ps]
        base = Group(
            [ProfileFacts(p.attributes, events[i], member_of[i]) for i, p in enumerate(ps)]
        )
        views: dict[str, Group] = {}

        def seen_by(policy: str | None) -> Group:
            if not policy:
                return base
            found = views.get(policy)
            if found is None:
                found = views[policy] = Group(
                    [
                        ProfileFacts(p.views.get(policy, p.attributes), events[i], member_of[i])
                        for i, p in enumerate(ps)
                    ]
                )
            return found

        # None: every segment (a batch job's profile); else the segments to check.
        checks = [
            None if p.job_id is not None else p.to_check | catalog.dependants(p.to_check)
            for p in ps
        ]
        everyone = range(len(ps))
        all_checked = all(c is None for c in checks)
        holders: dict[str, set[int]] = defaultdict(set)
        for i, names in enumerate(member_of):
            for name in names:
                holders[name].add(i)
        memo: dict[tuple[Any, ...], bool] = {}
        jobs_here = sorted({p.job_id for p in ps if p.job_id is not None})
        for name in catalog.order:
            seg = catalog.segments[name]
            for job_id in jobs_here:  # a job counts every segment, those nobody is in too
                _ = self.counts[job_id][name]  # the defaultdict makes the entry
            if all_checked:
                which: range | list[int] = everyone
                held = set(holders[name])
            else:
                which = [
                    i for i, c in enumerate(checks) if c is None or (seg.streaming and name in c)
                ]
                if not which:
                    continue
                held = holders[name].intersection(which)
            group = seen_by(seg.spec.merge_policy)
            qualified = evaluate_many(seg, group, which, self.now, memo)
            for i in sorted(qualified | held):
                joins = i in qualified
                if not self._settle(todo[i][0], ps[i], seg, joins):
                    continue
                if joins:  # the segments after it see it (inSegment)
                    member_of[i].add(name)
                    holders[name].add(i)
                else:
                    member_of[i].discard(name)
                    holders[name].discard(i)
            if seg.streaming and seg.reads.uses_events:
                facts = group.facts
                for i in which:
                    # without events time changes nothing: only a timer held goes
                    if facts[i].events or name in ps[i].timers:
                        self._time(todo[i][0], ps[i], seg, group, i, now_in=i in qualified)

    def _settle(self, pid: str, p: _Profile, seg: CompiledSegment, qualifies: bool) -> bool:
        """What the result does to the profile's membership (`membership.step`); whether
        the membership changed."""
        name = seg.name
        batch = p.job_id is not None
        status, since = p.memberships.get(name, (None, self.now))
        method = "batch" if batch else "streaming"
        t = step(status, qualifies, batch=batch)
        if t is not None:
            if t.changed:
                self._set(pid, p, name, t.status, method)
            else:
                self.store.put_membership(
                    self.w,
                    pid,
                    name,
                    t.status,
                    since=since,
                    last_qualified=self.now,
                    method=method,
                    now=self.now,
                )
        if p.job_id is not None:
            c = self.counts[p.job_id][name]
            if qualifies:
                c["members"] += 1
                if t is not None and t.changed:
                    c["realized"] += 1
            elif t is not None and t.changed:
                c["exited"] += 1
        return t is not None and t.changed

    def _time(
        self, pid: str, p: _Profile, seg: CompiledSegment, group: Group, i: int, *, now_in: bool
    ) -> None:
        """The profile's timer for `seg`: when time alone may change its result (`now_in`:
        its result now). Without events, time alone changes nothing; write only what
        differs from the timers the profile has (a batch job reaches every profile)."""
        due = (
            next_change_of(group.evaluation(i), seg.node, self.now, now_in)
            if group.facts[i].events
            else None
        )
        held = p.timers.get(seg.name)
        if due is None:
            if held is not None:
                self.store.drop_timer(self.w, pid, seg.name)
        elif due != held:
            self.store.put_timer(self.w, pid, seg.name, due)
            self.timer_set = True

    def _set(self, pid: str, p: _Profile, segment: str, status: str, method: str) -> None:
        """A membership changes: written, and announced on `cdp.membership.<segment>`."""
        now = self.now
        self.store.put_membership(
            self.w,
            pid,
            segment,
            status,
            since=now,
            last_qualified=now if status == "realized" else None,
            method=method,
            now=now,
        )
        p.memberships[segment] = (status, now)
        event = MembershipEvent(
            profile_id=pid,
            segment=segment,
            status=status,
            at=now,
            method=method,
            identities=p.identities,
        )
        self.step.emit(subjects.membership(segment), json_encoder.encode(event))
        self.members.add(self.part(pid), MembershipChange(event))

    # -- the rest ---------------------------------------------------------------------------
    def persist(self) -> None:
        """The rest of the step's outcome, once per table (the events were written in item
        order already): folded profiles leave, views are written, memberships and timers
        of profiles that are gone now are not."""
        tx = self.step.tx
        gone = self.gone
        for pid in self.folded:
            self.store.drop_profile(tx, pid)
        for pid, p in self.profiles.items():
            if p.changed_at is not None and pid not in gone:
                self.store.put_facts(
                    tx,
                    pid,
                    attributes=p.attributes,
                    identities=p.identities,
                    views=p.views,
                    at=p.changed_at,
                )
        for pid, p in sorted(self.profiles.items()):
            if p.capped and pid not in gone:
                self.store.cap_events(tx, pid, MAX_EVENTS_PER_PROFILE)
        for sql, rows in self.w.rows.items():
            tx.add_many(sql, [r for r in rows if r[0] not in gone])


class Handlers:
    """The actor's steps, on the service's store and catalog."""

    def __init__(
        self,
        store: SegmentationStore,
        catalog: Catalog,
        *,
        partitions: int,
        timer_set: Callable[[], None] = lambda: None,
        job_step_profiles: int = jobs.STEP_PROFILES,
    ) -> None:
        self.store = store
        self.job_step_profiles = job_step_profiles
        self.catalog = catalog
        self.partitions = partitions
        self.timer_set = timer_set
        self.log = structlog.get_logger(service=SERVICE)

    async def changes(self, step: Step) -> None:
        """Load every profile the items name (a query per table), apply the items in order
        in memory (changes, merges, deletes, rechecks: a job's profiles up to the step's
        share, the rest deferred) with the writes to events in the same order, evaluate what
        they may affect, and write the rest once per table."""
        items = [i for d in step.deliveries for i in change_batch_decoder.decode(d.data).items]
        # A job's profiles beyond the step's share go back to the stream, evaluated later.
        items, left_over = jobs.bounded(items, self.job_step_profiles)
        if left_over:
            jobs.defer(step, left_over, partitions=self.partitions)
        now = time.time()
        catalog = self.catalog.snapshot()
        s = _ChangesStep(
            step,
            self.store,
            catalog,
            await self._load(items, catalog, now),
            now,
            partitions=self.partitions,
        )
        probes: list[Probe] = []
        for item in items:
            match item:
                case ProfileChanged():
                    s.changed(item)
                case ProfileMerged():
                    s.merged(item)
                case ProfileDeleted():
                    await s.deleted_profiles(item)
                case Recheck():
                    s.recheck(item)
                case Probe():
                    probes.append(item)
        s.announce_moves()
        s.evaluate()
        if s.timer_set:
            step.after_commit(self.timer_set)
        if s.job_scanned or s.counts:
            # The job's clock: its end is when this step's evaluation is over.
            await jobs.record_progress(step, self.store, s.job_scanned, s.counts, time.time())
        s.persist()
        for probe in probes:
            step.emit(subjects.MEMBERSHIP_PROBE, json_encoder.encode(probe))
            if 0 <= probe.partition < self.partitions:
                s.members.add(probe.partition, probe)
            else:  # not one partition's copy: behind everything of the step
                s.members.add_across(0, range(self.partitions), probe)
            report_probe(step, probe, SERVICE)
        for subject, payload in s.members.messages():
            step.emit(subject, payload)

    async def _load(
        self, items: list[ChangeItem], catalog: Catalog, now: float
    ) -> dict[str, _Profile]:
        """Every profile the items name, as stored: the view (unless a change of the step
        carries it), the events (within the streaming horizon, or all of them when a batch
        job is in the step), memberships and timers. One query per table."""
        profiles: dict[str, _Profile] = defaultdict(_Profile)
        carried: set[str] = set()
        job = False
        for item in items:
            match item:
                case ProfileChanged():
                    profiles[item.profile_id]  # creates it
                    if not item.same_view:
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
        store = self.store
        missing = [pid for pid in profiles if pid not in carried]
        if missing:
            for f in await store.facts(missing, views=catalog.policies_used):
                p = profiles[f.profile_id]
                p.known = True
                p.attributes = f.attributes
                p.identities = f.identities
                p.views = f.views
        since = None if job else now - STREAMING_HORIZON_S - 60.0
        for pid, event in await store.events(profiles, since):
            profiles[pid].events[event.record_id] = event
        for m in await store.memberships(profiles):
            profiles[m.profile_id].memberships[m.segment] = (m.status, m.since)
        for t in await store.timers(profiles):
            profiles[t.profile_id].timers[t.segment] = t.due
        return profiles

    async def policies(self, step: Step) -> None:
        """Merge policies as profile publishes them: their names are known from now on."""
        now = time.time()
        for d, policy in published(step.deliveries, "merge_policy", _policy_decoder, self.log):
            self.store.put_policy(step.tx, policy.name, d.data, now)

    async def job_requests(self, step: Step) -> None:
        """Start the batch jobs asked for, each job id once."""
        started: dict[str, JobInfo] = {}
        for d in step.deliveries:
            try:
                request = _job_decoder.decode(d.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.log.warning("undecodable job request", subject=d.subject)
                continue
            info = await jobs.start(
                step,
                self.store,
                request,
                partitions=self.partitions,
                now=time.time(),
                earlier=started,
            )
            if info is not None:
                started[info.job_id] = info

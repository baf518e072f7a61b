"""The profile actor's rules, without I/O: a fetch's items applied in order, in memory.

The handler loads what the items touch (`Loaded`: the attribute rows and identities of
every profile they name, the survivors of folded ids, the stored events anchored on
identities that move, the records a privacy delete reaches), `apply_items` decides and
returns `Effects`, and the handler persists them (the store) and publishes the messages.

Rules kept here:

- Attributes belong to the profile a record was attributed to; on a merge they fold into
  the survivor (per dataset and path the newest wins); after a split or a move they stay.
- An experience event sits on the profile that holds its anchor identity (the record's
  highest-ranked identity, decided by the identity service) and follows it: a shared
  device's anonymous events go to whoever authenticated on it last, while an event that
  carries a person identity is anchored on it and stays with that person. If the graph
  size limit drops the anchor, the event stays where it is (its anchor is cleared).
- A privacy delete removes the deleted profiles and every record carrying one of the
  person's identities, wherever it sits.

Writes to stored data that depend on order (moving events by profile or by anchor,
deletes) are `Effects.ordered`, in item order; the new state (attribute rows, identities,
profiles, new events) is written once, after them. What segmentation needs comes out in
causal order on the profile's partition (`PartitionedOutput`): a merge behind every
earlier change of both profiles, then one change per profile touched, then the probes.

Invariant: a fetch applied at once stores what its items applied one fetch each store
(fold chains and the carried index compared as followed to their survivors); the batch is
only the fast path (tests/test_profile_handlers.py holds it with a property test).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from services.profile.merge import (
    AttributeValue,
    changed_paths,
    fold_rows,
    fragment_updates,
    merge_flat,
    record_time,
    unflatten,
)
from shared import subjects
from shared.messages import (
    Awaits,
    ChangeEnvelope,
    ChangeItem,
    Deleted,
    ExperienceEvent,
    Fragment,
    Handoff,
    HandOver,
    Identity,
    Merged,
    PrivacyDelete,
    Probe,
    ProfileChanged,
    ProfileDeleted,
    ProfileItem,
    ProfileMerged,
    Reassigned,
    Sweep,
    fold_key,
    move_key,
    msgpack_encoder,
)
from shared.resources import MergePolicy
from shared.runtime.partitioned import PartitionedOutput

MAX_EVENTS_PER_PROFILE = 5000
_keys_encoder = msgspec.json.Encoder()
_keys_decoder = msgspec.json.Decoder(list[str])
_value_decoder = msgspec.msgpack.Decoder()
IdentityKey = tuple[str, str]
"""(namespace, value)"""


def key_text(ident: IdentityKey) -> str:
    return f"{ident[0]}:{ident[1]}"


def follow(redirect: dict[str, str], profile_id: str) -> str:
    """The profile `profile_id` was folded into, chains followed: the survivor."""
    seen = 0
    while profile_id in redirect and seen < 64:
        profile_id = redirect[profile_id]
        seen += 1
    return profile_id


def _encode_changes(items: list[ChangeItem]) -> bytes:
    return msgpack_encoder.encode(ChangeEnvelope(items))


@dataclass(frozen=True)
class MoveEvents:
    """Every stored event of `folded` goes to `survivor` (a merge)."""

    survivor: str
    folded: str


@dataclass(frozen=True)
class MoveAnchored:
    """Every stored event anchored on `anchor` goes to `target` (the identity moved)."""

    target: str
    anchor: str


@dataclass(frozen=True)
class PinAnchored:
    """The events anchored on `anchor` stay where they are (the size limit dropped it),
    indexed by it so that a delete of that identity still reaches them."""

    anchor: str


@dataclass(frozen=True)
class Forget:
    """A privacy delete: these profiles (and every profile folded into them), the stored
    events `events`, and the index rows of `persons`."""

    profile_ids: list[str]
    events: list[str]
    persons: list[str]


Write = MoveEvents | MoveAnchored | PinAnchored | Forget
"""A write to stored data whose place among the others matters."""


class EventRow(NamedTuple):
    """A new event, as stored."""

    record_id: str
    profile_id: str
    dataset: str
    event_type: str | None
    ts: float
    identity_keys: bytes
    """JSON list of the record's identities, `<namespace>:<value>`."""
    payload: bytes
    """msgpack"""
    anchor: str | None


@dataclass(frozen=True)
class Forgotten:
    """What a privacy delete removed here, for its report."""

    request: PrivacyDelete
    profile_ids: list[str]
    removed: dict[str, int]


@dataclass
class Effects:
    """What a fetch's items do: the writes, in the order they are made, and the messages.

    `ordered` comes first, in item order; then the new state: folds (`folds`, whose
    attributes and memberships go), profile rows, attribute rows dropped and written,
    identities dropped and written, new events, the carried index, the event caps."""

    now: float
    ordered: list[Write] = field(default_factory=list)
    folds: list[tuple[str, str, float]] = field(default_factory=list)
    """(folded profile, survivor, creation time if the row is new): its attributes and
    memberships go (segmentation evaluates the survivor again)."""
    profiles: list[tuple[str, float]] = field(default_factory=list)
    """(live profile touched, its creation time); its update time is `now`."""
    dropped_rows: list[tuple[str, str, str]] = field(default_factory=list)
    """(profile, dataset, path)"""
    rows: list[tuple[str, AttributeValue]] = field(default_factory=list)
    """(profile, row): the attribute rows this fetch made or moved (the others are stored)."""
    dropped_identities: list[IdentityKey] = field(default_factory=list)
    identities: list[tuple[str, str, str]] = field(default_factory=list)
    """(namespace, value, profile)"""
    events: list[EventRow] = field(default_factory=list)
    carried: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(person key, record id, profile, "event" or "profile")"""
    capped: list[str] = field(default_factory=list)
    """Profiles that received events: at most `MAX_EVENTS_PER_PROFILE` are kept."""
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    """(subject, payload) for segmentation, in causal order per partition, probes last."""
    forgotten: list[Forgotten] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    decided: set[str] = field(default_factory=set)
    """Record ids of the events this fetch placed (several instances only)."""
    outgoing: dict[str, Outgoing] = field(default_factory=dict)
    """Profile of another partition -> what this fetch hands over to it (several
    instances, each holding some partitions): it is removed here."""


@dataclass
class Outgoing:
    """State that ends on a profile of another partition, handed to that partition's owner.
    `sources` are the profiles of this partition folded into it (their stored events and
    carried rows go along); `keys` the `Awaits` it answers."""

    keys: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    rows: list[AttributeValue] = field(default_factory=list)
    identities: list[IdentityKey] = field(default_factory=list)
    events: list[tuple[EventRow, bool]] = field(default_factory=list)
    """(the event, whether segmentation has yet to see it on the profile)"""
    carried: list[tuple[str, str, str]] = field(default_factory=list)


def apply_items(
    loaded: Loaded,
    items: Iterable[ProfileItem],
    *,
    policy: MergePolicy,
    others: Sequence[MergePolicy] = (),
    partitions: int,
    now: float | None = None,
    local: Callable[[str], bool] | None = None,
    handed: Mapping[str, Handoff | None] | None = None,
) -> Effects:
    """Apply a fetch's `items` in order to the state they touch (`loaded`, which this
    takes over): the writes and messages that make it so. `policy` is the default merge
    policy, `others` the other policies whose views segmentation receives.

    With `local` (this store holds some partitions only: whether a profile is in them),
    a merge folds only this store's profiles, `HandOver` folds one, state that ends on a
    profile of another partition leaves in `Effects.outgoing`, and `Awaits` applies the
    state handed over (`handed`, by key; None: applied already). Without it (one store
    holds every profile), `HandOver` and `Awaits` are ignored."""
    return _Apply(
        loaded,
        policy=policy,
        others=others,
        partitions=partitions,
        now=now,
        local=local,
        handed=handed or {},
    ).run(items)


@dataclass
class StoredEvent:
    """An event already stored, that this fetch may move or remove."""

    profile_id: str
    anchor: str | None
    event: ExperienceEvent


@dataclass
class Loaded:
    """What a fetch's items touch, as stored before it."""

    redirect: dict[str, str] = field(default_factory=dict)
    """Folded profile id -> the profile it was folded into."""
    known: set[str] = field(default_factory=set)
    """Live profile ids that have a row (folded ones excluded)."""
    rows: dict[str, dict[tuple[str, str], AttributeValue]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    identities: dict[str, set[IdentityKey]] = field(default_factory=lambda: defaultdict(set))
    anchored: dict[str, list[StoredEvent]] = field(default_factory=lambda: defaultdict(list))
    """Anchor key -> stored events anchored on it (for the keys that move in the fetch)."""
    events: dict[str, StoredEvent] = field(default_factory=dict)
    """Record id -> stored event, for the events a privacy delete reaches."""
    carried: dict[str, list[tuple[str, str, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    """Person key -> (record id, "event" or "profile", profile id it was put on) of the
    stored records that carry it without being anchored on it."""
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Deleted profile id -> table -> stored rows (for the privacy report)."""


class _Event:
    """An event the fetch inserts, moves or removes: where it started, where it is now."""

    __slots__ = ("anchor", "announce", "event", "gone", "keys", "loc", "new", "start")

    def __init__(
        self,
        event: ExperienceEvent,
        loc: str,
        anchor: str | None,
        *,
        new: bool,
        keys: list[str] | None = None,
    ) -> None:
        self.event = event
        self.loc = loc
        self.start = loc
        self.anchor = anchor
        self.new = new
        self.keys = keys or []
        self.gone = False
        self.announce = True


class _Apply:
    """One fetch's items applied in order; `run` returns the `Effects`."""

    def __init__(
        self,
        loaded: Loaded,
        *,
        policy: MergePolicy,
        others: Sequence[MergePolicy],
        partitions: int,
        now: float | None = None,
        local: Callable[[str], bool] | None = None,
        handed: Mapping[str, Handoff | None] | None = None,
    ) -> None:
        self.local = local
        self.handed = handed or {}
        self.far_keys: dict[str, list[str]] = defaultdict(list)
        """Profile of another partition -> the handoff keys of this fetch's folds and moves
        into it."""
        self.far_sources: dict[str, list[str]] = defaultdict(list)
        self.loaded = loaded
        self.policy = policy
        self.others = list(others)
        self.partitions = partitions
        self.now = time.time() if now is None else now
        self.effects = Effects(self.now)
        self.ordered = self.effects.ordered
        self.out: PartitionedOutput[ChangeItem] = PartitionedOutput(
            subjects.changes, _encode_changes, partitions
        )
        self.probes = self.effects.probes
        self.redirect = dict(loaded.redirect)
        self.live = set(loaded.known)
        self.created: dict[str, float] = {}
        self.rows = loaded.rows
        self.stored = {pid: dict(rows) for pid, rows in self.rows.items() if rows}
        """The attribute rows as loaded: a row still there, the same, is not written again."""
        self.identities = loaded.identities
        self.reviewed: set[str] = set()
        """Profiles whose view (attributes under any policy, identities) this fetch may have
        changed: made, given attribute records or identities, merged into, reassigned from
        or to, or stripped of a deleted person's records. The others' changes carry their
        events only (`ProfileChanged.same_view`)."""
        self.touched: dict[str, list[str]] = {}
        """Profile -> the record ids this fetch gave it."""
        self.holder: dict[IdentityKey, str | None] = {}
        """Identities whose profile changed in this fetch -> the profile (None: dropped)."""
        self.dropped_rows: set[tuple[str, str, str]] = set()
        self.folded: dict[str, str] = {}
        self.absorbed: dict[str, list[str]] = defaultdict(list)
        """Survivor -> the profiles folded into it by this fetch."""
        self.deleted: set[str] = set()
        self.events: dict[str, _Event] = {}
        """Record id -> the events this fetch inserts or may move or remove."""
        self.by_anchor: dict[str, list[_Event]] = defaultdict(list)
        self.carried: list[tuple[str, str, str, str]] = []
        """(person key, record id, profile id, kind) of this fetch's records."""
        for stored in (*loaded.events.values(), *(e for v in loaded.anchored.values() for e in v)):
            rid = stored.event.record_id
            if rid in self.events:
                continue
            ev = _Event(stored.event, self.resolve(stored.profile_id), stored.anchor, new=False)
            self.events[rid] = ev
            if stored.anchor is not None:
                self.by_anchor[stored.anchor].append(ev)

    # -- helpers -------------------------------------------------------------------------
    def resolve(self, profile_id: str) -> str:
        return follow(self.redirect, profile_id)

    def _part(self, profile_id: str) -> int:
        return subjects.partition_of(profile_id, self.partitions)

    def _far(self, pid: str) -> bool:
        """Whether `pid` sits on a partition this store does not hold."""
        return self.local is not None and not self.local(pid)

    def _touch(self, pid: str) -> list[str]:
        return self.touched.setdefault(pid, [])

    def _ensure(self, pid: str, at: float) -> None:
        if pid not in self.live:
            self.reviewed.add(pid)
            self.live.add(pid)
            self.created.setdefault(pid, at)

    # -- the step ------------------------------------------------------------------------
    def run(self, items: Iterable[ProfileItem]) -> Effects:
        for item in items:
            match item:
                case Fragment():
                    self._fragment(item)
                case Merged():
                    self._merge(item)
                case Reassigned():
                    self._reassign(item)
                case Deleted():
                    self._delete(item)
                case Probe():
                    self.probes.append(item)
                case Sweep():
                    if self.local is not None:
                        self._delete(
                            Deleted(item.profile_ids, item.request, item.person_keys),
                            announce=False,
                        )
                case HandOver():
                    if self.local is not None:
                        self._merge(Merged(item.profile_id, [item.source], item.at))
                case Awaits():
                    if self.local is not None:
                        handoff = self.handed.get(item.key)
                        if handoff is not None:
                            self._receive(handoff)
        self._finish()
        self.effects.messages = self.out.messages()
        return self.effects

    def _fragment(self, item: Fragment) -> None:
        r = item.record
        pid = self.resolve(item.profile_id)
        if pid in self.deleted:  # never in order; a deleted profile does not come back
            return
        self._ensure(pid, r.ingested_at)
        held = self.identities[pid]
        unlinked = set(item.unlinked)
        for ident in r.identities:
            pair = (ident.namespace, ident.value)
            if pair not in held and key_text(pair) not in unlinked:
                held.add(pair)
                self.holder[pair] = pid
                self.reviewed.add(pid)
        self._touch(pid).append(r.record_id)
        kind = "event" if r.record_class == "event" else "profile"
        # An event follows its anchor, so a delete of its anchor's person finds it there;
        # a profile record's attributes stay when their anchor splits off: indexed too.
        self.carried += [
            (person, r.record_id, pid, kind)
            for person in item.persons
            if kind == "profile" or person != item.anchor
        ]
        if r.record_class == "event":
            ev = _Event(
                ExperienceEvent(
                    record_id=r.record_id,
                    dataset=r.dataset,
                    event_type=r.event_type,
                    timestamp=r.timestamp if r.timestamp is not None else r.ingested_at,
                    payload=r.payload,
                ),
                pid,
                item.anchor,
                new=True,
                keys=[f"{i.namespace}:{i.value}" for i in r.identities],
            )
            self.events[r.record_id] = ev
            if item.anchor is not None:
                self.by_anchor[item.anchor].append(ev)
            return
        self.reviewed.add(pid)
        rows = self.rows[pid]
        for row in fragment_updates(rows, r.dataset, r.payload, record_time(r), r.record_id):
            rows[(row.dataset, row.path)] = row
            self.dropped_rows.discard((pid, row.dataset, row.path))

    def _merge(self, item: Merged) -> None:
        survivor = self.resolve(item.profile_id)
        folded_now: list[str] = []
        for raw in item.folded:
            folded = self.resolve(raw)
            if folded == survivor or folded in self.deleted:
                continue
            if self._far(folded):  # its own partition folds it (`HandOver`)
                continue
            if self._far(survivor):
                self.far_keys[survivor].append(fold_key(raw))
                self.far_sources[survivor].append(folded)
            folded_now.append(folded)
            self._ensure(survivor, item.at)
            merged = fold_rows(
                [*self.rows.get(survivor, {}).values(), *self.rows.pop(folded, {}).values()]
            )
            self.rows[survivor] = dict(merged)
            self.dropped_rows = {d for d in self.dropped_rows if d[0] != folded}
            for pair in self.identities.pop(folded, set()):
                self.identities[survivor].add(pair)
                self.holder[pair] = survivor
            self.redirect[folded] = survivor
            self.folded[folded] = survivor
            self.live.discard(folded)
            self.reviewed.add(survivor)
            # What the folded profile received in this fetch reaches segmentation on the
            # survivor: its records and events are the survivor's now.
            self._touch(survivor).extend(self.touched.pop(folded, []))
            self.absorbed[survivor] += [folded, *self.absorbed.pop(folded, [])]
            self.ordered.append(MoveEvents(survivor, folded))
        if folded_now:
            parts = [self._part(f) for f in folded_now]
            self.out.add_across(
                parts[0],
                [self._part(survivor), *parts],
                ProfileMerged(survivor, folded_now, item.at),
            )

    def _reassign(self, item: Reassigned) -> None:
        source = self.resolve(item.profile_id)
        moved = {(i.namespace, i.value) for i in item.identities}
        self.identities[source] -= moved
        self._touch(source)
        self.reviewed.add(source)
        if item.to_profile is None:  # dropped by the size limit: their events stay
            for pair in moved:
                self.holder[pair] = None
                key = key_text(pair)
                for ev in self.by_anchor.pop(key, []):
                    ev.anchor = None
                    if ev.new:  # a delete of the dropped identity still reaches it
                        self.carried.append((key, ev.event.record_id, ev.loc, "event"))
                self.ordered.append(PinAnchored(key))
            return
        target = self.resolve(item.to_profile)
        if self._far(target):
            keys = [key_text(pair) for pair in moved]
            self.far_keys[target].append(move_key(item.profile_id, item.to_profile, keys, item.at))
        self._ensure(target, item.at)
        self._touch(target)
        self.reviewed.add(target)
        for pair in moved:
            self.identities[target].add(pair)
            self.holder[pair] = target
            key = key_text(pair)
            for ev in self.by_anchor.get(key, ()):
                ev.loc = target
            self.ordered.append(MoveAnchored(target, key))

    def _receive(self, handoff: Handoff) -> None:
        """State handed over from another partition's owner: folded into its profile."""
        target = self.resolve(handoff.profile_id)
        if target in self.deleted:
            return
        self._ensure(target, self.now)
        self._touch(target)
        self.reviewed.add(target)
        handed_rows = [
            AttributeValue(r.dataset, r.path, _value_decoder.decode(r.value), r.ts, r.record_id)
            for r in handoff.rows
        ]
        self.rows[target] = dict(fold_rows([*self.rows.get(target, {}).values(), *handed_rows]))
        for ident in handoff.identities:
            pair = (ident.namespace, ident.value)
            self.identities[target].add(pair)
            self.holder[pair] = target
        for e in handoff.events:
            if e.record_id in self.events:
                continue
            ev = _Event(
                ExperienceEvent(
                    record_id=e.record_id,
                    dataset=e.dataset,
                    event_type=e.event_type,
                    timestamp=e.ts,
                    payload=_value_decoder.decode(e.payload),
                ),
                target,
                e.anchor,
                new=True,
                keys=_keys_decoder.decode(e.identity_keys),
            )
            ev.announce = e.announce
            self.events[e.record_id] = ev
            if e.anchor is not None:
                self.by_anchor[e.anchor].append(ev)
        self.carried += [(key, rid, target, kind) for key, rid, kind in handoff.carried]
        self.absorbed[target] += handoff.sources

    def _delete(self, item: Deleted, *, announce: bool = True) -> None:
        """A privacy delete; `announce`: the delete's own partition (or every partition in
        one store), which tells segmentation and reports; a `Sweep` does neither."""
        named = sorted({self.resolve(p) for p in item.profile_ids})
        pids = [p for p in named if not self._far(p)] if self.local is not None else named
        gone_pids = set(pids)
        counts: dict[str, int] = defaultdict(int)
        for pid in pids:
            for table, n in self.loaded.counts.get(pid, {}).items():
                counts[table] += n
        persons = set(item.person_keys)
        # Records that carry one of the person's identities, wherever they sit: stored
        # ones (`carried`) and this fetch's, before this point.
        swept: set[str] = set()
        swept_rows: set[tuple[str, str]] = set()  # (profile, record id) of profile records
        for key in persons:
            for rid, kind, pid in self.loaded.carried.get(key, ()):
                if kind == "event":
                    swept.add(rid)
                else:
                    swept_rows.add((self.resolve(pid), rid))
        for key, rid, pid, kind in self.carried:
            if key in persons:
                if kind == "event":
                    swept.add(rid)
                else:
                    swept_rows.add((self.resolve(pid), rid))
        for rid, ev in self.events.items():
            if ev.gone:
                continue
            where = self.resolve(ev.loc)
            if where in gone_pids:
                ev.gone = True
            elif rid in swept:
                ev.gone = True
                counts["events"] += 1
        for pid, rid in swept_rows:
            if pid in gone_pids:
                continue
            rows = self.rows.get(pid, {})
            for k, row in list(rows.items()):
                if row.record_id == rid:
                    del rows[k]
                    self.dropped_rows.add((pid, row.dataset, row.path))
                    counts["attributes"] += 1
                    self._touch(pid)
                    self.reviewed.add(pid)
        for pid in pids:
            for pair in self.identities.pop(pid, set()):
                self.holder[pair] = None
            self.rows.pop(pid, None)
            self.touched.pop(pid, None)
            self.live.discard(pid)
            self.deleted.add(pid)
        self.dropped_rows = {d for d in self.dropped_rows if d[0] not in gone_pids}
        self.carried = [c for c in self.carried if c[1] not in swept and c[0] not in persons]
        # Profiles folded into the deleted ones in this fetch go with them (their fold is
        # not written); stored ones are found by their folded_into chains.
        folded_now = sorted(f for f in self.folded if self.resolve(f) in gone_pids)
        for f in folded_now:
            del self.folded[f]
        # Stored data, in order.
        self.ordered.append(Forget([*pids, *folded_now], sorted(swept), sorted(persons)))
        if not announce:
            return
        part = self._part(named[0]) if named else 0
        self.out.add_across(part, range(self.partitions), ProfileDeleted(named, item.request))
        self.effects.forgotten.append(Forgotten(item.request, named, dict(counts)))

    # -- the end of the fetch ----------------------------------------------------------
    def _finish(self) -> None:
        now = self.now
        split = self.local is not None  # some partitions only: state may leave (`outgoing`)
        # Where each event ends: new ones are inserted there; stored ones that moved or
        # went reach segmentation as removed from where it has them, added where they are.
        added: dict[str, list[ExperienceEvent]] = defaultdict(list)
        removed: dict[str, list[str]] = defaultdict(list)
        new_rows: list[EventRow] = []
        for ev in self.events.values():
            start, end = self.resolve(ev.start), self.resolve(ev.loc)
            if ev.new:
                if ev.gone or end in self.deleted:
                    continue
                e = ev.event
                row = EventRow(
                    e.record_id,
                    end,
                    e.dataset,
                    e.event_type,
                    e.timestamp,
                    _keys_encoder.encode(ev.keys),
                    msgpack_encoder.encode(e.payload),
                    ev.anchor,
                )
                if split and self._far(end):
                    self._outgoing(end).events.append((row, ev.announce))
                    continue
                new_rows.append(row)
                if ev.announce:
                    added[end].append(e)
                self._touch(end)
                continue
            if ev.gone:
                if start not in self.deleted:
                    removed[start].append(ev.event.record_id)
                    self._touch(start)
                continue
            if self._far(end) and end not in self.deleted:
                e = ev.event
                row = EventRow(
                    e.record_id,
                    end,
                    e.dataset,
                    e.event_type,
                    e.timestamp,
                    _keys_encoder.encode(ev.keys),
                    msgpack_encoder.encode(e.payload),
                    ev.anchor,
                )
                self._outgoing(end).events.append((row, start != end))
                if start != end and start not in self.deleted:
                    removed[start].append(e.record_id)
                    self._touch(start)
                continue
            if start == end or end in self.deleted:
                continue
            added[end].append(ev.event)
            self._touch(end)
            if start not in self.deleted:
                removed[start].append(ev.event.record_id)
                self._touch(start)
        # The new state, once per table.
        fx = self.effects
        # A profile folded in the fetch that made it keeps a row too: its id still answers.
        fx.folds = [(f, self.resolve(f), self.created.get(f, now)) for f in self.folded]
        live_touched = [
            pid for pid in self.touched if pid in self.live and not (split and self._far(pid))
        ]
        if self.local is not None:
            self._hand_over()
            fx.decided = set(self.events)
        fx.profiles = [(pid, self.created.get(pid, now)) for pid in live_touched]
        fx.dropped_rows = sorted(d for d in self.dropped_rows if d[0] in self.live)
        for live in live_touched:
            held = self.rows.get(live)
            if not held:
                continue
            stored = self.stored.get(live)
            if stored is None:  # a profile new to the store: every row
                fx.rows.extend((live, row) for row in held.values())
            else:
                fx.rows.extend((live, row) for k, row in held.items() if stored.get(k) is not row)
        for pair, pid in self.holder.items():
            final = self.resolve(pid) if pid is not None else None
            if final is None or final in self.deleted or (split and self._far(final)):
                fx.dropped_identities.append(pair)
            else:
                fx.identities.append((pair[0], pair[1], final))
        fx.events = new_rows
        fx.carried = [
            (key, rid, self.resolve(pid), kind)
            for key, rid, pid, kind in self.carried
            if self.resolve(pid) not in self.deleted
        ]
        if split:
            kept = []
            for key, rid, end, kind in fx.carried:
                if self._far(end):
                    self._outgoing(end).carried.append((key, rid, kind))
                else:
                    kept.append((key, rid, end, kind))
            fx.carried = kept
        fx.capped = list(added)
        # What segmentation needs: one change per live profile touched (more if the events
        # it carries are many: a device that moves takes all its events along), then the
        # probes.
        sizes = {row.record_id: len(row.payload) for row in new_rows}
        for pid in live_touched:
            first = self._change(pid, sorted(set(removed.get(pid, []))))
            events = sorted(added.get(pid, []), key=lambda e: (e.timestamp, e.record_id))
            for i, part in enumerate(_by_size(events, sizes)):
                change = (
                    first
                    if i == 0
                    else ProfileChanged(
                        pid,
                        [],
                        now,
                        attributes=first.attributes,
                        identities=first.identities,
                        views=first.views,
                        same_view=first.same_view,
                    )
                )
                change.events = part
                self.out.add(self._part(pid), change)
        for probe in self.probes:
            self.out.add(probe.partition % self.partitions, probe)

    def _outgoing(self, pid: str) -> Outgoing:
        out = self.effects.outgoing.get(pid)
        if out is None:
            out = self.effects.outgoing[pid] = Outgoing()
        return out

    def _hand_over(self) -> None:
        """What ends on profiles of other partitions: their attribute rows and identities
        (the events and carried rows are gathered where they are decided)."""
        far = {
            pid
            for pid in (*self.far_keys, *self.rows, *self.identities)
            if self._far(pid) and pid not in self.deleted
        }
        for pid in sorted(far):
            rows = list(self.rows.get(pid, {}).values())
            identities = sorted(self.identities.get(pid, ()))
            if not (rows or identities or pid in self.far_keys):
                continue
            out = self._outgoing(pid)
            out.keys += self.far_keys.get(pid, [])
            out.sources += self.far_sources.get(pid, [])
            out.rows += rows
            out.identities += identities

    def _change(self, pid: str, removed_events: list[str]) -> ProfileChanged:
        """The profile's change for segmentation (its events are added by the caller): its
        whole view when this fetch may have changed it, else only that the view is the
        same (no merge, no attributes to encode or decode, no view to write again)."""
        if pid not in self.reviewed:
            return ProfileChanged(
                pid, self.touched[pid], self.now, removed_events=removed_events, same_view=True
            )
        rows = self.rows.get(pid, {})
        winners = merge_flat(rows.values(), self.policy)
        after = _flat_values(winners)
        before = _flat_values(merge_flat(self.stored.get(pid, {}).values(), self.policy))
        return ProfileChanged(
            pid,
            self.touched[pid],
            self.now,
            attributes=unflatten(after),
            changed=changed_paths(before, after),
            identities=[Identity(ns, v) for ns, v in sorted(self.identities.get(pid, ()))],
            views=_views(rows.values(), winners, self.others),
            folded=self.absorbed.get(pid, []),
            removed_events=removed_events,
        )


CHANGE_EVENT_BYTES = 1024 * 1024
"""Most event payload bytes one change carries; more events go in further changes of the
same profile, so that every message stays under the payload limit."""


def _by_size(events: list[ExperienceEvent], sizes: dict[str, int]) -> list[list[ExperienceEvent]]:
    """`events` in order, in runs of at most `CHANGE_EVENT_BYTES` of payload (always one
    run, maybe empty, so that a change without events is still sent)."""
    runs: list[list[ExperienceEvent]] = [[]]
    held = 0
    for e in events:
        size = sizes.get(e.record_id)
        if size is None:
            size = len(msgpack_encoder.encode(e.payload))
        if runs[-1] and held + size > CHANGE_EVENT_BYTES:
            runs.append([])
            held = 0
        runs[-1].append(e)
        held += size
    return runs


def _views(
    rows: Collection[AttributeValue],
    winners: dict[str, tuple[Any, AttributeValue]],
    policies: Iterable[MergePolicy],
) -> dict[str, dict[str, Any]]:
    """The profile under each other merge policy whose winning rows are not those of the
    default policy (`winners`); a policy that picks the same rows is left out, and readers
    take the default attributes for it."""
    out: dict[str, dict[str, Any]] = {}
    if not rows:
        return out
    for policy in policies:
        flat = merge_flat(rows, policy)
        if flat.keys() == winners.keys() and all(
            row is winners[path][1] for path, (_, row) in flat.items()
        ):
            continue
        out[policy.name] = unflatten(_flat_values(flat))
    return out


def _flat_values(flat: dict[str, tuple[Any, AttributeValue]]) -> dict[str, Any]:
    return {path: value for path, (value, _) in flat.items()}

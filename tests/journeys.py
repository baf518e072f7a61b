"""Customer journeys: generated histories of records and privacy deletes, and a model of them.

A journey is what a few (or a few thousand) customers of the retail example do: CRM rows,
loyalty rows, web page views and logins, store orders, and now and then a privacy delete,
interleaved freely. `model(journey)` computes, in plain Python, the end state the platform
must reach: one person per identity graph, with its merged attributes, the stable ids of its
events and its segment memberships. It is the executable specification of the rules of
identity, profile, privacy delete and segmentation for these shapes, written from the rules
and not from the services' code, which it does not import.

- `journeys(prefix, now)`: a hypothesis strategy of small journeys (2 to 4 people);
  `big_journey(prefix, now, people, seed)`: a large one, deterministic.
- `model(journey)`, `coverage(journey)`, `differences(expected, actual)`.
- `runs(journey)`: the steps grouped for delivery as batch files.
- `rebase(journey, prefix)`: the same journey under another prefix.

Every identity value and stable id of a journey starts with its prefix (emails with the
prefix lower-cased), so that journeys can share one platform. Phone numbers cannot carry it:
each is derived from a hash of the prefix and the person (see `phone_of`).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import msgspec
from hypothesis import strategies as st

DAY = 86400
HOUR = 3600

# -- data types -----------------------------------------------------------------------------


class RecordStep(msgspec.Struct, frozen=True, tag="record"):
    """One record of a dataset, as a source sends it."""

    dataset: str
    payload: dict[str, Any]


class DeleteStep(msgspec.Struct, frozen=True, tag="delete"):
    """A privacy delete of the person holding `identity` ("namespace:value")."""

    identity: str


Step = RecordStep | DeleteStep


class Journey(msgspec.Struct, frozen=True):
    """Steps in delivery order. `prefix` starts every identity value and stable id; `now` is
    the epoch time the journey was generated for (event timestamps are relative to it)."""

    prefix: str
    steps: list[Step]
    now: float


class Person(msgspec.Struct, frozen=True):
    """One live identity graph: its identity keys ("namespace:normalised value"), merged
    attributes (nested, as a profile lookup shows them), the stable ids of the events on it
    and the segments it is a member of."""

    identities: frozenset[str]
    attributes: dict[str, Any]
    events: frozenset[str]
    segments: frozenset[str]


class ModelState(msgspec.Struct, frozen=True):
    """The end state of a journey: one person per live identity graph."""

    people: list[Person]

    def by_identities(self) -> dict[frozenset[str], Person]:
        return {p.identities: p for p in self.people}


# -- configuration of the retail example, as the model needs it ------------------------------


class Namespace(NamedTuple):
    type: str
    priority: int
    unique: bool


NAMESPACES: dict[str, Namespace] = {
    "crm_id": Namespace("person", 10, True),
    "loyalty_id": Namespace("person", 20, True),
    "email": Namespace("person", 30, False),
    "phone": Namespace("person", 40, False),
    "ecid": Namespace("cookie", 10, False),
}
TYPE_RANK = {"person": 0, "device": 1, "cookie": 2}
"""Person ranks highest, then device, then cookie."""

IDENTITY_FIELDS: dict[str, tuple[str, ...]] = {
    "crm": ("crm_id", "email", "phone"),
    "loyalty": ("loyalty_id", "crm_id"),
    "web": ("ecid", "email"),
    "store-orders": ("loyalty_id",),
}
"""Per dataset, its payload's identity fields in schema order (each field is named after its
namespace)."""

PROFILE_DATASETS = frozenset({"crm", "loyalty"})
EVENT_DATASETS = frozenset({"web", "store-orders"})
MAX_GRAPH = 50

SEGMENTS: dict[str, str] = {
    "gold": 'loyalty.tier = "gold"',
    "email-optin": 'consents.marketing.email = "y" and email exists',
    "viewed-today": 'event(type = "web.pageview") within 1 day',
    "recent-buyer": 'event(type = "commerce.purchase") within 7 days',
    "lapsed-browser": (
        'not event(type = "commerce.purchase") within 30 days'
        ' and event(type = "web.pageview") within 7 days'
    ),
    "optin-gold": 'inSegment("gold") and inSegment("email-optin")',
}
"""The segments of the equivalence test, in the platform's language. gold, email-optin,
viewed-today and optin-gold are streaming; recent-buyer and lapsed-browser batch."""


def normalise(namespace: str, value: str) -> str | None:
    """Emails trimmed and lower-cased; phones (E.164 already) and the rest trimmed."""
    text = value.strip()
    if namespace == "email":
        text = text.lower()
    return text or None


def identity_key(identity: str) -> str:
    """The key of "namespace:value" with its value normalised."""
    namespace, _, value = identity.partition(":")
    return f"{namespace}:{normalise(namespace, value) or ''}"


def _namespace(key: str) -> Namespace:
    return NAMESPACES[key.split(":", 1)[0]]


def _is_person(key: str) -> bool:
    return _namespace(key).type == "person"


def _rank(key: str) -> tuple[int, int]:
    ns = _namespace(key)
    return (TYPE_RANK[ns.type], ns.priority)


def record_keys(dataset: str, payload: Mapping[str, Any]) -> list[str]:
    """A record's identity keys sorted by (type rank, priority, position in the record); the
    first is its anchor."""
    keys: list[str] = []
    for name in IDENTITY_FIELDS[dataset]:
        value = payload.get(name)
        if isinstance(value, str) and (norm := normalise(name, value)) is not None:
            key = f"{name}:{norm}"
            if key not in keys:
                keys.append(key)
    return sorted(keys, key=_rank)  # stable: position breaks ties


def event_id(dataset: str, payload: Mapping[str, Any]) -> str:
    """The stable id of an event record: web "/j/<id>" in page.url, store orders
    commerce.order.id."""
    if dataset == "web":
        return str(payload["page"]["url"]).removeprefix("/j/")
    return str(payload["commerce"]["order"]["id"])


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(math.floor(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def flatten(payload: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted leaf path: value}: nested objects walked, lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for name, value in payload.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path in sorted(flat):
        *parents, leaf = path.split(".")
        node = root
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = flat[path]
    return root


def lookup(attributes: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path, None when missing."""
    node: Any = attributes
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


# -- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    """One attribute row of a profile: the value a dataset gave for a path."""

    value: Any
    time: float
    """The record time: its payload's updated_at."""
    order: int
    """The record's position in the journey (later records win ties)."""
    carried: frozenset[str]
    """The person identities of the record that gave it (a delete of one removes it)."""


@dataclass(frozen=True)
class _Event:
    id: str
    anchor: str
    carried: frozenset[str]
    type: str
    time: float


@dataclass(eq=False)
class _Profile:
    """One identity graph and its profile."""

    nodes: set[str] = field(default_factory=set)
    rows: dict[tuple[str, str], _Row] = field(default_factory=dict)
    """(dataset, path) -> the row stored for it."""
    merged_into: _Profile | None = None
    deleted: bool = False

    def live(self) -> _Profile | None:
        """Where this profile's rows are now (None: deleted)."""
        p = self
        while p.merged_into is not None:
            p = p.merged_into
        return None if p.deleted else p


def _newer(a: _Row, b: _Row) -> bool:
    return (a.time, a.order) > (b.time, b.order)


class _World:
    """The platform's state as the rules define it, one step at a time."""

    def __init__(self) -> None:
        self.profile_of: dict[str, _Profile] = {}
        """Identity key -> its graph."""
        self.adjacent: dict[str, set[str]] = defaultdict(set)
        self.first_seen: dict[str, int] = {}
        self.events: dict[str, _Event] = {}
        self.anchored: dict[str, set[str]] = defaultdict(set)
        """Identity key -> ids of the events anchored on it."""
        self.carrying: dict[str, set[str]] = defaultdict(set)
        """Person identity key -> ids of the events whose record carried it."""
        self.row_holders: dict[str, set[_Profile]] = defaultdict(set)
        """Person identity key -> profiles given rows by a record that carried it."""
        self.order = 0
        self.counts: Counter[str] = Counter()

    # -- steps --
    def apply(self, step: Step) -> None:
        self.order += 1
        if isinstance(step, DeleteStep):
            self.delete(step.identity)
            return
        keys = record_keys(step.dataset, step.payload)
        if not keys:
            return
        anchor = self.link(keys)
        carried = frozenset(k for k in keys if _is_person(k))
        if step.dataset in PROFILE_DATASETS:
            self.write(self.profile_of[anchor], step.dataset, step.payload, carried)
        else:
            self.add_event(step.dataset, step.payload, anchor, carried)

    # -- identity --
    def _new_node(self, key: str, profile: _Profile) -> None:
        profile.nodes.add(key)
        self.profile_of[key] = profile
        self.first_seen[key] = self.order

    def _unique(self, keys: Iterable[str]) -> dict[str, str]:
        return {k.split(":", 1)[0]: k for k in keys if _namespace(k).unique}

    def _connect(self, a: str, b: str) -> None:
        self.adjacent[a].add(b)
        self.adjacent[b].add(a)

    def link(self, keys: list[str]) -> str:
        """Link one record's identities (sorted, anchor first); return the anchor."""
        # 1. The first is the ANCHOR. If the anchor is not known, it starts a new pending
        # graph of its own.
        anchor = keys[0]
        pending = anchor not in self.profile_of
        if pending:
            self._new_node(anchor, _Profile())
        refused: set[str] = set()
        # 2. For each other identity X, in that order:
        for x in keys[1:]:
            mine = self.profile_of[anchor]
            theirs = self.profile_of.get(x)
            # a. If X is known and already in the anchor's graph: add the edge anchor-X.
            if theirs is mine:
                self._connect(anchor, x)
                continue
            # b. held = the unique-namespace identities of the anchor's graph; brought = those
            # of X's graph if X is known, else of {X} alone; clash = a namespace in both.
            # blocked = X's graph holds an identity refused earlier while linking this record.
            held = self._unique(mine.nodes)
            brought = self._unique(theirs.nodes if theirs is not None else [x])
            clash = held.keys() & brought.keys()
            blocked = theirs is not None and not theirs.nodes.isdisjoint(refused)
            ns = _namespace(x)
            # c. If no clash and not blocked: a new X joins the anchor's graph, a known X's
            # graph MERGES into it. Add the edge anchor-X.
            if not clash and not blocked:
                if theirs is None:
                    self._new_node(x, mine)
                else:
                    self._merge(mine, theirs)
                    if pending:  # the new graph takes over X's profile: no merge of two
                        pending = False
                    else:
                        self.counts["merges"] += 1
                self._connect(anchor, x)
                continue
            # d. Else, if X is known, its namespace is not a unique one already held, and X is
            # a device or cookie: MOVE X to the anchor's graph.
            own = ns.unique and x.split(":", 1)[0] in held
            if theirs is not None and not own and ns.type in ("device", "cookie"):
                self._move(x, anchor)
                continue
            # e. Else X is REFUSED: no edge; a new X becomes a graph of its own.
            refused.add(x)
            self.counts["refusals"] += 1
            if theirs is None:
                self._new_node(x, _Profile())
        # (The 50-identity limit is not modelled: generated journeys never reach it.)
        assert len(self.profile_of[anchor].nodes) <= MAX_GRAPH, "a graph outgrew the limit"
        return anchor

    def _merge(self, into: _Profile, other: _Profile) -> None:
        """One graph, all nodes and edges; per (dataset, path) the newest row wins (tie: the
        later record)."""
        for key in other.nodes:
            self.profile_of[key] = into
        into.nodes |= other.nodes
        for k, row in other.rows.items():
            held = into.rows.get(k)
            if held is None or _newer(row, held):
                into.rows[k] = row
        other.nodes = set()
        other.rows = {}
        other.merged_into = into

    def _move(self, x: str, anchor: str) -> None:
        """Remove every edge of X, put X in the anchor's graph with the edge anchor-X, and
        split X's old graph if it is now disconnected. The events anchored on X go along (they
        follow their anchor); the old graph's rows stay with it."""
        self.counts["moves"] += 1
        if self.anchored.get(x):
            self.counts["moves_with_events"] += 1
        old = self.profile_of[x]
        for near in self.adjacent.pop(x, set()):
            self.adjacent[near].discard(x)
        old.nodes.discard(x)
        new = self.profile_of[anchor]
        new.nodes.add(x)
        self.profile_of[x] = new
        self._connect(anchor, x)
        self._split(old)

    def _primary_order(self, key: str) -> tuple[int, int, int, str]:
        return (*_rank(key), self.first_seen[key], key)

    def _split(self, profile: _Profile) -> None:
        """The component holding the graph's PRIMARY identity (best by type rank, priority,
        first seen, key) keeps the profile and its rows; every other component becomes a new
        profile."""
        parts = self._components(profile.nodes)
        if len(parts) < 2:
            return
        primary = min(profile.nodes, key=self._primary_order)
        for part in parts:
            if primary in part:
                continue
            self.counts["splits"] += 1
            split_off = _Profile(nodes=set(part))
            profile.nodes -= part
            for key in part:
                self.profile_of[key] = split_off

    def _components(self, nodes: set[str]) -> list[set[str]]:
        left = set(nodes)
        parts: list[set[str]] = []
        while left:
            start = min(left)
            part = {start}
            todo = [start]
            while todo:
                for near in self.adjacent.get(todo.pop(), ()):
                    if near in left and near not in part:
                        part.add(near)
                        todo.append(near)
            left -= part
            parts.append(part)
        return parts

    # -- profile --
    def write(
        self, profile: _Profile, dataset: str, payload: Mapping[str, Any], carried: frozenset[str]
    ) -> None:
        """A profile record's rows go to its anchor's profile: each replaces the stored row of
        its (dataset, path) unless that one has a newer record time (equal: later wins)."""
        time = parse_time(payload["updated_at"])
        stale = False
        for path, value in flatten(payload).items():
            held = profile.rows.get((dataset, path))
            if held is not None and held.time > time:
                stale = True
                continue
            profile.rows[(dataset, path)] = _Row(value, time, self.order, carried)
        if stale:
            self.counts["late_rows"] += 1
        for key in carried:
            self.row_holders[key].add(profile)

    def add_event(
        self, dataset: str, payload: Mapping[str, Any], anchor: str, carried: frozenset[str]
    ) -> None:
        """An event sits on the profile holding its anchor and keeps following the anchor."""
        event = _Event(
            event_id(dataset, payload),
            anchor,
            carried,
            str(payload["eventType"]),
            parse_time(payload["timestamp"]),
        )
        assert event.id not in self.events, f"event id {event.id} used twice"
        self.events[event.id] = event
        self.anchored[anchor].add(event.id)
        for key in carried:
            self.carrying[key].add(event.id)

    def _drop_event(self, event_id: str) -> None:
        event = self.events.pop(event_id, None)
        if event is None:
            return
        self.anchored[event.anchor].discard(event_id)
        for key in event.carried:
            self.carrying[key].discard(event_id)

    # -- privacy --
    def delete(self, identity: str) -> None:
        """Remove the whole graph holding the identity, its profile, rows and events, and every
        event and attribute row from a record that carried one of its person identities."""
        gone = self.profile_of.get(identity_key(identity))
        if gone is None:
            self.counts["deletes_of_nobody"] += 1
            return
        self.counts["deletes"] += 1
        persons = {k for k in gone.nodes if _is_person(k)}
        doomed: set[str] = set()
        for key in gone.nodes:
            del self.profile_of[key]
            del self.first_seen[key]
            self.adjacent.pop(key, None)  # its edges are all inside the graph
            doomed |= self.anchored.pop(key, set())
        for key in persons:
            doomed |= self.carrying.pop(key, set())
        for event_id in doomed:
            self._drop_event(event_id)
        gone.deleted = True
        gone.nodes = set()
        gone.rows = {}
        for key in persons:
            for holder in self.row_holders.pop(key, set()):
                live = holder.live()
                if live is not None:
                    live.rows = {k: r for k, r in live.rows.items() if key not in r.carried}

    # -- the end state --
    def profiles(self) -> list[_Profile]:
        seen: dict[int, _Profile] = {}
        for profile in self.profile_of.values():
            seen.setdefault(id(profile), profile)
        return list(seen.values())

    def state(self, now: float) -> ModelState:
        people = []
        for profile in self.profiles():
            events = [self.events[i] for key in profile.nodes for i in self.anchored.get(key, ())]
            attributes = merged_attributes(profile.rows)
            people.append(
                Person(
                    identities=frozenset(profile.nodes),
                    attributes=attributes,
                    events=frozenset(e.id for e in events),
                    segments=segments_of(attributes, [(e.type, e.time) for e in events], now),
                )
            )
        people.sort(key=lambda p: sorted(p.identities))
        return ModelState(people)


def merged_attributes(rows: Mapping[tuple[str, str], _Row]) -> dict[str, Any]:
    """Merge policy "timestamp": per path the row with the newest record time across datasets
    (tie: the greater dataset name, then the later record), nested."""
    best: dict[str, tuple[tuple[float, str, int], Any]] = {}
    for (dataset, path), row in rows.items():
        rank = (row.time, dataset, row.order)
        if path not in best or rank > best[path][0]:
            best[path] = (rank, row.value)
    return unflatten({path: value for path, (_, value) in best.items()})


def segments_of(
    attributes: Mapping[str, Any], events: list[tuple[str, float]], now: float
) -> frozenset[str]:
    """The SEGMENTS a person is a member of at `now`, evaluated by hand; events are
    (type, epoch time). A window `within N` holds now - N <= time <= now."""
    if not attributes and not events:
        return frozenset()

    def within(event_type: str, seconds: float) -> bool:
        return any(t == event_type and now - seconds <= at <= now for t, at in events)

    member = {
        "gold": lookup(attributes, "loyalty.tier") == "gold",
        "email-optin": lookup(attributes, "consents.marketing.email") == "y"
        and lookup(attributes, "email") is not None,
        "viewed-today": within("web.pageview", 1 * DAY),
        "recent-buyer": within("commerce.purchase", 7 * DAY),
        "lapsed-browser": not within("commerce.purchase", 30 * DAY)
        and within("web.pageview", 7 * DAY),
    }
    member["optin-gold"] = member["gold"] and member["email-optin"]
    assert member.keys() == SEGMENTS.keys()
    return frozenset(name for name, yes in member.items() if yes)


def _run(journey: Journey) -> _World:
    world = _World()
    for step in journey.steps:
        world.apply(step)
    return world


def model(journey: Journey) -> ModelState:
    """The end state the platform must reach after the journey, at `journey.now`."""
    return _run(journey).state(journey.now)


def coverage(journey: Journey) -> dict[str, int]:
    """How many merges, moves, refusals, splits and deletes the model performed, and a few more
    counts: moves of a cookie with events anchored on it, profile records with a path the
    stored row was newer for (late rows), deletes of an identity no graph held.

    A merge is two existing graphs becoming one; a record whose new anchor joins an existing
    graph is not counted (that graph's profile simply gains identities)."""
    counts = _run(journey).counts
    base = dict.fromkeys(
        (
            "merges",
            "moves",
            "moves_with_events",
            "refusals",
            "splits",
            "deletes",
            "deletes_of_nobody",
            "late_rows",
        ),
        0,
    )
    return base | dict(counts)


# -- comparing states ---------------------------------------------------------------------------


def _label(identities: Iterable[str]) -> str:
    return "{" + ", ".join(sorted(identities)) + "}"


def differences(expected: ModelState, actual: ModelState) -> list[str]:
    """What differs between two states, one readable line each (empty: they are equal)."""
    exp = expected.by_identities()
    act = actual.by_identities()
    out: list[str] = []
    for ids in sorted(exp.keys() - act.keys(), key=sorted):
        near = [_label(other) for other in act if other & ids]
        where = f"; its identities are in {', '.join(sorted(near))}" if near else ""
        out.append(f"missing person {_label(ids)}{where}")
    for ids in sorted(act.keys() - exp.keys(), key=sorted):
        out.append(f"unexpected person {_label(ids)}")
    for ids in sorted(exp.keys() & act.keys(), key=sorted):
        e, a = exp[ids], act[ids]
        who = _label(ids)
        fe, fa = flatten(e.attributes), flatten(a.attributes)
        for path in sorted(fe.keys() | fa.keys()):
            if path not in fa:
                out.append(f"{who}: attribute {path} missing, expected {fe[path]!r}")
            elif path not in fe:
                out.append(f"{who}: unexpected attribute {path} = {fa[path]!r}")
            elif fe[path] != fa[path] or type(fe[path]) is not type(fa[path]):
                out.append(f"{who}: attribute {path} = {fa[path]!r}, expected {fe[path]!r}")
        if e.events != a.events:
            out.append(
                f"{who}: events missing {sorted(e.events - a.events)}, "
                f"unexpected {sorted(a.events - e.events)}"
            )
        if e.segments != a.segments:
            out.append(
                f"{who}: segments missing {sorted(e.segments - a.segments)}, "
                f"unexpected {sorted(a.segments - e.segments)}"
            )
    return out


# -- delivery helpers -------------------------------------------------------------------------


def runs(journey: Journey) -> list[tuple[str, list[dict[str, Any]]] | DeleteStep]:
    """The steps as maximal runs of consecutive records of one dataset (one batch file each),
    with the deletes kept between them."""
    out: list[tuple[str, list[dict[str, Any]]] | DeleteStep] = []
    for step in journey.steps:
        if isinstance(step, DeleteStep):
            out.append(step)
            continue
        last = out[-1] if out else None
        if isinstance(last, tuple) and last[0] == step.dataset:
            last[1].append(step.payload)
        else:
            out.append((step.dataset, [step.payload]))
    return out


def journey_identities(journey: Journey) -> frozenset[str]:
    """Every identity key the journey's records and deletes name."""
    keys: set[str] = set()
    for step in journey.steps:
        if isinstance(step, DeleteStep):
            keys.add(identity_key(step.identity))
        else:
            keys.update(record_keys(step.dataset, step.payload))
    return frozenset(keys)


# -- generation ---------------------------------------------------------------------------------

_AREA_CODES = (
    201, 202, 203, 205, 206, 207, 208, 209, 210, 212, 213, 214, 215, 216, 217, 218, 219, 224,
    225, 228, 229, 231, 234, 239, 240, 248, 251, 252, 253, 254, 256, 260, 262, 267, 269, 270,
    276, 281, 301, 302, 303, 304, 305, 307, 308, 309, 310, 312, 313, 314, 315, 316, 317, 318,
    319, 320, 321, 323, 330, 334, 336, 337, 339, 347, 351, 352, 360, 361, 386, 401, 402, 404,
    405, 406, 407, 408, 409, 410, 412, 413, 414, 415, 417, 419, 423, 425, 430, 432, 434, 435,
    440, 443, 469, 478, 479, 480, 484, 501, 502, 503, 504, 505, 507, 508, 509, 510, 512, 513,
    515, 516, 517, 518, 520, 530, 540, 541, 559, 561, 562, 563, 567, 570, 571, 573, 574, 580,
    585, 586, 601, 602, 603, 605, 606, 607, 608, 609, 610, 612, 614, 615, 616, 617, 618, 619,
    620, 623, 626, 630, 631, 636, 641, 646, 650, 651, 660, 661, 662, 678, 682, 701, 702, 703,
    704, 706, 707, 708, 712, 713, 714, 715, 716, 717, 718, 719, 720, 724, 727, 731, 732, 734,
    740, 754, 757, 760, 763, 765, 770, 772, 773, 774, 775, 781, 785, 786, 801, 802, 803, 804,
    805, 806, 808, 810, 812, 813, 814, 815, 816, 817, 818, 828, 830, 831, 832, 843, 845, 847,
    848, 850, 856, 857, 858, 859, 860, 862, 863, 864, 865, 870, 901, 903, 904, 906, 907, 908,
    909, 910, 912, 913, 914, 915, 916, 917, 918, 919, 920, 925, 928, 931, 936, 937, 940, 941,
    947, 949, 951, 952, 954, 956, 970, 971, 972, 973, 978, 979, 980, 985, 989,
)  # fmt: skip
"""US area codes in service."""


def email_of(prefix: str, person: int) -> str:
    return f"{prefix}p{person}@example.com".lower()


def crm_of(prefix: str, person: int) -> str:
    return f"{prefix}C{person}"


def phone_of(prefix: str, person: int) -> str:
    """A valid US number in E.164 for a person of the journeys of `prefix`: +1, an area code in
    service, an exchange 200-999 (not N11, not 555) and a line, all from a hash of the prefix
    and the person, so that journeys of different prefixes (almost surely) never share one."""
    n = int.from_bytes(hashlib.sha256(f"{prefix}\x00{person}".encode()).digest()[:8], "big")
    n, area = divmod(n, len(_AREA_CODES))
    n, exchange = divmod(n, 800)
    exchange += 200
    if exchange % 100 == 11 or exchange == 555:
        exchange += 1
    line = n % 10000
    return f"+1{_AREA_CODES[area]}{exchange}{line:04d}"


class _Chooser(Protocol):
    def integer(self, lo: int, hi: int) -> int: ...

    def chance(self, percent: int) -> bool: ...

    def shuffle(self, items: list[Any]) -> None: ...


class _RandomChooser:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def chance(self, percent: int) -> bool:
        return self.rng.randrange(100) < percent

    def shuffle(self, items: list[Any]) -> None:
        self.rng.shuffle(items)


class _DrawChooser:
    """Choices drawn by hypothesis, so that they shrink: to the low end of ranges, to no for
    chances and to the planned order for shuffles."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def chance(self, percent: int) -> bool:
        return self.draw(st.integers(0, 99)) >= 100 - percent

    def shuffle(self, items: list[Any]) -> None:
        rest = items[:]
        items.clear()
        while rest:
            items.append(rest.pop(self.integer(0, len(rest) - 1)))


@dataclass(frozen=True)
class _Sizes:
    """Ranges and chances (percent) of a generated journey."""

    pageviews: int
    """Most anonymous page views per cookie."""
    logins: int
    """Most logins of a person on one cookie."""
    orders: int
    """Most orders per loyalty card."""
    second_cookie: int
    anonymous_cookie: int
    """A person's cookie that never logs in."""
    phone: int
    crm: int
    second_crm_row: int
    late_crm_row: int
    loyalty: int
    second_loyalty_row: int
    late_loyalty_row: int
    reissued_card: int
    transferred_card: int
    household: int
    """A person shares a cookie with the next person ..."""
    trio: int
    """... and with the one after too."""
    odd_email: int
    """A login's email upper-cased or space-padded."""
    visitor: int
    """Most anonymous visitors (cookies of nobody known), per 100 people; at least one."""
    delete: int
    max_steps: int


_SMALL = _Sizes(
    pageviews=2,
    logins=1,
    orders=2,
    second_cookie=25,
    anonymous_cookie=20,
    phone=30,
    crm=85,
    second_crm_row=30,
    late_crm_row=20,
    loyalty=45,
    second_loyalty_row=25,
    late_loyalty_row=15,
    reissued_card=10,
    transferred_card=10,
    household=40,
    trio=40,
    odd_email=15,
    visitor=25,
    delete=12,
    max_steps=30,
)
_BIG = _Sizes(
    pageviews=5,
    logins=2,
    orders=3,
    second_cookie=35,
    anonymous_cookie=15,
    phone=30,
    crm=88,
    second_crm_row=30,
    late_crm_row=8,
    loyalty=45,
    second_loyalty_row=25,
    late_loyalty_row=5,
    reissued_card=3,
    transferred_card=2,
    household=10,
    trio=15,
    odd_email=5,
    visitor=5,
    delete=2,
    max_steps=1_000_000,
)

_FIRST = ("Ada", "Ben", "Chloe", "Dev", "Emma", "Femi", "Grace", "Hugo", "Ines", "Jun", "Kai")
_LAST = ("Smith", "Okafor", "Garcia", "Chen", "Novak", "Patel", "Rossi", "Berg", "Kim", "Diaz")
_TIERS = ("bronze", "silver", "gold", "platinum")


# The plan of a journey: steps before their order is drawn. Record times (updated_at) and
# event ids are given once the order is known.
@dataclass(frozen=True)
class _CrmRow:
    person: int
    phone: str | None
    first: str
    last: str
    consent: str
    late: bool


@dataclass(frozen=True)
class _LoyaltyRow:
    card: str
    person: int
    """Whose crm_id the row names."""
    tier: str
    points: int
    late: bool


@dataclass(frozen=True)
class _Visit:
    cookie: str
    login: str | None
    """The email as the login form sent it; None: an anonymous page view."""
    age: int


@dataclass(frozen=True)
class _Order:
    card: str
    age: int
    cents: int


@dataclass(frozen=True)
class _Delete:
    identity: str


_Planned = _CrmRow | _LoyaltyRow | _Visit | _Order | _Delete

_BLOCK = 100_000
"""updated_at = start + (base + logical) * _BLOCK + serial: rows of one (dataset, crm_id) are
ordered by their logical clock, and the serial (unique, < _BLOCK) makes all times distinct."""


class _Planner:
    def __init__(self, c: _Chooser, prefix: str, sizes: _Sizes) -> None:
        self.c = c
        self.prefix = prefix
        self.sizes = sizes
        self.items: list[_Planned] = []
        self.cookies = itertools.count(1)
        self.cards: dict[int, str] = {}

    def age(self) -> int:
        """Seconds before now: a few hours, 3 to 5 days, or 40 to 60 days; never within an
        hour of a segment window's edge (1, 7 and 30 days) nor in the future."""
        band = self.c.integer(0, 99)
        if band < 45:
            return self.c.integer(10 * 60, 6 * HOUR)
        if band < 75:
            return self.c.integer(3 * DAY, 5 * DAY)
        return self.c.integer(40 * DAY, 60 * DAY)

    def login_email(self, person: int) -> str:
        email = email_of(self.prefix, person)
        if not self.c.chance(self.sizes.odd_email):
            return email
        return (email.upper(), f"  {email} ", f" {email.upper()}")[self.c.integer(0, 2)]

    def cookie(self) -> str:
        return f"{self.prefix}k{next(self.cookies)}"

    def visits(self, cookie: str, users: list[int], anonymous: int) -> None:
        for person in users:
            for _ in range(self.c.integer(1, self.sizes.logins)):
                self.items.append(_Visit(cookie, self.login_email(person), self.age()))
        for _ in range(anonymous):
            self.items.append(_Visit(cookie, None, self.age()))

    def crm_row(self, person: int, phone: str | None, late: bool) -> _CrmRow:
        return _CrmRow(
            person,
            phone if phone is not None and self.c.chance(85) else None,
            _FIRST[person % len(_FIRST)],
            _LAST[(person // len(_FIRST) + self.c.integer(0, 1)) % len(_LAST)],
            "y" if self.c.chance(50) else "n",
            late,
        )

    def loyalty_row(self, card: str, person: int, late: bool = False) -> _LoyaltyRow:
        return _LoyaltyRow(
            card, person, _TIERS[self.c.integer(0, 3)], self.c.integer(0, 5000), late
        )

    def orders(self, card: str, most: int) -> None:
        for _ in range(self.c.integer(0, most)):
            self.items.append(_Order(card, self.age(), self.c.integer(100, 50_000)))

    def person(self, i: int) -> bool:
        """Plan person i's own records; return whether they have a CRM row."""
        s, c, p = self.sizes, self.c, self.prefix
        has_crm = c.chance(s.crm)
        if has_crm:
            phone = phone_of(p, i) if c.chance(s.phone) else None
            self.items.append(self.crm_row(i, phone, late=False))
            if c.chance(s.second_crm_row):
                self.items.append(self.crm_row(i, phone, late=False))
            if c.chance(s.late_crm_row):
                self.items.append(self.crm_row(i, phone, late=True))
            if c.chance(s.loyalty):
                card = self.cards[i] = f"{p}L{i}"
                self.items.append(self.loyalty_row(card, i))
                if c.chance(s.second_loyalty_row):
                    self.items.append(self.loyalty_row(card, i))
                if c.chance(s.late_loyalty_row):
                    self.items.append(self.loyalty_row(card, i, late=True))
                self.orders(card, s.orders)
                if c.chance(s.reissued_card):  # a new card for the same customer
                    again = f"{p}L{i}r"
                    self.items.append(self.loyalty_row(again, i))
                    self.orders(again, 2)
        for _ in range(1 + c.chance(s.second_cookie)):
            cookie = self.cookie()
            users = [] if c.chance(s.anonymous_cookie) else [i]
            self.visits(cookie, users, c.integer(0 if users else 1, s.pageviews))
        if c.chance(s.delete):
            by_crm = has_crm and c.chance(50)
            identity = f"crm_id:{crm_of(p, i)}" if by_crm else f"email:{email_of(p, i)}"
            self.items.append(_Delete(identity))
        return has_crm

    def plan(self, people: int) -> list[_Planned]:
        s, c = self.sizes, self.c
        with_crm = [i for i in range(1, people + 1) if self.person(i)]
        # Households: a cookie shared by a person and the next (sometimes the next two), both
        # logging in on it at different times, anonymous page views in between.
        i = 1
        while i < people:
            if c.chance(s.household):
                users = [i, i + 1]
                if i + 2 <= people and c.chance(s.trio):
                    users.append(i + 2)
                self.visits(self.cookie(), users, c.integer(1, s.pageviews + 1))
                i += len(users)
            else:
                i += 1
        # A card already linked to one customer, handed to another: the row is refused.
        for i in with_crm:
            if c.chance(s.transferred_card):
                others = [j for j in self.cards if j != i]
                if others:
                    j = others[c.integer(0, len(others) - 1)]
                    self.items.append(self.loyalty_row(self.cards[j], i))
        for _ in range(c.integer(0, max(1, people * s.visitor // 100))):
            self.visits(self.cookie(), [], c.integer(1, s.pageviews))
        return self.items


def _trim(items: list[_Planned], limit: int) -> list[_Planned]:
    """At most `limit` items: anonymous page views and orders go first, from the end."""
    out = list(items)
    for i in range(len(out) - 1, -1, -1):
        if len(out) <= limit:
            break
        item = out[i]
        if isinstance(item, _Order) or (isinstance(item, _Visit) and item.login is None):
            del out[i]
    return out[:limit]


def _materialise(prefix: str, now: float, ordered: list[_Planned], c: _Chooser) -> list[Step]:
    start = math.floor(now) - 60 * DAY
    bases: dict[tuple[str, int], int] = {}
    clocks: dict[tuple[str, int], tuple[int, int]] = {}
    serial = itertools.count()
    event_ids = (f"{prefix}e{n}" for n in itertools.count(1))

    def updated_at(dataset: str, person: int, late: bool) -> str:
        """Newer than the rows of (dataset, person) delivered before it, or older if late."""
        clock = (dataset, person)
        base = bases.setdefault(clock, c.integer(6, 40))
        held = clocks.get(clock)
        if held is None:
            logical = 0
            clocks[clock] = (0, 0)
        elif late:
            logical = held[0] - 1
            clocks[clock] = (logical, held[1])
        else:
            logical = held[1] + 1
            clocks[clock] = (held[0], logical)
        assert abs(logical) < 6
        n = next(serial)
        assert n < _BLOCK
        return iso(start + (base + logical) * _BLOCK + n)

    steps: list[Step] = []
    for item in ordered:
        match item:
            case _CrmRow():
                crm: dict[str, Any] = {
                    "crm_id": crm_of(prefix, item.person),
                    "email": email_of(prefix, item.person),
                }
                if item.phone is not None:
                    crm["phone"] = item.phone
                crm["person"] = {"name": {"first": item.first, "last": item.last}}
                crm["consents"] = {"marketing": {"email": item.consent}}
                crm["updated_at"] = updated_at("crm", item.person, item.late)
                steps.append(RecordStep("crm", crm))
            case _LoyaltyRow():
                loyalty = {
                    "loyalty_id": item.card,
                    "crm_id": crm_of(prefix, item.person),
                    "loyalty": {"tier": item.tier, "points": item.points},
                    "updated_at": updated_at("loyalty", item.person, item.late),
                }
                steps.append(RecordStep("loyalty", loyalty))
            case _Visit():
                web: dict[str, Any] = {
                    "ecid": item.cookie,
                    "eventType": "web.pageview" if item.login is None else "app.login",
                    "timestamp": iso(now - item.age),
                    "page": {"url": f"/j/{next(event_ids)}"},
                }
                if item.login is not None:
                    web["email"] = item.login
                steps.append(RecordStep("web", web))
            case _Order():
                order = {
                    "loyalty_id": item.card,
                    "eventType": "commerce.purchase",
                    "timestamp": iso(now - item.age),
                    "commerce": {
                        "order": {
                            "id": next(event_ids),
                            "total": item.cents / 100,
                            "currency": "USD",
                        }
                    },
                }
                steps.append(RecordStep("store-orders", order))
            case _Delete():
                steps.append(DeleteStep(item.identity))
    return steps


def _generate(c: _Chooser, prefix: str, now: float, people: int, sizes: _Sizes) -> Journey:
    items = _trim(_Planner(c, prefix, sizes).plan(people), sizes.max_steps)
    c.shuffle(items)
    return Journey(prefix, _materialise(prefix, now, items, c), now)


def journeys(prefix: str, now: float) -> st.SearchStrategy[Journey]:
    """Small journeys: 2 to 4 people, at most 30 steps."""

    @st.composite
    def build(draw: st.DrawFn) -> Journey:
        c = _DrawChooser(draw)
        return _generate(c, prefix, now, c.integer(2, 4), _SMALL)

    return build()


def small_journey(prefix: str, now: float, people: int, seed: int) -> Journey:
    """A small journey (the sizes `journeys` draws with) from a seed: the same for the same
    arguments, whatever else ran before."""
    return _generate(_RandomChooser(seed), prefix, now, people, _SMALL)


def big_journey(prefix: str, now: float, people: int, seed: int) -> Journey:
    """A large realistic journey (for 2,000 people: over 10,000 events), the same for the same
    arguments."""
    return _generate(_RandomChooser(seed), prefix, now, people, _BIG)


# -- another prefix -----------------------------------------------------------------------------


def rebase(journey: Journey, prefix: str) -> Journey:
    """The same journey with every prefixed value (and phone) under `prefix` instead."""
    old = journey.prefix

    def swap(value: str) -> str:
        core = value.strip()
        lead, trail = value[: value.index(core)], value[value.index(core) + len(core) :]
        if core.lower().startswith(old.lower()) and "@" in core:  # an email, maybe upper-cased
            new = (prefix + core[len(old) :]).lower()
            new = new.upper() if core == core.upper() else new
        else:
            assert core.startswith(old), f"{value!r} does not start with {old!r}"
            new = prefix + core[len(old) :]
        return lead + new + trail

    def person_of(crm_id: str) -> int:
        return int(crm_id[len(old) + 1 :])

    fields = ("crm_id", "email", "loyalty_id", "ecid")
    steps: list[Step] = []
    for step in journey.steps:
        if isinstance(step, DeleteStep):
            namespace, _, value = step.identity.partition(":")
            steps.append(DeleteStep(f"{namespace}:{swap(value)}"))
            continue
        payload = msgspec.json.decode(msgspec.json.encode(step.payload))
        for name in fields:
            if name in payload:
                payload[name] = swap(payload[name])
        if "phone" in payload:
            payload["phone"] = phone_of(prefix, person_of(step.payload["crm_id"]))
        if step.dataset == "web":
            payload["page"]["url"] = "/j/" + swap(event_id("web", step.payload))
        elif step.dataset == "store-orders":
            order = payload["commerce"]["order"]
            order["id"] = swap(order["id"])
        steps.append(RecordStep(step.dataset, payload))
    return Journey(prefix, steps, journey.now)

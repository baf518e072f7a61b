"""Customer journeys: generated histories of records and privacy deletes, and a model of them.

A journey is what a few (or a few thousand) customers of the retail example do: CRM rows,
loyalty rows, web page views and logins, store orders, and now and then a privacy delete,
interleaved freely. `model(journey)` computes, in plain Python, the end state the platform
must reach: one person per identity graph, with its merged attributes, the stable ids of its
events and its segment memberships. It is the executable specification of the rules of
identity, profile, privacy delete and segmentation for these shapes, written from the rules
and not from the services' code, which it does not import.

- `model(journey)`, `coverage(journey)`, `differences(expected, actual)`.
- `runs(journey)`: the steps grouped for delivery as batch files.

Every identity value and stable id of a journey starts with its prefix, so that journeys can
share one platform.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec

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

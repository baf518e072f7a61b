"""The identity graph: which identities belong to one person, as pure domain logic.

Identities seen together in a record are linked by edges; a connected set of identities is
one graph, which is one person with a stable profile id. This module holds the rules (links,
merges, unique namespaces, shared devices, the size limit, the privacy delete) and nothing
else: the handler loads the part of the graph a batch touches into a `WorkingSet`, calls
`IdentityGraph.link` once per record (`IdentityGraph.forget` once per privacy delete), and
persists the `Effects` the calls accumulated.

Invariants kept on a working set (given that they hold on the loaded state):

- every node of a connected component of edges has the same profile id, and every profile's
  nodes are connected;
- a graph holds at most one value of each unique namespace;
- a graph holds at most `max_identities` identities (unless one record alone brings more).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Self, TypeVar

import msgspec

from shared.messages import Identity
from shared.normalize import normalize
from shared.resources import Namespace

TYPE_RANK: dict[str, int] = {"person": 0, "device": 1, "cookie": 2}
"""Order of namespace types: person identities rank above devices, devices above cookies."""

PENDING = "\x00pending"
"""Stand-in profile id of a new graph during one `link` call; never stored."""

UNKNOWN_PRIORITY = 1000
"""Priority of a namespace that is not configured (its type is person, it is not unique)."""

NORMALISED_KEPT = 65_536
"""Most identity values a graph keeps normalised (then it starts over): a record's
identities are read several times per step, and a person's again in the next fetches."""

ReassignReason = Literal["split", "moved", "limit"]

K = TypeVar("K")
V = TypeVar("V")


def derived_profile_id(seed: str, n: int) -> str:
    """The `n`th profile id a record creates, from the record's seed (its place in the
    records stream and its id): a replay of the same records in the same order gives every
    graph the id it had, so profile ids survive the loss of the identity service's state."""
    return "p" + hashlib.sha256(f"{seed}#{n}".encode()).hexdigest()[:20]


def edge_key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


# -- graph elements -----------------------------------------------------------------------------


class Node(msgspec.Struct):
    """One identity: `key` is "<namespace>:<value>", with the value normalised."""

    key: str
    namespace: str
    value: str
    profile_id: str
    first_seen: float
    last_seen: float


class Edge(msgspec.Struct):
    """A link between two identities seen together in a record (`a < b`)."""

    a: str
    b: str
    created_at: float
    dataset: str
    record_id: str


class RefusedLink(msgspec.Struct):
    """A link a record asked for and that was not made: `a` is the record's highest-priority
    identity, `b` the identity that was not linked to it."""

    at: float
    record_id: str
    dataset: str
    a: str
    b: str
    reason: str


class Move(msgspec.Struct):
    """Identities that left `from_profile`: "split" (to a new profile), "moved" (a device or
    cookie moved to another person) or "limit" (dropped from the graph, `to_profile` None)."""

    from_profile: str
    to_profile: str | None
    keys: list[str]
    reason: ReassignReason


class Fold(msgspec.Struct):
    """The graphs of `folded` profiles joined the graph of `survivor`."""

    survivor: str
    folded: list[str]


GraphEvent = Fold | Move


class Forgotten(msgspec.Struct):
    """What a privacy delete removed from a working set (`IdentityGraph.forget`).

    The graph's nodes and edges are already gone from the working set and the effects;
    what is left for the store is in the stored state only: the profile and every profile
    folded into it (`profile_ids[0]`, `folded`) and the refused links of `identities`."""

    profile_ids: list[str]
    """The profile of the graph that held the identity (none: no graph holds it)."""
    person_keys: list[str]
    """The identity itself and the graph's person identities: the records that carry one
    of them belong to the person, on whatever profile they sit."""
    identities: list[str]
    """Keys of the nodes removed."""
    folded: list[str]
    """Profiles folded into it in this fetch, removed with it."""


# -- state and effects --------------------------------------------------------------------------


class _Tracked(dict[K, V]):
    """A dict that notes when it is changed from outside the working set's own upkeep."""

    def __init__(self, items: Mapping[K, V] | None = None) -> None:
        super().__init__(items or {})
        self.dirty = True

    def __setitem__(self, key: K, value: V) -> None:
        self.dirty = True
        super().__setitem__(key, value)

    def __delitem__(self, key: K) -> None:
        self.dirty = True
        super().__delitem__(key)

    def pop(self, key: K, *default: V) -> V:  # type: ignore[override]
        self.dirty = True
        return super().pop(key, *default)

    def popitem(self) -> tuple[K, V]:
        self.dirty = True
        return super().popitem()

    def setdefault(self, key: K, default: V) -> V:
        self.dirty = True
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.dirty = True
        super().update(*args, **kwargs)

    def __ior__(self, other: Any) -> Self:  # type: ignore[override, misc]
        self.dirty = True
        return super().__ior__(other)

    def clear(self) -> None:
        self.dirty = True
        super().clear()

    # -- upkeep by the working set itself, which keeps its index in step --
    def _set(self, key: K, value: V) -> None:
        super().__setitem__(key, value)

    def _del(self, key: K) -> V:
        return super().pop(key)


class WorkingSet:
    """The part of the graph a batch touches: for every known identity of the batch, all the
    nodes of its profile, the edges between them and the profiles' creation times.

    `nodes`, `edges` and `profiles` are plain mappings the service may fill and change; an
    index of members and neighbours is rebuilt when they were changed from outside. (Changing
    a node's `profile_id` in place is not noticed: replace the node instead.)
    """

    def __init__(
        self,
        nodes: Iterable[Node] = (),
        edges: Iterable[Edge] = (),
        profiles: Mapping[str, float] | None = None,
    ) -> None:
        self._nodes: _Tracked[str, Node] = _Tracked({n.key: n for n in nodes})
        self._edges: _Tracked[tuple[str, str], Edge] = _Tracked({(e.a, e.b): e for e in edges})
        self.profiles: dict[str, float] = dict(profiles or {})
        """Live profile id -> created_at."""
        self._members: dict[str, set[str]] = {}
        self._adjacent: dict[str, set[str]] = {}

    @property
    def nodes(self) -> dict[str, Node]:
        """Key -> node."""
        return self._nodes

    @nodes.setter
    def nodes(self, value: dict[str, Node]) -> None:
        self._nodes = _Tracked(value)

    @property
    def edges(self) -> dict[tuple[str, str], Edge]:
        """(a, b) -> edge, with a < b."""
        return self._edges

    @edges.setter
    def edges(self, value: dict[tuple[str, str], Edge]) -> None:
        self._edges = _Tracked(value)

    def members(self, profile_id: str) -> frozenset[str]:
        """Keys of the nodes of one profile."""
        self._reindex()
        return frozenset(self._members.get(profile_id, ()))

    def neighbours(self, key: str) -> frozenset[str]:
        """Keys linked to `key` by an edge."""
        self._reindex()
        return frozenset(self._adjacent.get(key, ()))

    def _reindex(self) -> None:
        if not (self._nodes.dirty or self._edges.dirty):
            return
        self._members = {}
        self._adjacent = {}
        for node in self._nodes.values():
            self._members.setdefault(node.profile_id, set()).add(node.key)
        for a, b in self._edges:
            self._adjacent.setdefault(a, set()).add(b)
            self._adjacent.setdefault(b, set()).add(a)
        self._nodes.dirty = self._edges.dirty = False

    # -- changes made by IdentityGraph, index kept in step --
    def _unindex(self, key: str, profile_id: str) -> None:
        keys = self._members.get(profile_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._members[profile_id]

    def _put_node(self, node: Node) -> None:
        self._reindex()
        old = self._nodes.get(node.key)
        if old is not None:
            self._unindex(old.key, old.profile_id)
        self._nodes._set(node.key, node)
        self._members.setdefault(node.profile_id, set()).add(node.key)

    def _relabel(self, key: str, profile_id: str) -> Node:
        self._reindex()
        node = self._nodes[key]
        self._unindex(key, node.profile_id)
        node.profile_id = profile_id
        self._members.setdefault(profile_id, set()).add(key)
        return node

    def _drop_node(self, key: str) -> None:
        self._reindex()
        node = self._nodes._del(key)
        self._unindex(key, node.profile_id)
        self._adjacent.pop(key, None)

    def _put_edge(self, edge: Edge) -> None:
        self._reindex()
        self._edges._set((edge.a, edge.b), edge)
        self._adjacent.setdefault(edge.a, set()).add(edge.b)
        self._adjacent.setdefault(edge.b, set()).add(edge.a)

    def _drop_edge(self, key: tuple[str, str]) -> None:
        self._reindex()
        self._edges._del(key)
        a, b = key
        for x, y in ((a, b), (b, a)):
            near = self._adjacent.get(x)
            if near is not None:
                near.discard(y)
                if not near:
                    del self._adjacent[x]


class Effects:
    """What a batch changed, for the service to persist and announce.

    Applying them to the stored graph gives the working set's state: delete `delete_nodes`
    and `delete_edges`, upsert `upsert_nodes` and `add_edges` (each pair of sets is disjoint,
    so the order does not matter), insert `new_profiles`, and mark `folded_profiles` as
    folded into their survivor. Live profiles are then the stored ones plus `new_profiles`
    minus `folded_profiles`. A profile created and folded within one batch is in both.
    `upsert_nodes` holds the working set's own node objects, so it shows their final state.
    """

    def __init__(self) -> None:
        self.upsert_nodes: dict[str, Node] = {}
        self.delete_nodes: set[str] = set()
        self.add_edges: dict[tuple[str, str], Edge] = {}
        self.delete_edges: set[tuple[str, str]] = set()
        self.new_profiles: dict[str, float] = {}
        """Profile id -> created_at."""
        self.folded_profiles: dict[str, str] = {}
        """Folded profile id -> the survivor it now belongs to (chains are resolved)."""
        self.events: list[GraphEvent] = []
        """Merges and reassignments in the order they happened."""
        self.refused: list[RefusedLink] = []

    def __bool__(self) -> bool:
        return bool(
            self.upsert_nodes
            or self.delete_nodes
            or self.add_edges
            or self.delete_edges
            or self.new_profiles
            or self.folded_profiles
            or self.events
            or self.refused
        )


class _Item(msgspec.Struct):
    """One identity of the record being linked."""

    key: str
    namespace: str
    value: str
    spec: Namespace


class _Record:
    """The state of one `link` call."""

    def __init__(self, at: float, dataset: str, record_id: str, keys: set[str], seed: str) -> None:
        self.at = at
        self.dataset = dataset
        self.record_id = record_id
        self.keys = keys
        self.seed = seed
        self.minted = 0
        """How many profile ids this record created so far."""
        self.placeholder: str | None = None
        """PENDING while the record's anchor is new and its graph has no profile id yet: it
        gets the id of the first existing graph it merges with, else a new profile."""
        self.to_placeholder: list[Move] = []
        """Events naming the pending profile, to be given the final id."""
        self.first_event = 0
        self.refused: set[str] = set()
        """Keys this record could not link to its anchor: their graphs must stay apart from
        the anchor's until the call ends."""


# -- the rules ----------------------------------------------------------------------------------


class IdentityGraph:
    """Linking rules over a working set; holds configuration only, no state."""

    def __init__(
        self,
        namespaces: Mapping[str, Namespace],
        max_identities: int = 50,
        new_profile_id: Callable[[], str] | None = None,
        *,
        default_region: str,
    ) -> None:
        if max_identities < 1:
            raise ValueError("max_identities must be at least 1")
        self.namespaces = dict(namespaces)
        self.max_identities = max_identities
        self.new_profile_id = new_profile_id
        self.default_region = default_region
        self._normalised: dict[tuple[str, str], _Item | None] = {}
        """(namespace, raw value) -> the identity normalised, None if unusable."""

    # -- namespaces and ordering --
    def namespace(self, symbol: str) -> Namespace:
        """The namespace's configuration; an unknown one is a person id of priority 1000."""
        spec = self.namespaces.get(symbol)
        if spec is None:
            return Namespace(symbol, "person", priority=UNKNOWN_PRIORITY)
        return spec

    def rank(self, symbol: str) -> tuple[int, int]:
        """Sort key of a namespace: type first (person, device, cookie), then priority."""
        spec = self.namespace(symbol)
        return (TYPE_RANK[spec.type], spec.priority)

    def _node_order(self, node: Node) -> tuple[int, int, float, str]:
        return (*self.rank(node.namespace), node.first_seen, node.key)

    def primary_identity(self, nodes: list[Node]) -> Node | None:
        """The graph's main identity: person > device > cookie, then the namespace's priority
        (lower first), then the oldest first_seen."""
        return min(nodes, key=self._node_order, default=None)

    def _items(self, identities: Iterable[Identity]) -> list[_Item]:
        seen: dict[str, _Item] = {}
        known = self._normalised
        for ident in identities:
            pair = (ident.namespace, ident.value)
            if pair in known:
                item = known[pair]
            else:
                item = self._item(ident)
                if len(known) >= NORMALISED_KEPT:
                    known.clear()
                known[pair] = item
            if item is not None:
                seen.setdefault(item.key, item)
        return list(seen.values())

    def _item(self, ident: Identity) -> _Item | None:
        """One identity normalised by its namespace's rules; None if its value is unusable."""
        spec = self.namespace(ident.namespace)
        value = normalize(
            self.namespaces.get(ident.namespace), ident.namespace, ident.value, self.default_region
        )
        if value is None:
            return None
        return _Item(f"{ident.namespace}:{value}", ident.namespace, value, spec)

    def _ranked(self, items: list[_Item]) -> list[_Item]:
        """Items by rank (type, then priority), ties in record order: the first is the
        record's anchor."""
        order = {item.key: i for i, item in enumerate(items)}
        return sorted(items, key=lambda it: (*self.rank(it.namespace), order[it.key]))

    def anchor_of(self, identities: Iterable[Identity]) -> tuple[str | None, list[str]]:
        """The record's anchor key (its highest-ranked identity, which `link` attaches the
        record to) and its person identity keys (the anchor among them if it is one)."""
        items = self._ranked(self._items(identities))
        if not items:
            return None, []
        return items[0].key, [it.key for it in items if it.spec.type == "person"]

    def keys_of(self, identities: Iterable[Identity]) -> list[str]:
        """Normalised keys of identities, without duplicates; unusable values are dropped."""
        return [item.key for item in self._items(identities)]

    def graph_of(self, ws: WorkingSet, profile_id: str) -> list[Node]:
        """Nodes of one profile, its primary identity first."""
        return sorted((ws.nodes[k] for k in ws.members(profile_id)), key=self._node_order)

    # -- linking --
    def link(
        self,
        ws: WorkingSet,
        fx: Effects,
        identities: list[Identity],
        *,
        at: float,
        dataset: str,
        record_id: str,
        seed: str | None = None,
    ) -> str | None:
        """Apply one record; return the profile id it belongs to (None: no usable identity).

        New profile ids derive from `seed` (default: the record id), which must be unique
        to the record and the same when the record is replayed."""
        items = self._ranked(self._items(identities))
        if not items:
            return None
        rec = _Record(at, dataset, record_id, {item.key for item in items}, seed or record_id)
        rec.first_event = len(fx.events)

        anchor = items[0]
        if anchor.key in ws.nodes:
            self._touch(ws, fx, anchor.key, at)
        else:
            rec.placeholder = PENDING
            self._create(ws, fx, anchor, PENDING, at)

        for item in items[1:]:
            self._link_one(ws, fx, rec, anchor.key, item)

        profile_id = ws.nodes[anchor.key].profile_id
        if profile_id == PENDING:
            profile_id = self._mint(rec)
            self._new_profile(ws, fx, profile_id, at)
            self._settle(ws, fx, rec, profile_id)
        self._enforce_limit(ws, fx, rec, profile_id)
        return ws.nodes[anchor.key].profile_id

    def _link_one(
        self, ws: WorkingSet, fx: Effects, rec: _Record, anchor: str, item: _Item
    ) -> None:
        anchor_profile = ws.nodes[anchor].profile_id
        node = ws.nodes.get(item.key)
        if node is not None:
            self._touch(ws, fx, item.key, rec.at)
            if node.profile_id == anchor_profile:
                self._connect(ws, fx, rec, anchor, item.key)
                return
        held = self._unique_values(ws, ws.members(anchor_profile))
        brought = (
            self._unique_values(ws, ws.members(node.profile_id))
            if node is not None
            else self._unique_values(ws, [item.key])
        )
        clashes = sorted(ns for ns in brought if ns in held)
        # A graph holding an identity this record was refused clashes too. A refusal is
        # decided on the graphs as they are when it is met; a later move of a shared device
        # can split the refused identity off from the unique value that caused it (crm_id:C2
        # refuses loyalty_id:L1, whose graph holds crm_id:C1 through devices d1 and d2; d1
        # moves to C2 and {L1, d2} splits off). That part no longer clashes, but merging it
        # for d2 would put L1 in C2's graph after all. Instead the device goes to the person
        # who authenticated last and the person identities it linked stay behind: d2 is moved
        # too, which cuts its edge to L1, so L1 ends up on its own and the refusal stays true.
        # (Person identities come before devices and cookies, so none meets such a graph;
        # were one to, it would be refused as well.)
        blocked = (
            sorted(k for k in ws.members(node.profile_id) if k in rec.refused)
            if node is not None and rec.refused
            else []
        )
        if not clashes and not blocked:
            if node is None:
                self._create(ws, fx, item, anchor_profile, rec.at)
            else:
                self._merge(ws, fx, rec, anchor_profile, node.profile_id)
            self._connect(ws, fx, rec, anchor, item.key)
            return
        own = item.spec.unique and item.namespace in held
        if node is not None and not own and item.spec.type in ("device", "cookie"):
            self._move(ws, fx, rec, anchor, item.key)
            return
        if own or clashes:
            ns = item.namespace if own else clashes[0]
            if brought[ns] == item.key:
                reason = f"{ns}: graph already holds {held[ns]}, cannot add {item.key}"
            else:
                reason = f"{ns}: graph already holds {held[ns]}, {item.key} is with {brought[ns]}"
        else:
            reason = f"{item.key} is with {blocked[0]}, which this record could not link"
        rec.refused.add(item.key)
        fx.refused.append(RefusedLink(rec.at, rec.record_id, rec.dataset, anchor, item.key, reason))
        if node is None:
            profile_id = self._mint(rec)
            self._new_profile(ws, fx, profile_id, rec.at)
            self._create(ws, fx, item, profile_id, rec.at)

    def _unique_values(self, ws: WorkingSet, keys: Iterable[str]) -> dict[str, str]:
        """Unique namespace -> the key holding a value of it, among `keys`."""
        out: dict[str, str] = {}
        for key in sorted(keys):
            symbol = key.split(":", 1)[0] if key not in ws.nodes else ws.nodes[key].namespace
            if self.namespace(symbol).unique:
                out.setdefault(symbol, key)
        return out

    def _older(self, ws: WorkingSet, rec: _Record, p: str, q: str) -> str:
        """The surviving profile of two: the oldest, then the smallest id."""

        def age(profile_id: str) -> tuple[float, str]:
            if profile_id == rec.placeholder:
                return (math.inf, profile_id)
            created = ws.profiles.get(profile_id)
            if created is None:  # not loaded: its oldest identity stands in
                created = min(ws.nodes[k].first_seen for k in ws.members(profile_id))
            return (created, profile_id)

        return min(p, q, key=age)

    def _merge(self, ws: WorkingSet, fx: Effects, rec: _Record, p: str, q: str) -> None:
        survivor = self._older(ws, rec, p, q)
        folded = q if survivor == p else p
        if folded == rec.placeholder:
            self._settle(ws, fx, rec, survivor)
            return
        for key in ws.members(folded):
            fx.upsert_nodes[key] = ws._relabel(key, survivor)
        ws.profiles.pop(folded, None)
        for was, into in fx.folded_profiles.items():
            if into == folded:
                fx.folded_profiles[was] = survivor
        fx.folded_profiles[folded] = survivor
        last = fx.events[-1] if len(fx.events) > rec.first_event else None
        if isinstance(last, Fold) and last.survivor == survivor:
            last.folded.append(folded)
        else:
            fx.events.append(Fold(survivor, [folded]))

    @staticmethod
    def _settle(ws: WorkingSet, fx: Effects, rec: _Record, profile_id: str) -> None:
        """Give the pending profile's nodes and events their final profile id."""
        for key in ws.members(PENDING):
            fx.upsert_nodes[key] = ws._relabel(key, profile_id)
        for event in rec.to_placeholder:
            event.to_profile = profile_id
        rec.to_placeholder.clear()
        rec.placeholder = None

    def _move(self, ws: WorkingSet, fx: Effects, rec: _Record, anchor: str, key: str) -> None:
        """Take a device or cookie out of its graph and link it to the anchor."""
        old = ws.nodes[key].profile_id
        new = ws.nodes[anchor].profile_id
        for near in ws.neighbours(key):
            self._disconnect(ws, fx, edge_key(key, near))
        fx.upsert_nodes[key] = ws._relabel(key, new)
        self._connect(ws, fx, rec, anchor, key)
        event = Move(old, new, [key], "moved")
        fx.events.append(event)
        if new == rec.placeholder:
            rec.to_placeholder.append(event)
        self._split(ws, fx, rec, old)

    def _mint(self, rec: _Record) -> str:
        """A new profile id: derived from the record (see `derived_profile_id`), or from the
        injected factory."""
        if self.new_profile_id is not None:
            return self.new_profile_id()
        rec.minted += 1
        return derived_profile_id(rec.seed, rec.minted)

    def _split(self, ws: WorkingSet, fx: Effects, rec: _Record, profile_id: str) -> list[str]:
        """Give new profile ids to the parts of a graph no longer connected to its primary
        identity; return them."""
        members = ws.members(profile_id)
        parts = self._components(ws, members)
        if len(parts) < 2:
            return []
        primary = self.primary_identity([ws.nodes[k] for k in members])
        assert primary is not None
        created: list[str] = []
        others = [part for part in parts if primary.key not in part]
        others.sort(key=lambda part: min(self._node_order(ws.nodes[k]) for k in part))
        for part in others:
            new = self._mint(rec)
            self._new_profile(ws, fx, new, rec.at)
            for key in part:
                fx.upsert_nodes[key] = ws._relabel(key, new)
            fx.events.append(Move(profile_id, new, sorted(part), "split"))
            created.append(new)
        return created

    @staticmethod
    def _components(ws: WorkingSet, members: frozenset[str]) -> list[set[str]]:
        left = set(members)
        parts: list[set[str]] = []
        while left:
            start = min(left)
            part = {start}
            todo = [start]
            while todo:
                for near in ws.neighbours(todo.pop()):
                    if near in left and near not in part:
                        part.add(near)
                        todo.append(near)
            left -= part
            parts.append(part)
        return parts

    def _enforce_limit(self, ws: WorkingSet, fx: Effects, rec: _Record, profile_id: str) -> None:
        """Drop identities until every graph the record touched fits: the oldest of the
        lowest-priority type first, never one of the record's own identities."""
        todo = [profile_id]
        while todo:
            current = todo.pop()
            while len(ws.members(current)) > self.max_identities:
                candidates = [ws.nodes[k] for k in ws.members(current) if k not in rec.keys]
                if not candidates:
                    break
                victim = min(
                    candidates,
                    key=lambda n: (
                        -TYPE_RANK[self.namespace(n.namespace).type],
                        n.first_seen,
                        n.key,
                    ),
                )
                for near in ws.neighbours(victim.key):
                    self._disconnect(ws, fx, edge_key(victim.key, near))
                ws._drop_node(victim.key)
                fx.upsert_nodes.pop(victim.key, None)
                fx.delete_nodes.add(victim.key)
                fx.events.append(Move(current, None, [victim.key], "limit"))
                todo.extend(self._split(ws, fx, rec, current))

    # -- privacy --
    def forget(self, ws: WorkingSet, fx: Effects, identity: Identity) -> Forgotten:
        """Remove the whole graph that holds `identity` (a privacy delete) from the working
        set and from what the batch changed so far: its nodes, its edges, its profile and
        the profiles folded into it in this fetch, and the refusals it met in this fetch
        (they would be written after the delete)."""
        keys = self.keys_of([identity])
        node = ws.nodes.get(keys[0]) if keys else None
        if node is None:
            # No graph holds it (the size limit dropped it, or it never came): the records
            # that carry it are still reached.
            return Forgotten([], keys[:1], [], [])
        pid = node.profile_id
        members = sorted(ws.members(pid))
        person_keys = sorted(
            {
                *keys[:1],
                *(k for k in members if self.namespace(ws.nodes[k].namespace).type == "person"),
            }
        )
        for key in members:
            del ws.nodes[key]
            fx.upsert_nodes.pop(key, None)
            fx.delete_nodes.add(key)
        member_set = set(members)
        for edge in [k for k in ws.edges if k[0] in member_set or k[1] in member_set]:
            del ws.edges[edge]
            fx.add_edges.pop(edge, None)
            fx.delete_edges.add(edge)
        # The profiles folded into it go with it: stored ones (the store follows any chain
        # of them) and those of this fetch, whose fold would otherwise be written after.
        folded = [f for f, into in fx.folded_profiles.items() if into == pid]
        for f in (pid, *folded):
            ws.profiles.pop(f, None)
            fx.new_profiles.pop(f, None)
            fx.folded_profiles.pop(f, None)
        fx.refused = [r for r in fx.refused if r.a not in member_set and r.b not in member_set]
        return Forgotten([pid], person_keys, members, folded)

    # -- primitive changes, each recorded in the effects --
    def _touch(self, ws: WorkingSet, fx: Effects, key: str, at: float) -> None:
        node = ws.nodes[key]
        node.last_seen = max(node.last_seen, at)
        node.first_seen = min(node.first_seen, at)
        fx.upsert_nodes[key] = node

    def _create(self, ws: WorkingSet, fx: Effects, item: _Item, profile_id: str, at: float) -> None:
        node = Node(item.key, item.namespace, item.value, profile_id, at, at)
        ws._put_node(node)
        fx.delete_nodes.discard(item.key)
        fx.upsert_nodes[item.key] = node

    @staticmethod
    def _new_profile(ws: WorkingSet, fx: Effects, profile_id: str, at: float) -> None:
        ws.profiles[profile_id] = at
        fx.new_profiles[profile_id] = at

    @staticmethod
    def _connect(ws: WorkingSet, fx: Effects, rec: _Record, a: str, b: str) -> None:
        key = edge_key(a, b)
        if a == b or key in ws.edges:
            return
        edge = Edge(key[0], key[1], rec.at, rec.dataset, rec.record_id)
        ws._put_edge(edge)
        fx.delete_edges.discard(key)
        fx.add_edges[key] = edge

    @staticmethod
    def _disconnect(ws: WorkingSet, fx: Effects, key: tuple[str, str]) -> None:
        ws._drop_edge(key)
        fx.add_edges.pop(key, None)
        fx.delete_edges.add(key)

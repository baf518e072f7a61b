"""The identity graph's rules: links, merges, unique namespaces, shared devices, the limit."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.identity.graph import (
    Edge,
    Effects,
    Fold,
    Forgotten,
    IdentityGraph,
    Move,
    Node,
    WorkingSet,
)
from shared.messages import Identity
from shared.normalize import normalize
from shared.resources import BUILTIN_NAMESPACES, Namespace

NAMESPACES = {ns.symbol: ns for ns in BUILTIN_NAMESPACES}


def ids(*keys: str) -> list[Identity]:
    out = []
    for key in keys:
        ns, _, value = key.partition(":")
        out.append(Identity(ns, value))
    return out


def sequential_ids() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"p{next(counter)}"


def make_graph(max_identities: int = 50) -> IdentityGraph:
    return IdentityGraph(
        NAMESPACES, max_identities, new_profile_id=sequential_ids(), default_region="US"
    )


class World:
    """One working set, records applied one by one, each with its own effects."""

    def __init__(self, max_identities: int = 50) -> None:
        self.graph = make_graph(max_identities)
        self.ws = WorkingSet()
        self.fx = Effects()
        self.clock = 0.0

    def link(self, *keys: str, dataset: str = "web") -> str | None:
        """Apply one record at the next tick, with fresh effects."""
        self.clock += 1
        self.fx = Effects()
        return self.graph.link(
            self.ws,
            self.fx,
            ids(*keys),
            at=self.clock,
            dataset=dataset,
            record_id=f"r{int(self.clock)}",
        )

    def see(self, *keys: str, dataset: str = "web") -> str:
        """Apply one record that has a usable identity; return its profile id."""
        profile_id = self.link(*keys, dataset=dataset)
        assert profile_id is not None
        return profile_id

    def profile(self, key: str) -> str:
        return self.ws.nodes[key].profile_id

    def keys(self, profile_id: str) -> set[str]:
        return {n.key for n in self.graph.graph_of(self.ws, profile_id)}


# -- normalisation -------------------------------------------------------------------------------


def test_emails_are_trimmed_and_lower_cased() -> None:
    email = NAMESPACES["email"]
    assert normalize(email, "email", " A@B.com ", "US") == "a@b.com"
    assert normalize(email, "email", "a@b.com", "US") == "a@b.com"
    assert normalize(email, "email", "   ", "US") is None


def test_phones_become_e164() -> None:
    phone = NAMESPACES["phone"]
    assert normalize(phone, "phone", "+1 (415) 555-0100", "US") == "+14155550100"
    assert normalize(phone, "phone", "(415) 555-0100", "US") == "+14155550100"
    assert normalize(phone, "phone", "020 7946 0958", default_region="GB") == "+442079460958"
    assert normalize(phone, "phone", "+44 20 7946 0958", "US") == "+442079460958"
    assert normalize(phone, "phone", "12", "US") is None
    assert normalize(phone, "phone", "not a number", "US") is None
    assert normalize(phone, "phone", "", "US") is None


def test_hashed_values_are_left_as_they_are_but_digests_are_lower_cased() -> None:
    hashed = NAMESPACES["email_sha256"]
    digest = "AB" * 32
    assert normalize(hashed, "email_sha256", f" {digest} ", "US") == digest.lower()
    assert normalize(hashed, "email_sha256", "SomeOtherHash", "US") == "SomeOtherHash"
    assert normalize(None, "partner_id", " Xy ", "US") == "Xy"
    assert normalize(NAMESPACES["crm_id"], "crm_id", " C-1 ", "US") == "C-1"


def test_keys_of_normalises_and_drops_unusable_values() -> None:
    graph = make_graph()
    keys = graph.keys_of(
        ids("email: A@B.com ", "email:a@b.com", "phone:+1 (415) 555-0100", "phone:12", "ecid: ")
    )
    assert keys == ["email:a@b.com", "phone:+14155550100"]


_RAW_IDENTITIES = st.builds(
    Identity,
    st.sampled_from(["email", "phone", "ecid", "crm_id", "unknown_ns"]),
    st.sampled_from(
        ["A@B.com ", "a@b.com", "+1 (415) 555-0100", "4155550100", "12", " ", "x", "C1"]
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_RAW_IDENTITIES, max_size=5), max_size=8))
def test_a_graph_normalises_as_the_reference_however_often_it_met_the_values(
    records: list[list[Identity]],
) -> None:
    """A graph keeps what it normalised: each record's keys and anchor are still the ones
    `normalize` gives, value by value, and the ones a graph that never met them gives."""
    warm = make_graph()
    for identities in records:
        warm.keys_of(identities)
    for identities in records:
        expected: list[str] = []
        for i in identities:
            value = normalize(NAMESPACES.get(i.namespace), i.namespace, i.value, "US")
            if value is not None and f"{i.namespace}:{value}" not in expected:
                expected.append(f"{i.namespace}:{value}")
        assert warm.keys_of(identities) == expected
        assert warm.anchor_of(identities) == make_graph().anchor_of(identities)


# -- primary identity ----------------------------------------------------------------------------


def test_primary_identity_order() -> None:
    graph = IdentityGraph(
        {**NAMESPACES, "web": Namespace("web", "cookie", priority=5)}, default_region="US"
    )

    def node(key: str, first_seen: float) -> Node:
        ns, _, value = key.partition(":")
        return Node(key, ns, value, "p", first_seen, first_seen)

    cookie = node("ecid:k", 1)
    web_cookie = node("web:w", 9)
    device = node("gaid:g", 2)
    better_device = node("idfa:i", 3)
    unknown = node("partner:x", 4)
    email = node("email:e", 5)
    crm = node("crm_id:c", 6)
    assert graph.primary_identity([]) is None
    assert graph.primary_identity([cookie, web_cookie]) is web_cookie  # priority 5 before 10
    assert graph.primary_identity([cookie, web_cookie, device]) is device
    assert graph.primary_identity([cookie, device, better_device]) is better_device
    assert graph.primary_identity([cookie, better_device, unknown]) is unknown  # a person id
    assert graph.primary_identity([unknown, email]) is email
    assert graph.primary_identity([email, crm, cookie]) is crm
    older_email = node("email:f", 0.5)
    assert graph.primary_identity([email, older_email]) is older_email


# -- one person's journey -----------------------------------------------------------------------


def test_one_person_journey_ends_in_one_profile() -> None:
    w = World()
    p = w.see("ecid:K1")  # browsing, anonymous
    assert p == "p1"
    assert w.fx.new_profiles == {"p1": 1.0}

    assert w.see("ecid:K1", "email: Ann@Example.com ") == p  # the same cookie logs in
    assert w.fx.new_profiles == {}
    assert w.profile("email:ann@example.com") == p

    assert w.see("crm_id:C1", "email:ann@example.com", "phone:(415) 555-0100", dataset="crm") == p
    assert w.see("crm_id:C1", "loyalty_id:L1", dataset="loyalty") == p
    assert w.see("loyalty_id:L1", dataset="orders") == p  # an order keyed by loyalty id only

    assert w.keys(p) == {
        "ecid:K1",
        "email:ann@example.com",
        "crm_id:C1",
        "phone:+14155550100",
        "loyalty_id:L1",
    }
    assert list(w.ws.profiles) == ["p1"]
    primary = w.graph.primary_identity(w.graph.graph_of(w.ws, p))
    assert primary is not None
    assert primary.key == "crm_id:C1"
    assert w.graph.graph_of(w.ws, p)[0] is primary
    # edges go from the record's highest-priority identity to the others
    assert set(w.ws.edges) == {
        ("ecid:K1", "email:ann@example.com"),
        ("crm_id:C1", "email:ann@example.com"),
        ("crm_id:C1", "phone:+14155550100"),
        ("crm_id:C1", "loyalty_id:L1"),
    }
    crm_edge = w.ws.edges[("crm_id:C1", "phone:+14155550100")]
    assert (crm_edge.dataset, crm_edge.record_id, crm_edge.created_at) == ("crm", "r3", 3.0)
    cookie = w.ws.nodes["ecid:K1"]
    assert (cookie.first_seen, cookie.last_seen) == (1.0, 2.0)
    assert w.ws.nodes["loyalty_id:L1"].last_seen == 5.0


def test_records_without_usable_identities_belong_to_no_profile() -> None:
    w = World()
    assert w.link() is None
    assert w.link("email:  ", "phone:12") is None
    assert not w.fx
    assert w.ws.nodes == {}


# -- merges --------------------------------------------------------------------------------------


def test_merge_keeps_the_older_profile_and_reports_the_folded_one() -> None:
    w = World()
    older = w.see("ecid:K1")
    newer = w.see("email:a@x.com", "phone:+14155550100")
    assert (older, newer) == ("p1", "p2")

    # the record's anchor (email) is in the newer graph; the cookie's graph is older
    assert w.see("email:a@x.com", "ecid:K1") == older
    assert w.fx.events == [Fold("p1", ["p2"])]
    assert w.fx.folded_profiles == {"p2": "p1"}
    assert w.fx.new_profiles == {}
    assert w.keys(older) == {"ecid:K1", "email:a@x.com", "phone:+14155550100"}
    assert w.ws.profiles == {"p1": 1.0}
    assert set(w.fx.upsert_nodes) == {"ecid:K1", "email:a@x.com", "phone:+14155550100"}
    assert set(w.fx.add_edges) == {("ecid:K1", "email:a@x.com")}


def test_merge_of_three_graphs_in_one_record() -> None:
    w = World()
    assert w.see("ecid:K2") == "p1"
    assert w.see("ecid:K1") == "p2"
    assert w.see("email:a@x.com") == "p3"
    assert w.see("email:a@x.com", "ecid:K1", "ecid:K2") == "p1"
    assert w.fx.events == [Fold("p2", ["p3"]), Fold("p1", ["p2"])]
    assert w.fx.folded_profiles == {"p3": "p1", "p2": "p1"}
    assert w.keys("p1") == {"ecid:K1", "ecid:K2", "email:a@x.com"}


def test_new_identities_join_an_existing_graph_without_a_new_profile() -> None:
    w = World()
    assert w.see("ecid:K1") == "p1"
    assert w.see("crm_id:C1", "email:a@x.com", "ecid:K1") == "p1"
    assert w.fx.new_profiles == {}
    assert w.fx.events == []


# -- unique namespaces and shared devices -------------------------------------------------------


def test_shared_device_goes_to_the_person_who_logged_in_last() -> None:
    w = World()
    anna = w.see("crm_id:A", "email:anna@x.com", dataset="crm")
    ben = w.see("crm_id:B", "email:ben@x.com", dataset="crm")
    assert (anna, ben) == ("p1", "p2")

    assert w.see("email:anna@x.com", "idfa:D") == anna
    assert w.profile("idfa:D") == anna

    assert w.see("email:ben@x.com", "idfa:D") == ben  # Ben logs in on the same tablet
    assert w.profile("idfa:D") == ben
    assert w.fx.events == [Move(anna, ben, ["idfa:D"], "moved")]
    assert w.fx.delete_edges == {("email:anna@x.com", "idfa:D")}
    assert set(w.fx.add_edges) == {("email:ben@x.com", "idfa:D")}
    assert w.fx.refused == []
    assert set(w.ws.profiles) == {anna, ben}
    assert w.keys(anna) == {"crm_id:A", "email:anna@x.com"}
    assert w.keys(ben) == {"crm_id:B", "email:ben@x.com", "idfa:D"}

    assert w.see("email:anna@x.com", "idfa:D") == anna  # and back
    assert w.fx.events == [Move(ben, anna, ["idfa:D"], "moved")]
    assert set(w.ws.profiles) == {anna, ben}


def test_a_person_id_from_another_graph_is_refused() -> None:
    w = World()
    anna = w.see("crm_id:A", "email:anna@x.com")
    ben = w.see("crm_id:B", "email:ben@x.com")
    assert w.see("crm_id:A", "email:ben@x.com", dataset="crm") == anna
    assert len(w.fx.refused) == 1
    refused = w.fx.refused[0]
    assert (refused.a, refused.b, refused.dataset, refused.record_id, refused.at) == (
        "crm_id:A",
        "email:ben@x.com",
        "crm",
        "r3",
        3.0,
    )
    assert "crm_id" in refused.reason
    assert "crm_id:A" in refused.reason
    assert "crm_id:B" in refused.reason
    assert w.profile("email:ben@x.com") == ben
    assert w.keys(anna) == {"crm_id:A", "email:anna@x.com"}
    assert w.fx.events == []
    assert w.ws.nodes["email:ben@x.com"].last_seen == 3.0


def test_a_second_value_of_a_unique_namespace_gets_its_own_graph() -> None:
    w = World()
    p = w.see("crm_id:A", "crm_id:B", "email:e@x.com")
    other = w.profile("crm_id:B")
    assert other != p
    assert w.fx.new_profiles == {p: 1.0, other: 1.0}
    assert [r.b for r in w.fx.refused] == ["crm_id:B"]
    assert w.fx.refused[0].reason == "crm_id: graph already holds crm_id:A, cannot add crm_id:B"
    assert w.keys(p) == {"crm_id:A", "email:e@x.com"}
    assert w.keys(other) == {"crm_id:B"}


def test_moving_a_device_splits_what_hung_on_it() -> None:
    w = World()
    anna = w.see("crm_id:A", "email:anna@x.com")
    w.see("email:anna@x.com", "idfa:D")
    w.see("idfa:D", "ecid:K")  # the browser cookie is linked only through the tablet
    ben = w.see("crm_id:B")
    assert w.keys(anna) == {"crm_id:A", "email:anna@x.com", "idfa:D", "ecid:K"}

    assert w.see("crm_id:B", "idfa:D") == ben
    assert w.fx.events == [
        Move(anna, ben, ["idfa:D"], "moved"),
        Move(anna, "p3", ["ecid:K"], "split"),
    ]
    assert w.fx.new_profiles == {"p3": 5.0}
    assert w.keys(anna) == {"crm_id:A", "email:anna@x.com"}
    assert w.keys(ben) == {"crm_id:B", "idfa:D"}
    assert w.keys("p3") == {"ecid:K"}
    assert w.fx.delete_edges == {("email:anna@x.com", "idfa:D"), ("ecid:K", "idfa:D")}


def test_a_new_person_takes_the_device_and_the_split_off_cookie() -> None:
    w = World()
    anna = w.see("crm_id:A", "idfa:D")
    w.see("idfa:D", "ecid:K")
    # a new person logs in on the tablet and the cookie in one record
    ben = w.see("crm_id:B", "idfa:D", "ecid:K")
    assert ben != anna
    assert w.keys(anna) == {"crm_id:A"}
    assert w.keys(ben) == {"crm_id:B", "idfa:D", "ecid:K"}
    moved = [e for e in w.fx.events if isinstance(e, Move) and e.reason == "moved"]
    assert moved == [Move(anna, ben, ["idfa:D"], "moved")]
    assert ben in w.fx.new_profiles
    assert set(w.ws.profiles) == {anna, ben}


def test_a_refused_person_id_stays_behind_when_the_devices_linking_it_move() -> None:
    w = World(max_identities=4)
    c1 = w.see("crm_id:C1", "idfa:d1")
    assert w.see("loyalty_id:L1", "idfa:d1", "gaid:d2") == c1  # L1 hangs on C1's devices
    # C2 logs in with L1 on both devices: L1's graph holds C1, so the link C2-L1 is refused;
    # the devices move to C2, which leaves L1 on its own (not in C2's graph through d2)
    c2 = w.see("crm_id:C2", "loyalty_id:L1", "idfa:d1", "gaid:d2")
    assert [(r.a, r.b) for r in w.fx.refused] == [("crm_id:C2", "loyalty_id:L1")]
    l1 = w.profile("loyalty_id:L1")
    assert len({c1, c2, l1}) == 3
    assert w.keys(c1) == {"crm_id:C1"}
    assert w.keys(c2) == {"crm_id:C2", "idfa:d1", "gaid:d2"}
    assert w.keys(l1) == {"loyalty_id:L1"}
    assert w.fx.events == [
        Move(c1, c2, ["idfa:d1"], "moved"),
        Move(c1, l1, ["gaid:d2", "loyalty_id:L1"], "split"),
        Move(l1, c2, ["gaid:d2"], "moved"),
    ]
    assert set(w.fx.new_profiles) == {l1, c2}
    assert set(w.ws.edges) == {("crm_id:C2", "idfa:d1"), ("crm_id:C2", "gaid:d2")}


def test_a_cookie_on_a_refused_person_ids_split_off_graph_moves_too() -> None:
    w = World()
    c1 = w.see("crm_id:C1", "idfa:d1")
    assert w.see("loyalty_id:L1", "idfa:d1", "ecid:k1") == c1
    c2 = w.see("crm_id:C2", "loyalty_id:L1", "idfa:d1", "ecid:k1")
    assert [(r.a, r.b) for r in w.fx.refused] == [("crm_id:C2", "loyalty_id:L1")]
    assert w.keys(c2) == {"crm_id:C2", "idfa:d1", "ecid:k1"}
    assert w.keys(w.profile("loyalty_id:L1")) == {"loyalty_id:L1"}
    assert w.keys(c1) == {"crm_id:C1"}


# -- the size limit ------------------------------------------------------------------------------


def test_the_50_identity_limit_removes_the_oldest_cookie_first() -> None:
    w = World()
    p = w.see("crm_id:C1")
    for i in range(48):
        assert w.see("crm_id:C1", f"ecid:k{i:02}") == p
    assert w.see("crm_id:C1", "idfa:D") == p
    assert len(w.keys(p)) == 50
    assert w.fx.events == []

    assert w.see("crm_id:C1", "email:a@x.com") == p
    assert len(w.keys(p)) == 50
    assert w.fx.events == [Move(p, None, ["ecid:k00"], "limit")]
    assert w.fx.delete_nodes == {"ecid:k00"}
    assert w.fx.delete_edges == {("crm_id:C1", "ecid:k00")}
    assert "ecid:k00" not in w.ws.nodes
    assert "ecid:k00" not in w.fx.upsert_nodes

    # a cookie seen again is not protected by its age alone: first_seen counts
    assert w.see("crm_id:C1", "ecid:k01", "ecid:k02", "email:b@x.com") == p
    assert w.fx.events == [Move(p, None, ["ecid:k03"], "limit")]


def test_the_limit_removes_cookies_then_devices_then_person_ids() -> None:
    w = World(max_identities=4)
    p = w.see("crm_id:C1", "email:e@x.com", "idfa:D", "ecid:K")
    assert w.see("crm_id:C1", "phone:+14155550100") == p
    assert w.fx.events == [Move(p, None, ["ecid:K"], "limit")]
    assert w.see("crm_id:C1", "email:f@x.com") == p
    assert w.fx.events == [Move(p, None, ["idfa:D"], "limit")]
    w.clock = 10
    assert w.see("crm_id:C1", "email:g@x.com") == p
    assert w.fx.events == [Move(p, None, ["email:e@x.com"], "limit")]
    assert w.keys(p) == {"crm_id:C1", "phone:+14155550100", "email:f@x.com", "email:g@x.com"}


def test_the_limit_never_removes_the_records_own_identities() -> None:
    w = World(max_identities=3)
    p = w.see("crm_id:C1", "ecid:K1", "ecid:K2")
    assert w.see("crm_id:C1", "ecid:K1", "email:a@x.com") == p
    assert w.fx.events == [Move(p, None, ["ecid:K2"], "limit")]
    # one record with more identities than the limit keeps them all
    assert w.see("crm_id:C1", "ecid:K1", "email:a@x.com", "email:b@x.com") == p
    assert len(w.keys(p)) == 4


def test_removing_a_node_for_the_limit_can_split_the_graph() -> None:
    w = World(max_identities=3)
    p = w.see("email:e@x.com", "ecid:K")
    assert w.see("ecid:K", "idfa:D") == p  # the device hangs on the cookie
    assert w.keys(p) == {"email:e@x.com", "ecid:K", "idfa:D"}

    assert w.see("email:e@x.com", "phone:+14155550100") == p
    assert w.fx.events == [
        Move(p, None, ["ecid:K"], "limit"),
        Move(p, "p2", ["idfa:D"], "split"),
    ]
    assert w.keys(p) == {"email:e@x.com", "phone:+14155550100"}
    assert w.keys("p2") == {"idfa:D"}
    assert w.fx.new_profiles == {"p2": 3.0}


# -- effects and working sets --------------------------------------------------------------------


class Store:
    """A stand-in for the service's tables: it only ever sees effects."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.edges: dict[tuple[str, str], Edge] = {}
        self.profiles: dict[str, float] = {}

    def working_set(self, keys: list[str]) -> WorkingSet:
        """What the service loads for a batch: the whole graphs of the batch's identities."""
        pids = {self.nodes[k].profile_id for k in keys if k in self.nodes}
        ws = WorkingSet()
        for node in self.nodes.values():
            if node.profile_id in pids:
                ws.nodes[node.key] = msgspec.structs.replace(node)
        for key, edge in self.edges.items():
            if key[0] in ws.nodes:
                ws.edges[key] = msgspec.structs.replace(edge)
        ws.profiles.update({p: self.profiles[p] for p in pids})
        return ws

    def apply(self, fx: Effects) -> None:
        assert not (fx.delete_nodes & set(fx.upsert_nodes))
        assert not (fx.delete_edges & set(fx.add_edges))
        for key in fx.delete_nodes:
            self.nodes.pop(key, None)
        for ekey in fx.delete_edges:
            self.edges.pop(ekey, None)
        for key, node in fx.upsert_nodes.items():
            self.nodes[key] = msgspec.structs.replace(node)
        for ekey, edge in fx.add_edges.items():
            self.edges[ekey] = msgspec.structs.replace(edge)
        self.profiles.update(fx.new_profiles)
        for folded in fx.folded_profiles:
            self.profiles.pop(folded, None)


def check_invariants(graph: IdentityGraph, store: Store) -> None:
    by_profile: dict[str, set[str]] = defaultdict(set)
    for key, node in store.nodes.items():
        assert key == f"{node.namespace}:{node.value}"
        assert node.profile_id in store.profiles
        by_profile[node.profile_id].add(key)
    adjacent: dict[str, set[str]] = defaultdict(set)
    for (a, b), edge in store.edges.items():
        assert a < b
        assert (edge.a, edge.b) == (a, b)
        assert store.nodes[a].profile_id == store.nodes[b].profile_id
        adjacent[a].add(b)
        adjacent[b].add(a)
    for pid, keys in by_profile.items():
        assert len(keys) <= graph.max_identities, pid
        unique = [store.nodes[k].namespace for k in keys if graph.namespace(k.split(":")[0]).unique]
        assert len(unique) == len(set(unique)), (pid, sorted(keys))
        # the profile is one connected component
        start = next(iter(keys))
        seen = {start}
        todo = [start]
        while todo:
            for near in adjacent[todo.pop()]:
                if near not in seen:
                    seen.add(near)
                    todo.append(near)
        assert seen == keys, pid


def test_the_service_may_change_the_working_set_directly() -> None:
    graph = make_graph()
    ws = WorkingSet()
    fx = Effects()
    p = graph.link(ws, fx, ids("email:a@x.com", "ecid:K"), at=1, dataset="d", record_id="r1")
    assert p == "p1"
    # the service loads more of the graph by hand, as it would from its tables
    ws.nodes["crm_id:C9"] = Node("crm_id:C9", "crm_id", "C9", "p9", 0.5, 0.5)
    ws.nodes["idfa:Z"] = Node("idfa:Z", "idfa", "Z", "p9", 0.5, 0.5)
    ws.edges[("crm_id:C9", "idfa:Z")] = Edge("crm_id:C9", "idfa:Z", 0.5, "d", "r0")
    ws.profiles["p9"] = 0.5
    assert graph.link(ws, fx, ids("ecid:K", "idfa:Z"), at=2, dataset="d", record_id="r2") == "p9"
    assert {n.key for n in graph.graph_of(ws, "p9")} == {
        "crm_id:C9",
        "idfa:Z",
        "ecid:K",
        "email:a@x.com",
    }
    assert fx.folded_profiles == {"p1": "p9"}


NAMES = (
    "crm_id:C1",
    "crm_id:C2",
    "crm_id:C3",
    "loyalty_id:L1",
    "loyalty_id:L2",
    "email:e1",
    "email:e2",
    "email:e3",
    "partner:x1",
    "idfa:d1",
    "gaid:d2",
    "ecid:k1",
    "ecid:k2",
    "ecid:k3",
    "ecid:k4",
)
records = st.lists(st.sampled_from(NAMES), min_size=1, max_size=4)
batches = st.lists(st.lists(records, min_size=1, max_size=4), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=batches, max_identities=st.integers(min_value=4, max_value=6))
@example(  # a refused person id must not reach the anchor's graph through a moved device
    batches=[
        [
            ["crm_id:C1", "idfa:d1"],
            ["loyalty_id:L1", "idfa:d1", "gaid:d2"],
            ["crm_id:C2", "loyalty_id:L1", "idfa:d1", "gaid:d2"],
        ]
    ],
    max_identities=4,
)
def test_random_records_keep_the_graph_consistent(
    batches: list[list[list[str]]], max_identities: int
) -> None:
    graph = make_graph(max_identities)
    store = Store()
    clock = 0.0
    for batch in batches:
        keys = [k for record in batch for k in graph.keys_of(ids(*record))]
        ws = graph_ws = store.working_set(keys)
        fx = Effects()
        for record in batch:
            clock += 1
            p = graph.link(ws, fx, ids(*record), at=clock, dataset="d", record_id=str(clock))
            assert p is not None
            assert p in ws.profiles
            assert any(ws.nodes[k].profile_id == p for k in graph.keys_of(ids(*record)))
            for k in graph.keys_of(ids(*record)):
                assert ws.nodes[k].last_seen == clock
            for refused in fx.refused:
                if refused.at == clock:
                    assert ws.nodes[refused.a].profile_id != ws.nodes[refused.b].profile_id
        store.apply(fx)
        check_invariants(graph, store)
        # the effects reproduce the working set exactly
        for key, node in graph_ws.nodes.items():
            assert store.nodes[key] == node
        for ekey, edge in graph_ws.edges.items():
            assert store.edges[ekey] == edge
        for pid in graph_ws.profiles:
            assert store.profiles[pid] == graph_ws.profiles[pid]
            in_store = {k for k, n in store.nodes.items() if n.profile_id == pid}
            assert in_store == graph_ws.members(pid)
        touched = {e for key in graph_ws.nodes for e in store.edges if key in e}
        assert touched == set(graph_ws.edges)


@pytest.mark.parametrize("bad", [0, -1])
def test_max_identities_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match="max_identities"):
        IdentityGraph(NAMESPACES, bad, default_region="US")


# -- privacy -------------------------------------------------------------------------------------


def test_forget_removes_the_whole_graph_and_names_its_person_identities() -> None:
    w = World()
    p = w.see("crm_id:C1", "email:e@x.com", "ecid:K")
    w.fx = Effects()
    gone = w.graph.forget(w.ws, w.fx, Identity("email", " E@x.com "))
    assert gone == Forgotten(
        [p], ["crm_id:C1", "email:e@x.com"], ["crm_id:C1", "ecid:K", "email:e@x.com"], []
    )
    assert w.ws.nodes == {}
    assert w.ws.edges == {}
    assert w.ws.profiles == {}
    assert w.fx.delete_nodes == {"crm_id:C1", "ecid:K", "email:e@x.com"}


def test_forgetting_an_identity_no_graph_holds_changes_nothing() -> None:
    w = World()
    w.see("crm_id:C1")
    w.fx = Effects()
    assert w.graph.forget(w.ws, w.fx, Identity("crm_id", "C2")) == Forgotten(
        [], ["crm_id:C2"], [], []
    )
    assert w.graph.forget(w.ws, w.fx, Identity("phone", "12")) == Forgotten([], [], [], [])
    assert not w.fx
    assert set(w.ws.nodes) == {"crm_id:C1"}


steps = st.one_of(records, st.sampled_from(NAMES).map(lambda key: f"forget {key}"))
forget_batches = st.lists(st.lists(steps, min_size=1, max_size=5), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=forget_batches)
def test_random_records_and_forgets_keep_the_graph_consistent(
    batches: list[list[list[str] | str]],
) -> None:
    """Privacy deletes among the records of a fetch: the person's graph is gone from the
    working set at once, and the effects (with what `forget` returns for the stored
    profiles) still reproduce the working set."""
    graph = make_graph(6)
    store = Store()
    clock = 0.0
    for batch in batches:
        keys: list[str] = []
        for step in batch:
            if isinstance(step, str):
                keys += graph.keys_of(ids(step.removeprefix("forget ")))
            else:
                keys += graph.keys_of(ids(*step))
        ws = store.working_set(keys)
        fx = Effects()
        forgotten: list[str] = []
        removed: set[str] = set()
        for step in batch:
            clock += 1
            if isinstance(step, str):
                key = step.removeprefix("forget ")
                pid = ws.nodes[key].profile_id if key in ws.nodes else None
                gone = graph.forget(ws, fx, ids(key)[0])
                assert gone.profile_ids == ([] if pid is None else [pid])
                assert key not in ws.nodes
                assert not any(pid == n.profile_id for n in ws.nodes.values())
                assert pid not in ws.profiles
                forgotten += [*gone.profile_ids, *gone.folded]
                removed.update(gone.identities)
            else:
                graph.link(ws, fx, ids(*step), at=clock, dataset="d", record_id=str(clock))
        store.apply(fx)
        for pid in forgotten:
            store.profiles.pop(pid, None)
        check_invariants(graph, store)
        for key, node in ws.nodes.items():
            assert store.nodes[key] == node
        assert not (removed - set(ws.nodes)) & set(store.nodes), "forgotten, not linked again"
        for ekey, edge in ws.edges.items():
            assert store.edges[ekey] == edge
        for pid in ws.profiles:
            assert store.profiles[pid] == ws.profiles[pid]

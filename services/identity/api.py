"""The identity service's admin API (for people and the CLI): look up a person's graph."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from services.identity.graph import IdentityGraph
from services.identity.store import IdentityStore
from shared import admin, subjects
from shared.admin import Invalid, NotFound
from shared.db import write_lock
from shared.messages import Identity
from shared.normalize import Unusable, normalized


class IdentityLookup(msgspec.Struct):
    identity: str
    """`<namespace>:<value>`"""


class GraphNode(msgspec.Struct):
    namespace: str
    value: str
    first_seen: float
    last_seen: float


class GraphLink(msgspec.Struct):
    a: str
    b: str
    created_at: float
    dataset: str
    record_id: str


class GraphRefusal(msgspec.Struct):
    at: float
    record_id: str
    dataset: str
    a: str
    b: str
    reason: str


class IdentityGraphView(msgspec.Struct):
    profile_id: str
    primary: Identity | None
    identities: list[GraphNode]
    links: list[GraphLink]
    refused: list[GraphRefusal]


def parse_identity(text: str) -> Identity:
    namespace, sep, value = text.partition(":")
    if not sep or not namespace or not value:
        raise Invalid(f"expected <namespace>:<value>, got {text!r}", field="identity")
    return Identity(namespace, value)


class IdentityApi:
    """`cdp.admin.identity.lookup`: the graph that holds an identity."""

    def __init__(self, store: IdentityStore, graph: Callable[[], IdentityGraph]) -> None:
        self.store = store
        self._graph = graph
        self._subs: list[Subscription] = []

    async def start(self, nc: Client) -> None:
        self._subs = [
            await admin.serve(nc, subjects.admin("identity", "lookup"), IdentityLookup, self.lookup)
        ]

    async def stop(self) -> None:
        await admin.unsubscribe_all(self._subs)

    async def lookup(self, request: IdentityLookup) -> IdentityGraphView:
        """Read under the write lock: the graph, its links and refusals of one moment."""
        async with write_lock(self.store.db):
            return await self._lookup(request)

    async def _lookup(self, request: IdentityLookup) -> IdentityGraphView:
        graph = self._graph()
        identity = parse_identity(request.identity)
        keys = graph.keys_of([identity])
        if not keys:
            why = normalized(
                graph.namespaces.get(identity.namespace),
                identity.namespace,
                identity.value,
                graph.default_region,
            )
            reason = f" ({why.reason})" if isinstance(why, Unusable) else ""
            raise NotFound(f"{request.identity} is not a usable identity value{reason}")
        ws = await self.store.load([keys[0]])
        node = ws.nodes.get(keys[0])
        if node is None:
            raise NotFound(f"no profile holds {request.identity}")
        members = graph.graph_of(ws, node.profile_id)
        member_keys = {n.key for n in members}
        primary = graph.primary_identity(members)
        refused = await self.store.refused(member_keys)
        return IdentityGraphView(
            profile_id=node.profile_id,
            primary=Identity(primary.namespace, primary.value) if primary else None,
            identities=[
                GraphNode(n.namespace, n.value, n.first_seen, n.last_seen)
                for n in sorted(members, key=lambda n: (n.first_seen, n.key))
            ],
            links=[
                GraphLink(e.a, e.b, e.created_at, e.dataset, e.record_id)
                for e in sorted(ws.edges.values(), key=lambda e: (e.created_at, e.a, e.b))
                if e.a in member_keys
            ],
            refused=[
                GraphRefusal(r.at, r.record_id, r.dataset, r.a, r.b, r.reason) for r in refused
            ],
        )

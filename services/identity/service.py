"""The identity actor: stitches each record's identities into the identity graph.

Per batch it loads the part of the graph the batch touches (four queries), applies every
record in order with the pure graph logic, persists the effects in the batch's
transaction, and tells the profile service, partition by partition, which profile each
record belongs to and which profiles merged, split or lost identities.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import msgspec
import nats.js.errors
from nats.aio.subscription import Subscription

from services.identity.errors import ReplayImpossible
from services.identity.graph import Edge, Effects, Fold, IdentityGraph, Move, Node, WorkingSet
from services.identity.store import (
    DELETE_EDGE,
    DELETE_NODE,
    DELETE_PROFILE,
    EDGE_COLUMNS,
    FOLD_PROFILE,
    INSERT_EDGE,
    INSERT_PROFILE,
    INSERT_REFUSED,
    MIGRATIONS,
    NODE_COLUMNS,
    UPSERT_NAMESPACE,
    UPSERT_NODE,
)
from shared import admin, subjects
from shared.admin import AdminFailure
from shared.config import ConfigError
from shared.db import write_lock
from shared.messages import (
    Deleted,
    Fragment,
    Identity,
    Merged,
    PrivacyDelete,
    PrivacyReport,
    Probe,
    ProfileEnvelope,
    ProfileItem,
    Reassigned,
    Record,
    json_encoder,
    msgpack_encoder,
    record_batch_decoder,
)
from shared.normalize import Unusable, normalized
from shared.resources import BUILTIN_NAMESPACES, Namespace
from shared.runtime import ConsumerSpec, Service, Step
from shared.runtime.partitioned import PartitionedOutput
from shared.runtime.probes import report_probe

RECORDS_CONSUMER = "identity"
_namespace_decoder = msgspec.json.Decoder(Namespace)
_keys_encoder = msgspec.json.Encoder()


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
        raise AdminFailure(
            "invalid", f"expected <namespace>:<value>, got {text!r}", field="identity"
        )
    return Identity(namespace, value)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, raw, "a positive integer") from None
    if value < 2:
        raise ConfigError(name, raw, "an integer of at least 2")
    return value


def _json_list(values: Iterable[str]) -> bytes:
    return _keys_encoder.encode(list(values))


def _encode_items(items: list[ProfileItem]) -> bytes:
    return msgpack_encoder.encode(ProfileEnvelope(items))


class IdentityService(Service):
    name = "identity"
    migrations = MIGRATIONS
    listings: ClassVar[dict[str, str]] = {
        "nodes": "SELECT rowid, key, profile_id FROM nodes WHERE rowid > ? ORDER BY rowid LIMIT ?",
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_identities = _env_int("CDP_IDENTITY_MAX_GRAPH_SIZE", 50)
        self.phone_region = self.settings.phone_region
        self.namespaces: dict[str, Namespace] = {n.symbol: n for n in BUILTIN_NAMESPACES}
        self.graph = self._new_graph()
        self._subs: list[Subscription] = []
        self.announced_until = 0
        """While the graph is rebuilt from the records stream: the last record sequence
        whose effects the profile service already received (0: announce everything)."""

    def _new_graph(self) -> IdentityGraph:
        return IdentityGraph(
            self.namespaces, max_identities=self.max_identities, default_region=self.phone_region
        )

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (
            ConsumerSpec(
                "identity-namespaces",
                subjects.STREAM_CONFIG,
                self.handle_namespaces,
                filter_subjects=(subjects.config("namespace", "*"),),
                description="identity namespaces (linking rules), from ingest's configuration",
            ),
            ConsumerSpec(
                RECORDS_CONSUMER,
                subjects.STREAM_RECORDS,
                self.handle_records,
                description="accepted records and privacy deletes, from ingest",
            ),
        )

    async def on_start(self) -> None:
        await self._refuse_partial_replay()
        for symbol, spec in await self.db.execute_fetchall("SELECT symbol, spec FROM namespaces"):
            self.namespaces[str(symbol)] = _namespace_decoder.decode(spec)
        self.graph = self._new_graph()
        self._subs = [
            await admin.serve(
                self.nc, subjects.admin("identity", "lookup"), IdentityLookup, self.lookup
            )
        ]

    async def on_stop(self) -> None:
        await admin.unsubscribe_all(self._subs)

    async def _refuse_partial_replay(self) -> None:
        """Without its state (no offset: a new or lost identity.db) the service rebuilds
        the graph by replaying the records stream from its first message, which gives every
        graph the profile id it had. That needs the stream to still hold its first message:
        if retention removed any, a replay would build other graphs than the ones the
        profile service holds, so refuse to start instead."""
        rows = await self.db.execute_fetchall(
            "SELECT 1 FROM rt_offsets WHERE consumer = ?", (RECORDS_CONSUMER,)
        )
        if list(rows):
            return
        info = await self.js.stream_info(subjects.STREAM_RECORDS.name)
        first, last = info.state.first_seq, info.state.last_seq
        if last > 0 and first > 1:
            raise ReplayImpossible(subjects.STREAM_RECORDS.name, first, str(self.settings.db_path))
        self.announced_until = await self._last_announced()
        if self.announced_until:
            self.log.warning(
                "no identity graph: rebuilding it from the records stream; the records up to "
                "this sequence are not announced again (the profile service has them)",
                records_seq=self.announced_until,
            )

    async def _last_announced(self) -> int:
        """The records sequence of the last message this service published to the profile
        service (its message id is `identity:<records seq>:<n>`), 0 if there is none."""
        info = await self.js.stream_info(subjects.STREAM_PROFILES.name)
        seq = info.state.last_seq
        if not seq or info.state.messages == 0:
            return 0
        try:
            msg = await self.js.get_msg(subjects.STREAM_PROFILES.name, seq)
        except nats.js.errors.NotFoundError:
            return 0
        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        consumer, _, rest = msg_id.partition(":")
        number = rest.partition(":")[0]
        if consumer != RECORDS_CONSUMER or not number.isdigit():
            return 0
        return int(number)

    # -- configuration ------------------------------------------------------------------
    async def handle_namespaces(self, batch: Step) -> None:
        updates: dict[str, Namespace] = {}
        for d in batch.deliveries:
            try:
                ns = _namespace_decoder.decode(d.data)
            except msgspec.DecodeError:
                self.log.warning("undecodable namespace configuration", subject=d.subject)
                continue
            updates[ns.symbol] = ns
            batch.tx.add(UPSERT_NAMESPACE, (ns.symbol, d.data))

        def install() -> None:
            self.namespaces.update(updates)
            self.graph = self._new_graph()

        batch.after_commit(install)

    # -- records ---------------------------------------------------------------------------
    async def handle_records(self, batch: Step) -> None:
        """Link every record in order; tell the profile service, partition by partition and
        in causal order, which profile each record belongs to and what merged or moved."""
        messages = [(d.seq, record_batch_decoder.decode(d.data)) for d in batch.deliveries]
        keys: set[str] = set()
        for _, m in messages:
            for r in m.records:
                keys.update(self.graph.keys_of(r.identities))
            for req in m.deletes:
                keys.update(self.graph.keys_of([req.identity]))
        ws = await self._load(keys)
        fx = Effects()
        out: PartitionedOutput[ProfileItem] = PartitionedOutput(
            subjects.profiles, _encode_items, self.settings.partitions
        )
        # Rebuilding the graph: what the profile service already received is applied to the
        # graph and stored, but not announced again (a replayed delete would otherwise remove
        # what arrived after it).
        sink: PartitionedOutput[ProfileItem] = PartitionedOutput(
            subjects.profiles, _encode_items, self.settings.partitions
        )
        reported = 0
        for seq, m in messages:
            quiet = seq <= self.announced_until
            target = sink if quiet else out
            for i, record in enumerate(m.records):
                profile_id = self.graph.link(
                    ws,
                    fx,
                    record.identities,
                    at=record.ingested_at,
                    dataset=record.dataset,
                    record_id=record.record_id,
                    # Its place in the records stream: a replay gives the same profile ids.
                    seed=f"{seq}.{i}:{record.record_id}",
                )
                reported = self._announce(fx, reported, target, record.ingested_at)
                if profile_id is None:
                    self.log.info(
                        "record has no usable identity; not linked",
                        record_id=record.record_id,
                        dataset=record.dataset,
                    )
                    continue
                anchor, persons = self.graph.anchor_of(record.identities)
                normalised = self._normalised(record)
                unlinked = [
                    key
                    for i in normalised.identities
                    if (node := ws.nodes.get(key := f"{i.namespace}:{i.value}")) is None
                    or node.profile_id != profile_id
                ]
                target.add(
                    self._part(profile_id),
                    Fragment(profile_id, normalised, anchor, persons, unlinked),
                )
            for req in m.deletes:
                self._delete(ws, fx, req, target, batch, report=not quiet)
            for probe in m.probes if not quiet else ():
                self._pass_probe(probe, out, batch)
        self._persist(fx, batch)
        for subject, payload in out.messages():
            batch.emit(subject, payload)

    def _pass_probe(self, probe: Probe, out: PartitionedOutput[ProfileItem], batch: Step) -> None:
        n = self.settings.partitions
        out.add_everywhere(lambda p: Probe(probe.probe_id, p, n))
        report_probe(batch, probe, self.name, partitions=n)

    def _part(self, profile_id: str) -> int:
        return subjects.partition_of(profile_id, self.settings.partitions)

    def _normalised(self, record: Record) -> Record:
        keys = self.graph.keys_of(record.identities)
        identities = [Identity(*k.split(":", 1)) for k in keys]
        primary = record.primary_identity
        if primary is not None:
            pk = self.graph.keys_of([primary])
            primary = Identity(*pk[0].split(":", 1)) if pk else None
        return msgspec.structs.replace(record, identities=identities, primary_identity=primary)

    def _announce(
        self, fx: Effects, reported: int, out: PartitionedOutput[ProfileItem], at: float
    ) -> int:
        """Turn graph events new since `reported` into items for the profile service.

        A merge goes on the partition of the (first) folded profile, behind every earlier
        item of the folded and surviving profiles; identities that move go on the
        partition of the profile they leave, behind every earlier item of both profiles."""
        for event in fx.events[reported:]:
            match event:
                case Fold(survivor=survivor, folded=folded):
                    parts = [self._part(f) for f in folded]
                    out.add_across(
                        parts[0],
                        [self._part(survivor), *parts],
                        Merged(survivor, list(folded), at),
                    )
                    self.log.info("profiles merged", profile_id=survivor, folded=folded)
                case Move(from_profile=source, to_profile=target, keys=keys):
                    identities = [Identity(*k.split(":", 1)) for k in keys]
                    item = Reassigned(source, target, identities, event.reason, at)
                    if target is None:
                        out.add(self._part(source), item)
                    else:
                        out.add_across(self._part(source), [self._part(target)], item)
                    self.log.info(
                        "identities reassigned",
                        profile_id=source,
                        to_profile=target,
                        reason=event.reason,
                        count=len(keys),
                    )
        return len(fx.events)

    def _delete(
        self,
        ws: WorkingSet,
        fx: Effects,
        req: PrivacyDelete,
        out: PartitionedOutput[ProfileItem],
        batch: Step,
        *,
        report: bool = True,
    ) -> None:
        keys = self.graph.keys_of([req.identity])
        node = ws.nodes.get(keys[0]) if keys else None
        profile_ids: list[str] = []
        # No graph holds it (the size limit dropped it, or it never came): the records that
        # carry it are still reached.
        person_keys: list[str] = keys[:1]
        removed = 0
        if node is not None:
            pid = node.profile_id
            profile_ids.append(pid)
            members = [n.key for n in ws.nodes.values() if n.profile_id == pid]
            person_keys = sorted(
                {
                    *keys[:1],
                    *(
                        k
                        for k in members
                        if self.graph.namespace(ws.nodes[k].namespace).type == "person"
                    ),
                }
            )
            for key in members:
                del ws.nodes[key]
                fx.upsert_nodes.pop(key, None)
                fx.delete_nodes.add(key)
            removed = len(members)
            member_set = set(members)
            for edge_key in [k for k in ws.edges if k[0] in member_set or k[1] in member_set]:
                del ws.edges[edge_key]
                fx.add_edges.pop(edge_key, None)
                fx.delete_edges.add(edge_key)
            # The profiles folded into it go with it: stored ones (any chain of them) and
            # those of this fetch, whose fold would otherwise be written after the delete.
            folded_now = [f for f, into in fx.folded_profiles.items() if into == pid]
            for f in (pid, *folded_now):
                ws.profiles.pop(f, None)
                fx.new_profiles.pop(f, None)
                fx.folded_profiles.pop(f, None)
            batch.tx.add(DELETE_PROFILE, (pid,))
            batch.tx.add_many(DELETE_PROFILE, [(f,) for f in folded_now])
            # Refusals this fetch met before the delete would be written after it.
            fx.refused = [r for r in fx.refused if r.a not in member_set and r.b not in member_set]
            batch.tx.add(
                "DELETE FROM refused_links WHERE a IN (SELECT value FROM json_each(?)) "
                "OR b IN (SELECT value FROM json_each(?))",
                (_json_list(members), _json_list(members)),
            )
        part = self._part(profile_ids[0]) if profile_ids else 0
        # Behind everything before it on every partition: the records that carry one of
        # the person's identities may sit on any profile.
        out.add_across(
            part, range(self.settings.partitions), Deleted(profile_ids, req, person_keys)
        )
        if not report:
            return
        done = PrivacyReport(
            request_id=req.request_id,
            service=self.name,
            identity=req.identity,
            profile_ids=profile_ids,
            removed={"identities": removed},
            at=time.time(),
        )
        batch.emit(subjects.privacy_report(req.request_id, self.name), json_encoder.encode(done))
        self.log.info("identity graph deleted", request_id=req.request_id, identities=removed)

    async def _load(self, keys: set[str]) -> WorkingSet:
        """The graphs of every profile that holds one of `keys`: nodes, edges, profiles."""
        ws = WorkingSet()
        if not keys:
            return ws
        db = self.db
        rows = await db.execute_fetchall(
            "SELECT DISTINCT profile_id FROM nodes WHERE key IN (SELECT value FROM json_each(?))",
            (_json_list(keys),),
        )
        pids = [str(r[0]) for r in rows]
        if not pids:
            return ws
        plist = _json_list(pids)
        for r in await db.execute_fetchall(
            f"SELECT {NODE_COLUMNS} FROM nodes WHERE profile_id IN "
            "(SELECT value FROM json_each(?))",
            (plist,),
        ):
            ws.nodes[r[0]] = Node(
                key=r[0],
                namespace=r[1],
                value=r[2],
                profile_id=r[3],
                first_seen=r[4],
                last_seen=r[5],
            )
        for r in await db.execute_fetchall(
            f"SELECT {EDGE_COLUMNS} FROM edges WHERE a IN (SELECT value FROM json_each(?)) "
            "OR b IN (SELECT value FROM json_each(?))",
            (_json_list(ws.nodes), _json_list(ws.nodes)),
        ):
            ws.edges[(r[0], r[1])] = Edge(
                a=r[0], b=r[1], created_at=r[2], dataset=r[3], record_id=r[4]
            )
        for r in await db.execute_fetchall(
            "SELECT profile_id, created_at FROM profiles WHERE profile_id IN "
            "(SELECT value FROM json_each(?))",
            (plist,),
        ):
            ws.profiles[str(r[0])] = float(r[1])
        return ws

    def _persist(self, fx: Effects, batch: Step) -> None:
        tx = batch.tx
        tx.add_many(DELETE_EDGE, list(fx.delete_edges))
        tx.add_many(DELETE_NODE, [(k,) for k in fx.delete_nodes])
        tx.add_many(INSERT_PROFILE, list(fx.new_profiles.items()))
        tx.add_many(
            UPSERT_NODE,
            [
                (n.key, n.namespace, n.value, n.profile_id, n.first_seen, n.last_seen)
                for n in fx.upsert_nodes.values()
            ],
        )
        tx.add_many(
            INSERT_EDGE,
            [(e.a, e.b, e.created_at, e.dataset, e.record_id) for e in fx.add_edges.values()],
        )
        tx.add_many(FOLD_PROFILE, [(s, f) for f, s in fx.folded_profiles.items()])
        tx.add_many(
            INSERT_REFUSED,
            [(r.at, r.record_id, r.dataset, r.a, r.b, r.reason) for r in fx.refused],
        )

    # -- lookups -----------------------------------------------------------------------------
    async def lookup(self, request: IdentityLookup) -> IdentityGraphView:
        """Read under the write lock: the graph, its links and refusals of one moment."""
        async with write_lock(self.db):
            return await self._lookup(request)

    async def _lookup(self, request: IdentityLookup) -> IdentityGraphView:
        identity = parse_identity(request.identity)
        keys = self.graph.keys_of([identity])
        if not keys:
            why = normalized(
                self.namespaces.get(identity.namespace),
                identity.namespace,
                identity.value,
                self.phone_region,
            )
            reason = f" ({why.reason})" if isinstance(why, Unusable) else ""
            raise AdminFailure(
                "not_found", f"{request.identity} is not a usable identity value{reason}"
            )
        ws = await self._load({keys[0]})
        node = ws.nodes.get(keys[0])
        if node is None:
            raise AdminFailure("not_found", f"no profile holds {request.identity}")
        members = self.graph.graph_of(ws, node.profile_id)
        member_keys = {n.key for n in members}
        primary = self.graph.primary_identity(members)
        refused = await self.db.execute_fetchall(
            "SELECT at, record_id, dataset, a, b, reason FROM refused_links WHERE a IN "
            "(SELECT value FROM json_each(?)) OR b IN (SELECT value FROM json_each(?)) "
            "ORDER BY at DESC LIMIT 100",
            (_json_list(member_keys), _json_list(member_keys)),
        )
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
            refused=[GraphRefusal(*r) for r in refused],
        )

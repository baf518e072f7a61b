"""The identity actor's steps: namespaces from the configuration stream, and records.

Per fetch of records the step loads the part of the graph the fetch touches (four
queries), applies every record in order with the pure graph rules (`IdentityGraph.link`,
`IdentityGraph.forget` for a privacy delete), persists the effects in the step's
transaction, and tells the profile service, partition by partition, which profile each
record belongs to and which profiles merged, split or lost identities.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
import structlog

from services.identity.graph import Effects, Fold, IdentityGraph, Move, WorkingSet
from services.identity.store import IdentityStore
from shared import subjects
from shared.messages import (
    Awaits,
    Deleted,
    Fragment,
    HandOver,
    Identity,
    Merged,
    PrivacyDelete,
    Probe,
    ProfileEnvelope,
    ProfileItem,
    Reassigned,
    Record,
    Sweep,
    fold_key,
    move_key,
    msgpack_encoder,
    record_batch_decoder,
)
from shared.resources import BUILTIN_NAMESPACES, Namespace
from shared.runtime import Step
from shared.runtime.configs import published
from shared.runtime.partitioned import PartitionedOutput
from shared.runtime.privacy import report
from shared.runtime.probes import report_probe

SERVICE = "identity"
RECORDS_CONSUMER = "identity"
"""The durable consumer of the records stream (its offset tells a rebuild apart)."""
NAMESPACES_CONSUMER = "identity-namespaces"

_namespace_decoder = msgspec.json.Decoder(Namespace)


def _encode_items(items: list[ProfileItem]) -> bytes:
    return msgpack_encoder.encode(ProfileEnvelope(items))


class IdentityHandlers:
    """The steps of the identity actor, over its store and its linking configuration."""

    def __init__(
        self,
        store: IdentityStore,
        *,
        partitions: int,
        max_identities: int,
        phone_region: str,
        announced_until: int = 0,
    ) -> None:
        self.store = store
        self.partitions = partitions
        self.max_identities = max_identities
        self.phone_region = phone_region
        self.announced_until = announced_until
        """While the graph is rebuilt from the records stream: the last record sequence
        whose effects the profile service already received (0: announce everything)."""
        self.namespaces: dict[str, Namespace] = {n.symbol: n for n in BUILTIN_NAMESPACES}
        self.graph = self._new_graph()
        self.log = structlog.get_logger(service=SERVICE)

    def install(self, namespaces: Iterable[Namespace]) -> None:
        """Link by these namespaces from now on (the others stay as they were)."""
        self.namespaces.update({n.symbol: n for n in namespaces})
        self.graph = self._new_graph()

    def _new_graph(self) -> IdentityGraph:
        return IdentityGraph(
            self.namespaces, max_identities=self.max_identities, default_region=self.phone_region
        )

    def _part(self, profile_id: str) -> int:
        return subjects.partition_of(profile_id, self.partitions)

    # -- configuration ------------------------------------------------------------------
    async def on_namespaces(self, step: Step) -> None:
        updates: list[Namespace] = []
        for d, ns in published(step.deliveries, "namespace", _namespace_decoder, self.log):
            updates.append(ns)
            self.store.save_namespace(step.tx, ns.symbol, d.data)
        step.after_commit(lambda: self.install(updates))

    # -- records ---------------------------------------------------------------------------
    async def on_records(self, step: Step) -> None:
        """Link every record in order; tell the profile service, partition by partition and
        in causal order, which profile each record belongs to and what merged or moved."""
        graph = self.graph
        messages = [(d.seq, record_batch_decoder.decode(d.data)) for d in step.deliveries]
        keys: set[str] = set()
        for _, m in messages:
            for r in m.records:
                keys.update(graph.keys_of(r.identities))
            for req in m.deletes:
                keys.update(graph.keys_of([req.identity]))
        ws = await self.store.load(keys)
        fx = Effects()
        out: PartitionedOutput[ProfileItem] = PartitionedOutput(
            subjects.profiles, _encode_items, self.partitions
        )
        # Rebuilding the graph: what the profile service already received is applied to the
        # graph and stored, but not announced again (a replayed delete would otherwise remove
        # what arrived after it).
        sink: PartitionedOutput[ProfileItem] = PartitionedOutput(
            subjects.profiles, _encode_items, self.partitions
        )
        reported = 0
        for seq, m in messages:
            quiet = seq <= self.announced_until
            target = sink if quiet else out
            for i, record in enumerate(m.records):
                profile_id = graph.link(
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
                anchor, persons = graph.anchor_of(record.identities)
                normalised = self._normalised(graph, record)
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
                self._forget(
                    req, graph=graph, ws=ws, fx=fx, out=target, step=step, report_it=not quiet
                )
            for probe in m.probes if not quiet else ():
                self._pass_probe(probe, out, step)
        self.store.persist(step.tx, fx)
        for subject, payload in out.messages():
            step.emit(subject, payload)

    def _pass_probe(self, probe: Probe, out: PartitionedOutput[ProfileItem], step: Step) -> None:
        n = self.partitions
        out.add_everywhere(lambda p: Probe(probe.probe_id, p, n))
        report_probe(step, probe, SERVICE, partitions=n)

    @staticmethod
    def _normalised(graph: IdentityGraph, record: Record) -> Record:
        keys = graph.keys_of(record.identities)
        identities = [Identity(*k.split(":", 1)) for k in keys]
        primary = record.primary_identity
        if primary is not None:
            pk = graph.keys_of([primary])
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
                    home = self._part(survivor)
                    out.add_across(parts[0], [home, *parts], Merged(survivor, list(folded), at))
                    # For profile instances that each hold some partitions: every folded
                    # profile's partition folds it, and the survivor's waits for its state.
                    for f, part in zip(folded, parts, strict=True):
                        if part != parts[0]:  # ends its message, as the merge does
                            out.add_across(part, (), HandOver(survivor, f, at))
                        if part != home:
                            out.add(home, Awaits(survivor, f, fold_key(f)))
                    self.log.info("profiles merged", profile_id=survivor, folded=folded)
                case Move(from_profile=source, to_profile=target, keys=keys):
                    identities = [Identity(*k.split(":", 1)) for k in keys]
                    item = Reassigned(source, target, identities, event.reason, at)
                    if target is None:
                        out.add(self._part(source), item)
                    else:
                        out.add_across(self._part(source), [self._part(target)], item)
                        if self._part(source) != self._part(target):
                            key = move_key(source, target, list(keys), at)
                            out.add(self._part(target), Awaits(target, source, key))
                    self.log.info(
                        "identities reassigned",
                        profile_id=source,
                        to_profile=target,
                        reason=event.reason,
                        count=len(keys),
                    )
        return len(fx.events)

    def _forget(
        self,
        req: PrivacyDelete,
        *,
        graph: IdentityGraph,
        ws: WorkingSet,
        fx: Effects,
        out: PartitionedOutput[ProfileItem],
        step: Step,
        report_it: bool,
    ) -> None:
        gone = graph.forget(ws, fx, req.identity)
        # Written now, before the batch's effects: what the batch adds after the delete
        # (a new graph for the same identity, a refusal met later) stays.
        self.store.forget(step.tx, gone)
        part = self._part(gone.profile_ids[0]) if gone.profile_ids else 0
        # For profile instances that each hold some partitions: the delete's half on every
        # other partition, at the same point (closed behind it by the delete just below).
        for other in range(self.partitions):
            if other != part:
                out.add(other, Sweep(gone.profile_ids, req, gone.person_keys))
        # Behind everything before it on every partition: the records that carry one of
        # the person's identities may sit on any profile.
        out.add_across(
            part, range(self.partitions), Deleted(gone.profile_ids, req, gone.person_keys)
        )
        if not report_it:
            return
        report(
            step,
            SERVICE,
            req,
            {"identities": len(gone.identities)},
            profile_ids=gone.profile_ids,
        )
        self.log.info(
            "identity graph deleted", request_id=req.request_id, identities=len(gone.identities)
        )

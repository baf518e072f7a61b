"""The profile actor's steps: each takes a `Step` (one fetch of one consumer), loads what
it needs through the store, decides with the pure rules, and adds its writes and messages
to the step.

- `on_items` (CDP_PROFILES): records with their profile ids, merges, splits, deletes,
  probes; the unified profile and what segmentation needs (`rules.apply_items`).
- `on_memberships` (CDP_MEMBERS, `cdp.x.members.<partition>`): segment memberships,
  in batches from segmentation, written back to the profile.
- `on_datasets`, `on_namespaces`, `on_policies` (CDP_CONFIG): the configuration the
  service follows, stored and, once committed, held in `ProfileConfig`.
"""

from __future__ import annotations

import time
from collections.abc import Collection

import msgspec
import structlog

from services.profile.config import ProfileConfig
from services.profile.rules import apply_items
from services.profile.store import ProfileStore
from shared import subjects
from shared.messages import (
    Awaits,
    Handoff,
    MembershipChange,
    MembershipEvent,
    Probe,
    ProfileItem,
    handoff_decoder,
    members_batch_decoder,
    msgpack_encoder,
    profile_batch_decoder,
)
from shared.resources import Dataset, MergePolicy, Namespace
from shared.runtime import Step
from shared.runtime.actor import Blocked
from shared.runtime.configs import published
from shared.runtime.privacy import report
from shared.runtime.probes import report_probe
from shared.subjects import partition_of

SERVICE = "profile"
_dataset_decoder = msgspec.json.Decoder(Dataset)
_namespace_decoder = msgspec.json.Decoder(Namespace)
_policy_decoder = msgspec.json.Decoder(MergePolicy)


class ProfileHandlers:
    def __init__(
        self,
        store: ProfileStore,
        config: ProfileConfig,
        *,
        partitions: int,
        log: structlog.typing.FilteringBoundLogger | None = None,
        held: Collection[int] | None = None,
    ) -> None:
        self.held = held
        """The partitions this store holds, when it holds some only (several instances)."""
        self.store = store
        self.config = config
        self.partitions = partitions
        self.log = log or structlog.get_logger(service=SERVICE)

    # -- the unified profile ---------------------------------------------------------
    async def on_items(self, step: Step) -> None:
        """Load what the items touch (a query per table), apply them in order in memory,
        and commit the writes and the changes for segmentation; a privacy delete reports
        what it removed.

        Holding some partitions only (`held`): an `Awaits` whose handoff has not arrived
        leaves its message and the rest for later (`Blocked`); state that ends on a
        profile of another partition is handed to its owner (`cdp.x.handoff.<p>`)."""
        if self.held is None:
            items = [i for d in step.deliveries for i in profile_batch_decoder.decode(d.data).items]
            handed = None
        else:
            items, handed = await self._awaited(step)
        loaded = await self.store.load(items)
        fx = apply_items(
            loaded,
            items,
            policy=self.config.default_policy(),
            others=self.config.other_policies(),
            partitions=self.partitions,
            local=self._local if self.held is not None else None,
            handed=handed,
        )
        outgoing = await self.store.handoffs(fx) if fx.outgoing else []
        self.store.persist(step.tx, fx)
        for subject, payload in fx.messages:
            step.emit(subject, payload)
        for handoff in outgoing:
            part = partition_of(handoff.profile_id, self.partitions)
            step.emit(subjects.handoffs(part), msgpack_encoder.encode(handoff))
        for gone in fx.forgotten:
            report(
                step, SERVICE, gone.request, gone.removed, profile_ids=gone.profile_ids, at=fx.now
            )
        for probe in fx.probes:
            report_probe(step, probe, SERVICE)

    def _local(self, profile_id: str) -> bool:
        return partition_of(profile_id, self.partitions) in (self.held or ())

    async def _awaited(self, step: Step) -> tuple[list[ProfileItem], dict[str, Handoff | None]]:
        """The step's items, and the handoffs its `Awaits` wait for (None: applied
        already); raises `Blocked` at the first message whose handoff is still to come."""
        per: list[tuple[int, list[ProfileItem]]] = [
            (d.seq, profile_batch_decoder.decode(d.data).items) for d in step.deliveries
        ]
        keys = [i.key for _, items in per for i in items if isinstance(i, Awaits)]
        items = [i for _, its in per for i in its]
        if not keys:
            return items, {}
        stored = await self.store.handed(keys)
        handed: dict[str, Handoff | None] = {}
        applied: set[str] = set()
        for seq, its in per:
            for item in its:
                if not isinstance(item, Awaits):
                    continue
                got = stored.get(item.key)
                if got is None:
                    raise Blocked(seq, f"the handoff {item.key}")
                body, done = got
                if done or item.key in applied:
                    handed[item.key] = None
                    continue
                handoff = handoff_decoder.decode(body)
                handed[item.key] = handoff
                applied.update(handoff.keys)
        self.store.applied_handoff(step.tx, sorted(applied))
        return items, handed

    async def on_handoffs(self, step: Step) -> None:
        """State handed over from other partitions' owners: kept by the keys it answers,
        applied where the partition's items await it (`on_items`)."""
        for d in step.deliveries:
            handoff = handoff_decoder.decode(d.data)
            self.store.put_handoff(step.tx, handoff.keys, d.data)

    # -- memberships -----------------------------------------------------------------
    async def on_memberships(self, step: Step) -> None:
        """Write the batch's membership changes back onto the profile, in one statement,
        for live profiles only: a change of a profile folded or deleted since is no one's
        any more. A privacy delete needs nothing here (the profile was deleted first)."""
        latest: dict[tuple[str, str], MembershipEvent] = {}
        for d in step.deliveries:
            for item in members_batch_decoder.decode(d.data).items:
                if isinstance(item, MembershipChange):
                    e = item.event
                    key = (e.profile_id, e.segment)
                    held = latest.get(key)
                    if held is None or e.at >= held.at:  # what the upsert would keep
                        latest[key] = e
                elif isinstance(item, Probe):
                    report_probe(step, item, "profile-memberships")
        self.store.put_memberships(step.tx, latest.values())

    # -- configuration ---------------------------------------------------------------
    async def on_datasets(self, step: Step) -> None:
        found: dict[str, Dataset] = {}
        for d, ds in published(step.deliveries, "dataset", _dataset_decoder, self.log):
            found[ds.name] = ds
            self.store.put_dataset(step.tx, ds.name, d.data)
        step.after_commit(lambda: self.config.update(datasets=found.values()))

    async def on_namespaces(self, step: Step) -> None:
        found: dict[str, Namespace] = {}
        for d, ns in published(step.deliveries, "namespace", _namespace_decoder, self.log):
            found[ns.symbol] = ns
            self.store.put_namespace(step.tx, ns.symbol, d.data)
        step.after_commit(lambda: self.config.update(namespaces=found.values()))

    async def on_policies(self, step: Step) -> None:
        """The merge policies this service published on the config stream (a profile.db
        rebuilt from the streams gets them back)."""
        found: dict[str, MergePolicy] = {}
        now = time.time()
        for d, policy in published(step.deliveries, "merge_policy", _policy_decoder, self.log):
            found[policy.name] = policy
            self.store.put_policy(step.tx, policy.name, d.data, now)
        step.after_commit(lambda: self.config.update(policies=found.values()))

    # -- expiration ------------------------------------------------------------------
    async def expire_events(self, now: float | None = None) -> None:
        """Drop the events older than their dataset's expiration."""
        await self.store.expire_events(self.config.expirations(time.time() if now is None else now))

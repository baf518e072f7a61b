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

import msgspec
import structlog

from services.profile.config import ProfileConfig
from services.profile.rules import apply_items
from services.profile.store import ProfileStore
from shared.messages import (
    MembershipChange,
    MembershipEvent,
    Probe,
    members_batch_decoder,
    profile_batch_decoder,
)
from shared.resources import Dataset, MergePolicy, Namespace
from shared.runtime import Step
from shared.runtime.configs import published
from shared.runtime.privacy import report
from shared.runtime.probes import report_probe

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
    ) -> None:
        self.store = store
        self.config = config
        self.partitions = partitions
        self.log = log or structlog.get_logger(service=SERVICE)

    # -- the unified profile ---------------------------------------------------------
    async def on_items(self, step: Step) -> None:
        """Load what the items touch (a query per table), apply them in order in memory,
        and commit the writes and the changes for segmentation; a privacy delete reports
        what it removed."""
        items = [i for d in step.deliveries for i in profile_batch_decoder.decode(d.data).items]
        loaded = await self.store.load(items)
        fx = apply_items(
            loaded,
            items,
            policy=self.config.default_policy(),
            others=self.config.other_policies(),
            partitions=self.partitions,
        )
        self.store.persist(step.tx, fx)
        for subject, payload in fx.messages:
            step.emit(subject, payload)
        for gone in fx.forgotten:
            report(
                step, SERVICE, gone.request, gone.removed, profile_ids=gone.profile_ids, at=fx.now
            )
        for probe in fx.probes:
            report_probe(step, probe, SERVICE)

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

"""The profile actor: merges every fragment of a person into one unified profile.

Per batch it loads the attribute rows and identities of the profiles the batch touches,
applies fragments, merges, reassignments and deletes in order, commits, and tells
segmentation what changed (merged attributes under the default merge policy, the changed
paths, the new events, the identities).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import msgspec

from services.profile.lookup import ProfileLookups
from services.profile.merge import AttributeValue, default_policy
from services.profile.namespaces import ProfileNamespaces
from services.profile.policies import MergePolicies
from services.profile.step import Loaded, ProfileStep, StoredEvent, follow
from services.profile.store import (
    FOLLOW_FOLDS,
    MIGRATIONS,
    UPSERT_DATASET,
    UPSERT_MEMBERSHIP,
)
from shared import subjects
from shared.db import Tx, apply
from shared.messages import (
    Deleted,
    ExperienceEvent,
    Fragment,
    MembershipEvent,
    Merged,
    ProfileItem,
    Reassigned,
    json_encoder,
    membership_decoder,
    profile_batch_decoder,
)
from shared.resources import Dataset
from shared.runtime import ConsumerSpec, Service, Step
from shared.runtime.probes import decode_probe, report_probe

EXPIRY_EVERY_S = 600.0
_dataset_decoder = msgspec.json.Decoder(Dataset)
_value_decoder = msgspec.msgpack.Decoder()
_keys_encoder = msgspec.json.Encoder()


def _json_list(values: Iterable[str]) -> bytes:
    return _keys_encoder.encode(list(values))


class ProfileService(Service):
    name = "profile"
    migrations = MIGRATIONS
    listings: ClassVar[dict[str, str]] = {
        "profiles": "SELECT rowid, profile_id FROM profiles WHERE folded_into IS NULL "
        "AND rowid > ? ORDER BY rowid LIMIT ?",
        "identities": "SELECT rowid, namespace || ':' || value, profile_id FROM identities "
        "WHERE rowid > ? ORDER BY rowid LIMIT ?",
        "events": "SELECT rowid, record_id, profile_id, anchor FROM events WHERE rowid > ? "
        "ORDER BY rowid LIMIT ?",
        "members": "SELECT rowid, profile_id, segment FROM memberships WHERE status IN "
        "('realized', 'existing') AND rowid > ? ORDER BY rowid LIMIT ?",
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.datasets: dict[str, Dataset] = {}
        self.namespaces = ProfileNamespaces(self)
        self.policies = MergePolicies(self)
        self.lookups = ProfileLookups(self)
        self._expiry: asyncio.Task[None] | None = None

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (
            ConsumerSpec(
                "profile-datasets",
                subjects.STREAM_CONFIG,
                self.handle_datasets,
                filter_subjects=(subjects.config("dataset", "*"),),
                description="datasets (event expiration), from ingest's configuration",
            ),
            self.namespaces.consumer(),
            self.policies.consumer(),
            ConsumerSpec(
                "profile-memberships",
                subjects.STREAM_MEMBERSHIP,
                self.handle_memberships,
                description="segment membership changes, written back to the profile",
            ),
            ConsumerSpec(
                "profile",
                subjects.STREAM_PROFILES,
                self.handle_items,
                description="records with their profile ids, merges, splits, deletes",
            ),
        )

    async def on_start(self) -> None:
        for name, spec in await self.db.execute_fetchall("SELECT name, spec FROM datasets"):
            self.datasets[str(name)] = _dataset_decoder.decode(spec)
        await self.namespaces.load()
        await self.policies.start()
        await self.lookups.start()
        self._expiry = asyncio.create_task(self._expire_events(), name="expire-events")

    async def on_stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        await self.lookups.stop()
        await self.policies.stop()

    async def _expire_events(self) -> None:
        """Drop events older than their dataset's expiration, now and every ten minutes."""
        while True:
            now = time.time()
            tx = Tx()
            for ds in self.datasets.values():
                if ds.expiration_days:
                    tx.add(
                        "DELETE FROM events WHERE dataset = ? AND ts < ?",
                        (ds.name, now - ds.expiration_days * 86400.0),
                    )
            if tx:
                await apply(self.db, tx)
            await asyncio.sleep(EXPIRY_EVERY_S)

    # -- configuration ---------------------------------------------------------------------
    async def handle_datasets(self, batch: Step) -> None:
        updates: dict[str, Dataset] = {}
        for d in batch.deliveries:
            try:
                ds = _dataset_decoder.decode(d.data)
            except msgspec.DecodeError:
                self.log.warning("undecodable dataset configuration", subject=d.subject)
                continue
            updates[ds.name] = ds
            batch.tx.add(UPSERT_DATASET, (ds.name, d.data))
        batch.after_commit(lambda: self.datasets.update(updates))

    async def handle_memberships(self, batch: Step) -> None:
        """Write membership changes back onto the profile, for live profiles only: a change
        of a profile folded or deleted since is no one's any more."""
        events: list[MembershipEvent] = []
        for d in batch.deliveries:
            if d.subject == subjects.PRIVACY_MEMBERSHIP:
                continue  # the profile was deleted here first
            if d.subject == subjects.MEMBERSHIP_PROBE:
                if (probe := decode_probe(d.data)) is not None:
                    report_probe(batch, probe, "profile-memberships")
                continue
            try:
                events.append(membership_decoder.decode(d.data))
            except msgspec.DecodeError:
                self.log.warning("undecodable membership event", seq=d.seq)
        batch.tx.add_many(
            UPSERT_MEMBERSHIP, [(e.profile_id, e.segment, e.status, e.at) for e in events]
        )

    # -- the unified profile -----------------------------------------------------------------
    async def handle_items(self, batch: Step) -> None:
        """Load what the items touch (a query per table), apply them in order in memory
        (`ProfileStep`), and commit the writes and the changes for segmentation."""
        items = [i for d in batch.deliveries for i in profile_batch_decoder.decode(d.data).items]
        loaded = await self._load(items)
        policy = default_policy(self.policies.items())
        step = ProfileStep(
            loaded,
            policy=policy,
            others=[p for p in self.policies.items() if p.name != policy.name],
            partitions=self.settings.partitions,
        )
        step.apply(items)
        batch.tx.extend(step.tx)
        for subject, payload in step.out.messages():
            batch.emit(subject, payload)
        for report in step.reports:
            batch.emit(
                subjects.privacy_report(report.request_id, self.name), json_encoder.encode(report)
            )
        for probe in step.probes:
            report_probe(batch, probe, self.name)

    async def _load(self, items: Sequence[ProfileItem]) -> Loaded:
        """The state the items touch, as stored: a handful of set-based queries."""
        loaded = Loaded()
        ids: set[str] = set()
        moving: set[str] = set()
        persons: set[str] = set()
        deleted: set[str] = set()
        for item in items:
            match item:
                case Fragment():
                    ids.add(item.profile_id)
                case Merged():
                    ids.add(item.profile_id)
                    ids.update(item.folded)
                case Reassigned():
                    ids.add(item.profile_id)
                    if item.to_profile:
                        ids.add(item.to_profile)
                        moving.update(f"{i.namespace}:{i.value}" for i in item.identities)
                case Deleted():
                    ids.update(item.profile_ids)
                    deleted.update(item.profile_ids)
                    persons.update(item.person_keys)
        db = self.db
        if persons:
            for key, rid, kind, pid in await db.execute_fetchall(
                "SELECT key, record_id, kind, profile_id FROM carried WHERE key IN "
                "(SELECT value FROM json_each(?))",
                (_json_list(persons),),
            ):
                loaded.carried[str(key)].append((str(rid), str(kind), str(pid)))
                ids.add(str(pid))
            event_ids = {
                rid for v in loaded.carried.values() for rid, kind, _ in v if kind == "event"
            }
            for stored in await self._events("record_id", event_ids):
                loaded.events[stored.event.record_id] = stored
                ids.add(stored.profile_id)
        if not ids:
            return loaded
        # The rows of these profiles and of the profiles they were folded into, chains
        # followed to their survivors, in one query.
        for pid, into in await db.execute_fetchall(FOLLOW_FOLDS, (_json_list(ids),)):
            if into is None:
                loaded.known.add(str(pid))
            else:
                loaded.redirect[str(pid)] = str(into)
            ids.add(str(pid))
        plist = _json_list(ids)
        for pid, ds, path, value, ts, rid in await db.execute_fetchall(
            "SELECT profile_id, dataset, path, value, ts, record_id FROM attributes WHERE "
            "profile_id IN (SELECT value FROM json_each(?))",
            (plist,),
        ):
            loaded.rows[pid][(ds, path)] = AttributeValue(
                ds, path, _value_decoder.decode(value), ts, rid
            )
        for ns, value, pid in await db.execute_fetchall(
            "SELECT namespace, value, profile_id FROM identities WHERE "
            "profile_id IN (SELECT value FROM json_each(?))",
            (plist,),
        ):
            loaded.identities[pid].add((ns, value))
        if moving:
            for stored in await self._events("anchor", moving):
                if stored.anchor is not None:
                    loaded.anchored[stored.anchor].append(stored)
        if deleted:
            gone = {follow(loaded.redirect, p) for p in deleted}
            glist = _json_list(gone)
            for table in ("attributes", "events", "identities", "memberships"):
                for pid, n in await db.execute_fetchall(
                    f"SELECT profile_id, count(*) FROM {table} WHERE profile_id IN "
                    "(SELECT value FROM json_each(?)) GROUP BY profile_id",
                    (glist,),
                ):
                    loaded.counts.setdefault(str(pid), {})[table] = int(n)
        return loaded

    async def _events(self, column: str, values: set[str]) -> list[StoredEvent]:
        if not values:
            return []
        rows = await self.db.execute_fetchall(
            "SELECT record_id, profile_id, anchor, dataset, event_type, ts, payload FROM events "
            f"WHERE {column} IN (SELECT value FROM json_each(?))",
            (_json_list(values),),
        )
        return [
            StoredEvent(
                str(pid),
                anchor,
                ExperienceEvent(
                    record_id=rid,
                    dataset=ds,
                    event_type=et,
                    timestamp=ts,
                    payload=_value_decoder.decode(payload),
                ),
            )
            for rid, pid, anchor, ds, et, ts, payload in rows
        ]


def _flat_values(flat: dict[str, tuple[Any, AttributeValue]]) -> dict[str, Any]:
    return {path: value for path, (value, _) in flat.items()}

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
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from services.profile.lookup import ProfileLookups
from services.profile.merge import (
    AttributeValue,
    changed_paths,
    default_policy,
    fold_rows,
    fragment_updates,
    merge_flat,
    record_time,
    unflatten,
)
from services.profile.namespaces import ProfileNamespaces
from services.profile.policies import MergePolicies
from services.profile.store import (
    CAP_EVENTS,
    DELETE_ATTRIBUTES,
    DELETE_IDENTITY,
    FOLD_PROFILE,
    INSERT_EVENT,
    MIGRATIONS,
    MOVE_EVENTS,
    MOVE_IDENTITIES,
    UPSERT_ATTRIBUTE,
    UPSERT_DATASET,
    UPSERT_IDENTITY,
    UPSERT_PROFILE,
)
from shared import subjects
from shared.db import Tx, apply
from shared.messages import (
    ChangeBatch,
    ChangeItem,
    Deleted,
    ExperienceEvent,
    Fragment,
    Identity,
    Merged,
    PrivacyReport,
    ProfileChanged,
    ProfileDeleted,
    ProfileMerged,
    Reassigned,
    chunks,
    json_encoder,
    membership_decoder,
    msgpack_encoder,
    profile_batch_decoder,
)
from shared.resources import Dataset
from shared.runtime import Batch, ConsumerSpec, Service

MAX_EVENTS_PER_PROFILE = 5000
EXPIRY_EVERY_S = 600.0
_dataset_decoder = msgspec.json.Decoder(Dataset)
_value_decoder = msgspec.msgpack.Decoder()
_keys_encoder = msgspec.json.Encoder()


def _json_list(values: Iterable[str]) -> bytes:
    return _keys_encoder.encode(list(values))


@dataclass
class _Touched:
    record_ids: list[str] = field(default_factory=list)
    events: list[ExperienceEvent] = field(default_factory=list)


class _State:
    """The attribute rows and identities of the profiles a batch touches."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[tuple[str, str], AttributeValue]] = defaultdict(dict)
        self.identities: dict[str, set[tuple[str, str]]] = defaultdict(set)
        self.redirect: dict[str, str] = {}

    def resolve(self, profile_id: str) -> str:
        seen = 0
        while profile_id in self.redirect and seen < 32:
            profile_id = self.redirect[profile_id]
            seen += 1
        return profile_id


class ProfileService(Service):
    name = "profile"
    migrations = MIGRATIONS

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
    async def handle_datasets(self, batch: Batch) -> None:
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

    async def handle_memberships(self, batch: Batch) -> None:
        for d in batch.deliveries:
            if d.subject == subjects.PRIVACY_MEMBERSHIP:
                continue  # the profile was deleted here first
            try:
                ev = membership_decoder.decode(d.data)
            except msgspec.DecodeError:
                self.log.warning("undecodable membership event", seq=d.seq)
                continue
            batch.tx.add(
                "INSERT INTO memberships (profile_id, segment, status, at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (profile_id, segment) DO UPDATE SET status = excluded.status, "
                "at = excluded.at WHERE excluded.at >= memberships.at",
                (ev.profile_id, ev.segment, ev.status, ev.at),
            )

    # -- the unified profile -----------------------------------------------------------------
    async def handle_items(self, batch: Batch) -> None:
        items = [i for d in batch.deliveries for i in profile_batch_decoder.decode(d.data).items]
        state = await self._load(items)
        policy = default_policy(self.policies.items())
        others = [p for p in self.policies.items() if p.name != policy.name]
        before = {
            pid: _flat_values(merge_flat(rows.values(), policy)) for pid, rows in state.rows.items()
        }
        touched: dict[str, _Touched] = {}
        out: dict[int, list[ChangeItem]] = defaultdict(list)
        tx = batch.tx
        for item in items:
            match item:
                case Fragment():
                    pid = state.resolve(item.profile_id)
                    self._apply_fragment(state, tx, touched.setdefault(pid, _Touched()), pid, item)
                case Merged():
                    survivor = state.resolve(item.profile_id)
                    for folded in item.folded:
                        if folded == survivor:
                            continue
                        self._fold(state, tx, survivor, folded)
                        touched.pop(folded, None)
                        before.pop(folded, None)
                    touched.setdefault(survivor, _Touched())
                    out[self._part(survivor)].append(ProfileMerged(survivor, item.folded, item.at))
                case Reassigned():
                    self._reassign(state, tx, touched, item)
                case Deleted():
                    await self._delete(
                        state=state,
                        tx=tx,
                        touched=touched,
                        before=before,
                        out=out,
                        batch=batch,
                        item=item,
                    )
        now = time.time()
        for pid, acc in touched.items():
            after_flat = merge_flat(state.rows.get(pid, {}).values(), policy)
            after = _flat_values(after_flat)
            changed = changed_paths(before.get(pid, {}), after)
            if acc.events:
                tx.add(CAP_EVENTS, (pid, MAX_EVENTS_PER_PROFILE))
            out[self._part(pid)].append(
                ProfileChanged(
                    pid,
                    acc.record_ids,
                    now,
                    attributes=unflatten(after),
                    changed=changed,
                    events=acc.events,
                    identities=[Identity(ns, v) for ns, v in sorted(state.identities.get(pid, ()))],
                    views={
                        p.name: unflatten(_flat_values(merge_flat(rows.values(), p)))
                        for p in others
                        if (rows := state.rows.get(pid))
                    },
                )
            )
        for part, change_items in out.items():
            for some in chunks(change_items):
                batch.emit(subjects.changes(part), msgpack_encoder.encode(ChangeBatch(some)))

    def _part(self, profile_id: str) -> int:
        return subjects.partition_of(profile_id, self.settings.partitions)

    def _apply_fragment(
        self, state: _State, tx: Any, acc: _Touched, pid: str, item: Fragment
    ) -> None:
        r = item.record
        tx.add(UPSERT_PROFILE, (pid, r.ingested_at, r.ingested_at))
        for ident in r.identities:
            state.identities[pid].add((ident.namespace, ident.value))
            tx.add(UPSERT_IDENTITY, (ident.namespace, ident.value, pid))
        acc.record_ids.append(r.record_id)
        if r.record_class == "event":
            ts = r.timestamp if r.timestamp is not None else r.ingested_at
            keys = [f"{i.namespace}:{i.value}" for i in r.identities]
            tx.add(
                INSERT_EVENT,
                (
                    r.record_id,
                    pid,
                    r.dataset,
                    r.event_type,
                    ts,
                    _keys_encoder.encode(keys),
                    msgpack_encoder.encode(r.payload),
                ),
            )
            acc.events.append(
                ExperienceEvent(
                    record_id=r.record_id,
                    dataset=r.dataset,
                    event_type=r.event_type,
                    timestamp=ts,
                    payload=r.payload,
                )
            )
            return
        rows = state.rows[pid]
        for row in fragment_updates(rows, r.dataset, r.payload, record_time(r), r.record_id):
            rows[(row.dataset, row.path)] = row
            tx.add(
                UPSERT_ATTRIBUTE,
                (
                    pid,
                    row.dataset,
                    row.path,
                    msgpack_encoder.encode(row.value),
                    row.ts,
                    row.record_id,
                ),
            )

    def _fold(self, state: _State, tx: Any, survivor: str, folded: str) -> None:
        """Everything of `folded` now belongs to `survivor`; per attribute the newer wins."""
        merged = fold_rows(
            [*state.rows.get(survivor, {}).values(), *state.rows.get(folded, {}).values()]
        )
        state.rows[survivor] = dict(merged)
        state.rows.pop(folded, None)
        state.identities[survivor] |= state.identities.pop(folded, set())
        state.redirect[folded] = survivor
        tx.add(DELETE_ATTRIBUTES, (folded,))
        for row in merged.values():
            tx.add(
                UPSERT_ATTRIBUTE,
                (
                    survivor,
                    row.dataset,
                    row.path,
                    msgpack_encoder.encode(row.value),
                    row.ts,
                    row.record_id,
                ),
            )
        tx.add(MOVE_EVENTS, (survivor, folded))
        tx.add("DELETE FROM memberships WHERE profile_id = ?", (folded,))  # re-evaluated upstream
        tx.add(MOVE_IDENTITIES, (survivor, folded))
        tx.add(UPSERT_PROFILE, (survivor, time.time(), time.time()))
        tx.add(FOLD_PROFILE, (survivor, folded))

    def _reassign(
        self, state: _State, tx: Any, touched: dict[str, _Touched], item: Reassigned
    ) -> None:
        source = state.resolve(item.profile_id)
        moved = {(i.namespace, i.value) for i in item.identities}
        state.identities[source] -= moved
        touched.setdefault(source, _Touched())
        if item.to_profile is None:
            tx.add_many(DELETE_IDENTITY, list(moved))
            return
        target = state.resolve(item.to_profile)
        state.identities[target] |= moved
        tx.add(UPSERT_PROFILE, (target, item.at, item.at))
        tx.add_many(UPSERT_IDENTITY, [(ns, v, target) for ns, v in moved])
        keys = [f"{ns}:{v}" for ns, v in moved]
        tx.add(
            "UPDATE events SET profile_id = ? WHERE profile_id = ? AND EXISTS (SELECT 1 FROM "
            "json_each(events.identity_keys) AS k WHERE k.value IN "
            "(SELECT value FROM json_each(?)))",
            (target, source, _json_list(keys)),
        )
        touched.setdefault(target, _Touched())

    async def _delete(
        self,
        *,
        state: _State,
        tx: Any,
        touched: dict[str, _Touched],
        before: dict[str, dict[str, Any]],
        out: dict[int, list[ChangeItem]],
        batch: Batch,
        item: Deleted,
    ) -> None:
        pids = sorted({state.resolve(p) for p in item.profile_ids})
        plist = _json_list(pids)
        counts = {}
        for table in ("attributes", "events", "identities", "memberships"):
            rows = await self.db.execute_fetchall(
                f"SELECT count(*) FROM {table} WHERE profile_id IN "
                "(SELECT value FROM json_each(?))",
                (plist,),
            )
            counts[table] = int(next(iter(rows))[0])
        for table in ("attributes", "events", "identities", "memberships"):
            tx.add(
                f"DELETE FROM {table} WHERE profile_id IN (SELECT value FROM json_each(?))",
                (plist,),
            )
        tx.add(
            "DELETE FROM profiles WHERE profile_id IN (SELECT value FROM json_each(?)) "
            "OR folded_into IN (SELECT value FROM json_each(?))",
            (plist, plist),
        )
        counts["attributes"] = sum(len(state.rows.get(pid, {})) for pid in pids)  # loaded + new
        for pid in pids:
            state.rows.pop(pid, None)
            state.identities.pop(pid, None)
            touched.pop(pid, None)
            before.pop(pid, None)
        part = self._part(pids[0]) if pids else 0
        out[part].append(ProfileDeleted(pids, item.request))
        report = PrivacyReport(
            request_id=item.request.request_id,
            service=self.name,
            identity=item.request.identity,
            profile_ids=pids,
            removed=counts,
            at=time.time(),
        )
        batch.emit(
            subjects.privacy_report(item.request.request_id, self.name), json_encoder.encode(report)
        )

    async def _load(self, items: Sequence[Any]) -> _State:
        state = _State()
        ids: set[str] = set()
        for item in items:
            match item:
                case Fragment() | Merged():
                    ids.add(item.profile_id)
                    if isinstance(item, Merged):
                        ids.update(item.folded)
                case Reassigned():
                    ids.add(item.profile_id)
                    if item.to_profile:
                        ids.add(item.to_profile)
                case Deleted():
                    ids.update(item.profile_ids)
        if not ids:
            return state
        db = self.db
        frontier = set(ids)
        for _ in range(8):  # follow folded ids to their survivors
            rows = await db.execute_fetchall(
                "SELECT profile_id, folded_into FROM profiles WHERE folded_into IS NOT NULL AND "
                "profile_id IN (SELECT value FROM json_each(?))",
                (_json_list(frontier),),
            )
            frontier = set()
            for pid, into in rows:
                state.redirect[str(pid)] = str(into)
                if into not in ids:
                    frontier.add(str(into))
            ids |= frontier
            if not frontier:
                break
        plist = _json_list(ids)
        for pid, ds, path, value, ts, rid in await db.execute_fetchall(
            "SELECT profile_id, dataset, path, value, ts, record_id FROM attributes WHERE "
            "profile_id IN (SELECT value FROM json_each(?))",
            (plist,),
        ):
            state.rows[pid][(ds, path)] = AttributeValue(
                ds, path, _value_decoder.decode(value), ts, rid
            )
        for ns, value, pid in await db.execute_fetchall(
            "SELECT namespace, value, profile_id FROM identities WHERE "
            "profile_id IN (SELECT value FROM json_each(?))",
            (plist,),
        ):
            state.identities[pid].add((ns, value))
        return state


def _flat_values(flat: dict[str, tuple[Any, AttributeValue]]) -> dict[str, Any]:
    return {path: value for path, (value, _) in flat.items()}

"""The segmentation actor: keeps the profile view it evaluates (attributes, identities,
events), follows merges, and carries privacy deletes on to the destination service (on
`cdp.membership._deleted`) after removing its own state."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import msgspec

from services.segmentation.store import CAP_EVENTS, INSERT_EVENT, MIGRATIONS, UPSERT_FACTS
from shared import subjects
from shared.messages import (
    PrivacyReport,
    ProfileChanged,
    ProfileDeleted,
    ProfileMerged,
    Recheck,
    change_batch_decoder,
    json_encoder,
    msgpack_encoder,
)
from shared.runtime import Batch, ConsumerSpec, Service

MAX_EVENTS_PER_PROFILE = 5000
_keys_encoder = msgspec.json.Encoder()


def _json_list(values: Iterable[str]) -> bytes:
    return _keys_encoder.encode(list(values))


class SegmentationService(Service):
    name = "segmentation"
    migrations = MIGRATIONS

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (
            ConsumerSpec(
                "segmentation",
                subjects.STREAM_CHANGES,
                self.handle_changes,
                description="profile changes, from profile",
            ),
        )

    async def handle_changes(self, batch: Batch) -> None:
        for d in batch.deliveries:
            for item in change_batch_decoder.decode(d.data).items:
                match item:
                    case ProfileChanged():
                        self._store_view(batch, item)
                    case ProfileMerged():
                        self._fold(batch, item)
                    case ProfileDeleted():
                        await self._delete(batch, item)
                    case Recheck():
                        pass

    def _store_view(self, batch: Batch, item: ProfileChanged) -> None:
        tx = batch.tx
        tx.add(
            UPSERT_FACTS,
            (
                item.profile_id,
                msgpack_encoder.encode(item.attributes),
                msgpack_encoder.encode(item.identities),
                item.at,
            ),
        )
        for e in item.events:
            tx.add(
                INSERT_EVENT,
                (
                    e.record_id,
                    item.profile_id,
                    e.dataset,
                    e.event_type,
                    e.timestamp,
                    msgpack_encoder.encode(e.payload),
                ),
            )
        if item.events:
            tx.add(CAP_EVENTS, (item.profile_id, MAX_EVENTS_PER_PROFILE))

    def _fold(self, batch: Batch, item: ProfileMerged) -> None:
        folded = _json_list(item.folded)
        tx = batch.tx
        tx.add(
            "UPDATE events SET profile_id = ? WHERE profile_id IN (SELECT value FROM json_each(?))",
            (item.profile_id, folded),
        )
        tx.add("DELETE FROM facts WHERE profile_id IN (SELECT value FROM json_each(?))", (folded,))

    async def _delete(self, batch: Batch, item: ProfileDeleted) -> None:
        plist = _json_list(item.profile_ids)
        removed: dict[str, int] = {}
        for table in ("facts", "events", "memberships", "timers"):
            rows = await self.db.execute_fetchall(
                f"SELECT count(*) FROM {table} WHERE profile_id IN "
                "(SELECT value FROM json_each(?))",
                (plist,),
            )
            removed[table] = int(next(iter(rows))[0])
            batch.tx.add(
                f"DELETE FROM {table} WHERE profile_id IN (SELECT value FROM json_each(?))",
                (plist,),
            )
        batch.emit(subjects.PRIVACY_MEMBERSHIP, json_encoder.encode(item))
        report = PrivacyReport(
            request_id=item.request.request_id,
            service=self.name,
            identity=item.request.identity,
            profile_ids=item.profile_ids,
            removed=removed,
            at=time.time(),
        )
        batch.emit(
            subjects.privacy_report(item.request.request_id, self.name), json_encoder.encode(report)
        )

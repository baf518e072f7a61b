"""The segmentation actor: consumes profile changes, partition by partition.

The segment language and evaluation arrive with their own issue; today the service keeps,
per profile, what it has seen, follows merges, and carries privacy deletes on to the
destination service (on `cdp.membership._deleted`) after removing its own state.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from services.segmentation.store import BUMP_PROFILE, MIGRATIONS
from shared import subjects
from shared.messages import (
    PrivacyReport,
    ProfileChanged,
    ProfileDeleted,
    ProfileMerged,
    change_batch_decoder,
    json_encoder,
)
from shared.runtime import Batch, ConsumerSpec, Service


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
                        batch.tx.add(BUMP_PROFILE, (item.profile_id, len(item.record_ids), item.at))
                    case ProfileMerged():
                        for folded in item.folded:
                            batch.tx.add(
                                "DELETE FROM profile_state WHERE profile_id = ?", (folded,)
                            )
                        batch.tx.add(BUMP_PROFILE, (item.profile_id, 0, item.at))
                    case ProfileDeleted():
                        await self._delete(batch, item)

    async def _delete(self, batch: Batch, item: ProfileDeleted) -> None:
        removed = 0
        for pid in item.profile_ids:
            rows = await self.db.execute_fetchall(
                "SELECT count(*) FROM profile_state WHERE profile_id = ?", (pid,)
            )
            removed += int(next(iter(rows))[0])
            batch.tx.add("DELETE FROM profile_state WHERE profile_id = ?", (pid,))
        batch.emit(subjects.PRIVACY_MEMBERSHIP, json_encoder.encode(item))
        report = PrivacyReport(
            request_id=item.request.request_id,
            service=self.name,
            identity=item.request.identity,
            profile_ids=item.profile_ids,
            removed={"profile_state": removed},
            at=time.time(),
        )
        batch.emit(
            subjects.privacy_report(item.request.request_id, self.name), json_encoder.encode(report)
        )

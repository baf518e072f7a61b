"""The segmentation actor: consumes profile changes, partition by partition."""

from __future__ import annotations

from collections.abc import Sequence

from services.segmentation.store import BUMP_PROFILE, MIGRATIONS
from shared import subjects
from shared.messages import change_batch_decoder
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
                batch.tx.add(BUMP_PROFILE, (item.profile_id, len(item.record_ids), item.at))

"""The profile actor: stores fragments per profile and tells segmentation what changed."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence

from services.profile.store import INSERT_FRAGMENT, MIGRATIONS
from shared import subjects
from shared.messages import (
    ChangeBatch,
    ProfileChanged,
    msgpack_encoder,
    profile_batch_decoder,
)
from shared.runtime import Batch, ConsumerSpec, Service


class ProfileService(Service):
    name = "profile"
    migrations = MIGRATIONS

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (
            ConsumerSpec(
                "profile",
                subjects.STREAM_PROFILES,
                self.handle_fragments,
                description="records with their profile ids, from identity",
            ),
        )

    async def handle_fragments(self, batch: Batch) -> None:
        changed: dict[str, list[str]] = defaultdict(list)
        for d in batch.deliveries:
            for item in profile_batch_decoder.decode(d.data).items:
                r = item.record
                batch.tx.add(
                    INSERT_FRAGMENT,
                    (
                        r.record_id,
                        item.profile_id,
                        r.dataset,
                        r.ingested_at,
                        msgpack_encoder.encode(r.payload),
                    ),
                )
                changed[item.profile_id].append(r.record_id)
        now = time.time()
        by_partition: dict[int, list[ProfileChanged]] = defaultdict(list)
        for profile_id, record_ids in changed.items():
            part = subjects.partition_of(profile_id, self.settings.partitions)
            by_partition[part].append(ProfileChanged(profile_id, record_ids, now))
        for part, items in by_partition.items():
            batch.emit(subjects.changes(part), msgpack_encoder.encode(ChangeBatch(items)))

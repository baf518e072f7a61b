"""The destination actor: consumes membership changes from `cdp.membership.>`."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from services.destination.store import MIGRATIONS, UPSERT_MEMBERSHIP
from shared import subjects
from shared.messages import membership_decoder
from shared.runtime import Batch, ConsumerSpec, Service


class DestinationService(Service):
    name = "destination"
    migrations = MIGRATIONS

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (
            ConsumerSpec(
                "destination",
                subjects.STREAM_MEMBERSHIP,
                self.handle_memberships,
                description="segment membership changes",
            ),
        )

    async def handle_memberships(self, batch: Batch) -> None:
        for d in batch.deliveries:
            try:
                ev = membership_decoder.decode(d.data)
            except msgspec.DecodeError:
                self.log.warning("undecodable membership event", seq=d.seq)
                continue
            batch.tx.add(UPSERT_MEMBERSHIP, (ev.segment, ev.profile_id, ev.status, ev.at))

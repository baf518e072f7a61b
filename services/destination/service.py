"""The destination actor: consumes membership changes from `cdp.membership.>`.

Connectors arrive with their own issue; today the service records the memberships it has
seen and honours privacy deletes (`cdp.membership._deleted`) by forgetting the person.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec

from services.destination.store import MIGRATIONS, UPSERT_MEMBERSHIP
from shared import subjects
from shared.messages import PrivacyReport, ProfileDeleted, json_encoder, membership_decoder
from shared.runtime import Batch, ConsumerSpec, Service

_deleted_decoder = msgspec.json.Decoder(ProfileDeleted)


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
            if d.subject == subjects.PRIVACY_MEMBERSHIP:
                await self._delete(batch, d.data)
                continue
            try:
                ev = membership_decoder.decode(d.data)
            except msgspec.DecodeError:
                self.log.warning("undecodable membership event", seq=d.seq)
                continue
            batch.tx.add(UPSERT_MEMBERSHIP, (ev.segment, ev.profile_id, ev.status, ev.at))

    async def _delete(self, batch: Batch, data: bytes) -> None:
        try:
            item = _deleted_decoder.decode(data)
        except msgspec.DecodeError:
            self.log.warning("undecodable privacy delete")
            return
        removed = 0
        for pid in item.profile_ids:
            rows = await self.db.execute_fetchall(
                "SELECT count(*) FROM memberships_seen WHERE profile_id = ?", (pid,)
            )
            removed += int(next(iter(rows))[0])
            batch.tx.add("DELETE FROM memberships_seen WHERE profile_id = ?", (pid,))
        report = PrivacyReport(
            request_id=item.request.request_id,
            service=self.name,
            identity=item.request.identity,
            profile_ids=item.profile_ids,
            removed={"memberships": removed},
            at=time.time(),
        )
        batch.emit(
            subjects.privacy_report(item.request.request_id, self.name), json_encoder.encode(report)
        )

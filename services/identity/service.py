"""The identity actor: resolves each record's profile id and routes it to its partition."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

from services.identity.store import MIGRATIONS, UPSERT_IDENTITY
from shared import subjects
from shared.messages import Fragment, ProfileBatch, msgpack_encoder, record_batch_decoder
from shared.runtime import Batch, ConsumerSpec, Service


def new_profile_id(seed: str) -> str:
    return "p" + hashlib.blake2b(seed.encode(), digest_size=10).hexdigest()


class IdentityService(Service):
    name = "identity"
    migrations = MIGRATIONS

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (
            ConsumerSpec(
                "identity",
                subjects.STREAM_RECORDS,
                self.handle_records,
                description="accepted records from ingest",
            ),
        )

    async def handle_records(self, batch: Batch) -> None:
        by_partition: dict[int, list[Fragment]] = defaultdict(list)
        for d in batch.deliveries:
            for record in record_batch_decoder.decode(d.data).records:
                first = record.identities[0] if record.identities else None
                seed = f"{first.namespace}:{first.value}" if first else record.record_id
                profile_id = new_profile_id(seed)
                for ident in record.identities:
                    batch.tx.add(
                        UPSERT_IDENTITY,
                        (ident.namespace, ident.value, profile_id, record.ingested_at),
                    )
                part = subjects.partition_of(profile_id, self.settings.partitions)
                by_partition[part].append(Fragment(profile_id, record))
        for part, items in by_partition.items():
            batch.emit(subjects.profiles(part), msgpack_encoder.encode(ProfileBatch(items)))

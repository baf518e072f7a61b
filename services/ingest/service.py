"""The ingest actor: one consumer over every `cdp.ingest.<dataset>` subject."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import msgspec

from services.ingest.store import BUMP_COUNTS, INSERT_REJECTED, MIGRATIONS
from shared import subjects
from shared.messages import Record, RecordBatch, msgpack_encoder
from shared.runtime import Batch, ConsumerSpec, Service

_json_any = msgspec.json.Decoder(dict[str, Any])


class IngestService(Service):
    name = "ingest"
    migrations = MIGRATIONS

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (
            ConsumerSpec(
                "ingest",
                subjects.STREAM_INGEST,
                self.handle_records,
                description="records published by clients on cdp.ingest.<dataset>",
            ),
        )

    async def handle_records(self, batch: Batch) -> None:
        now = time.time()
        accepted: list[Record] = []
        counts: Counter[tuple[str, bool]] = Counter()
        for d in batch.deliveries:
            dataset = subjects.dataset_of(d.subject)
            record_id = f"s{d.seq}"
            try:
                payload = _json_any.decode(d.data)
            except msgspec.DecodeError as exc:
                batch.tx.add(
                    INSERT_REJECTED,
                    (
                        record_id,
                        dataset,
                        None,
                        "malformed JSON",
                        "",
                        "a JSON object",
                        str(exc),
                        d.data,
                        now,
                    ),
                )
                counts[dataset, False] += 1
                continue
            accepted.append(
                Record(
                    record_id=record_id,
                    dataset=dataset,
                    ingested_at=now,
                    payload=payload,
                    source_msg_id=d.msg_id,
                )
            )
            counts[dataset, True] += 1
        for (dataset, ok), n in counts.items():
            batch.tx.add(BUMP_COUNTS, (dataset, n if ok else 0, 0 if ok else n))
        if accepted:
            batch.emit(subjects.RECORDS, msgpack_encoder.encode(RecordBatch(accepted)))

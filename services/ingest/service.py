"""The ingest actor.

One consumer over every `cdp.ingest.<dataset>` subject validates each record against its
dataset's schema: accepted records of profile-enabled datasets go to identity in
batches; rejected ones are kept in the error store with their reason. The HTTP door, the
admin API and batch file jobs live in their own modules and share this state.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime

import msgspec

from services.ingest.admin import IngestAdmin
from services.ingest.batches import BatchJobs
from services.ingest.http import IngestHttp
from services.ingest.records import encoded, reject_row, to_record, unknown_dataset
from services.ingest.registry import Registry
from services.ingest.settings import load_limits
from services.ingest.store import BUMP_COUNTS, MIGRATIONS
from services.ingest.validation import Accepted, CompiledSchema, Limits
from shared import subjects
from shared.config import Settings
from shared.messages import (
    PrivacyDelete,
    PrivacyReport,
    Record,
    RecordBatch,
    json_encoder,
    msgpack_encoder,
    probe_decoder,
)
from shared.resources import Dataset
from shared.runtime import Batch, ConsumerSpec, Service

_delete_decoder = msgspec.json.Decoder(PrivacyDelete)


class IngestService(Service):
    name = "ingest"
    migrations = MIGRATIONS

    def __init__(self, settings: Settings, limits: Limits | None = None) -> None:
        super().__init__(settings)
        self.limits = limits or load_limits()
        self.registry = Registry()
        self._compiled: dict[str, CompiledSchema] = {}
        self._id_prefix = "r"
        self.admin = IngestAdmin(self)
        self.http = IngestHttp(self)
        self.batches = BatchJobs(self)

    # -- state shared by the doors, the admin API and batch jobs ---------------------
    def compiled(self, dataset: str) -> tuple[Dataset, CompiledSchema] | None:
        ds = self.registry.datasets.get(dataset)
        if ds is None:
            return None
        compiled = self._compiled.get(dataset)
        if compiled is None:
            schema = self.registry.schemas[ds.schema]
            compiled = CompiledSchema(
                schema,
                self.limits,
                require_identity=ds.profile_enabled,
                phone_region=self.settings.phone_region,
            )
            self._compiled[dataset] = compiled
        return ds, compiled

    def config_changed(self) -> None:
        """Forget compiled schemas; they are rebuilt on next use."""
        self._compiled.clear()

    def record_id(self, seq: int) -> str:
        """Record id of the message at `seq` in CDP_INGEST (unique even if the stream is
        ever re-created: the prefix comes from the stream's creation time)."""
        return f"{self._id_prefix}{seq}"

    # -- lifecycle ---------------------------------------------------------------------
    async def on_start(self) -> None:
        await self.admin.load()
        info = await self.js.stream_info(subjects.STREAM_INGEST.name)
        created: object = info.created  # a datetime, or a string on some nats-py versions
        if isinstance(created, datetime):
            stamp = int(created.timestamp())
        elif isinstance(created, str):
            stamp = _epoch(created)
        else:
            stamp = 0
        self._id_prefix = f"r{stamp:x}-"
        await self.admin.start()
        await self.batches.start()

    async def on_stop(self) -> None:
        await self.batches.stop()
        await self.admin.stop()

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (
            ConsumerSpec(
                "ingest",
                subjects.STREAM_INGEST,
                self.handle_records,
                description="records published on cdp.ingest.<dataset> (NATS and HTTP doors)",
            ),
        )

    # -- the streaming door ------------------------------------------------------------
    async def handle_records(self, batch: Batch) -> None:
        now = time.time()
        accepted: list[Record] = []
        counts: Counter[tuple[str, bool]] = Counter()
        for d in batch.deliveries:
            if d.subject == subjects.PRIVACY_DELETE:
                for data in encoded(accepted):  # records published before the delete go first
                    batch.emit(subjects.RECORDS, data)
                accepted = []
                await self._privacy_delete(batch, d.data, now)
                continue
            if d.subject == subjects.PROBE:
                for data in encoded(accepted):  # the probe follows the records before it
                    batch.emit(subjects.RECORDS, data)
                accepted = []
                self._pass_probe(batch, d.data)
                continue
            dataset = subjects.dataset_of(d.subject)
            record_id = self.record_id(d.seq)
            found = self.compiled(dataset)
            result = found[1].validate_json(d.data) if found else unknown_dataset(dataset)
            if isinstance(result, Accepted):
                ds, compiled = found  # type: ignore[misc]
                counts[dataset, True] += 1
                if ds.profile_enabled:
                    accepted.append(
                        to_record(
                            result,
                            record_id=record_id,
                            dataset=dataset,
                            record_class=compiled.record_class,
                            now=now,
                            msg_id=d.msg_id,
                        )
                    )
            else:
                counts[dataset, False] += 1
                source = "http" if (d.msg_id or "").startswith("http:") else "nats"
                reject_row(
                    batch.tx,
                    record_id=record_id,
                    dataset=dataset,
                    problems=result,
                    payload=d.data,
                    source=source,
                    now=now,
                )
                self.log.info(
                    "record rejected",
                    dataset=dataset,
                    record_id=record_id,
                    reason=result[0].reason,
                    path=result[0].path,
                )
        for (dataset, ok), n in counts.items():
            batch.tx.add(BUMP_COUNTS, (dataset, n if ok else 0, 0 if ok else n))
        for data in encoded(accepted):
            batch.emit(subjects.RECORDS, data)

    def _pass_probe(self, batch: Batch, data: bytes) -> None:
        try:
            probe = probe_decoder.decode(data)
        except msgspec.DecodeError as exc:
            self.log.warning("malformed probe ignored", error=str(exc))
            return
        batch.emit(subjects.RECORDS, msgpack_encoder.encode(RecordBatch([], probes=[probe])))

    async def _privacy_delete(self, batch: Batch, data: bytes, now: float) -> None:
        try:
            request = _delete_decoder.decode(data)
        except msgspec.DecodeError as exc:
            self.log.warning("malformed privacy delete ignored", error=str(exc))
            return
        value = request.identity.value
        rows = await self.db.execute_fetchall(
            "SELECT count(*) FROM rejected_records WHERE instr(lower(CAST(payload AS TEXT)), "
            "lower(?)) > 0",
            (value,),
        )
        removed = int(next(iter(rows))[0])
        batch.tx.add(
            "DELETE FROM rejected_records WHERE instr(lower(CAST(payload AS TEXT)), lower(?)) > 0",
            (value,),
        )
        batch.emit(subjects.RECORDS, msgpack_encoder.encode(RecordBatch([], deletes=[request])))
        report = PrivacyReport(
            request_id=request.request_id,
            service=self.name,
            identity=request.identity,
            removed={"rejected_records": removed},
            at=now,
        )
        batch.emit(
            subjects.privacy_report(request.request_id, self.name), json_encoder.encode(report)
        )
        self.log.info("privacy delete passed on", request_id=request.request_id)


def _epoch(iso: str) -> int:
    with contextlib.suppress(ValueError):
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    return int(time.time())

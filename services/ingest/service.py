"""The ingest actor.

One consumer over every `cdp.ingest.<dataset>` subject validates each record against its
dataset's schema: accepted records of profile-enabled datasets go to identity in
batches; rejected ones are kept in the error store with their reason. The HTTP door, the
admin API and batch file jobs live in their own modules and share this state.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime

import msgspec
from prometheus_client import Counter as PromCounter

from services.ingest.admin import IngestAdmin
from services.ingest.batches import BatchJobs
from services.ingest.http import IngestHttp
from services.ingest.records import (
    encoded,
    identity_keys,
    payload_keys,
    reject_row,
    to_record,
    unknown_dataset,
)
from services.ingest.registry import Registry
from services.ingest.settings import load_limits
from services.ingest.store import (
    BUMP_COUNTS,
    DELETE_BY_KEYS,
    INSERT_REJECTED_KEY,
    KEY_TRIGGERS,
    MIGRATIONS,
    RETENTION,
)
from services.ingest.validation import Accepted, CompiledSchema, Limits
from shared import subjects
from shared.config import Settings
from shared.db import Tx, apply
from shared.messages import (
    PrivacyDelete,
    PrivacyReport,
    Record,
    RecordEnvelope,
    json_encoder,
    msgpack_encoder,
    probe_decoder,
)
from shared.resources import Dataset
from shared.runtime import ConsumerSpec, Service, Step

_delete_decoder = msgspec.json.Decoder(PrivacyDelete)
RETENTION_INTERVAL = 60.0
"""Seconds between two runs of the error store's retention when nothing is rejected."""
KEEP_FRACTION = 0.9
"""Past its size limit the error store drops down to this fraction of it, so that the next
writes do not each drop a few rows."""
_SELECT_DOOMED = (
    "SELECT DISTINCT record_id FROM rejected_keys WHERE key IN (SELECT value FROM json_each(?))"
)


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
        self.error_bytes = 0
        """The error store's size, as of the last retention run plus what was added since
        (an upper bound: deletes are not subtracted)."""
        self.errors_dropped = 0
        self._last_retention = 0.0
        self._retention_task: asyncio.Task[None] | None = None
        self.dropped_counter = PromCounter(
            "cdp_errors_dropped_total",
            "Rejected records the error store dropped by retention (age or size).",
            registry=self.metrics.registry,
        )

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
        await self.db.executescript(KEY_TRIGGERS)
        await self._key_old_rows()
        await self.retain()
        self._retention_task = asyncio.create_task(self._retention_loop(), name="retention")
        await self.admin.start()
        await self.batches.start()

    async def on_stop(self) -> None:
        if self._retention_task is not None:
            self._retention_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention_task
        await self.batches.stop()
        await self.admin.stop()

    # -- the error store's retention -----------------------------------------------------
    def _retention_params(self, now: float) -> tuple[float, float, int]:
        s = self.settings
        return (
            now - s.errors_max_age_days * 86400.0,
            s.errors_max_bytes * KEEP_FRACTION,
            s.errors_max_bytes,
        )

    def add_retention(self, tx: Tx, now: float, added: int) -> bool:
        """Add the retention statements to `tx` when the store may be past its size limit
        or retention has not run for a while; returns whether it did."""
        self.error_bytes += added
        due = now - self._last_retention > RETENTION_INTERVAL
        if self.error_bytes <= self.settings.errors_max_bytes and not due:
            return False
        params = self._retention_params(now)
        for sql in RETENTION:
            tx.add(sql, params)
        self._last_retention = now
        return True

    async def retain(self) -> None:
        """Apply retention in a transaction of its own, then refresh the counts."""
        tx = Tx()
        self.add_retention(tx, time.time(), self.settings.errors_max_bytes + 1)
        await apply(self.db, tx)
        await self.refresh_error_stats()

    async def refresh_error_stats(self) -> None:
        rows = await self.db.execute_fetchall(
            "SELECT (SELECT coalesce(sum(size), 0) FROM rejected_records), "
            "(SELECT dropped FROM error_store WHERE id = 1)"
        )
        size, dropped = next(iter(rows))
        self.error_bytes = int(size)
        if int(dropped) > self.errors_dropped:
            self.dropped_counter.inc(int(dropped) - self.errors_dropped)
        self.errors_dropped = int(dropped)

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(RETENTION_INTERVAL)
            try:
                await self.retain()
            except Exception as exc:  # the next run tries again
                self.log.warning("error store retention failed", error=repr(exc))

    async def _key_old_rows(self) -> None:
        """Rejected records stored before they were keyed get their identity keys."""
        while True:
            rows = list(
                await self.db.execute_fetchall(
                    "SELECT record_id, payload FROM rejected_records WHERE keyed = 0 LIMIT 1000"
                )
            )
            if not rows:
                return
            tx = Tx()
            tx.add_many(
                INSERT_REJECTED_KEY,
                [(k, str(r[0])) for r in rows for k in payload_keys(bytes(r[1]))],
            )
            tx.add_many(
                "UPDATE rejected_records SET keyed = 1 WHERE record_id = ?",
                [(r[0],) for r in rows],
            )
            await apply(self.db, tx)

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
    async def handle_records(self, batch: Step) -> None:
        now = time.time()
        accepted: list[Record] = []
        counts: Counter[tuple[str, bool]] = Counter()
        added = 0
        pending: dict[str, set[str]] = {}  # rejected in this batch, not stored yet: keys
        for d in batch.deliveries:
            if d.subject == subjects.PRIVACY_DELETE:
                for data in encoded(accepted):  # records published before the delete go first
                    batch.emit(subjects.RECORDS, data)
                accepted = []
                await self._privacy_delete(batch, d.data, now, pending)
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
                stored = reject_row(
                    batch.tx,
                    record_id=record_id,
                    dataset=dataset,
                    problems=result,
                    payload=d.data,
                    source=source,
                    now=now,
                )
                added += stored.size
                pending[record_id] = set(stored.keys)
                self.log.info(
                    "record rejected",
                    dataset=dataset,
                    record_id=record_id,
                    reason=result[0].reason,
                    path=result[0].path,
                )
        for (dataset, ok), n in counts.items():
            batch.tx.add(BUMP_COUNTS, (dataset, n if ok else 0, 0 if ok else n))
        if added and self.add_retention(batch.tx, now, added):
            batch.after_commit(self._after_retention)
        for data in encoded(accepted):
            batch.emit(subjects.RECORDS, data)

    def _after_retention(self) -> None:
        task = asyncio.create_task(self.refresh_error_stats(), name="error-store-stats")
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _pass_probe(self, batch: Step, data: bytes) -> None:
        try:
            probe = probe_decoder.decode(data)
        except msgspec.DecodeError as exc:
            self.log.warning("malformed probe ignored", error=str(exc))
            return
        batch.emit(subjects.RECORDS, msgpack_encoder.encode(RecordEnvelope([], probes=[probe])))

    async def _privacy_delete(
        self, batch: Step, data: bytes, now: float, pending: dict[str, set[str]]
    ) -> None:
        try:
            request = _delete_decoder.decode(data)
        except msgspec.DecodeError as exc:
            self.log.warning("malformed privacy delete ignored", error=str(exc))
            return
        # Exactly the records that carry the value (as identity normalises it), never one
        # that merely contains it.
        # Those rejected earlier in this batch are in its transaction, before the delete.
        wanted = identity_keys(request.identity.value, self.settings.phone_region)
        keys = json_encoder.encode(sorted(wanted))
        ids = {str(r[0]) for r in await self.db.execute_fetchall(_SELECT_DOOMED, (keys,))}
        for record_id in [r for r, found_by in pending.items() if found_by & wanted]:
            ids.add(record_id)
            del pending[record_id]
        removed = len(ids)
        batch.tx.add(DELETE_BY_KEYS, (keys,))
        batch.emit(subjects.RECORDS, msgpack_encoder.encode(RecordEnvelope([], deletes=[request])))
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

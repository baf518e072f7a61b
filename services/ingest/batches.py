"""Batch file ingestion: CSV, JSON Lines and Parquet files uploaded to the object store.

A batch runs in two phases. Validating: the file is read in chunks (in a worker thread),
every row is validated, bad rows go to the error store with their row number and reason,
and good rows are spooled to a local file. Then, if the share of bad rows is at most the
dataset's threshold, ingesting: the spooled records are published to identity in
batches, with deterministic message ids. Otherwise the batch fails and ingests nothing.
Progress is published on `cdp.batches.<id>.progress`; the batch record lives in SQLite,
and a batch interrupted by a restart runs again from the start (every step is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import msgspec
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from services.ingest.admin import batch_from_row
from services.ingest.errors import IngestError
from services.ingest.files import FileReader, Row
from services.ingest.formats import Format
from services.ingest.records import encoded, reject_row, to_record
from services.ingest.store import BATCH_COLUMNS, BUMP_COUNTS, INSERT_BATCH, UPDATE_BATCH
from services.ingest.validation import Accepted, CompiledSchema, Problem
from shared import subjects
from shared.admin import AdminFailure, BatchInfo, BatchStart
from shared.db import Tx, apply
from shared.messages import Record, RecordEnvelope

if TYPE_CHECKING:
    from services.ingest.service import IngestService

CHUNK_ROWS = 5000
PROGRESS_EVERY_S = 0.2
PUBLISH_WINDOW = 16
_LEN = struct.Struct(">I")
_info_encoder = msgspec.json.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(RecordEnvelope)


class BatchFailed(IngestError):
    code = "batch_failed"


def validate_rows(
    rows: list[Row],
    compiled: CompiledSchema,
) -> list[tuple[Row, Accepted | list[Problem]]]:
    """Validate a chunk of rows (runs in a worker thread)."""
    out: list[tuple[Row, Accepted | list[Problem]]] = []
    for row in rows:
        result: Accepted | list[Problem]
        if row.kind == "flat":
            value = row.value
            error = value.get("__error__") if isinstance(value, dict) else None
            if error:
                result = [Problem("malformed row", "", "as many cells as the header", str(error))]
            else:
                result = compiled.validate_row(value)
        elif row.kind == "raw":
            result = compiled.validate_json(row.value)
        else:
            result = compiled.validate_object(row.value)
        out.append((row, result))
    return out


def _spool_write(spool: IO[bytes], records: list[Record]) -> None:
    for data in encoded(records):
        spool.write(_LEN.pack(len(data)))
        spool.write(data)


def _spool_read(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while header := f.read(_LEN.size):
            (n,) = _LEN.unpack(header)
            yield f.read(n)


class BatchJobs:
    def __init__(self, service: IngestService) -> None:
        self.svc = service
        self.live: dict[str, BatchInfo] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._store: ObjectStore | None = None

    @property
    def work_dir(self) -> Path:
        return self.svc.settings.data_dir / "batches"

    async def start(self) -> None:
        js = self.svc.js
        try:
            self._store = await js.object_store(subjects.BATCH_BUCKET)
        except NotFoundError:
            self._store = await js.create_object_store(subjects.BATCH_BUCKET)
        # Batches a previous run did not finish run again from the start.
        rows = await self.svc.db.execute_fetchall(
            f"SELECT {BATCH_COLUMNS} FROM batches WHERE status IN ('queued', 'validating', "
            "'ingesting') ORDER BY created_at"
        )
        for row in rows:
            info = batch_from_row(row)
            self.svc.log.info("resuming batch", batch_id=info.batch_id)
            self._launch(info)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def start_batch(self, request: BatchStart) -> BatchInfo:
        """Admin: register a batch for an uploaded object and start it."""
        ds = self.svc.registry.datasets.get(request.dataset)
        if ds is None:
            raise AdminFailure(
                "not_found",
                f"no dataset named {request.dataset!r}",
                kind="dataset",
                name=request.dataset,
            )
        if request.format not in ("csv", "jsonl", "parquet"):
            raise AdminFailure(
                "invalid",
                f"unknown file format {request.format!r} (csv, jsonl or parquet)",
                field="format",
            )
        if not request.batch_id.replace("-", "").isalnum() or len(request.batch_id) > 64:
            raise AdminFailure(
                "invalid", "a batch id holds letters, digits and '-'", field="batch_id"
            )
        now = time.time()
        tx = Tx()
        tx.add(
            INSERT_BATCH,
            (
                request.batch_id,
                request.dataset,
                request.file_name,
                request.format,
                ds.error_threshold,
                now,
            ),
        )
        try:
            await apply(self.svc.db, tx)
        except Exception as exc:
            raise AdminFailure("conflict", f"batch {request.batch_id} exists already") from exc
        info = BatchInfo(
            batch_id=request.batch_id,
            dataset=request.dataset,
            file_name=request.file_name,
            format=request.format,
            status="queued",
            threshold=ds.error_threshold,
            created_at=now,
        )
        self._launch(info)
        return info

    def _launch(self, info: BatchInfo) -> None:
        self.live[info.batch_id] = info
        task = asyncio.create_task(self._run(info), name=f"batch:{info.batch_id}")
        self._tasks[info.batch_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(info.batch_id, None))

    # -- one batch -------------------------------------------------------------------------
    async def _run(self, info: BatchInfo) -> None:
        log = self.svc.log.bind(batch_id=info.batch_id, dataset=info.dataset)
        work = self.work_dir
        source = work / f"{info.batch_id}.{info.format}"
        spool = work / f"{info.batch_id}.spool"
        try:
            await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
            info.started_at = time.time()
            await self._download(info, source)
            await self._validate(info, source, spool)
            if info.input_rows and info.failed / info.input_rows > info.threshold:
                info.status = "failed"
                info.error = (
                    f"{info.failed} of {info.input_rows} rows are bad "
                    f"({info.failed / info.input_rows:.1%}), above the dataset's threshold "
                    f"of {info.threshold:.1%}: nothing was ingested"
                )
                info.accepted = 0
            else:
                await self._ingest(info, spool)
                info.status = "success" if info.failed == 0 else "partial"
            info.progress = 1.0
        except asyncio.CancelledError:
            log.info("batch interrupted; it runs again at the next start")
            raise
        except Exception as exc:
            log.exception("batch failed")
            info.status = "failed"
            info.error = f"{type(exc).__name__}: {exc}"
            info.accepted = 0
        finally:
            for path in (source, spool):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        info.finished_at = time.time()
        await self._save(info, counts=True)
        await self._progress(info)
        self.live.pop(info.batch_id, None)
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self._store.delete(info.batch_id)
        log.info(
            "batch finished",
            status=info.status,
            input_rows=info.input_rows,
            accepted=info.accepted,
            failed=info.failed,
        )

    async def _download(self, info: BatchInfo, target: Path) -> None:
        assert self._store is not None
        with open(target, "wb") as f:  # noqa: ASYNC230 - the object store writes via a thread
            try:
                await self._store.get(info.batch_id, writeinto=f)
            except NotFoundError:
                raise BatchFailed(f"no uploaded file for batch {info.batch_id}") from None

    async def _validate(self, info: BatchInfo, source: Path, spool_path: Path) -> None:
        found = self.svc.compiled(info.dataset)
        if found is None:
            raise BatchFailed(f"dataset {info.dataset!r} no longer exists")
        ds, compiled = found
        info.status, info.progress = "validating", 0.0
        info.input_rows = info.accepted = info.failed = 0
        await self._save(info)
        reader = FileReader(source, as_format(info.format), chunk_rows=CHUNK_ROWS)
        chunks = reader.chunks()
        now = time.time()
        last_progress = 0.0
        with open(spool_path, "wb") as spool:  # noqa: ASYNC230 - written from a worker thread
            while True:
                step = await asyncio.to_thread(_next_validated, chunks, compiled)
                if step is None:
                    break
                tx = Tx()
                records: list[Record] = []
                added = 0
                for row, result in step:
                    record_id = f"b{info.batch_id}-{row.number}"
                    if isinstance(result, Accepted):
                        records.append(
                            to_record(
                                result,
                                record_id=record_id,
                                dataset=info.dataset,
                                record_class=compiled.record_class,
                                now=now,
                                batch_id=info.batch_id,
                            )
                        )
                    else:
                        added += reject_row(
                            tx,
                            record_id=record_id,
                            dataset=info.dataset,
                            problems=result,
                            payload=row.original,
                            source="batch",
                            now=now,
                            batch_id=info.batch_id,
                            row_number=row.number,
                        ).size
                info.input_rows += len(step)
                info.accepted += len(records)
                info.failed += len(step) - len(records)
                retained = bool(added) and self.svc.add_retention(tx, now, added)
                if tx:
                    await apply(self.svc.db, tx)
                if retained:
                    await self.svc.refresh_error_stats()
                if ds.profile_enabled and records:
                    await asyncio.to_thread(_spool_write, spool, records)
                info.progress = reader.progress
                if time.monotonic() - last_progress > PROGRESS_EVERY_S:
                    last_progress = time.monotonic()
                    await self._progress(info)

    async def _ingest(self, info: BatchInfo, spool_path: Path) -> None:
        info.status, info.progress = "ingesting", 0.0
        await self._save(info)
        await self._progress(info)
        js = self.svc.js
        pending: list[asyncio.Future[object]] = []
        sent = 0
        last_progress = time.monotonic()
        for n, data in enumerate(_spool_read(spool_path)):
            msg_id = f"batch:{info.batch_id}:{n}"
            pending.append(
                asyncio.ensure_future(
                    js.publish(subjects.RECORDS, data, headers={"Nats-Msg-Id": msg_id})
                )
            )
            if len(pending) >= PUBLISH_WINDOW:
                await asyncio.gather(*pending)
                sent += len(pending)
                pending = []
                if time.monotonic() - last_progress > PROGRESS_EVERY_S:
                    last_progress = time.monotonic()
                    info.progress = min(1.0, sent * 500 / max(info.accepted, 1))
                    await self._progress(info)
        if pending:
            await asyncio.gather(*pending)

    async def _save(self, info: BatchInfo, counts: bool = False) -> None:
        tx = Tx()
        if counts:
            tx.add(BUMP_COUNTS, (info.dataset, info.accepted, info.failed))
        tx.add(
            UPDATE_BATCH,
            (
                info.status,
                info.input_rows,
                info.accepted,
                info.failed,
                info.error,
                info.started_at,
                info.finished_at,
                info.batch_id,
            ),
        )
        await apply(self.svc.db, tx)

    async def _progress(self, info: BatchInfo) -> None:
        with contextlib.suppress(Exception):
            await self.svc.nc.publish(
                subjects.batch_progress(info.batch_id), _info_encoder.encode(info)
            )


def as_format(name: str) -> Format:
    match name:
        case "csv" | "jsonl" | "parquet":
            return name
    raise BatchFailed(f"unknown format {name!r}")


def _next_validated(
    chunks: Iterator[list[Row]], compiled: CompiledSchema
) -> list[tuple[Row, Accepted | list[Problem]]] | None:
    rows = next(chunks, None)
    return None if rows is None else validate_rows(rows, compiled)

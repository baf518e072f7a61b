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
from typing import IO

import msgspec
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from services.ingest.errors import IngestError
from services.ingest.files import FileReader, Row
from services.ingest.formats import FORMATS, Format
from services.ingest.records import encoded
from services.ingest.retention import Retention
from services.ingest.rules import Validated, sort_rows, validate_rows
from services.ingest.state import IngestState
from services.ingest.store import Store
from services.ingest.validation import CompiledSchema
from shared import subjects
from shared.admin import BatchInfo, BatchStart, Conflict, Invalid, NotFound
from shared.db import Tx
from shared.messages import Record
from shared.runtime.tasks import cancel_all

CHUNK_ROWS = 5000
PROGRESS_EVERY_S = 0.2
PUBLISH_WINDOW = 16
_LEN = struct.Struct(">I")
_info_encoder = msgspec.json.Encoder()


class BatchFailed(IngestError):
    code = "batch_failed"


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
    """The batch file jobs: started by the admin API, resumed at start, run as tasks."""

    def __init__(
        self,
        *,
        store: Store,
        state: IngestState,
        retention: Retention,
        nc: Client,
        js: JetStreamContext,
        work_dir: Path,
    ) -> None:
        self.store = store
        self.state = state
        self.retention = retention
        self.nc = nc
        self.js = js
        self.work_dir = work_dir
        self.live: dict[str, BatchInfo] = {}
        """The batches running now, as they are."""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._objects: ObjectStore | None = None
        self.log = structlog.get_logger(service="ingest")

    async def start(self) -> None:
        js = self.js
        try:
            self._objects = await js.object_store(subjects.BATCH_BUCKET)
        except NotFoundError:
            self._objects = await js.create_object_store(subjects.BATCH_BUCKET)
        # Batches a previous run did not finish run again from the start.
        for info in await self.store.unfinished_batches():
            self.log.info("resuming batch", batch_id=info.batch_id)
            self._launch(info)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        await cancel_all(tasks)
        self._tasks.clear()

    async def start_batch(self, request: BatchStart) -> BatchInfo:
        """Admin: register a batch for an uploaded object and start it."""
        ds = self.state.registry.datasets.get(request.dataset)
        if ds is None:
            raise NotFound(
                f"no dataset named {request.dataset!r}", kind="dataset", name=request.dataset
            )
        if request.format not in FORMATS:
            raise Invalid(
                f"unknown file format {request.format!r} (csv, jsonl or parquet)",
                field="format",
            )
        if not request.batch_id.replace("-", "").isalnum() or len(request.batch_id) > 64:
            raise Invalid("a batch id holds letters, digits and '-'", field="batch_id")
        info = BatchInfo(
            batch_id=request.batch_id,
            dataset=request.dataset,
            file_name=request.file_name,
            format=request.format,
            status="queued",
            threshold=ds.error_threshold,
            created_at=time.time(),
        )
        try:
            await self.store.add_batch(info)
        except Exception as exc:
            raise Conflict(f"batch {request.batch_id} exists already") from exc
        self._launch(info)
        return info

    def _launch(self, info: BatchInfo) -> None:
        self.live[info.batch_id] = info
        task = asyncio.create_task(self._run(info), name=f"batch:{info.batch_id}")
        self._tasks[info.batch_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(info.batch_id, None))

    # -- one batch -------------------------------------------------------------------------
    async def _run(self, info: BatchInfo) -> None:
        log = self.log.bind(batch_id=info.batch_id, dataset=info.dataset)
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
        if self._objects is not None:
            with contextlib.suppress(Exception):
                await self._objects.delete(info.batch_id)
        log.info(
            "batch finished",
            status=info.status,
            input_rows=info.input_rows,
            accepted=info.accepted,
            failed=info.failed,
        )

    async def _download(self, info: BatchInfo, target: Path) -> None:
        assert self._objects is not None
        with open(target, "wb") as f:  # noqa: ASYNC230 - the object store writes via a thread
            try:
                await self._objects.get(info.batch_id, writeinto=f)
            except NotFoundError:
                raise BatchFailed(f"no uploaded file for batch {info.batch_id}") from None

    async def _validate(self, info: BatchInfo, source: Path, spool_path: Path) -> None:
        found = self.state.compiled(info.dataset)
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
                chunk = await asyncio.to_thread(_next_validated, chunks, compiled)
                if chunk is None:
                    break
                records, rejected = sort_rows(
                    chunk,
                    batch_id=info.batch_id,
                    dataset=info.dataset,
                    record_class=compiled.record_class,
                    now=now,
                )
                tx = Tx()
                self.store.add_rejected(tx, rejected)
                added = sum(r.size for r in rejected)
                info.input_rows += len(chunk)
                info.accepted += len(records)
                info.failed += len(rejected)
                retained = bool(added) and self.retention.add(tx, now, added)
                if tx:
                    await self.store.apply(tx)
                if retained:
                    await self.retention.refresh()
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
        js = self.js
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
            self.store.count(tx, info.dataset, info.accepted, info.failed)
        self.store.save_batch(tx, info)
        await self.store.apply(tx)

    async def _progress(self, info: BatchInfo) -> None:
        with contextlib.suppress(Exception):
            await self.nc.publish(
                subjects.batch_progress(info.batch_id), _info_encoder.encode(info)
            )


def as_format(name: str) -> Format:
    match name:
        case "csv" | "jsonl" | "parquet":
            return name
    raise BatchFailed(f"unknown format {name!r}")


def _next_validated(chunks: Iterator[list[Row]], compiled: CompiledSchema) -> Validated | None:
    rows = next(chunks, None)
    return None if rows is None else validate_rows(rows, compiled)

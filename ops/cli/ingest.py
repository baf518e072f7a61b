"""`cdp ingest <dataset> <file>`: upload a batch file, follow its progress."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from ops.cli.client import ClientError
from services.ingest.formats import EXTENSIONS, FORMATS
from shared import admin, subjects
from shared.admin import AdminFailure, BatchInfo, BatchStart

_info_decoder = msgspec.json.Decoder(BatchInfo)


def new_batch_id() -> str:
    """Sortable by time, unique: seconds since the epoch (hex) and 6 random bytes."""
    return f"{int(time.time()):08x}-{secrets.token_hex(6)}"


def file_format(path: Path, explicit: str | None) -> str:
    if explicit:
        if explicit not in FORMATS:
            raise ClientError(f"unknown format {explicit!r}: {', '.join(FORMATS)}")
        return explicit
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise ClientError(
            f"{path}: cannot tell the format from {path.suffix!r}; use --format csv|jsonl|parquet"
        )
    return fmt


async def run_batch(
    nc: Client,
    dataset: str,
    path: Path,
    fmt: str,
    on_progress: Callable[[BatchInfo], None],
    *,
    timeout: float | None = None,
) -> BatchInfo:
    """Upload `path`, start the batch, call `on_progress` until it ends; the final state."""
    if not path.is_file():  # noqa: ASYNC240 - one stat before the upload
        raise ClientError(f"{path}: no such file")
    js = nc.jetstream()
    try:
        store = await js.object_store(subjects.BATCH_BUCKET)
    except NotFoundError:
        raise ClientError("the ingest service has not created its file bucket yet") from None
    batch_id = new_batch_id()
    done = asyncio.Event()
    final: list[BatchInfo] = []

    async def on_msg(msg: Msg) -> None:
        try:
            info = _info_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        on_progress(info)
        if info.finished:
            final.append(info)
            done.set()

    sub = await nc.subscribe(subjects.batch_progress(batch_id), cb=on_msg)
    try:
        with open(path, "rb") as f:  # noqa: ASYNC230 - the object store reads via a thread
            await store.put(batch_id, f)
        try:
            started = await admin.request(
                nc,
                subjects.admin("ingest", "batch.start"),
                BatchStart(batch_id, dataset, os.path.basename(path), fmt),
                BatchInfo,
            )
        except AdminFailure as exc:
            await store.delete(batch_id)
            raise ClientError(exc.message) from None
        except nats.errors.NoRespondersError:
            raise ClientError("the ingest service is not running") from None
        on_progress(started)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), 2.0)
            except TimeoutError:
                # Progress events are not stored; ask for the batch's state in case one was missed.
                info = await batch_state(nc, batch_id)
                if info is not None and info.finished:
                    return info
                if deadline is not None and time.monotonic() > deadline:
                    raise ClientError(f"batch {batch_id} did not finish in time") from None
    finally:
        await sub.unsubscribe()
    return final[0]


async def batch_state(nc: Client, batch_id: str) -> BatchInfo | None:
    listed = await admin.ingest_batches(nc, 1000)
    return next((b for b in listed.batches if b.batch_id == batch_id), None)

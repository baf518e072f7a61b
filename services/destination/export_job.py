"""Export jobs of file destinations: the members of each activated segment, with the
destination's identity and mapped attributes and a membership status column, written as
CSV, JSON Lines or Parquet (full, or incremental: changes since the last export, exits
included, the first one full), split at a row count, and uploaded over SFTP if asked."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from services.destination.activation import consents, lookup
from services.destination.exports import ExportRow, export_files, incremental_rows
from services.destination.guard import check_secret_variable, export_folder
from services.destination.sftp import upload
from shared.admin import ExportResult
from shared.db import Tx, apply
from shared.messages import Identity
from shared.resources import Destination

if TYPE_CHECKING:
    from services.destination.service import DestinationService

_any_msgpack = msgspec.msgpack.Decoder()
_identities = msgspec.msgpack.Decoder(list[Identity])
_encoder = msgspec.json.Encoder()
MEMBER = ("realized", "existing")


async def run_export(svc: DestinationService, dest: Destination, trigger: str) -> ExportResult:
    assert dest.export is not None
    exp = dest.export
    started = time.time()
    db = svc.db
    settings = svc.settings
    files: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    skipped = 0
    total = 0
    done_before = list(
        await db.execute_fetchall(
            "SELECT 1 FROM export_jobs WHERE destination = ? AND status = 'succeeded' LIMIT 1",
            (dest.name,),
        )
    )
    full = exp.mode == "full" or not done_before
    new_state: list[tuple[str, str, str, str]] = []
    try:
        # Checked again now: a symlink may have appeared since the destination was applied.
        folder = export_folder(exp.folder, settings.data_dir, settings.exports_root)
        for segment in dest.segments:
            current = {
                str(pid): str(status)
                for pid, status in await db.execute_fetchall(
                    "SELECT profile_id, status FROM memberships WHERE segment = ? AND status IN "
                    "('realized', 'existing') ORDER BY profile_id",
                    (segment,),
                )
            }
            previous = None
            if not full:
                previous = {
                    str(pid): str(status)
                    for pid, status in await db.execute_fetchall(
                        "SELECT profile_id, status FROM export_state WHERE destination = ? AND "
                        "segment = ? ORDER BY profile_id",
                        (dest.name, segment),
                    )
                }
            pairs = incremental_rows(current, previous)
            views = {
                str(pid): (_any_msgpack.decode(a), _identities.decode(i))
                for pid, a, i in await db.execute_fetchall(
                    "SELECT profile_id, attributes, identities FROM profiles WHERE profile_id IN "
                    "(SELECT value FROM json_each(?))",
                    (_encoder.encode([p for p, _ in pairs]),),
                )
            }
            rows: list[ExportRow] = []
            seg_counts: dict[str, int] = {}
            for pid, status in pairs:
                attributes, identities = views.get(pid, ({}, []))
                ident = {}
                if dest.identity is not None:
                    value = next(
                        (i.value for i in identities if i.namespace == dest.identity), None
                    )
                    if value is None:
                        skipped += 1
                        continue
                    ident[dest.identity] = value
                if status != "exited" and not consents(dest, attributes):
                    skipped += 1
                    continue
                mapped = {
                    field: v
                    for path, field in dest.mappings.items()
                    if (v := lookup(attributes, path)) is not None
                }
                rows.append(ExportRow(pid, segment, status, ident, mapped))
                seg_counts[status] = seg_counts.get(status, 0) + 1
            columns = [*([dest.identity] if dest.identity else []), *dest.mappings.values()]
            written = await asyncio.to_thread(
                export_files,
                rows,
                folder=folder,
                destination=dest.name,
                segment=segment,
                started=dt.datetime.fromtimestamp(started, dt.UTC),
                fmt=exp.format,
                columns=columns,
                max_rows=exp.split_rows,
            )
            files += [str(f.path) for f in written]
            total += len(rows)
            counts[segment] = seg_counts
            new_state += [(dest.name, segment, pid, status) for pid, status in current.items()]
        if exp.sftp is not None:
            target = exp.sftp
            password = None
            if target.password_secret:
                variable = dest.secrets.get(target.password_secret, "")
                check_secret_variable(variable)
                password = os.environ.get(variable, "")
            files += await upload(
                [Path(f) for f in files],
                host=target.host,
                port=target.port,
                username=target.username,
                password=password,
                client_key=target.client_key,
                remote_dir=target.remote_dir,
                known_hosts=target.known_hosts,
            )
        status, error = "succeeded", None
    except Exception as exc:
        svc.log.exception("export failed", destination=dest.name)
        status, error = "failed", f"{type(exc).__name__}: {exc}"
    result = ExportResult(
        destination=dest.name,
        trigger=trigger,
        status=status,
        started_at=started,
        finished_at=time.time(),
        mode="full" if full else "incremental",
        files=files,
        rows=total,
        counts=counts,
        skipped=skipped,
        error=error,
    )
    tx = Tx()
    if status == "succeeded":
        tx.add("DELETE FROM export_state WHERE destination = ?", (dest.name,))
        tx.add_many(
            "INSERT INTO export_state (destination, segment, profile_id, status) "
            "VALUES (?, ?, ?, ?)",
            new_state,
        )
    tx.add(
        "INSERT INTO export_jobs (destination, trigger, status, started_at, finished_at, rows, "
        "result) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (dest.name, trigger, status, started, result.finished_at, total, _encoder.encode(result)),
    )
    await apply(db, tx)
    svc.log.info(
        "export finished", destination=dest.name, status=status, rows=total, files=len(files)
    )
    return result

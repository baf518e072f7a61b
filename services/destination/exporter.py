"""Export jobs of file destinations: the members of each activated segment, with the
destination's identity and mapped attributes and a membership status column, written as
CSV, JSON Lines or Parquet (full, or incremental: changes since the last export, exits
included, the first one full), split at a row count, and uploaded over SFTP if asked.

`Exporter.run` writes the files and adds the job record (and, if it succeeded, the state
the next incremental export starts from) to the caller's transaction: a consumer's step
(an export request on the jobs stream, or a segmentation job that finished) or the admin
API's own."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from pathlib import Path

import structlog

from services.destination.activation import MISSING_IDENTITY, NO_CONSENT, View, consents, lookup
from services.destination.exports import ExportRow, export_files, incremental_rows
from services.destination.guard import check_secret_variable, export_folder
from services.destination.sftp import upload
from services.destination.store import DestinationStore
from shared.admin import ExportFile, ExportResult
from shared.config import Settings
from shared.db import Tx
from shared.resources import Destination


class Exporter:
    def __init__(
        self,
        store: DestinationStore,
        settings: Settings,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.store = store
        self.settings = settings
        self.log = log

    async def run(
        self, tx: Tx, dest: Destination, trigger: str, job_id: str | None = None
    ) -> ExportResult:
        assert dest.export is not None
        exp = dest.export
        started = time.time()
        store = self.store
        settings = self.settings
        files: list[str] = []
        written_files: list[ExportFile] = []
        counts: dict[str, dict[str, int]] = {}
        excluded: dict[str, int] = {}
        total = 0
        full = exp.mode == "full" or not await store.exported_before(dest.name)
        new_state: list[tuple[str, str, str]] = []
        try:
            # Checked again now: a symlink may have appeared since the destination was applied.
            folder = export_folder(exp.folder, settings.data_dir, settings.exports_root)
            for segment in dest.segments:
                current = await store.statuses(segment)
                previous = None if full else await store.exported_statuses(dest.name, segment)
                pairs = incremental_rows(current, previous)
                views = await store.views(p for p, _ in pairs)
                rows: list[ExportRow] = []
                seg_counts: dict[str, int] = {}
                for pid, status in pairs:
                    view = views.get(pid, View())
                    ident = {}
                    if dest.identity is not None:
                        value = next(
                            (i.value for i in view.identities if i.namespace == dest.identity),
                            None,
                        )
                        if value is None:
                            excluded[MISSING_IDENTITY] = excluded.get(MISSING_IDENTITY, 0) + 1
                            continue
                        ident[dest.identity] = value
                    if status != "exited" and not consents(dest, view.attributes):
                        excluded[NO_CONSENT] = excluded.get(NO_CONSENT, 0) + 1
                        continue
                    mapped = {
                        field: v
                        for path, field in dest.mappings.items()
                        if (v := lookup(view.attributes, path)) is not None
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
                at = time.time()
                sizes = await asyncio.to_thread(_sizes, [f.path for f in written])
                written_files += [
                    ExportFile(name=f.path.name, rows=f.rows, bytes=size, created_at=at)
                    for f, size in zip(written, sizes, strict=True)
                ]
                total += len(rows)
                counts[segment] = seg_counts
                new_state += [(segment, pid, status) for pid, status in current.items()]
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
            self.log.exception("export failed", destination=dest.name)
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
            skipped=sum(excluded.values()),
            error=error,
            job_id=job_id,
            excluded=excluded,
        )
        store.record_export(tx, result, new_state, written_files)
        self.log.info(
            "export finished", destination=dest.name, status=status, rows=total, files=len(files)
        )
        return result


def _sizes(paths: list[Path]) -> list[int]:
    """The sizes in bytes of files just written."""
    return [p.stat().st_size for p in paths]

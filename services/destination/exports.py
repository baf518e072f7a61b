"""Batch file exports of segment memberships: CSV, JSON Lines or Parquet (pure, synchronous).

Runs in a worker thread. Rows are streamed: at most one Parquet row batch is held in memory.

A file has the caller's `columns` (identity and mapped attribute columns, in order) followed
by `segment_membership_status` (realized, existing or exited). A value missing from a row
is written as an empty field (CSV) or null (JSON Lines, Parquet). In CSV, dicts and lists
are JSON-encoded and booleans are written `true` / `false`; Parquet stores every column as
a nullable string, with values converted the same way as in CSV.

Files are named `<destination>_<segment>_<YYYYMMDDTHHMMSSZ>[_partNNN].<ext>`; the part
suffix appears only when the export is split (more than `max_rows` rows), numbered from
001. Every part is first written under a hidden temporary name (`.<name>.<token>.tmp`) in
the same folder and all parts are renamed to their final names once the last one is
complete, so a reader never sees a half-written file or an incomplete set. On failure the
temporary files are removed. An export with the same names as an earlier one replaces it.

`incremental_rows` computes which memberships an incremental export writes: the first
export is full, later ones carry only the changes since the previous export.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final, Literal, Protocol

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

Format = Literal["csv", "jsonl", "parquet"]

STATUS_COLUMN: Final = "segment_membership_status"
STATUSES: Final = frozenset({"realized", "existing", "exited"})
MAX_ROWS: Final = 5_000_000
"""Rows per file before an export is split (as the reference platforms do)."""
PARQUET_BATCH_ROWS: Final = 50_000

_EXTENSIONS: Final[dict[str, str]] = {"csv": "csv", "jsonl": "jsonl", "parquet": "parquet"}
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]")
_NAME_PART_MAX: Final = 100
"""Longest destination or segment part of a file name, to stay far below 255 bytes."""


class ExportRow(msgspec.Struct):
    """One profile's membership line in an export file."""

    profile_id: str
    segment: str
    status: str
    """realized, existing or exited"""
    identities: dict[str, str] = {}
    """column -> value, already chosen (and hashed where needed) by the caller"""
    attributes: dict[str, Any] = {}
    """mapped destination field -> value"""


class ExportFile(msgspec.Struct):
    """A complete file of an export."""

    path: Path
    rows: int


# -- names ----------------------------------------------------------------------------------


def safe_name(text: str) -> str:
    """`text` with everything outside [A-Za-z0-9._-] replaced by '_', cut to a sane length."""
    return _UNSAFE.sub("_", text)[:_NAME_PART_MAX] or "_"


def _stamp(started: dt.datetime) -> str:
    if started.tzinfo is None:
        started = started.replace(tzinfo=dt.UTC)
    return started.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def file_name(
    destination: str, segment: str, started: dt.datetime, fmt: Format, part: int | None = None
) -> str:
    """The final name of an export file; `part` (from 1) only when the export is split."""
    suffix = "" if part is None else f"_part{part:03d}"
    return (
        f"{safe_name(destination)}_{safe_name(segment)}_{_stamp(started)}{suffix}"
        f".{_EXTENSIONS[fmt]}"
    )


# -- value conversion -----------------------------------------------------------------------


def _enc_hook(value: Any) -> Any:
    return str(value)


_json = msgspec.json.Encoder(enc_hook=_enc_hook)


def _text(value: Any) -> str | None:
    """A value as CSV / Parquet text; None stays None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dict | list | tuple | set | frozenset):
        return _json.encode(value).decode()
    return str(value)


def _values(row: ExportRow, columns: Sequence[str]) -> list[Any]:
    if row.status not in STATUSES:
        raise ValueError(f"profile {row.profile_id!r}: unknown membership status {row.status!r}")
    values: list[Any] = []
    for column in columns:
        value = row.identities.get(column)
        if value is None:
            value = row.attributes.get(column)
        values.append(value)
    values.append(row.status)
    return values


# -- writers --------------------------------------------------------------------------------


class _Writer(Protocol):
    def write(self, values: list[Any]) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class _CsvWriter:
    def __init__(self, path: Path, header: list[str]) -> None:
        self._file: IO[str] = path.open("w", encoding="utf-8", newline="")
        self._csv = csv.writer(self._file)
        self._csv.writerow(header)

    def write(self, values: list[Any]) -> None:
        self._csv.writerow(["" if (text := _text(v)) is None else text for v in values])

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


class _JsonlWriter:
    def __init__(self, path: Path, header: list[str]) -> None:
        self._file: IO[bytes] = path.open("wb")
        self._header = header

    def write(self, values: list[Any]) -> None:
        line = _json.encode(dict(zip(self._header, values, strict=True)))
        self._file.write(line + b"\n")

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


class _ParquetWriter:
    def __init__(self, path: Path, header: list[str], batch_rows: int) -> None:
        self._path = path
        self._schema = pa.schema([pa.field(name, pa.string()) for name in header])
        self._writer = pq.ParquetWriter(str(path), self._schema)
        self._batch_rows = batch_rows
        self._columns: list[list[str | None]] = [[] for _ in header]

    def write(self, values: list[Any]) -> None:
        for column, value in zip(self._columns, values, strict=True):
            column.append(_text(value))
        if len(self._columns[0]) >= self._batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self._columns[0]:
            arrays = [pa.array(column, type=pa.string()) for column in self._columns]
            self._writer.write_batch(pa.record_batch(arrays, schema=self._schema))
            for column in self._columns:
                column.clear()

    def close(self) -> None:
        self._flush()
        self._writer.close()
        with self._path.open("rb") as f:
            os.fsync(f.fileno())

    def abort(self) -> None:
        self._writer.close()


def _open(fmt: Format, path: Path, header: list[str]) -> _Writer:
    if fmt == "csv":
        return _CsvWriter(path, header)
    if fmt == "jsonl":
        return _JsonlWriter(path, header)
    if fmt == "parquet":
        return _ParquetWriter(path, header, PARQUET_BATCH_ROWS)
    raise ValueError(f"unknown export format {fmt!r}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- exports --------------------------------------------------------------------------------


def export_files(
    rows: Iterable[ExportRow],
    *,
    folder: Path,
    destination: str,
    segment: str,
    started: dt.datetime,
    fmt: Format = "csv",
    columns: Sequence[str],
    max_rows: int = MAX_ROWS,
) -> list[ExportFile]:
    """Write `rows` to one or more files in `folder` (split at `max_rows` rows per file).

    Returns the files in part order. An empty export still writes one file: the header
    (CSV), nothing (JSON Lines) or an empty table with the schema (Parquet).
    """
    if fmt not in _EXTENSIONS:
        raise ValueError(f"unknown export format {fmt!r}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, not {max_rows}")
    header = [*columns, STATUS_COLUMN]
    if len(set(header)) != len(header):
        raise ValueError(f"duplicate export column in {header}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    base = file_name(destination, segment, started, fmt)
    temps: list[Path] = []
    counts: list[int] = []
    writer: _Writer | None = None

    def start_part() -> _Writer:
        temp = folder / f".{base}.{len(temps) + 1:03d}.{token}.tmp"
        # Exports hold personal data: created 0600 before any writer opens them.
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        temps.append(temp)
        counts.append(0)
        return _open(fmt, temp, header)

    try:
        writer = start_part()
        for row in rows:
            if counts[-1] >= max_rows:
                writer.close()
                writer = None
                writer = start_part()
            writer.write(_values(row, columns))
            counts[-1] += 1
        writer.close()
        writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise

    split = len(temps) > 1
    files: list[ExportFile] = []
    for number, (temp, count) in enumerate(zip(temps, counts, strict=True), start=1):
        final = folder / file_name(destination, segment, started, fmt, number if split else None)
        temp.replace(final)
        files.append(ExportFile(path=final, rows=count))
    _fsync_dir(folder)
    return files


def incremental_rows(
    current: Mapping[str, str], previous: Mapping[str, str] | None
) -> list[tuple[str, str]]:
    """The (profile_id, status) pairs an export writes.

    `current` maps profile_id -> membership status now, `previous` the same at the last
    export (None: this is the first export). A profile counts as a member unless its status
    is `exited`. The first export is full: every current member with its status (realized
    or existing). Later exports carry only changes: new members as `realized` (in the order
    of `current`), then members gone since the last export as `exited` (in the order of
    `previous`); unchanged members are omitted.
    """
    if previous is None:
        return [(pid, status) for pid, status in current.items() if status != "exited"]
    before = {pid for pid, status in previous.items() if status != "exited"}
    now = {pid for pid, status in current.items() if status != "exited"}
    joined = [(pid, "realized") for pid in current if pid in now and pid not in before]
    left = [(pid, "exited") for pid in previous if pid in before and pid not in now]
    return joined + left

"""Readers for batch files (CSV, JSON Lines, Parquet): pure, synchronous and streaming.

The ingest service runs a `FileReader` in a worker thread and takes its rows chunk by
chunk; a file is never loaded whole. Each `Row` carries what the file held, in the
shape validation expects, and the row as it came (`original`) for the error store.

- CSV: the first row is the header; every cell is a string (no type inference), dotted
  column names are kept as they are. A row whose number of cells differs from the header
  is still yielded, with an `__error__` key that says what is wrong, so that the caller
  rejects that one row with a reason.
- JSON Lines: one undecoded line per row (blank lines skipped); decoding and validation
  are the caller's, so that a line that is not JSON, or not UTF-8, is rejected alone.
- Parquet: one dict per row, nested struct columns as nested dicts, read batch by batch.

Problems with the file as a whole (no header, text that is not UTF-8 in a CSV file, an
unreadable Parquet file) raise `FileFormatError` with a message that names the file and,
where it can, the line.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from services.ingest.errors import IngestError
from services.ingest.formats import EXTENSIONS, Format

RowKind = Literal["flat", "raw", "object"]


ERROR_KEY = "__error__"
"""Key of a CSV row's value that holds why the row is malformed (absent when it is not)."""

EXTRA_KEY = "__extra__"
"""Key of a CSV row's `original` that holds the cells beyond the header's columns."""

_BOM = b"\xef\xbb\xbf"
_json = msgspec.json.Encoder(enc_hook=str)


class FileFormatError(IngestError, ValueError):
    """The file as a whole cannot be read: unknown format, no header, not UTF-8, corrupt."""

    code = "file_format"


class Row(msgspec.Struct):
    number: int
    """1-based: the data row (CSV, header excluded), the line (JSON Lines), the row (Parquet)."""
    kind: RowKind
    value: Any
    """flat: dict[str, str] (CSV); raw: bytes of one line (JSON Lines); object: dict (Parquet)."""
    original: bytes
    """The row as it came, for the error store (JSON for CSV and Parquet rows)."""


def detect_format(name: str) -> Format:
    """The format of a file, by its extension."""
    suffix = Path(name).suffix.lower()
    fmt = EXTENSIONS.get(suffix)
    if fmt is None:
        known = ", ".join(EXTENSIONS)
        what = f"its extension {suffix!r}" if suffix else "it has no extension, which"
        raise FileFormatError(
            f"cannot tell the format of {name!r}: {what} is not one of {known} "
            "(CSV, JSON Lines, Parquet)"
        )
    return fmt


class FileReader:
    """Streams one file as lists of at most `chunk_rows` rows."""

    def __init__(self, path: Path, fmt: Format, chunk_rows: int = 5000) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")
        if fmt not in ("csv", "jsonl", "parquet"):
            raise FileFormatError(f"{path.name}: unknown format {fmt!r}")
        self.path = path
        self.fmt: Format = fmt
        self.chunk_rows = chunk_rows
        self.rows_read = 0
        self.columns: list[str] | None = None
        """CSV: the header; Parquet: the top-level column names (known once reading starts)."""
        self._size = 0
        self._consumed = 0
        self._done = False

    @property
    def progress(self) -> float:
        """Fraction (0..1) of the file consumed: bytes for CSV/JSON Lines, rows for Parquet."""
        if self._done:
            return 1.0
        if self._size <= 0:
            return 0.0
        return min(1.0, self._consumed / self._size)

    def chunks(self) -> Iterator[list[Row]]:
        """The file's rows, in order, `chunk_rows` at a time (the last chunk may be shorter)."""
        self.rows_read = 0
        self._consumed = 0
        self._done = False
        rows = {"csv": self._csv_rows, "jsonl": self._jsonl_rows, "parquet": self._parquet_rows}[
            self.fmt
        ]()
        chunk: list[Row] = []
        for row in rows:
            chunk.append(row)
            self.rows_read += 1
            if len(chunk) >= self.chunk_rows:
                yield chunk
                chunk = []
        self._done = True
        if chunk:
            yield chunk

    # -- CSV ----------------------------------------------------------------------------
    def _lines(self, f: Iterable[bytes]) -> Iterator[str]:
        """The file's lines, decoded, counting the bytes consumed (for `progress`)."""
        for n, raw in enumerate(f, 1):
            self._consumed += len(raw)
            line = raw[len(_BOM) :] if n == 1 and raw.startswith(_BOM) else raw
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FileFormatError(
                    f"{self.path.name}: line {n} is not UTF-8 text "
                    f"(byte {exc.start + 1} of the line); a CSV file must be UTF-8"
                ) from None

    def _csv_rows(self) -> Iterator[Row]:
        name = self.path.name
        with self.path.open("rb") as f:
            self._size = os.fstat(f.fileno()).st_size
            reader = csv.reader(self._lines(f), strict=True)
            try:
                header = next((r for r in reader if r), None)
                if header is None:
                    raise FileFormatError(
                        f"{name}: the file is empty; a CSV file needs a header row of column names"
                    )
                self.columns = _check_header(name, header)
                width = len(header)
                number = 0
                for cells in reader:
                    if not cells:
                        continue  # a blank line
                    number += 1
                    if len(cells) == width:
                        value = dict(zip(header, cells, strict=True))
                        yield Row(number, "flat", value, _json.encode(value))
                        continue
                    value = dict(zip(header, cells, strict=False))
                    original: dict[str, Any] = dict(value)
                    if len(cells) > width:
                        original[EXTRA_KEY] = cells[width:]
                        value[ERROR_KEY] = (
                            f"row has {len(cells)} cells, more than the header's {width} "
                            f"columns (line {reader.line_num})"
                        )
                    else:
                        value[ERROR_KEY] = (
                            f"row has {len(cells)} cells, fewer than the header's {width} "
                            f"columns (line {reader.line_num}); missing: "
                            + ", ".join(header[len(cells) :])
                        )
                    yield Row(number, "flat", value, _json.encode(original))
            except csv.Error as exc:
                raise FileFormatError(
                    f"{name}: not readable as CSV at line {reader.line_num}: {exc}"
                ) from None

    # -- JSON Lines -----------------------------------------------------------------------
    def _jsonl_rows(self) -> Iterator[Row]:
        with self.path.open("rb") as f:
            self._size = os.fstat(f.fileno()).st_size
            for n, raw in enumerate(f, 1):
                self._consumed += len(raw)
                line = raw.rstrip(b"\r\n")
                if n == 1 and line.startswith(_BOM):
                    line = line[len(_BOM) :]
                if not line.strip():
                    continue
                yield Row(n, "raw", line, line)

    # -- Parquet --------------------------------------------------------------------------
    def _parquet_rows(self) -> Iterator[Row]:
        name = self.path.name
        try:
            pf = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise FileFormatError(f"{name}: not a readable Parquet file: {exc}") from None
        with pf:
            schema = pf.schema_arrow
            self.columns = list(schema.names)
            self._size = pf.metadata.num_rows
            target = _readable_schema(schema)
            fixes = {f.name: f.type for f in target if _needs_fix(f.type)}
            number = 0
            try:
                for batch in pf.iter_batches(batch_size=self.chunk_rows):
                    data = batch
                    if target is not schema:
                        data = pa.Table.from_batches([batch]).cast(target, safe=False)
                    for record in data.to_pylist():
                        number += 1
                        self._consumed = number
                        for col, typ in fixes.items():
                            record[col] = _fix(record[col], typ)
                        yield Row(number, "object", record, _json.encode(record))
            except pa.ArrowException as exc:
                raise FileFormatError(
                    f"{name}: Parquet data unreadable after row {number}: {exc}"
                ) from None


def _check_header(name: str, header: list[str]) -> list[str]:
    seen: set[str] = set()
    for i, col in enumerate(header, 1):
        if not col.strip():
            raise FileFormatError(
                f"{name}: header column {i} has no name; the first row must name every column"
            )
        if col in seen:
            raise FileFormatError(f"{name}: header names column {col!r} twice")
        seen.add(col)
    return header


def _readable_type(t: Any) -> Any:
    """`t` with nanosecond times made microsecond ones (Python's datetime resolution)."""
    if pa.types.is_timestamp(t) and t.unit == "ns":
        return pa.timestamp("us", tz=t.tz)
    if pa.types.is_duration(t) and t.unit == "ns":
        return pa.duration("us")
    if pa.types.is_time64(t) and t.unit == "ns":
        return pa.time64("us")
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_readable_type(f.type)) for f in t])
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_readable_type(t.value_type)))
    if pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(_readable_type(t.value_type)))
    if pa.types.is_map(t):
        return pa.map_(
            t.key_field.with_type(_readable_type(t.key_type)),
            t.item_field.with_type(_readable_type(t.item_type)),
        )
    return t


def _readable_schema(schema: Any) -> Any:
    target = pa.schema(
        [f.with_type(_readable_type(f.type)) for f in schema], metadata=schema.metadata
    )
    return schema if target.equals(schema) else target


def _needs_fix(t: Any) -> bool:
    """Whether values of type `t` hold maps, which Arrow gives as lists of pairs."""
    if pa.types.is_map(t):
        return True
    if pa.types.is_struct(t):
        return any(_needs_fix(f.type) for f in t)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _needs_fix(t.value_type)
    return False


def _fix(value: Any, t: Any) -> Any:
    """`value` of type `t` with every map made a dict."""
    if value is None:
        return None
    if pa.types.is_map(t):
        return {k: _fix(v, t.item_type) for k, v in value}
    if pa.types.is_struct(t):
        for f in t:
            if _needs_fix(f.type):
                value[f.name] = _fix(value[f.name], f.type)
        return value
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return [_fix(v, t.value_type) for v in value]
    return value

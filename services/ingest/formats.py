"""The batch file formats ingest reads, and the file extensions that name them (the CLI
reads this table too, to tell a file's format before it uploads it)."""

from __future__ import annotations

from typing import Literal, get_args

Format = Literal["csv", "jsonl", "parquet"]
FORMATS: tuple[Format, ...] = get_args(Format)

EXTENSIONS: dict[str, Format] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
"""File extension (lower case) -> format."""

"""Batch file readers: CSV, JSON Lines and Parquet, streamed in chunks."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.ingest.files import (
    ERROR_KEY,
    FileFormatError,
    FileReader,
    Row,
    detect_format,
)
from services.ingest.formats import Format


def read_all(path: Path, fmt: Format, chunk_rows: int = 5000) -> tuple[list[Row], FileReader]:
    reader = FileReader(path, fmt, chunk_rows)
    rows = [row for chunk in reader.chunks() for row in chunk]
    return rows, reader


# -- detect_format ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("crm.csv", "csv"),
        ("CRM.CSV", "csv"),
        ("web.jsonl", "jsonl"),
        ("web.ndjson", "jsonl"),
        ("export.2024-01-01.json", "jsonl"),
        ("orders.parquet", "parquet"),
        ("orders.pq", "parquet"),
    ],
)
def test_detect_format(name: str, fmt: Format) -> None:
    assert detect_format(name) == fmt


@pytest.mark.parametrize("name", ["crm.xlsx", "crm.csv.gz", "README", "data."])
def test_detect_format_rejects_unknown_extensions(name: str) -> None:
    with pytest.raises(FileFormatError) as err:
        detect_format(name)
    assert isinstance(err.value, ValueError)
    assert name in str(err.value)
    assert ".csv" in str(err.value)
    assert ".parquet" in str(err.value)


# -- CSV ----------------------------------------------------------------------------------
def test_csv_rows_are_flat_strings_with_dotted_names_kept(tmp_path: Path) -> None:
    path = tmp_path / "crm.csv"
    path.write_text(
        "crm_id,person.name.first,loyalty.points,active\nC1,Ann,120,true\nC2,,007,false\n",
        encoding="utf-8",
    )
    rows, reader = read_all(path, "csv")
    assert [r.number for r in rows] == [1, 2]
    assert all(r.kind == "flat" for r in rows)
    assert rows[0].value == {
        "crm_id": "C1",
        "person.name.first": "Ann",
        "loyalty.points": "120",
        "active": "true",
    }
    assert rows[1].value["loyalty.points"] == "007"  # never type-inferred
    assert rows[1].value["person.name.first"] == ""
    assert json.loads(rows[0].original) == rows[0].value
    assert reader.columns == ["crm_id", "person.name.first", "loyalty.points", "active"]
    assert reader.rows_read == 2
    assert reader.progress == 1.0


def test_csv_with_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffemail,city\r\na@example.com,Zürich\r\n".encode())
    rows, _ = read_all(path, "csv")
    assert rows[0].value == {"email": "a@example.com", "city": "Zürich"}


def test_csv_quoted_commas_quotes_and_newlines(tmp_path: Path) -> None:
    path = tmp_path / "quoted.csv"
    path.write_text(
        'id,address,note\n1,"1 Main St, Springfield","said ""hi""\nthen left"\n2,plain,x\n',
        encoding="utf-8",
    )
    rows, _ = read_all(path, "csv")
    assert rows[0].value == {
        "id": "1",
        "address": "1 Main St, Springfield",
        "note": 'said "hi"\nthen left',
    }
    assert rows[1].number == 2
    assert rows[1].value == {"id": "2", "address": "plain", "note": "x"}


def test_csv_short_and_long_rows_are_yielded_with_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("a,b,c\n1,2,3\n4,5\n6,7,8,9,10\n11,12,13\n", encoding="utf-8")
    rows, reader = read_all(path, "csv")
    assert [r.number for r in rows] == [1, 2, 3, 4]
    assert ERROR_KEY not in rows[0].value
    assert ERROR_KEY not in rows[3].value

    short = rows[1].value
    assert short["a"] == "4"
    assert short["b"] == "5"
    assert "c" not in short
    assert "fewer" in short[ERROR_KEY]
    assert "c" in short[ERROR_KEY]
    assert json.loads(rows[1].original) == {"a": "4", "b": "5"}

    long = rows[2].value
    assert {k: v for k, v in long.items() if k != ERROR_KEY} == {"a": "6", "b": "7", "c": "8"}
    assert "more" in long[ERROR_KEY]
    assert "5 cells" in long[ERROR_KEY]
    assert json.loads(rows[2].original) == {"a": "6", "b": "7", "c": "8", "__extra__": ["9", "10"]}
    assert reader.rows_read == 4


def test_csv_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "blank.csv"
    path.write_text("\na,b\n1,2\n\n3,4\n", encoding="utf-8")
    rows, _ = read_all(path, "csv")
    assert [(r.number, r.value) for r in rows] == [
        (1, {"a": "1", "b": "2"}),
        (2, {"a": "3", "b": "4"}),
    ]


def test_csv_header_only(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("a,b\n", encoding="utf-8")
    rows, reader = read_all(path, "csv")
    assert rows == []
    assert reader.progress == 1.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "header"),
        (b"\n\n", "header"),
        (b"a,,c\n1,2,3\n", "column 2 has no name"),
        (b"a,b,a\n1,2,3\n", "twice"),
        (b"a,b\n1,2\n\xff\xfe,3\n", "line 3 is not UTF-8"),
        (b'a,b\n1,"unterminated\n', "not readable as CSV"),
    ],
)
def test_csv_problems_of_the_whole_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match=message) as err:
        read_all(path, "csv")
    assert "bad.csv" in str(err.value)


def test_csv_chunking_and_progress(tmp_path: Path) -> None:
    path = tmp_path / "many.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write("id,value\n")
        for i in range(1, 1001):
            f.write(f"{i},v{i}\n")
    reader = FileReader(path, "csv", chunk_rows=300)
    assert reader.progress == 0.0
    sizes: list[int] = []
    progress: list[float] = []
    numbers: list[int] = []
    for chunk in reader.chunks():
        sizes.append(len(chunk))
        progress.append(reader.progress)
        numbers.extend(r.number for r in chunk)
    assert sizes == [300, 300, 300, 100]
    assert numbers == list(range(1, 1001))
    assert progress == sorted(progress)
    assert 0.0 < progress[0] < 0.5
    assert progress[-1] == 1.0
    assert reader.rows_read == 1000


# -- JSON Lines ---------------------------------------------------------------------------
def test_jsonl_lines_are_raw_bytes(tmp_path: Path) -> None:
    path = tmp_path / "web.jsonl"
    path.write_bytes(
        b'{"ecid": "E1", "eventType": "web.pageview"}\n'
        b"\n"
        b"   \r\n"
        b"not json at all\r\n"
        b'{"ecid": "\xff\xfe"}\n'
        b'{"ecid": "E2"}'
    )
    rows, reader = read_all(path, "jsonl")
    assert [r.number for r in rows] == [1, 4, 5, 6]  # line numbers; blank lines skipped
    assert all(r.kind == "raw" for r in rows)
    assert rows[0].value == b'{"ecid": "E1", "eventType": "web.pageview"}'
    assert rows[1].value == b"not json at all"
    assert rows[2].value == b'{"ecid": "\xff\xfe"}'  # not UTF-8, still yielded
    assert rows[3].value == b'{"ecid": "E2"}'  # no final newline
    assert all(r.original == r.value for r in rows)
    assert reader.rows_read == 4
    assert reader.progress == 1.0


def test_jsonl_bom_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n')
    rows, _ = read_all(path, "jsonl")
    assert rows[0].value == b'{"a": 1}'


def test_jsonl_chunking_and_progress(tmp_path: Path) -> None:
    path = tmp_path / "many.ndjson"
    lines = [b'{"i": %d}\n' % i for i in range(250)]
    path.write_bytes(b"".join(lines))
    reader = FileReader(path, "jsonl", chunk_rows=100)
    sizes: list[int] = []
    progress: list[float] = []
    for chunk in reader.chunks():
        sizes.append(len(chunk))
        progress.append(reader.progress)
    assert sizes == [100, 100, 50]
    assert progress[0] == len(b"".join(lines[:100])) / path.stat().st_size
    assert progress[-1] == 1.0


def test_empty_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    rows, reader = read_all(path, "jsonl")
    assert rows == []
    assert reader.progress == 1.0


# -- Parquet ------------------------------------------------------------------------------
def test_parquet_nested_structs_become_nested_dicts(tmp_path: Path) -> None:
    path = tmp_path / "orders.parquet"
    table = pa.table(
        {
            "loyalty_id": ["L1", "L2", None],
            "timestamp": pa.array(
                [dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)] * 3, pa.timestamp("ns", "UTC")
            ),
            "commerce": pa.array(
                [
                    {"order": {"id": "O1", "total": Decimal("12.50"), "day": dt.date(2024, 5, 1)}},
                    {"order": {"id": "O2", "total": Decimal("3.00"), "day": dt.date(2024, 5, 2)}},
                    None,
                ],
                pa.struct(
                    [
                        (
                            "order",
                            pa.struct(
                                [
                                    ("id", pa.string()),
                                    ("total", pa.decimal128(10, 2)),
                                    ("day", pa.date32()),
                                ]
                            ),
                        )
                    ]
                ),
            ),
            "items": pa.array(
                [[{"sku": "S1", "quantity": 2}], [], None],
                pa.list_(pa.struct([("sku", pa.string()), ("quantity", pa.int32())])),
            ),
            "attrs": pa.array([{"k": "v"}, None, {}], pa.map_(pa.string(), pa.string())),
            "store.city": ["Paris", "Lyon", "Nice"],
        }
    )
    pq.write_table(table, path)
    rows, reader = read_all(path, "parquet")
    assert [r.number for r in rows] == [1, 2, 3]
    assert all(r.kind == "object" for r in rows)
    first = rows[0].value
    assert first["loyalty_id"] == "L1"
    assert first["timestamp"] == dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)
    assert first["commerce"] == {
        "order": {"id": "O1", "total": Decimal("12.50"), "day": dt.date(2024, 5, 1)}
    }
    assert first["items"] == [{"sku": "S1", "quantity": 2}]
    assert first["attrs"] == {"k": "v"}
    assert first["store.city"] == "Paris"
    assert rows[2].value["commerce"] is None
    assert rows[2].value["attrs"] == {}
    original = json.loads(rows[0].original)
    assert original["commerce"] == {"order": {"id": "O1", "total": "12.50", "day": "2024-05-01"}}
    assert original["timestamp"].startswith("2024-05-01T12:30:00")
    assert reader.columns == ["loyalty_id", "timestamp", "commerce", "items", "attrs", "store.city"]
    assert reader.progress == 1.0


def test_parquet_chunking_and_progress(tmp_path: Path) -> None:
    path = tmp_path / "many.pq"
    pq.write_table(pa.table({"id": list(range(1000))}), path, row_group_size=256)
    reader = FileReader(path, "parquet", chunk_rows=400)
    sizes: list[int] = []
    progress: list[float] = []
    ids: list[int] = []
    for chunk in reader.chunks():
        sizes.append(len(chunk))
        progress.append(reader.progress)
        ids.extend(r.value["id"] for r in chunk)
    assert sum(sizes) == 1000
    assert max(sizes) <= 400
    assert len(sizes) > 1
    assert ids == list(range(1000))
    assert progress[0] == pytest.approx(sizes[0] / 1000)
    assert progress[-1] == 1.0
    assert reader.rows_read == 1000


def test_unreadable_parquet(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not a parquet file at all")
    with pytest.raises(FileFormatError, match=r"broken\.parquet: not a readable Parquet file"):
        read_all(path, "parquet")


def test_chunk_rows_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chunk_rows"):
        FileReader(tmp_path / "x.csv", "csv", chunk_rows=0)

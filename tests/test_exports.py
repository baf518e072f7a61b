"""File exports (CSV, JSON Lines, Parquet; splitting; atomic names; incremental rows) and
SFTP upload against a real local asyncssh server."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import pytest_asyncio

from ops.natsd import free_port
from services.destination import exports
from services.destination.errors import DestinationError
from services.destination.exports import (
    STATUS_COLUMN,
    ExportFile,
    ExportRow,
    export_files,
    file_name,
    incremental_rows,
    safe_name,
)
from services.destination.sftp import SftpError, upload

STARTED = dt.datetime(2024, 5, 17, 8, 30, 5, tzinfo=dt.UTC)
COLUMNS = ["email_sha256", "first_name", "score", "vip", "tags", "meta"]
HEADER = [*COLUMNS, STATUS_COLUMN]


def sample_rows() -> list[ExportRow]:
    return [
        ExportRow(
            profile_id="p1",
            segment="vip",
            status="realized",
            identities={"email_sha256": "a" * 64},
            attributes={
                "first_name": 'Ann, "the" first\nof her name',
                "score": 3.5,
                "vip": True,
                "tags": ["x", "y"],
                "meta": {"tier": "gold", "n": 2},
            },
        ),
        ExportRow(
            profile_id="p2",
            segment="vip",
            status="existing",
            identities={"email_sha256": "b" * 64},
            attributes={"first_name": "Bo", "score": 7, "vip": False},
        ),
        ExportRow(profile_id="p3", segment="vip", status="exited", identities={}, attributes={}),
    ]


def numbered_rows(count: int) -> Iterator[ExportRow]:
    for i in range(count):
        yield ExportRow(
            profile_id=f"p{i}",
            segment="s",
            status="realized",
            identities={"id": f"id-{i}"},
            attributes={},
        )


def export(
    tmp_path: Path, rows: list[ExportRow], fmt: exports.Format, **kwargs: Any
) -> list[ExportFile]:
    return export_files(
        rows,
        folder=tmp_path / "out",
        destination="crm-sftp",
        segment="vip",
        started=STARTED,
        fmt=fmt,
        columns=COLUMNS,
        **kwargs,
    )


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- formats --------------------------------------------------------------------------------


def test_csv_round_trip(tmp_path: Path) -> None:
    files = export(tmp_path, sample_rows(), "csv")
    assert files == [
        ExportFile(path=tmp_path / "out" / "crm-sftp_vip_20240517T083005Z.csv", rows=3)
    ]
    header, rows = read_csv(files[0].path)
    assert header == HEADER
    assert rows[0] == {
        "email_sha256": "a" * 64,
        "first_name": 'Ann, "the" first\nof her name',
        "score": "3.5",
        "vip": "true",
        "tags": '["x","y"]',
        "meta": '{"tier":"gold","n":2}',
        STATUS_COLUMN: "realized",
    }
    assert json.loads(rows[0]["meta"]) == {"tier": "gold", "n": 2}
    assert rows[1] == {
        "email_sha256": "b" * 64,
        "first_name": "Bo",
        "score": "7",
        "vip": "false",
        "tags": "",
        "meta": "",
        STATUS_COLUMN: "existing",
    }
    assert rows[2] == {**dict.fromkeys(COLUMNS, ""), STATUS_COLUMN: "exited"}


def test_jsonl_round_trip(tmp_path: Path) -> None:
    files = export(tmp_path, sample_rows(), "jsonl")
    assert [f.path.name for f in files] == ["crm-sftp_vip_20240517T083005Z.jsonl"]
    assert files[0].rows == 3
    rows = read_jsonl(files[0].path)
    assert [list(r) for r in rows] == [HEADER] * 3
    assert rows[0] == {
        "email_sha256": "a" * 64,
        "first_name": 'Ann, "the" first\nof her name',
        "score": 3.5,
        "vip": True,
        "tags": ["x", "y"],
        "meta": {"tier": "gold", "n": 2},
        STATUS_COLUMN: "realized",
    }
    assert rows[1]["tags"] is None
    assert rows[1]["score"] == 7
    assert rows[2] == {**dict.fromkeys(COLUMNS), STATUS_COLUMN: "exited"}


def test_parquet_round_trip(tmp_path: Path) -> None:
    files = export(tmp_path, sample_rows(), "parquet")
    assert [f.path.name for f in files] == ["crm-sftp_vip_20240517T083005Z.parquet"]
    table = pq.read_table(files[0].path)
    assert table.schema == pa.schema([pa.field(name, pa.string()) for name in HEADER])
    rows = table.to_pylist()
    assert rows[0] == {
        "email_sha256": "a" * 64,
        "first_name": 'Ann, "the" first\nof her name',
        "score": "3.5",
        "vip": "true",
        "tags": '["x","y"]',
        "meta": '{"tier":"gold","n":2}',
        STATUS_COLUMN: "realized",
    }
    assert rows[1]["tags"] is None
    assert rows[2] == {**dict.fromkeys(COLUMNS), STATUS_COLUMN: "exited"}
    assert [r[STATUS_COLUMN] for r in rows] == ["realized", "existing", "exited"]


def test_parquet_streams_in_row_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exports, "PARQUET_BATCH_ROWS", 2)
    files = export_files(
        numbered_rows(5),
        folder=tmp_path,
        destination="d",
        segment="s",
        started=STARTED,
        fmt="parquet",
        columns=["id"],
    )
    parquet = pq.ParquetFile(files[0].path)
    assert parquet.metadata.num_rows == 5
    assert parquet.metadata.num_row_groups == 3
    assert parquet.read().column("id").to_pylist() == [f"id-{i}" for i in range(5)]


def test_identity_column_wins_over_attribute_of_same_name(tmp_path: Path) -> None:
    row = ExportRow("p", "s", "realized", {"email": "id@x.org"}, {"email": "attr@x.org"})
    files = export_files(
        [row], folder=tmp_path, destination="d", segment="s", started=STARTED, columns=["email"]
    )
    assert read_csv(files[0].path)[1] == [{"email": "id@x.org", STATUS_COLUMN: "realized"}]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_empty_export_writes_one_file(tmp_path: Path, fmt: exports.Format) -> None:
    files = export(tmp_path, [], fmt)
    assert [(f.path.name, f.rows) for f in files] == [(f"crm-sftp_vip_20240517T083005Z.{fmt}", 0)]
    path = files[0].path
    if fmt == "csv":
        assert read_csv(path) == (HEADER, [])
        assert path.read_bytes() == ",".join(HEADER).encode() + b"\r\n"
    elif fmt == "jsonl":
        assert path.read_bytes() == b""
    else:
        table = pq.read_table(path)
        assert table.num_rows == 0
        assert table.schema.names == HEADER
        assert all(field.type == pa.string() for field in table.schema)
    assert visible(tmp_path / "out") == [path.name]


# -- splitting and names --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_split_at_max_rows(tmp_path: Path, fmt: exports.Format) -> None:
    files = export_files(
        numbered_rows(7),
        folder=tmp_path,
        destination="d",
        segment="s",
        started=STARTED,
        fmt=fmt,
        columns=["id"],
        max_rows=3,
    )
    assert [(f.path.name, f.rows) for f in files] == [
        (f"d_s_20240517T083005Z_part001.{fmt}", 3),
        (f"d_s_20240517T083005Z_part002.{fmt}", 3),
        (f"d_s_20240517T083005Z_part003.{fmt}", 1),
    ]
    ids: list[str] = []
    for f in files:
        if fmt == "csv":
            header, rows = read_csv(f.path)
            assert header == ["id", STATUS_COLUMN]
        elif fmt == "jsonl":
            rows = read_jsonl(f.path)
        else:
            rows = pq.read_table(f.path).to_pylist()
        assert len(rows) == f.rows
        ids += [r["id"] for r in rows]
    assert ids == [f"id-{i}" for i in range(7)]
    assert visible(tmp_path) == [f.path.name for f in files]


def test_exact_multiple_of_max_rows_has_no_empty_part(tmp_path: Path) -> None:
    files = export_files(
        numbered_rows(6),
        folder=tmp_path,
        destination="d",
        segment="s",
        started=STARTED,
        columns=["id"],
        max_rows=3,
    )
    assert [(f.path.name, f.rows) for f in files] == [
        ("d_s_20240517T083005Z_part001.csv", 3),
        ("d_s_20240517T083005Z_part002.csv", 3),
    ]


def test_exactly_max_rows_is_not_split(tmp_path: Path) -> None:
    files = export_files(
        numbered_rows(3),
        folder=tmp_path,
        destination="d",
        segment="s",
        started=STARTED,
        columns=["id"],
        max_rows=3,
    )
    assert [(f.path.name, f.rows) for f in files] == [("d_s_20240517T083005Z.csv", 3)]


def test_file_names_are_safe_and_utc() -> None:
    assert safe_name("Mein Ziel/2: ü*?") == "Mein_Ziel_2_____"
    assert safe_name("ok-name_1.x") == "ok-name_1.x"
    assert safe_name("") == "_"
    assert len(safe_name("x" * 1000)) == 100
    paris = dt.timezone(dt.timedelta(hours=2))
    started = dt.datetime(2024, 5, 17, 10, 30, 5, tzinfo=paris)
    assert file_name("a b", "../etc", started, "jsonl") == "a_b_.._etc_20240517T083005Z.jsonl"
    assert file_name("d", "s", STARTED, "parquet", 12) == "d_s_20240517T083005Z_part012.parquet"
    naive = dt.datetime(2024, 5, 17, 8, 30, 5)
    assert file_name("d", "s", naive, "csv") == "d_s_20240517T083005Z.csv"


def test_readers_see_only_temporary_names_while_writing(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def rows() -> Iterator[ExportRow]:
        for row in numbered_rows(5):
            seen.append(visible(tmp_path))
            yield row

    files = export_files(
        rows(),
        folder=tmp_path,
        destination="d",
        segment="s",
        started=STARTED,
        columns=["id"],
        max_rows=2,
    )
    assert len(files) == 3
    assert [len(names) for names in seen] == [1, 1, 1, 2, 2]  # a part opens with its first row
    assert all(name.startswith(".") and name.endswith(".tmp") for names in seen for name in names)
    assert visible(tmp_path) == [f.path.name for f in files]


def test_failed_export_leaves_nothing_behind(tmp_path: Path) -> None:
    def rows() -> Iterator[ExportRow]:
        yield from numbered_rows(5)
        raise RuntimeError("store went away")

    for fmt in ("csv", "jsonl", "parquet"):
        with pytest.raises(RuntimeError, match="store went away"):
            export_files(
                rows(),
                folder=tmp_path,
                destination="d",
                segment="s",
                started=STARTED,
                fmt=fmt,
                columns=["id"],
                max_rows=2,
            )
    assert visible(tmp_path) == []


def test_invalid_arguments(tmp_path: Path) -> None:
    def run(rows: list[ExportRow], columns: list[str], max_rows: int = 10) -> None:
        export_files(
            rows,
            folder=tmp_path,
            destination="d",
            segment="s",
            started=STARTED,
            columns=columns,
            max_rows=max_rows,
        )

    with pytest.raises(ValueError, match="status"):
        run([ExportRow("p", "s", "gone", {}, {})], [])
    with pytest.raises(ValueError, match="duplicate"):
        run([], ["a", "a"])
    with pytest.raises(ValueError, match="duplicate"):
        run([], [STATUS_COLUMN])
    with pytest.raises(ValueError, match="max_rows"):
        run([], [], max_rows=0)
    assert visible(tmp_path) == []


# -- incremental rows -----------------------------------------------------------------------


def test_incremental_first_export_is_full() -> None:
    current = {"a": "realized", "b": "existing", "c": "exited"}
    assert incremental_rows(current, None) == [("a", "realized"), ("b", "existing")]
    assert incremental_rows({}, None) == []


def test_incremental_later_exports_carry_changes_only() -> None:
    previous = {"a": "realized", "b": "existing", "c": "existing", "x": "exited"}
    current = {"b": "existing", "d": "realized", "a": "existing", "x": "realized", "e": "existing"}
    assert incremental_rows(current, previous) == [
        ("d", "realized"),
        ("x", "realized"),  # exited at the last export, back now
        ("e", "realized"),  # an existing member new to this destination is new here
        ("c", "exited"),
    ]
    assert incremental_rows(current, current) == []
    assert incremental_rows({}, previous) == [
        ("a", "exited"),
        ("b", "exited"),
        ("c", "exited"),
    ]
    # a member whose status turned exited counts as gone; one already exited stays quiet
    assert incremental_rows({"a": "exited", "x": "exited"}, previous) == [
        ("a", "exited"),
        ("b", "exited"),
        ("c", "exited"),
    ]


# -- SFTP -----------------------------------------------------------------------------------

USER = "exporter"
PASSWORD = "s3cret-pass"


@dataclass
class SftpServer:
    port: int
    root: Path
    host_key: asyncssh.SSHKey
    client_key_path: Path
    known_hosts_path: Path


class _PasswordServer(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == USER and password == PASSWORD


@pytest_asyncio.fixture
async def sftp_server(tmp_path: Path) -> AsyncIterator[SftpServer]:
    root = tmp_path / "sftp-root"
    root.mkdir()
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key_path = tmp_path / "client_key"
    client_key.write_private_key(str(client_key_path))
    authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())
    chroot = os.fsencode(root)
    acceptor = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_factory=_PasswordServer,
        server_host_keys=[host_key],
        authorized_client_keys=authorized,
        sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=chroot),
        config=None,
    )
    port = acceptor.get_port()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}")
    try:
        yield SftpServer(port, root, host_key, client_key_path, known_hosts)
    finally:
        acceptor.close()
        await acceptor.wait_closed()


def local_files(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "local"
    folder.mkdir(exist_ok=True)
    first = folder / "crm_vip_20240517T083005Z_part001.csv"
    first.write_bytes(b"id,segment_membership_status\r\np1,realized\r\n")
    second = folder / "crm_vip_20240517T083005Z_part002.parquet"
    second.write_bytes(os.urandom(300_000))  # several SFTP write requests
    return [first, second]


@pytest.mark.asyncio
async def test_sftp_upload_with_password(tmp_path: Path, sftp_server: SftpServer) -> None:
    files = local_files(tmp_path)
    remote = await upload(
        files,
        host="127.0.0.1",
        port=sftp_server.port,
        username=USER,
        password=PASSWORD,
        remote_dir="/exports/daily",
    )
    assert remote == [f"/exports/daily/{f.name}" for f in files]
    target = sftp_server.root / "exports" / "daily"
    assert visible(target) == sorted(f.name for f in files)  # no temporary names left
    for f in files:
        assert (target / f.name).read_bytes() == f.read_bytes()


@pytest.mark.asyncio
async def test_sftp_upload_replaces_existing_file(tmp_path: Path, sftp_server: SftpServer) -> None:
    target = sftp_server.root / "out"
    target.mkdir()
    (target / "a.csv").write_bytes(b"old content that is longer than the new one\n")
    local = tmp_path / "a.csv"
    local.write_bytes(b"new\n")
    remote = await upload(
        [local],
        host="127.0.0.1",
        port=sftp_server.port,
        username=USER,
        password=PASSWORD,
        remote_dir="out",
    )
    assert remote == ["out/a.csv"]
    assert (target / "a.csv").read_bytes() == b"new\n"
    assert visible(target) == ["a.csv"]


@pytest.mark.asyncio
async def test_sftp_upload_with_client_key_and_known_hosts(
    tmp_path: Path, sftp_server: SftpServer
) -> None:
    files = local_files(tmp_path)
    remote = await upload(
        files,
        host="127.0.0.1",
        port=sftp_server.port,
        username=USER,
        client_key=str(sftp_server.client_key_path),
        known_hosts=str(sftp_server.known_hosts_path),
        remote_dir="/in",
    )
    assert remote == [f"/in/{f.name}" for f in files]
    for f in files:
        assert (sftp_server.root / "in" / f.name).read_bytes() == f.read_bytes()


@pytest.mark.asyncio
async def test_sftp_wrong_password_fails_clearly(tmp_path: Path, sftp_server: SftpServer) -> None:
    with pytest.raises(SftpError) as caught:
        await upload(
            local_files(tmp_path),
            host="127.0.0.1",
            port=sftp_server.port,
            username=USER,
            password="wrong",
            remote_dir="/exports",
        )
    error = caught.value
    assert isinstance(error, DestinationError)
    assert error.code == "sftp_failed"
    assert error.host == "127.0.0.1"
    assert error.retryable is False
    assert f"127.0.0.1:{sftp_server.port}" in str(error)
    assert "PermissionDenied" in error.reason
    assert not (sftp_server.root / "exports").exists()


@pytest.mark.asyncio
async def test_sftp_unknown_host_key_is_refused(tmp_path: Path, sftp_server: SftpServer) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    known_hosts = tmp_path / "other_known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sftp_server.port} {other}")
    with pytest.raises(SftpError) as caught:
        await upload(
            local_files(tmp_path),
            host="127.0.0.1",
            port=sftp_server.port,
            username=USER,
            password=PASSWORD,
            known_hosts=str(known_hosts),
            remote_dir="/exports",
        )
    assert caught.value.retryable is False
    assert "HostKeyNotVerifiable" in caught.value.reason


@pytest.mark.asyncio
async def test_sftp_connection_refused_is_retryable(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(SftpError) as caught:
        await upload(
            local_files(tmp_path),
            host="127.0.0.1",
            port=port,
            username=USER,
            password=PASSWORD,
            remote_dir="/exports",
        )
    assert caught.value.retryable is True
    assert caught.value.port == port


@pytest.mark.asyncio
async def test_sftp_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(SftpError, match="not found") as caught:
        await upload(
            [tmp_path / "nope.csv"],
            host="127.0.0.1",
            port=1,
            username=USER,
            password=PASSWORD,
            remote_dir="/exports",
        )
    assert caught.value.retryable is False


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_export_files_are_the_owners_alone(tmp_path: Path, fmt: exports.Format) -> None:
    """Exports hold emails and phone numbers: 0600 files in a 0700 folder, whatever the
    process umask (this test process runs with the usual 022)."""
    previous = os.umask(0o022)
    try:
        files = export(tmp_path, sample_rows(), fmt, max_rows=2)
    finally:
        os.umask(previous)
    assert len(files) == 2
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o700
    for f in files:
        assert stat.S_IMODE(f.path.stat().st_mode) == 0o600, f.path

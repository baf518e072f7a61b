"""scripts/gen: the retail example's data generator is deterministic, consistent and can
make an exact share of rows bad."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from datetime import date, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from services.ingest.files import FileReader, detect_format
from services.ingest.rules import validate_rows
from services.ingest.validation import CompiledSchema
from shared.resources import Schema

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "scripts" / "gen"
CONFIG = ROOT / "examples" / "retail" / "config.yaml"
SCHEMA_OF = {
    "crm": "crm-profile",
    "loyalty": "loyalty-profile",
    "web": "web-event",
    "store-orders": "store-order",
}
NATURAL = ("crm.csv", "loyalty.csv", "web.jsonl", "store-orders.jsonl")
E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
FAKE_EMAIL = re.compile(r"^[a-z0-9._-]+@example\.(com|org)$")


def gen(out: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(GEN), "--out", str(out), *args],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(done.stdout)
    assert isinstance(summary, dict)
    return summary


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open("rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def is_datetime(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def crm_row_is_bad(row: dict[str, str]) -> bool:
    """The rules of schema crm-profile that the generator breaks, checked independently."""
    return (
        row["crm_id"] in ("", "unknown")
        or (row["person.birth_date"] != "" and not is_date(row["person.birth_date"]))
        or not is_datetime(row["updated_at"])
    )


def test_same_seed_gives_the_same_bytes(tmp_path: Path) -> None:
    first = gen(tmp_path / "a", "--profiles", "150", "--bad-rate", "0.05")
    second = gen(tmp_path / "b", "--profiles", "150", "--bad-rate", "0.05")
    assert first == second
    for name in NATURAL:
        a = (tmp_path / "a" / name).read_bytes()
        assert a, name
        assert a == (tmp_path / "b" / name).read_bytes(), name
    other = gen(tmp_path / "c", "--profiles", "150", "--bad-rate", "0.05", "--seed", "7")
    assert other["files"]["web.jsonl"]["rows"] == first["files"]["web.jsonl"]["rows"]
    assert (tmp_path / "c" / "crm.csv").read_bytes() != (tmp_path / "a" / "crm.csv").read_bytes()


@pytest.mark.parametrize(("rate", "bad"), [(0.1, 20), (0.03, 6), (0.0, 0)])
def test_bad_rate_is_exact(tmp_path: Path, rate: float, bad: int) -> None:
    summary = gen(tmp_path, "--profiles", "200", "--bad-rate", str(rate))
    files = summary["files"]
    assert files["crm.csv"]["rows"] == 200
    assert files["crm.csv"]["bad"] == bad
    kinds = files["crm.csv"]["bad_kinds"]
    assert sum(kinds.values()) == bad
    if bad:
        assert set(kinds) == {"wrong_type", "placeholder", "missing_required"}
        assert min(kinds.values()) >= bad // 3
    rows = read_csv(tmp_path / "crm.csv")
    assert len(rows) == 200
    assert sum(crm_row_is_bad(r) for r in rows) == bad
    for name, counts in files.items():
        assert counts["bad"] == math.floor(counts["rows"] * rate + 0.5), name


def test_bad_rows_leave_the_good_rows_as_they_were(tmp_path: Path) -> None:
    gen(tmp_path / "clean", "--profiles", "200")
    gen(tmp_path / "dirty", "--profiles", "200", "--bad-rate", "0.1")
    clean = read_csv(tmp_path / "clean" / "crm.csv")
    dirty = read_csv(tmp_path / "dirty" / "crm.csv")
    changed = [i for i, (a, b) in enumerate(zip(clean, dirty, strict=True)) if a != b]
    assert len(changed) == 20
    assert all(crm_row_is_bad(dirty[i]) for i in changed)
    assert not any(crm_row_is_bad(r) for r in clean)
    web_clean = read_jsonl(tmp_path / "clean" / "web.jsonl")
    web_dirty = read_jsonl(tmp_path / "dirty" / "web.jsonl")
    assert sum(a != b for a, b in zip(web_clean, web_dirty, strict=True)) == len(web_clean) // 10


def test_identities_can_be_stitched(tmp_path: Path) -> None:
    summary = gen(tmp_path, "--profiles", "300", "--events-per-profile", "4")
    crm = read_csv(tmp_path / "crm.csv")
    loyalty = read_csv(tmp_path / "loyalty.csv")
    web = read_jsonl(tmp_path / "web.jsonl")
    orders = read_jsonl(tmp_path / "store-orders.jsonl")
    assert summary["files"]["web.jsonl"]["rows"] == len(web) == 1200
    assert 0.6 < len(loyalty) / len(crm) < 0.8

    crm_ids = {r["crm_id"] for r in crm}
    emails = [r["email"] for r in crm if r["email"]]
    phones = [r["phone"] for r in crm if r["phone"]]
    assert len(crm_ids) == len(crm)
    assert len(set(emails)) == len(emails) > 200
    assert len(set(phones)) == len(phones) > 150
    assert all(FAKE_EMAIL.match(e) for e in emails)
    assert all(E164.match(p) for p in phones)
    assert all(p.startswith("+44") or p[5:9] == "5550" for p in phones)

    loyalty_ids = {r["loyalty_id"] for r in loyalty}
    assert all(r["crm_id"] in crm_ids for r in loyalty)
    assert orders
    assert all(o["loyalty_id"] in loyalty_ids for o in orders)

    login_emails = {e["email"] for e in web if "email" in e}
    assert login_emails
    assert login_emails <= set(emails)
    assert all(e["eventType"] == "app.login" for e in web if "email" in e)
    linked_cookies = {e["ecid"] for e in web if "email" in e}
    assert len(linked_cookies) > 150


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_every_format_can_be_read_back(tmp_path: Path, fmt: str) -> None:
    summary = gen(tmp_path, "--profiles", "50", "--format", fmt, "--bad-rate", "0.1")
    for base in ("crm", "loyalty", "web", "store-orders"):
        name = f"{base}.{fmt}"
        path = tmp_path / name
        reader = FileReader(path, detect_format(name), chunk_rows=64)
        rows = [row for chunk in reader.chunks() for row in chunk]
        assert len(rows) == summary["files"][name]["rows"] > 0
        assert reader.progress == 1.0
    assert summary["files"][f"crm.{fmt}"]["bad"] == 5


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(GEN), "--out", str(tmp_path), "--profiles", "5", "--bad-rate", "2"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2
    assert b"between 0 and 1" in done.stderr


def rejected(path: Path, compiled: CompiledSchema) -> int:
    reader = FileReader(path, detect_format(path.name))
    return sum(
        isinstance(result, list)
        for chunk in reader.chunks()
        for _, result in validate_rows(chunk, compiled)
    )


@pytest.mark.parametrize("fmt", [None, "csv", "parquet"])
def test_data_follows_the_retail_schemas(tmp_path: Path, fmt: str | None) -> None:
    """Against examples/retail/config.yaml: clean rows all pass, bad rows all fail."""
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    schemas = {
        raw["name"]: CompiledSchema(msgspec.convert(raw, Schema), phone_region="US")
        for raw in config["schemas"]
    }
    datasets = {d["name"]: d["schema"] for d in config["datasets"]}
    assert {name: datasets[name] for name in SCHEMA_OF} == SCHEMA_OF
    extra = ("--format", fmt) if fmt else ()
    for rate in ("0", "0.1"):
        out = tmp_path / rate
        summary = gen(out, "--profiles", "120", "--bad-rate", rate, *extra)
        for name, counts in summary["files"].items():
            compiled = schemas[SCHEMA_OF[name.split(".")[0]]]
            assert rejected(out / name, compiled) == counts["bad"], (rate, name)
            assert counts["bad"] == (0 if rate == "0" else math.floor(counts["rows"] * 0.1 + 0.5))


def test_the_samples_are_the_generators_output(tmp_path: Path) -> None:
    samples = CONFIG.parent
    common = ("--profiles", "200", "--events-per-profile", "3")
    gen(tmp_path / "clean", *common)
    summary = gen(tmp_path / "errors", *common, "--bad-rate", "0.03")
    for name in NATURAL:
        sample = (samples / name).read_bytes()
        assert sample == (tmp_path / "clean" / name).read_bytes(), f"regenerate {name}"
        assert len(sample) < 200_000, name
    with_errors = (samples / "crm-with-errors.csv").read_bytes()
    assert with_errors == (tmp_path / "errors" / "crm.csv").read_bytes()
    assert summary["files"]["crm.csv"]["bad"] == 6
    assert sum(crm_row_is_bad(r) for r in read_csv(samples / "crm-with-errors.csv")) == 6

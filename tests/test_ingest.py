"""Ingestion end to end with a real nats-server: configuration, both streaming doors,
batch files, and the error store."""

from __future__ import annotations

import asyncio
import csv
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio
from nats.aio.client import Client
from typer.testing import CliRunner

from ops.cli.apply import apply_objects, load_file
from ops.cli.ingest import run_batch
from ops.cli.main import app
from ops.natsd import NatsServer
from services.ingest.service import IngestService
from services.ingest.validation import Limits
from services.profile.service import ProfileService
from services.segmentation.service import SegmentationService
from shared import admin, subjects
from shared.admin import (
    AdminFailure,
    ApplyMany,
    ApplyManyResult,
    ConfigObject,
    ErrorsQuery,
    ErrorsResult,
)
from shared.messages import Record, RecordEnvelope
from tests.helpers import eventually, ingest_drained, settings_for

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parent.parent

CONFIG: dict[str, Any] = {
    "namespaces": [{"symbol": "store_card", "type": "person"}],
    "schemas": [
        {
            "name": "crm-profile",
            "class": "profile",
            "fields": {
                "crm_id": {
                    "type": "string",
                    "required": True,
                    "identity": "crm_id",
                    "primary": True,
                },
                "email": {"type": "string", "identity": "email"},
                "phone": {"type": "string", "identity": "phone"},
                "age": {"type": "integer"},
                "person": {
                    "type": "object",
                    "fields": {"name": {"type": "object", "fields": {"first": {"type": "string"}}}},
                },
                "tier": {"type": "enum", "enum": ["gold", "silver"]},
            },
        },
        {
            "name": "web-event",
            "class": "event",
            "fields": {
                "ecid": {"type": "string", "required": True, "identity": "ecid", "primary": True},
                "email": {"type": "string", "identity": "email"},
                "page": {"type": "object", "fields": {"url": {"type": "string"}}},
            },
        },
    ],
    "datasets": [
        {"name": "crm", "schema": "crm-profile", "profile_enabled": True},
        {"name": "web", "schema": "web-event", "profile_enabled": True, "expiration_days": 30},
        {"name": "archive", "schema": "web-event"},
    ],
}


def objects(config: dict[str, Any]) -> list[ConfigObject]:
    order = ("namespaces", "schemas", "datasets")
    return [ConfigObject(k[:-1], spec) for k in order for spec in config.get(k, [])]


async def apply_config(
    nc: Client, config: dict[str, Any], dry_run: bool = False
) -> ApplyManyResult:
    return await admin.request(
        nc,
        subjects.admin("ingest", "apply"),
        ApplyMany(objects(config), dry_run),
        ApplyManyResult,
    )


@pytest_asyncio.fixture
async def bare_ingest(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[IngestService]:
    """The ingest service with nothing configured."""
    svc = IngestService(settings_for("ingest", nats_server.url, tmp_path))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


@pytest_asyncio.fixture
async def ingest(bare_ingest: IngestService, nc: Client) -> IngestService:
    """The ingest service with the test configuration applied."""
    await apply_config(nc, CONFIG)
    return bare_ingest


async def records_downstream(nc: Client) -> list[Record]:
    """Every record ingest passed to identity (the CDP_RECORDS stream)."""
    js = nc.jetstream()
    info = await js.stream_info("CDP_RECORDS")
    out: list[Record] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg("CDP_RECORDS", seq)
        out += msgspec.msgpack.decode(msg.data or b"", type=RecordEnvelope).records
    return out


async def errors_for(nc: Client, target: str, limit: int = 10_000) -> ErrorsResult:
    return await admin.request(
        nc, subjects.admin("ingest", "errors"), ErrorsQuery(target, limit), ErrorsResult
    )


# -- configuration -------------------------------------------------------------------------
async def test_apply_is_idempotent_and_dry_run_changes_nothing(
    ingest: IngestService, nc: Client
) -> None:
    again = await apply_config(nc, CONFIG)
    assert {r.action for r in again.results} == {"unchanged"}
    changed = json.loads(json.dumps(CONFIG))
    changed["schemas"][0]["fields"]["nickname"] = {"type": "string"}
    dry = await apply_config(nc, changed, dry_run=True)
    crm = next(r for r in dry.results if r.name == "crm-profile")
    assert crm.action == "updated"
    assert [c.path for c in crm.changes] == ["fields.nickname"]
    assert "nickname" not in ingest.state.registry.schemas["crm-profile"].fields
    real = await apply_config(nc, changed)
    assert next(r for r in real.results if r.name == "crm-profile").action == "updated"
    assert "nickname" in ingest.state.registry.schemas["crm-profile"].fields


async def test_config_is_published_for_other_services(ingest: IngestService, nc: Client) -> None:
    js = nc.jetstream()
    msg = await js.get_last_msg("CDP_CONFIG", subjects.config("dataset", "web"))
    assert json.loads(msg.data or b"{}")["expiration_days"] == 30
    builtin = await js.get_last_msg("CDP_CONFIG", subjects.config("namespace", "crm_id"))
    assert json.loads(builtin.data or b"{}")["unique"] is True


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (lambda c: c["schemas"][0]["fields"].pop("age"), "fields.age", "field removed"),
        (
            lambda c: c["schemas"][0]["fields"]["age"].update(type="string"),
            "fields.age",
            "type changed (integer -> string)",
        ),
        (
            lambda c: c["schemas"][0]["fields"]["age"].update(required=True),
            "fields.age",
            "cannot become required",
        ),
        (
            lambda c: c["schemas"][0]["fields"]["tier"].update(enum=["gold"]),
            "fields.tier",
            "enum values removed: silver",
        ),
        (
            lambda c: c["schemas"][0]["fields"].update(vip={"type": "boolean", "required": True}),
            "fields.vip",
            "a new field cannot be required",
        ),
    ],
)
async def test_breaking_schema_changes_are_refused_with_field_and_reason(
    ingest: IngestService, nc: Client, change: Any, field: str, words: str
) -> None:
    config = json.loads(json.dumps(CONFIG))
    change(config)
    with pytest.raises(AdminFailure) as failure:
        await apply_config(nc, config)
    assert failure.value.code == "breaking_change"
    assert failure.value.kind == "schema"
    assert failure.value.name == "crm-profile"
    assert failure.value.field == field
    assert words in failure.value.message


async def test_namespace_type_cannot_change(ingest: IngestService, nc: Client) -> None:
    with pytest.raises(AdminFailure) as failure:
        await apply_config(nc, {"namespaces": [{"symbol": "email", "type": "cookie"}]})
    assert failure.value.field == "type"
    assert "cannot change once created" in failure.value.message


async def test_invalid_config_names_file_object_and_field(
    ingest: IngestService, nc: Client, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "schemas:\n  - name: s1\n    class: profile\n    fields:\n"
        "      email: {type: string, identity: emial}\n"
    )
    with pytest.raises(Exception) as failure:
        await apply_objects(nc, load_file(bad), dry_run=False, file=str(bad))
    assert str(failure.value) == (
        f"{bad}: schema \"s1\": field fields.email.identity: unknown namespace 'emial'"
    )
    typo = tmp_path / "typo.yaml"
    typo.write_text("datasets:\n  - name: d1\n    schema: crm-profile\n    profile_enabeld: true\n")
    with pytest.raises(Exception) as failure:
        await apply_objects(nc, load_file(typo), dry_run=False, file=str(typo))
    assert f'{typo}: dataset "d1"' in str(failure.value)
    assert "profile_enabeld" in str(failure.value)


async def test_cli_apply_get_and_dry_run(
    bare_ingest: IngestService, nats_server: NatsServer, tmp_path: Path
) -> None:
    # The profile and segmentation services own the example's merge policies and segments.
    owners = [
        ProfileService(settings_for("profile", nats_server.url, tmp_path)),
        SegmentationService(settings_for("segmentation", nats_server.url, tmp_path)),
    ]
    for svc in owners:
        await svc.start()
    try:
        await _cli_apply_get_and_dry_run(nats_server)
    finally:
        for svc in owners:
            await svc.stop()


async def _cli_apply_get_and_dry_run(nats_server: NatsServer) -> None:
    runner = CliRunner()
    env = {"CDP_NATS_URL": nats_server.url}
    config = ROOT / "examples" / "retail" / "config.yaml"
    first = await asyncio.to_thread(runner.invoke, app, ["apply", "-f", str(config)], env=env)
    assert first.exit_code == 0, first.output
    assert "created schema crm-profile" in first.output
    second = await asyncio.to_thread(
        runner.invoke, app, ["apply", "-f", str(config), "--dry-run"], env=env
    )
    assert second.exit_code == 0, second.output
    assert "0 to change" in second.output
    got = await asyncio.to_thread(runner.invoke, app, ["get", "datasets", "web"], env=env)
    assert got.exit_code == 0, got.output
    assert "profile_enabled: true" in got.output
    policies = await asyncio.to_thread(runner.invoke, app, ["get", "merge_policies"], env=env)
    assert policies.exit_code == 0, policies.output
    assert "name: crm-first" in policies.output


# -- the NATS door ---------------------------------------------------------------------------
async def test_valid_records_go_downstream_with_ids_and_timestamps(
    ingest: IngestService, nc: Client
) -> None:
    js = nc.jetstream()
    await js.publish(
        "cdp.ingest.web",
        json.dumps(
            {
                "ecid": "c-1",
                "eventType": "web.pageview",
                "timestamp": "2026-11-29T10:00:00Z",
                "page": {"url": "/home"},
            }
        ).encode(),
    )
    await js.publish("cdp.ingest.crm", json.dumps({"crm_id": "C1", "email": "A@x.io"}).encode())
    await js.publish(
        "cdp.ingest.archive",
        json.dumps(
            {"ecid": "c-9", "eventType": "web.pageview", "timestamp": "2026-11-29T10:00:00Z"}
        ).encode(),
    )
    await eventually(lambda: _count_downstream(nc, 2))
    recs = {r.dataset: r for r in await records_downstream(nc)}
    assert set(recs) == {"web", "crm"}, "a dataset that is not profile-enabled stays out"
    web = recs["web"]
    assert web.record_class == "event"
    assert web.event_type == "web.pageview"
    assert web.timestamp == datetime(2026, 11, 29, 10, tzinfo=UTC).timestamp()
    assert web.record_id and web.ingested_at > 0
    assert [(i.namespace, i.value) for i in web.identities] == [("ecid", "c-1")]
    assert recs["crm"].primary_identity is not None
    assert recs["crm"].primary_identity.namespace == "crm_id"


async def _count_downstream(nc: Client, n: int) -> bool:
    return len(await records_downstream(nc)) >= n


REJECTS: list[tuple[str, bytes, str, str]] = [
    ("crm", b"{not json", "malformed JSON", ""),
    ("crm", b"[1, 2]", "not a JSON object", ""),
    ("crm", json.dumps({"email": "a@b.co"}).encode(), "missing required field", "crm_id"),
    ("crm", json.dumps({"crm_id": "C2", "age": "old"}).encode(), "wrong type", "age"),
    ("crm", json.dumps({"crm_id": "C2", "tier": "platinum"}).encode(), "invalid value", "tier"),
    ("crm", json.dumps({"crm_id": "C2", "shoe": 42}).encode(), "unknown field", "shoe"),
    ("crm", json.dumps({"crm_id": "null"}).encode(), "invalid identity", "crm_id"),
    (
        "crm",
        json.dumps({"crm_id": "C2", "email": "anonymous"}).encode(),
        "invalid identity",
        "email",
    ),
    ("crm", json.dumps({"crm_id": "C2", "phone": "0000"}).encode(), "invalid identity", "phone"),
    ("crm", json.dumps({"crm_id": "C2", "email": ""}).encode(), "invalid identity", "email"),
    ("crm", json.dumps({"crm_id": "x" * 1025}).encode(), "invalid identity", "crm_id"),
    ("nope", json.dumps({"crm_id": "C2"}).encode(), "unknown dataset", ""),
    (
        "web",
        json.dumps(
            {
                "ecid": "c",
                "eventType": "e",
                "timestamp": "2026-01-01T00:00:00Z",
                "page": {"url": "u" * 11_000},
            }
        ).encode(),
        "event too large",
        "",
    ),
    (
        "crm",
        json.dumps({"crm_id": "C3", "person": {"name": {"first": "x" * 1_100_000}}}).encode(),
        "record too large",
        "",
    ),
]


async def test_every_rejected_record_is_kept_with_its_reason(
    ingest: IngestService, nc: Client
) -> None:
    js = nc.jetstream()
    for dataset, body, _, _ in REJECTS:
        await js.publish(f"cdp.ingest.{dataset}", body)
    await js.publish("cdp.ingest.crm", json.dumps({"crm_id": "GOOD"}).encode())
    await eventually(lambda: _count_downstream(nc, 1))
    crm = await errors_for(nc, "crm")
    others = (await errors_for(nc, "nope")).records + (await errors_for(nc, "web")).records
    got = sorted((r.reason, r.path) for r in crm.records + others)
    assert got == sorted((reason, path) for _, _, reason, path in REJECTS)
    by_reason = {r.reason: r for r in crm.records}
    assert by_reason["wrong type"].expected == "integer"
    assert "old" in by_reason["wrong type"].got
    assert by_reason["malformed JSON"].payload == "{not json"
    assert [r.dataset for r in await records_downstream(nc)] == ["crm"]
    assert ingest.ready


async def test_the_same_nats_msg_id_is_ingested_once(ingest: IngestService, nc: Client) -> None:
    js = nc.jetstream()
    body = json.dumps({"crm_id": "D1"}).encode()
    first = await js.publish("cdp.ingest.crm", body, headers={"Nats-Msg-Id": "order-77"})
    second = await js.publish("cdp.ingest.crm", body, headers={"Nats-Msg-Id": "order-77"})
    assert second.duplicate and not first.duplicate
    await js.publish("cdp.ingest.crm", json.dumps({"crm_id": "D2"}).encode())
    await eventually(lambda: _count_downstream(nc, 2))
    await ingest_drained(nc)
    ids = [r.payload["crm_id"] for r in await records_downstream(nc)]
    assert sorted(ids) == ["D1", "D2"]


# -- the HTTP door ----------------------------------------------------------------------------
async def test_http_door_answers_202_and_400(ingest: IngestService, nc: Client) -> None:
    base = f"http://127.0.0.1:{ingest.health.port}/v1/datasets"
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/crm/records", json={"crm_id": "H1"}) as r:
            assert r.status == 202
            body = await r.json()
            assert len(body["accepted"]) == 1 and body["rejected"] == []
            first_id = body["accepted"][0]["record_id"]
        async with s.post(f"{base}/crm/records", json=[{"crm_id": "H2"}, {"crm_id": "H3"}]) as r:
            assert r.status == 202
            assert [a["index"] for a in (await r.json())["accepted"]] == [0, 1]
        mixed = [{"crm_id": "H4"}, {"crm_id": "H5", "age": "x"}, {"crm_id": "undefined"}]
        async with s.post(f"{base}/crm/records", json=mixed) as r:
            assert r.status == 400
            body = await r.json()
            assert [a["index"] for a in body["accepted"]] == [0]
            errs = {e["index"]: e["errors"][0] for e in body["rejected"]}
            assert errs[1]["reason"] == "wrong type" and errs[1]["path"] == "age"
            assert errs[2]["reason"] == "invalid identity" and errs[2]["path"] == "crm_id"
        async with s.post(f"{base}/crm/records", data=b"{oops") as r:
            assert r.status == 400
            assert (await r.json())["rejected"][0]["errors"][0]["reason"] == "malformed JSON"
        async with s.post(f"{base}/crm/records", json=[]) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "no_records"
        async with s.post(f"{base}/unknown/records", json={"a": 1}) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "unknown_dataset"
    await eventually(lambda: _count_downstream(nc, 4))
    downstream = await records_downstream(nc)
    assert sorted(r.payload["crm_id"] for r in downstream) == ["H1", "H2", "H3", "H4"]
    assert first_id in {r.record_id for r in downstream}
    await eventually(lambda: _errors_at_least(nc, "crm", 3))
    sources = {r.source for r in (await errors_for(nc, "crm")).records}
    assert sources == {"http"}


async def _errors_at_least(nc: Client, target: str, n: int) -> bool:
    return (await errors_for(nc, target)).total >= n


# -- batch files --------------------------------------------------------------------------------
def write_crm_csv(path: Path, rows: int, bad_every: int | None) -> set[int]:
    """A CRM file; every `bad_every`-th row is bad in one of three ways. Returns bad rows."""
    bad: set[int] = set()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["crm_id", "email", "age", "person.name.first", "tier"])
        for i in range(1, rows + 1):
            row = [f"C{i}", f"p{i}@example.com", str(20 + i % 50), f"N{i}", "gold"]
            if bad_every and i % bad_every == 0:
                bad.add(i)
                kind = (i // bad_every) % 3
                if kind == 0:
                    row[2] = "not-a-number"
                elif kind == 1:
                    row[0] = "null"
                else:
                    row[4] = "bronze"
            w.writerow(row)
    return bad


@pytest.mark.timeout(120)
async def test_batch_with_3_percent_bad_rows_ends_partial(
    ingest: IngestService, nc: Client, tmp_path: Path
) -> None:
    path = tmp_path / "crm.csv"
    bad = write_crm_csv(path, 10_000, bad_every=33)  # 303 bad rows: 3.03%
    seen: list[str] = []
    info = await run_batch(nc, "crm", path, "csv", lambda i: seen.append(i.status), timeout=60)
    assert info.status == "partial"
    assert (info.input_rows, info.accepted, info.failed) == (10_000, 10_000 - len(bad), len(bad))
    assert "validating" in seen
    errors = await errors_for(nc, info.batch_id)
    assert errors.total == len(bad)
    assert {r.row_number for r in errors.records} == bad
    assert {r.reason for r in errors.records} == {"wrong type", "invalid identity", "invalid value"}
    await eventually(lambda: _count_downstream(nc, 10_000 - len(bad)))
    downstream = await records_downstream(nc)
    assert len(downstream) == 10_000 - len(bad)
    one = next(r for r in downstream if r.payload["crm_id"] == "C1")
    assert one.payload["age"] == 21 and one.payload["person"] == {"name": {"first": "N1"}}


@pytest.mark.timeout(120)
async def test_batch_with_10_percent_bad_rows_fails_and_ingests_nothing(
    ingest: IngestService, nc: Client, tmp_path: Path
) -> None:
    path = tmp_path / "crm.csv"
    bad = write_crm_csv(path, 10_000, bad_every=10)
    info = await run_batch(nc, "crm", path, "csv", lambda _i: None, timeout=60)
    assert info.status == "failed"
    assert (info.input_rows, info.failed) == (10_000, 1000)
    assert info.accepted == 0
    assert info.error and "above the dataset's threshold" in info.error
    errors = await errors_for(nc, info.batch_id)
    assert errors.total == 1000
    assert {r.row_number for r in errors.records} == bad
    # A batch publishes its records before it reports its end; the stream's are drained.
    await ingest_drained(nc)
    assert await records_downstream(nc) == []


async def test_batch_formats_jsonl_and_parquet(
    ingest: IngestService, nc: Client, tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "web.jsonl"
    lines = [
        {"ecid": f"c{i}", "eventType": "web.pageview", "timestamp": "2026-11-29T10:00:00Z"}
        for i in range(40)
    ]
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    info = await run_batch(nc, "web", jsonl, "jsonl", lambda _i: None, timeout=30)
    assert (info.status, info.input_rows, info.accepted, info.failed) == ("partial", 41, 40, 1)
    parquet = tmp_path / "crm.parquet"
    table = pa.table({"crm_id": ["P1", "P2"], "age": [30, 40], "tier": ["gold", "silver"]})
    pq.write_table(table, parquet)
    info = await run_batch(nc, "crm", parquet, "parquet", lambda _i: None, timeout=30)
    assert (info.status, info.accepted) == ("success", 2)
    await eventually(lambda: _count_downstream(nc, 42))


async def test_cli_ingest_and_batches(
    ingest: IngestService, nats_server: NatsServer, tmp_path: Path
) -> None:
    path = tmp_path / "crm.csv"
    write_crm_csv(path, 300, bad_every=50)
    runner = CliRunner()
    env = {"CDP_NATS_URL": nats_server.url}
    result = await asyncio.to_thread(runner.invoke, app, ["ingest", "crm", str(path)], env=env)
    assert result.exit_code == 0, result.output
    assert "partial" in result.output
    listed = await asyncio.to_thread(runner.invoke, app, ["batches"], env=env)
    assert "partial" in listed.output and "crm.csv" in listed.output
    errs = await asyncio.to_thread(runner.invoke, app, ["errors", "crm"], env=env)
    assert errs.exit_code == 0, errs.output
    assert "6 rejected records" in errs.output


async def test_identity_count_and_no_identity_rules_with_configured_limits(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    svc = IngestService(
        settings_for("ingest", nats_server.url, tmp_path), limits=Limits(max_identities=2)
    )
    await svc.start()
    try:
        await apply_config(nc, CONFIG)
        optional = {
            "name": "newsletter",
            "class": "profile",
            "fields": {
                "email": {"type": "string", "identity": "email"},
                "topic": {"type": "string"},
            },
        }
        await apply_config(
            nc,
            {
                "schemas": [optional],
                "datasets": [{"name": "news", "schema": "newsletter", "profile_enabled": True}],
            },
        )
        js = nc.jetstream()
        three = {"crm_id": "T1", "email": "t@example.com", "phone": "+12015550100"}
        await js.publish("cdp.ingest.crm", json.dumps(three).encode())
        await js.publish("cdp.ingest.news", json.dumps({"topic": "shoes"}).encode())
        await js.publish("cdp.ingest.news", json.dumps({"email": "n@example.com"}).encode())
        await eventually(lambda: _count_downstream(nc, 1))
        crm = (await errors_for(nc, "crm")).records
        assert [(r.reason, r.expected) for r in crm] == [
            ("too many identities", "at most 2 identities")
        ]
        news = (await errors_for(nc, "news")).records
        assert [r.reason for r in news] == ["no identity"]
    finally:
        await svc.stop()


@pytest.mark.timeout(60)
async def test_http_door_during_a_nats_outage_answers_503_and_ingests_each_record_once(
    ingest: IngestService, nats_server: NatsServer, nc: Client
) -> None:
    """nats-server is killed while clients post records, each request with its own
    Idempotency-Key, and started again a second later. During the outage the door answers
    503 at once (not after a publish timeout); no record is reported rejected, none goes to
    the error store; clients retry every 503 with the same key, and each record arrives
    downstream exactly once."""
    url = f"http://127.0.0.1:{ingest.health.port}/v1/datasets/crm/records"
    total = 150
    statuses: Counter[int] = Counter()
    fast_503 = 0
    slowest_503 = 0.0
    done = 0

    async def post(s: aiohttp.ClientSession, i: int) -> None:
        nonlocal fast_503, slowest_503, done
        while True:
            t0 = time.monotonic()
            async with s.post(
                url, json={"crm_id": f"K{i}"}, headers={"Idempotency-Key": f"key-{i}"}
            ) as r:
                took = time.monotonic() - t0
                statuses[r.status] += 1
                body = await r.json()
                if r.status == 202:
                    done += 1
                    return
                assert r.status == 503, (r.status, body)
                assert r.headers.get("Retry-After")
                slowest_503 = max(slowest_503, took)
                fast_503 += took < 0.5
            await asyncio.sleep(0.05)

    async def client(s: aiohttp.ClientSession, first: int) -> None:
        for i in range(first, total, 5):
            await post(s, i)

    async with aiohttp.ClientSession() as s:
        clients = asyncio.gather(*(client(s, k) for k in range(5)))
        await eventually(lambda: _true(done >= 40), timeout=20, interval=0.005)
        nats_server.kill()
        await eventually(lambda: _true(fast_503 >= 3), timeout=10, interval=0.01)
        await nats_server.start()
        await clients
    assert statuses[400] == 0, statuses
    assert statuses[503] >= 3, statuses
    assert slowest_503 < 7.0, "a request was held longer than a publish timeout"
    await eventually(lambda: _count_downstream(nc, total), timeout=30)
    downstream = Counter(r.payload["crm_id"] for r in await records_downstream(nc))
    assert downstream == Counter(f"K{i}" for i in range(total))
    assert (await errors_for(nc, "crm")).total == 0


async def test_http_door_same_idempotency_key_ingests_once(
    ingest: IngestService, nc: Client
) -> None:
    """The same request sent twice with one Idempotency-Key: the same record ids, each
    record downstream once; the ingest stream keeps message ids long enough to tell."""
    url = f"http://127.0.0.1:{ingest.health.port}/v1/datasets/crm/records"
    body = [{"crm_id": "I1"}, {"crm_id": "I2"}]
    answers = []
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(url, json=body, headers={"Idempotency-Key": "order-77"}) as r:
                assert r.status == 202
                answers.append(await r.json())
        async with s.post(url, json=body, headers={"Idempotency-Key": "x" * 201}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "bad_idempotency_key"
    assert answers[0]["accepted"] == answers[1]["accepted"]
    await eventually(lambda: _count_downstream(nc, 2))
    assert sorted(r.payload["crm_id"] for r in await records_downstream(nc)) == ["I1", "I2"]
    info = await nc.jetstream().stream_info("CDP_INGEST")
    assert (info.config.duplicate_window or 0) >= 120


async def _true(value: bool) -> bool:
    return value

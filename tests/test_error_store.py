"""Ingest's error store: a privacy delete removes exactly the person's rejected records,
and the store keeps within its age and size limits, counting what it dropped."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio
from nats.aio.client import Client

from ops.natsd import NatsServer
from services.ingest.service import IngestService
from shared import admin, subjects
from shared.admin import ErrorsQuery, ErrorsResult
from shared.messages import Identity, PrivacyDelete
from tests.helpers import eventually, settings_for

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def ingest(
    nats_server: NatsServer, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[IngestService]:
    limit = getattr(request, "param", 100_000_000)
    svc = IngestService(settings_for("ingest", nats_server.url, tmp_path, errors_max_bytes=limit))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


def stored(svc: IngestService, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{svc.settings.db_path}?mode=ro", uri=True) as conn:
        return [tuple(r) for r in conn.execute(sql).fetchall()]


async def offset(svc: IngestService) -> int:
    return svc.runners[0].offset


async def publish_all(nc: Client, svc: IngestService, messages: list[tuple[str, bytes]]) -> None:
    js = nc.jetstream()
    last = 0
    for subject, body in messages:
        last = (await js.publish(subject, body)).seq

    async def handled() -> bool:
        return await offset(svc) >= last

    await eventually(handled)


async def test_a_privacy_delete_removes_exactly_the_persons_rejected_records(
    ingest: IngestService, nc: Client
) -> None:
    # Rejected (no such dataset): a hundred other people, and the real NK0016 twice.
    bad = [
        (subjects.ingest("nowhere"), json.dumps({"crm_id": f"NK00{n}", "x": 1}).encode())
        for n in range(1600, 1700)
    ]
    bad.append((subjects.ingest("nowhere"), json.dumps({"crm_id": "nk0016"}).encode()))
    bad.append((subjects.ingest("nowhere"), b"not json, crm NK0016 here"))
    await publish_all(nc, ingest, bad)
    assert stored(ingest, "SELECT count(*) FROM rejected_records") == [(102,)]

    request = PrivacyDelete(
        request_id="d1", identity=Identity("crm_id", "NK0016"), requested_at=time.time()
    )
    await publish_all(nc, ingest, [(subjects.PRIVACY_DELETE, msgspec.json.encode(request))])

    # Rejected and deleted one right after the other (often in one fetch).
    late = PrivacyDelete(
        request_id="d3", identity=Identity("email", "Late@Example.com"), requested_at=time.time()
    )
    await publish_all(
        nc,
        ingest,
        [
            (subjects.ingest("nowhere"), json.dumps({"email": "late@example.com"}).encode()),
            (subjects.PRIVACY_DELETE, msgspec.json.encode(late)),
        ],
    )

    left = stored(ingest, "SELECT CAST(payload AS TEXT) FROM rejected_records")
    assert stored(ingest, "SELECT count(*) FROM rejected_keys WHERE key = 'nk0016'") == [(0,)]
    assert len(left) == 100  # the real person's two are gone, nobody else's
    assert all('NK0016"' not in p[0] and "nk0016" not in p[0] for (p,) in [(r,) for r in left])
    assert {json.loads(p)["crm_id"] for (p,) in left} == {f"NK00{n}" for n in range(1600, 1700)}


@pytest.mark.parametrize("ingest", [20_000], indirect=True)
async def test_the_error_store_keeps_within_its_size_limit_newest_first(
    ingest: IngestService, nc: Client
) -> None:
    filler = "x" * 300
    bad = [
        (subjects.ingest("nowhere"), json.dumps({"n": n, "pad": filler}).encode())
        for n in range(300)
    ]
    huge = (subjects.ingest("nowhere"), b"{" + b'"a":' * 10 + b"y" * 500_000)
    await publish_all(nc, ingest, [huge, *bad])

    size = stored(ingest, "SELECT sum(size) FROM rejected_records")[0][0]
    assert isinstance(size, int) and size <= 20_000
    kept = [json.loads(p)["n"] for (p,) in stored(ingest, "SELECT payload FROM rejected_records")]
    assert kept and max(kept) == 299  # the newest are kept
    assert sorted(kept) == list(range(300 - len(kept), 300))

    result = await admin.request(
        nc, subjects.admin("ingest", "errors"), ErrorsQuery("nowhere", 10), ErrorsResult
    )
    assert result.dropped == 301 - len(kept)
    assert result.total == len(kept)

    async def counted() -> bool:
        port = ingest.health.port
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as r,
        ):
            text = await r.text()
        return f"cdp_errors_dropped_total {float(301 - len(kept))}" in text

    await eventually(counted)


async def test_a_huge_rejected_payload_is_cut_with_a_marker_and_keeps_its_reason(
    ingest: IngestService, nc: Client
) -> None:
    await publish_all(nc, ingest, [(subjects.ingest("nowhere"), b"z" * 3_000_000)])
    ((payload, reason),) = stored(ingest, "SELECT payload, reason FROM rejected_records")
    assert isinstance(payload, bytes) and len(payload) < 1_100_000
    assert payload.endswith(b"[truncated: 3000000 bytes in all]")
    assert reason == "unknown dataset"


async def test_rejected_records_stored_before_keys_existed_are_deleted_exactly(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """Rows of an older store (no identity keys yet) get their keys when ingest starts."""
    svc = IngestService(settings_for("ingest", nats_server.url, tmp_path))
    await svc.start()
    bad = [
        (subjects.ingest("nowhere"), json.dumps({"email": e}).encode())
        for e in ("Ann@Example.com", "ann@example.com.evil", "bob@example.com")
    ]
    await publish_all(nc, svc, bad)
    await svc.stop()
    with sqlite3.connect(svc.settings.db_path) as conn:  # as the older version left them
        conn.execute("DELETE FROM rejected_keys")
        conn.execute("UPDATE rejected_records SET keyed = 0")

    svc = IngestService(settings_for("ingest", nats_server.url, tmp_path))
    await svc.start()
    try:
        request = PrivacyDelete(
            request_id="d2", identity=Identity("email", "ann@example.com"), requested_at=1.0
        )
        await publish_all(nc, svc, [(subjects.PRIVACY_DELETE, msgspec.json.encode(request))])
        left = {
            json.loads(p)["email"] for (p,) in stored(svc, "SELECT payload FROM rejected_records")
        }
        assert left == {"ann@example.com.evil", "bob@example.com"}
    finally:
        await svc.stop()

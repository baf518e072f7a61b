"""The six services, started in-process against one nats-server, pass a record along."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from nats.aio.client import Client

from ops.natsd import NatsServer
from services.destination.service import DestinationService
from services.identity.service import IdentityService
from services.ingest.service import IngestService
from services.profile.service import ProfileService
from services.scheduler.service import SchedulerService
from services.segmentation.service import SegmentationService
from shared import admin, subjects
from shared.admin import ApplyMany, ApplyManyResult, ConfigObject
from shared.runtime import Service
from tests.helpers import eventually, settings_for

pytestmark = pytest.mark.asyncio

SERVICE_CLASSES: tuple[type[Service], ...] = (
    IngestService,
    IdentityService,
    ProfileService,
    SegmentationService,
    SchedulerService,
    DestinationService,
)


@pytest_asyncio.fixture
async def platform(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[list[Service]]:
    services = [cls(settings_for(cls.name, nats_server.url, tmp_path)) for cls in SERVICE_CLASSES]
    for svc in services:
        await svc.start()
    try:
        yield services
    finally:
        for svc in reversed(services):
            await svc.stop()


def scalar(db: Path, sql: str) -> object:
    with sqlite3.connect(db) as conn:
        row = conn.execute(sql).fetchone()
        return row[0] if row else None


async def test_a_record_travels_from_ingest_to_segmentation(
    platform: list[Service], nc: Client, tmp_path: Path
) -> None:
    assert all(s.ready for s in platform)
    spec = {
        "name": "web-event",
        "class": "event",
        "fields": {"ecid": {"type": "string", "identity": "ecid", "required": True}},
    }
    await admin.request(
        nc,
        subjects.admin("ingest", "apply"),
        ApplyMany(
            [
                ConfigObject("schema", spec),
                ConfigObject(
                    "dataset", {"name": "web", "schema": "web-event", "profile_enabled": True}
                ),
            ]
        ),
        ApplyManyResult,
    )
    js = nc.jetstream()
    event = {"ecid": "c1", "eventType": "web.pageview", "timestamp": "2026-11-29T10:00:00Z"}
    await js.publish("cdp.ingest.web", json.dumps(event).encode())
    await js.publish("cdp.ingest.web", b"{not json")

    async def landed() -> bool:
        return scalar(tmp_path / "segmentation.db", "SELECT count(*) FROM facts") == 1

    await eventually(landed)
    assert scalar(tmp_path / "profile.db", "SELECT dataset FROM events") == "web"
    assert scalar(tmp_path / "ingest.db", "SELECT reason FROM rejected_records") == "malformed JSON"
    assert scalar(tmp_path / "ingest.db", "SELECT accepted FROM dataset_counts") == 1


async def test_each_service_keeps_its_own_sqlite_file(
    platform: list[Service], tmp_path: Path
) -> None:
    for svc in platform:
        db = tmp_path / f"{svc.name}.db"
        assert db.exists()
        assert scalar(db, "PRAGMA journal_mode") == "wal"
        assert scalar(db, "SELECT count(*) FROM schema_migrations WHERE component = 'runtime'") == 1

"""Scheduled file exports end to end: after a batch segmentation job the scheduler starts
the export; the first file is full, the next incremental with exits; both are uploaded to
a real local SFTP server."""

from __future__ import annotations

import asyncio
import csv
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
from shared.admin import (
    ApplyMany,
    ApplyManyResult,
    ConfigObject,
    GetRequest,
    GetResult,
    JobInfo,
    JobList,
    JobRun,
    ListRequest,
)
from shared.runtime import Service
from tests.helpers import eventually, running, settings_for
from tests.test_exports import PASSWORD, USER, SftpServer, sftp_server

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parent.parent
CLASSES: tuple[type[Service], ...] = (
    IngestService,
    IdentityService,
    ProfileService,
    SegmentationService,
    SchedulerService,
    DestinationService,
)
__all__ = ["sftp_server"]


@pytest_asyncio.fixture
async def platform(
    nats_server: NatsServer, nc: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[dict[str, Service]]:
    monkeypatch.setenv("CDP_SECRET_TEST_SFTP_PASSWORD", PASSWORD)
    async with running(CLASSES, nats_server.url, tmp_path, nc) as services:
        yield services


async def customer(nc: Client, n: int, consent: str) -> None:
    record = {
        "crm_id": f"F{n}",
        "email": f"f{n}@example.com",
        "person": {"name": {"first": f"Name{n}"}},
        "consents": {"marketing": {"email": consent}},
    }
    await nc.jetstream().publish("cdp.ingest.crm", json.dumps(record).encode())


def exported(folder: Path) -> list[Path]:
    return sorted(folder.glob("crm-file_email-optin_*.csv")) if folder.exists() else []


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


async def members(platform: dict[str, Service], n: int, exited: int = 0) -> bool:
    rows = await platform["destination"].db.execute_fetchall(
        "SELECT sum(status = 'realized'), sum(status = 'exited') FROM memberships "
        "WHERE segment = 'email-optin'"
    )
    return tuple(next(iter(rows))) == (n, exited)


async def run_job(nc: Client) -> None:
    await admin.request(nc, subjects.admin("segmentation", "job.run"), JobRun(), JobInfo)


@pytest.mark.timeout(120)
async def test_full_then_incremental_exports_after_batch_jobs_reach_sftp(
    platform: dict[str, Service], nc: Client, tmp_path: Path, sftp_server: SftpServer
) -> None:
    spec: dict[str, Any] = {
        "name": "crm-file",
        "type": "file",
        "segments": ["email-optin"],
        "identity": "email",
        "mappings": {"person.name.first": "first_name"},
        "secrets": {"sftp_password": "CDP_SECRET_TEST_SFTP_PASSWORD"},
        "export": {
            "folder": "exports",
            "mode": "incremental",
            "schedule": "after_segmentation",
            "sftp": {
                "host": "127.0.0.1",
                "port": sftp_server.port,
                "username": USER,
                "password_secret": "sftp_password",
                "remote_dir": "/drop",
            },
        },
    }
    await admin.request(
        nc,
        subjects.admin("destination", "apply"),
        ApplyMany([ConfigObject("destination", spec)]),
        ApplyManyResult,
    )
    for n in range(3):
        await customer(nc, n, "y")
    await eventually(lambda: members(platform, 3), timeout=30)
    folder = tmp_path / "exports"
    await run_job(nc)
    await eventually(lambda: _true(len(exported(folder)) == 1), timeout=30)
    first = read(exported(folder)[0])
    assert sorted((r["email"], r["first_name"], r["segment_membership_status"]) for r in first) == [
        (f"f{n}@example.com", f"Name{n}", "realized") for n in range(3)
    ]
    assert list(first[0]) == ["email", "first_name", "segment_membership_status"]
    await eventually(lambda: _true(len(list((sftp_server.root / "drop").glob("*.csv"))) == 1))

    await asyncio.sleep(1.1)  # file names carry the second the export started
    await customer(nc, 1, "n")  # leaves the segment
    await customer(nc, 7, "y")  # joins it
    await eventually(lambda: members(platform, 3, exited=1), timeout=30)
    await run_job(nc)
    await eventually(lambda: _true(len(exported(folder)) == 2), timeout=30)
    second = read(exported(folder)[1])
    assert sorted((r["email"], r["segment_membership_status"]) for r in second) == [
        ("f1@example.com", "exited"),
        ("f7@example.com", "realized"),
    ]
    await eventually(lambda: _true(len(list((sftp_server.root / "drop").glob("*.csv"))) == 2))
    uploaded = sorted((sftp_server.root / "drop").glob("*.csv"))
    assert [p.read_bytes() for p in uploaded] == [p.read_bytes() for p in exported(folder)]
    want = [
        ("export:crm-file", "after_segmentation", "succeeded", 2),
        ("export:crm-file", "after_segmentation", "succeeded", 3),
    ]

    async def recorded() -> bool:
        # The job record is committed once the file is written and uploaded: wait for it.
        jobs = await admin.request(
            nc, subjects.admin("destination", "jobs"), ListRequest(), JobList
        )
        return [(j.kind, j.trigger, j.status, j.total) for j in jobs.jobs] == want

    await eventually(recorded, timeout=30)


async def _true(value: bool) -> bool:
    return value


async def test_an_export_schedule_missed_while_down_runs_once_at_start(
    platform: dict[str, Service], nc: Client, tmp_path: Path, nats_server: NatsServer
) -> None:
    await admin.request(
        nc,
        subjects.admin("destination", "apply"),
        ApplyMany(
            [
                ConfigObject(
                    "destination",
                    {
                        "name": "crm-file",
                        "type": "file",
                        "segments": ["email-optin"],
                        "identity": "email",
                        "export": {"folder": "exports", "schedule": "manual"},
                    },
                )
            ]
        ),
        ApplyManyResult,
    )
    await customer(nc, 1, "y")
    await eventually(lambda: members(platform, 1), timeout=30)
    schedule = {
        "name": "crm-nightly",
        "job": "export",
        "destination": "crm-file",
        "cron": "30 3 * * *",
        "timezone": "Europe/Paris",
    }
    await admin.request(
        nc,
        subjects.admin("scheduler", "apply"),
        ApplyMany([ConfigObject("schedule", schedule)]),
        ApplyManyResult,
    )
    listed = await admin.request(
        nc, subjects.admin("scheduler", "get"), GetRequest("schedule"), GetResult
    )
    assert [s["name"] for s in listed.items] == ["crm-nightly", "segmentation-daily"]
    assert exported(tmp_path / "exports") == []
    scheduler = platform["scheduler"]
    await scheduler.stop()
    with sqlite3.connect(tmp_path / "scheduler.db") as db:  # as if down for two days
        db.execute("UPDATE schedule_runs SET due = due - 2 * 86400")
    again = SchedulerService(settings_for("scheduler", nats_server.url, tmp_path))
    platform["scheduler"] = again
    await again.start()
    await eventually(lambda: _true(len(exported(tmp_path / "exports")) == 1), timeout=30)
    rows = read(exported(tmp_path / "exports")[0])
    assert [(r["email"], r["segment_membership_status"]) for r in rows] == [
        ("f1@example.com", "realized")
    ]

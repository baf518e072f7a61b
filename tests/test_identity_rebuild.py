"""The identity service's state lost while it is stopped: identity.db (and its -wal/-shm)
deleted. It replays the records stream from the start and must give every graph the
profile id it had, so the profile service, segmentation and `cdp check` see no change."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from ops.cli.check import check
from ops.natsd import NatsServer
from services.identity.errors import ReplayImpossible
from shared import subjects
from tests.helpers import lose_db, running
from tests.journeys import big_journey
from tests.test_equivalence import burst
from tests.test_merges import CLASSES, crm, landed, login, view

pytestmark = pytest.mark.asyncio
PEOPLE = 12


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [tuple(r) for r in conn.execute(sql).fetchall()]


async def publish(nc: Client, dataset: str, record: dict[str, Any]) -> None:
    await nc.publish(subjects.ingest(dataset), json.dumps(record).encode())


async def journey(nc: Client) -> None:
    """Cookies that browse, log in (a merge into the CRM person), and a device shared by
    two people (a move and a split)."""
    for p in range(PEOPLE):
        await publish(nc, "web", view(f"ck{p}", f"/p/{p}"))
    for p in range(PEOPLE):
        await publish(nc, "crm", crm(f"C{p}", f"person{p}@example.com"))
    for p in range(PEOPLE):
        await publish(nc, "web", login(f"ck{p}", f"person{p}@example.com", f"/in/{p}"))
    await publish(nc, "web", login("ck0", "person1@example.com", "/shared"))
    await publish(nc, "web", view("lonely", "/nobody"))
    await nc.flush()
    await landed(nc)


def snapshot(data: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    identity = rows(data / "identity.db", "SELECT key, profile_id FROM nodes ORDER BY key")
    profiles = rows(
        data / "profile.db",
        "SELECT profile_id, folded_into FROM profiles ORDER BY profile_id",
    ) + rows(
        data / "profile.db",
        "SELECT namespace, value, profile_id FROM identities ORDER BY namespace, value",
    )
    return identity, profiles


async def test_profile_ids_survive_the_loss_of_identity_db(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with running(CLASSES, nats_server.url, data, nc) as services:
        await journey(nc)
        before = snapshot(data)
        report = await check(nc)
        assert report.ok, report.violations
        assert len(before[1]) > PEOPLE

        await (await lose_db(services, "identity")).start()
        await landed(nc)

        after = snapshot(data)
        assert after[0] == before[0]  # every identity on the profile id it had
        assert after[1] == before[1]  # not one profile more, none lost
        report = await check(nc)
        assert report.ok, report.violations  # no profile without its identity graph


async def test_records_sent_while_identity_was_gone_land_after_its_rebuild(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with running(CLASSES, nats_server.url, data, nc) as services:
        await journey(nc)
        before = snapshot(data)
        fresh = await lose_db(services, "identity")
        await publish(nc, "crm", crm("C99", "late@example.com"))
        await publish(nc, "web", login("ck3", "person3@example.com", "/again"))
        await fresh.start()
        await landed(nc)

        after = snapshot(data)
        assert set(before[0]) < set(after[0])  # the old ids kept, the new person added
        assert {k for k, _ in after[0]} - {k for k, _ in before[0]} == {
            "crm_id:C99",
            "email:late@example.com",
        }
        assert (
            len(rows(data / "profile.db", "SELECT 1 FROM profiles"))
            == len([r for r in before[1] if len(r) == 2]) + 1
        )
        report = await check(nc)
        assert report.ok, report.violations


async def test_a_replayed_journey_with_deletes_and_shared_devices_keeps_every_id(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with running(CLASSES, nats_server.url, data, nc) as services:
        await burst(nc, big_journey("rb-", time.time(), 150, seed=5))
        before = snapshot(data)
        assert (await check(nc)).ok

        await (await lose_db(services, "identity")).start()
        await landed(nc)

        after = snapshot(data)
        assert after == before
        report = await check(nc)
        assert report.ok, report.violations


async def test_identity_refuses_to_start_when_the_records_stream_lost_its_start(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with running(CLASSES, nats_server.url, data, nc) as services:
        await journey(nc)
        fresh = await lose_db(services, "identity")
        js = nc.jetstream()
        await js.delete_msg(subjects.STREAM_RECORDS.name, 1)  # as retention would
        with pytest.raises(ReplayImpossible, match="cannot rebuild"):
            await fresh.start()

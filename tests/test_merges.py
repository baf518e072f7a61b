"""Identity merges as traffic really arrives: several records of one journey in one batch,
merges that cross partitions, shared devices, deletes. One regression test per cause found
in the field, each written as the user saw it, plus the tools that tell when data has
landed (`cdp ingest --wait`, `cdp status`) and whether the state is sound (`cdp check`)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from nats.aio.client import Client
from nats.aio.msg import Msg

from ops.cli import people
from ops.cli.check import check, wait_landed
from ops.cli.ingest import run_batch
from ops.natsd import NatsServer
from services.destination.service import DestinationService
from services.identity.service import IdentityService
from services.ingest.service import IngestService
from services.profile.service import ProfileService
from services.segmentation.service import SegmentationService
from shared import admin, subjects
from shared.admin import ApplyMany, ApplyManyResult, ConfigObject, ServiceStatus, StatusRequest
from shared.messages import MembershipEvent
from shared.runtime import Service
from tests.helpers import running

pytestmark = pytest.mark.asyncio
CLASSES: tuple[type[Service], ...] = (
    IngestService,
    IdentityService,
    ProfileService,
    SegmentationService,
    DestinationService,
)
SEGMENTS = {
    "viewed-today": 'event(type = "web.pageview") within 1 day',
    "logged-in-today": 'event(type = "app.login") within 1 day',
}


@pytest_asyncio.fixture
async def platform(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> AsyncIterator[dict[str, Service]]:
    async with running(CLASSES, nats_server.url, tmp_path / "data", nc) as services:
        await admin.request(
            nc,
            subjects.admin("segmentation", "apply"),
            ApplyMany(
                [ConfigObject("segment", {"name": n, "expression": e}) for n, e in SEGMENTS.items()]
            ),
            ApplyManyResult,
        )
        yield services


def iso(ago_s: float) -> str:
    when = dt.datetime.fromtimestamp(time.time() - ago_s, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def view(cookie: str, url: str, ago_s: float = 3600.0) -> dict[str, Any]:
    return {
        "ecid": cookie,
        "eventType": "web.pageview",
        "timestamp": iso(ago_s),
        "page": {"url": url},
    }


def login(cookie: str, email: str, url: str, ago_s: float = 3000.0) -> dict[str, Any]:
    return {
        "ecid": cookie,
        "eventType": "app.login",
        "timestamp": iso(ago_s),
        "email": email,
        "page": {"url": url},
    }


def two_cards() -> list[dict[str, Any]]:
    """Loyalty rows: card L1 for C1 (gold), card L2 for C2 (bronze)."""
    return [
        {"loyalty_id": "L1", "crm_id": "C1", "loyalty": {"tier": "gold"}, "updated_at": iso(9e4)},
        {"loyalty_id": "L2", "crm_id": "C2", "loyalty": {"tier": "bronze"}, "updated_at": iso(9e4)},
    ]


def crm(crm_id: str, email: str, **extra: Any) -> dict[str, Any]:
    return {"crm_id": crm_id, "email": email, "updated_at": iso(86400.0), **extra}


def write_file(folder: Path, dataset: str, records: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dataset}-{time.monotonic_ns()}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


async def ingest(nc: Client, folder: Path, dataset: str, records: list[dict[str, Any]]) -> None:
    """One batch file: its records reach identity in one message, so in one fetch."""
    path = write_file(folder, dataset, records)
    info = await run_batch(nc, dataset, path, "jsonl", lambda _: None, timeout=60)
    assert info.status == "success", info
    await landed(nc)


async def landed(nc: Client) -> None:
    result = await wait_landed(nc, 60.0)
    assert result.landed, result.missing


async def profile_of(nc: Client, identity: str) -> dict[str, Any]:
    return await people.profile(nc, identity, None, 100)


def urls(p: dict[str, Any]) -> set[str]:
    return {e["payload"]["page"]["url"] for e in p["events"] if "page" in e["payload"]}


def rows(folder: Path, db: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(folder / "data" / db) as conn:
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]


async def members(nc: Client, segment: str) -> int:
    listed = await admin.request(
        nc, subjects.admin("segmentation", "list"), admin.ListRequest(), admin.SegmentList
    )
    return next(s.members for s in listed.segments if s.name == segment)


async def sound(nc: Client) -> None:
    report = await check(nc)
    assert report.ok, report.violations


async def test_an_event_on_a_cookie_merged_in_the_same_batch_reaches_segmentation(
    platform: dict[str, Service], nc: Client, tmp_path: Path
) -> None:
    """A cookie's page view and the login that merges it into a known person arrive in one
    batch: the person is in the "viewed today" audience, and segmentation holds the view."""
    await ingest(nc, tmp_path, "crm", [crm("C1", "a@example.com")])
    await ingest(
        nc, tmp_path, "web", [view("k1", "/shoes"), login("k1", "a@example.com", "/login")]
    )
    person = await profile_of(nc, "crm_id:C1")
    assert urls(person) == {"/shoes", "/login"}
    held = rows(tmp_path, "segmentation.db", "SELECT profile_id FROM events")
    assert held == [(person["profile_id"],)] * 2
    assert {m["segment"] for m in person["memberships"] if m["status"] == "realized"} >= {
        "viewed-today",
        "logged-in-today",
    }
    assert await members(nc, "viewed-today") == 1
    await sound(nc)


async def test_events_of_a_batch_are_written_after_the_merges_before_them(
    platform: dict[str, Service], nc: Client, tmp_path: Path
) -> None:
    """The field repro: C's profile shows the page view of the cookie that logged in as C
    in the same file, not only the login."""
    await ingest(nc, tmp_path, "crm", [crm("A", "a@example.com"), crm("C", "c@example.com")])
    anon = {**view("Y", "/product"), "eventType": "web.productview"}
    await ingest(nc, tmp_path, "web", [anon])
    await ingest(
        nc,
        tmp_path,
        "web",
        [
            login("Y", "a@example.com", "/login-a"),
            view("X", "/page-x"),
            login("X", "c@example.com", "/login-c"),
        ],
    )
    assert urls(await profile_of(nc, "crm_id:C")) == {"/page-x", "/login-c"}
    assert urls(await profile_of(nc, "crm_id:A")) == {"/product", "/login-a"}
    await sound(nc)


async def test_a_merge_never_reaches_the_profile_service_before_the_folded_record(
    platform: dict[str, Service], nc: Client, tmp_path: Path
) -> None:
    """In one batch: a record of person S, a cookie's first page view, the cookie's login
    as S. However the partitions fall, there is one profile, not a ghost for the cookie."""
    await ingest(nc, tmp_path, "crm", [crm("S", "s@example.com")])
    for i in range(6):  # cookies whose partitions fall before and after S's
        await ingest(
            nc,
            tmp_path,
            "web",
            [
                login(f"z{i}", "s@example.com", f"/z{i}"),
                view(f"x{i}", f"/x{i}"),
                login(f"x{i}", "s@example.com", f"/login-x{i}"),
            ],
        )
    live = rows(tmp_path, "profile.db", "SELECT count(*) FROM profiles WHERE folded_into IS NULL")
    assert live == [(1,)]
    assert rows(tmp_path, "segmentation.db", "SELECT count(*) FROM facts") == [(1,)]
    assert await members(nc, "viewed-today") == 1
    person = await profile_of(nc, "crm_id:S")
    assert len(person["events"]) == 18
    await sound(nc)


async def test_a_login_after_an_anonymous_view_keeps_the_membership_and_names_who_exited(
    platform: dict[str, Service], nc: Client, tmp_path: Path
) -> None:
    """An anonymous page view makes the cookie's profile a member; two seconds later a
    login folds it into a known person: the person is a member at once (no batch job), and
    the cookie profile's exit says which identities left and which profile they joined."""
    seen: list[MembershipEvent] = []

    async def on_msg(msg: Msg) -> None:
        seen.append(msgspec.json.decode(msg.data, type=MembershipEvent))

    sub = await nc.subscribe(subjects.membership("viewed-today"), cb=on_msg)
    await ingest(nc, tmp_path, "crm", [crm("P", "p@example.com")])
    await ingest(nc, tmp_path, "web", [view("k", "/home")])
    cookie = await profile_of(nc, "ecid:k")
    await asyncio.sleep(2.0)  # as the user did: the login comes later
    await ingest(nc, tmp_path, "web", [login("k", "p@example.com", "/login")])
    await sub.unsubscribe()
    person = await profile_of(nc, "crm_id:P")
    assert person["profile_id"] != cookie["profile_id"]
    changes = [(e.profile_id, e.status) for e in seen]
    assert changes == [
        (cookie["profile_id"], "realized"),
        (cookie["profile_id"], "exited"),
        (person["profile_id"], "realized"),
    ]
    exit_ = seen[1]
    assert exit_.merged_into == person["profile_id"]
    assert [(i.namespace, i.value) for i in exit_.identities] == [("ecid", "k")]
    assert any(m["segment"] == "viewed-today" for m in person["memberships"])
    followed = await people.profile(nc, "", None, 5, profile_id=cookie["profile_id"])
    assert followed["profile_id"] == person["profile_id"]
    await sound(nc)


async def test_a_shared_device_moves_its_anonymous_events_and_never_a_login(
    platform: dict[str, Service], nc: Client, tmp_path: Path
) -> None:
    """P1 and then P2 log in on one tablet: the tablet and its anonymous views go to P2,
    P1's login stays with P1; deleting P1 leaves nothing of P1 anywhere."""
    await ingest(nc, tmp_path, "crm", [crm("P1", "one@example.com"), crm("P2", "two@example.com")])
    await ingest(
        nc,
        tmp_path,
        "web",
        [
            login("tab", "one@example.com", "/login-1", ago_s=4000),
            view("tab", "/anon-1", ago_s=3900),
            login("tab", "two@example.com", "/login-2", ago_s=3800),
            view("tab", "/anon-2", ago_s=3700),
        ],
    )
    one = await profile_of(nc, "crm_id:P1")
    two = await profile_of(nc, "crm_id:P2")
    assert urls(one) == {"/login-1"}
    assert urls(two) == {"/anon-1", "/login-2", "/anon-2"}
    assert (await profile_of(nc, "ecid:tab"))["profile_id"] == two["profile_id"]
    await sound(nc)
    await people.delete(nc, "crm_id:P1", timeout=30)
    await landed(nc)
    two = await profile_of(nc, "crm_id:P2")
    assert "one@example.com" not in json.dumps(two)
    for db, sql in [
        ("profile.db", "SELECT payload FROM events"),
        ("segmentation.db", "SELECT payload FROM events"),
        ("profile.db", "SELECT value FROM attributes"),
        ("segmentation.db", "SELECT attributes FROM facts"),
    ]:
        for (blob,) in rows(tmp_path, db, sql):
            assert b"one@example.com" not in bytes(blob), (db, sql)
    await sound(nc)


async def test_a_privacy_delete_reaches_a_record_that_carries_the_person_elsewhere(
    platform: dict[str, Service], nc: Client, tmp_path: Path
) -> None:
    """A loyalty record names C1 and a card already linked to C2: the card cannot join C1
    (one loyalty card per person graph is refused), so the record sits with C1 while it
    carries C2's card. Deleting C2 removes that record from C1 too."""
    await ingest(nc, tmp_path, "loyalty", two_cards())
    await ingest(
        nc,
        tmp_path,
        "loyalty",
        [{"loyalty_id": "L2", "crm_id": "C1", "loyalty": {"points": 7}, "updated_at": iso(8e4)}],
    )
    one = await profile_of(nc, "crm_id:C1")
    assert one["attributes"]["loyalty"] == {"tier": "gold", "points": 7}
    graph = await people.identity_graph(nc, "crm_id:C1")
    assert graph["refused"], "the link to C2's card is refused"
    await people.delete(nc, "crm_id:C2", timeout=30)
    await landed(nc)
    one = await profile_of(nc, "crm_id:C1")
    assert one["attributes"]["loyalty"] == {"tier": "gold"}
    assert "L2" not in json.dumps(one)
    await sound(nc)


async def test_status_shows_no_backlog_once_landed_and_check_finds_a_planted_ghost(
    platform: dict[str, Service], nc: Client, tmp_path: Path
) -> None:
    """`cdp status` reports each consumer's backlog; `cdp check` finds a profile that is
    no one (planted in segmentation's store) and names it."""
    await ingest(nc, tmp_path, "crm", [crm(f"B{i}", f"b{i}@example.com") for i in range(50)])
    for name in ("ingest", "identity", "profile", "segmentation", "destination"):
        status = await admin.request(
            nc, subjects.admin(name, "status"), StatusRequest(), ServiceStatus
        )
        assert status.ready and status.outbox == 0, status
        assert status.consumers and all(c.pending == 0 for c in status.consumers), status
    report = await check(nc)
    assert report.ok and report.counts["live profiles"] == 50, report
    with sqlite3.connect(tmp_path / "data" / "segmentation.db") as conn:
        conn.execute(
            "INSERT INTO facts (profile_id, attributes, identities, updated_at) "
            "VALUES ('p-ghost', x'80', x'90', 0)"
        )
    report = await check(nc)
    assert report.total == 1
    assert "segmentation holds profile p-ghost" in report.violations[0]

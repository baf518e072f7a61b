"""Identity graph and unified profile, end to end: records go in through ingest, the
services run against a real nats-server, and lookups answer as a user would see them."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio
from nats.aio.client import Client

from ops.cli import people
from ops.natsd import NatsServer
from services.destination.service import DestinationService
from services.identity.service import IdentityService
from services.ingest.service import IngestService
from services.profile.service import ProfileService
from services.segmentation.service import SegmentationService
from shared import admin, subjects
from shared.admin import AdminFailure, ApplyMany, ApplyManyResult, ConfigObject
from shared.messages import ChangeEnvelope, ProfileMerged
from shared.runtime import Service
from tests.helpers import eventually, running

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parent.parent
CLASSES: tuple[type[Service], ...] = (
    IngestService,
    IdentityService,
    ProfileService,
    SegmentationService,
    DestinationService,
)


@pytest_asyncio.fixture
async def platform(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> AsyncIterator[dict[str, Service]]:
    async with running(CLASSES, nats_server.url, tmp_path, nc, profile_token="t") as services:
        legacy = {"name": "crm-legacy", "schema": "crm-profile", "profile_enabled": True}
        await admin.request(
            nc,
            subjects.admin("ingest", "apply"),
            ApplyMany([ConfigObject("dataset", legacy)]),
            ApplyManyResult,
        )
        yield services


async def send(nc: Client, dataset: str, record: dict[str, Any]) -> None:
    ack = await nc.jetstream().publish(f"cdp.ingest.{dataset}", json.dumps(record).encode())
    assert not ack.duplicate


def web(ecid: str, when: str, event_type: str = "web.pageview", **extra: Any) -> dict[str, Any]:
    return {"ecid": ecid, "eventType": event_type, "timestamp": when, **extra}


async def lookup(nc: Client, identity: str, policy: str | None = None) -> dict[str, Any] | None:
    try:
        return await people.profile(nc, identity, policy, events=100)
    except AdminFailure as exc:
        assert exc.code == "not_found", exc.message
        return None


async def settled(nc: Client, identity: str, check: Any, timeout: float = 20.0) -> dict[str, Any]:
    """Wait until the profile found by `identity` satisfies `check`; return it."""
    found: list[dict[str, Any]] = []

    async def ok() -> bool:
        view = await lookup(nc, identity)
        if view is not None and check(view):
            found.append(view)
            return True
        return False

    await eventually(ok, timeout=timeout)
    return found[-1]


def idents(view: dict[str, Any]) -> set[str]:
    return {f"{i['namespace']}:{i['value']}" for i in view["identities"]}


async def test_one_person_journey_ends_in_one_profile(
    platform: dict[str, Service], nc: Client
) -> None:
    await send(nc, "web", web("c-1", "2026-11-20T10:00:00Z", page={"url": "/shoes"}))
    await send(
        nc, "web", web("c-1", "2026-11-20T10:05:00Z", "app.login", email=" Ann@Example.com ")
    )
    await send(
        nc,
        "crm",
        {
            "crm_id": "C1",
            "email": "ann@example.com",
            "phone": "+1 (201) 555-0123",
            "person": {"name": {"first": "Ann", "last": "Lee"}},
            "updated_at": "2026-11-21T09:00:00Z",
        },
    )
    await send(
        nc,
        "loyalty",
        {
            "loyalty_id": "L1",
            "crm_id": "C1",
            "loyalty": {"tier": "gold", "points": 1200},
            "updated_at": "2026-11-21T09:00:00Z",
        },
    )
    await send(
        nc,
        "store-orders",
        {
            "loyalty_id": "L1",
            "eventType": "commerce.purchase",
            "timestamp": "2026-11-22T15:00:00Z",
            "commerce": {"order": {"id": "O1", "total": 99.5, "currency": "USD"}},
        },
    )
    want = {"ecid:c-1", "email:ann@example.com", "crm_id:C1", "phone:+12015550123", "loyalty_id:L1"}
    view = await settled(nc, "loyalty_id:L1", lambda v: idents(v) == want and len(v["events"]) == 3)
    assert view["attributes"]["person"]["name"] == {"first": "Ann", "last": "Lee"}
    assert view["attributes"]["loyalty"]["tier"] == "gold"
    assert [e["event_type"] for e in view["events"]] == [
        "commerce.purchase",
        "app.login",
        "web.pageview",
    ]
    for identity in want:
        other = await lookup(nc, identity)
        assert other is not None and other["profile_id"] == view["profile_id"]
    assert (await lookup(nc, "email:ANN@example.com ")) is not None  # normalised on lookup too
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer t"}) as s:
        port = platform["profile"].health.port
        url = f"http://127.0.0.1:{port}/v1/profiles"
        async with s.get(url, params={"identity": "crm_id:C1"}) as r:
            assert r.status == 200
            assert (await r.json())["profile_id"] == view["profile_id"]
        async with s.get(url, params={"identity": "crm_id:nobody"}) as r:
            assert r.status == 404
            assert "no profile holds" in (await r.json())["error"]["message"]
    graph = await people.identity_graph(nc, "ecid:c-1")
    assert graph["profile_id"] == view["profile_id"]
    assert {link["dataset"] for link in graph["links"]} == {"web", "crm", "loyalty"}


async def test_two_people_sharing_a_device_stay_two_profiles(
    platform: dict[str, Service], nc: Client
) -> None:
    await send(nc, "crm", {"crm_id": "A1", "email": "a@example.com"})
    await send(nc, "crm", {"crm_id": "B1", "email": "b@example.com"})
    await send(nc, "web", web("tablet", "2026-11-20T10:00:00Z", "app.login", email="a@example.com"))
    await settled(nc, "crm_id:A1", lambda v: "ecid:tablet" in idents(v))
    await send(nc, "web", web("tablet", "2026-11-20T20:00:00Z", "app.login", email="b@example.com"))
    b = await settled(nc, "crm_id:B1", lambda v: "ecid:tablet" in idents(v))
    a = await settled(nc, "crm_id:A1", lambda v: "ecid:tablet" not in idents(v))
    assert a["profile_id"] != b["profile_id"]
    assert idents(a) == {"crm_id:A1", "email:a@example.com"}
    assert idents(b) == {"crm_id:B1", "email:b@example.com", "ecid:tablet"}
    graph = await people.identity_graph(nc, "ecid:tablet")
    assert graph["profile_id"] == b["profile_id"]


async def test_the_50_identity_limit_removes_the_oldest_cookie_first(
    platform: dict[str, Service], nc: Client
) -> None:
    await send(nc, "crm", {"crm_id": "BIG", "email": "big@example.com"})
    for i in range(49):  # 2 person ids + 49 cookies = 51 identities
        await send(
            nc, "web", web(f"k{i:02d}", f"2026-11-20T10:{i:02d}:00Z", email="big@example.com")
        )
    view = await settled(
        nc, "crm_id:BIG", lambda v: "ecid:k48" in idents(v) and len(v["identities"]) == 50
    )
    assert "ecid:k00" not in idents(view), "the oldest cookie goes first"
    assert {"crm_id:BIG", "email:big@example.com", "ecid:k01"} <= idents(view)
    assert await lookup(nc, "ecid:k00") is None


async def test_attribute_conflicts_resolve_as_each_merge_policy_says(
    platform: dict[str, Service], nc: Client
) -> None:
    policy = {"name": "legacy-first", "type": "dataset_precedence", "datasets": ["crm-legacy"]}
    await admin.request(
        nc,
        subjects.admin("profile", "apply"),
        ApplyMany([ConfigObject("merge_policy", policy)]),
        ApplyManyResult,
    )
    # The legacy system says "Kate", earlier; the CRM says "Katie", later. Only the legacy
    # system knows the birth date. An older CRM record arriving late changes nothing.
    await send(
        nc,
        "crm-legacy",
        {
            "crm_id": "K1",
            "person": {"name": {"first": "Kate"}, "birth_date": "1990-05-01"},
            "updated_at": "2026-01-01T00:00:00Z",
        },
    )
    await send(
        nc,
        "crm",
        {
            "crm_id": "K1",
            "person": {"name": {"first": "Katie"}},
            "updated_at": "2026-06-01T00:00:00Z",
        },
    )
    await send(
        nc,
        "crm",
        {
            "crm_id": "K1",
            "person": {"name": {"first": "Kathy"}},
            "updated_at": "2025-01-01T00:00:00Z",
        },
    )
    newest = await settled(
        nc,
        "crm_id:K1",
        lambda v: (
            v["attributes"]["person"]["name"]["first"] == "Katie"
            and "birth_date" in v["attributes"]["person"]
        ),
    )
    assert newest["merge_policy"] == "newest-wins"  # the example's default policy
    legacy = await people.profile(nc, "crm_id:K1", "legacy-first", 0)
    assert legacy["attributes"]["person"] == {"name": {"first": "Kate"}, "birth_date": "1990-05-01"}
    with pytest.raises(AdminFailure) as bad:
        await admin.request(
            nc,
            subjects.admin("profile", "apply"),
            ApplyMany([ConfigObject("merge_policy", {**policy, "datasets": ["nope"]})]),
            ApplyManyResult,
        )
    assert bad.value.name == "legacy-first" and "nope" in bad.value.message


async def test_a_merge_announces_the_folded_id_and_old_identities_find_it(
    platform: dict[str, Service], nc: Client
) -> None:
    await send(nc, "crm", {"crm_id": "M1", "email": "m@example.com"})
    first = await settled(nc, "crm_id:M1", lambda v: True)
    await send(nc, "web", web("cookie-m", "2026-11-20T10:00:00Z", page={"url": "/"}))
    second = await settled(nc, "ecid:cookie-m", lambda v: True)
    assert first["profile_id"] != second["profile_id"]
    await send(
        nc, "web", web("cookie-m", "2026-11-20T10:10:00Z", "app.login", email="m@example.com")
    )
    # The merge and the login event may land in two steps of the profile service: the
    # survivor answers for the cookie first, with the page view it took over, then with both.
    merged = await settled(
        nc,
        "ecid:cookie-m",
        lambda v: v["profile_id"] == first["profile_id"] and len(v["events"]) >= 2,
    )
    assert {"crm_id:M1", "email:m@example.com", "ecid:cookie-m"} <= idents(merged)
    assert len(merged["events"]) == 2, "the folded profile's events moved to the survivor"
    js = nc.jetstream()
    info = await js.stream_info("CDP_CHANGES")
    announced = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        body = (await js.get_msg("CDP_CHANGES", seq)).data or b""
        for item in msgspec.msgpack.decode(body, type=ChangeEnvelope).items:
            if isinstance(item, ProfileMerged):
                announced.append((item.profile_id, item.folded))
    assert announced == [(first["profile_id"], [second["profile_id"]])]


async def test_a_privacy_delete_removes_everything_everywhere(
    platform: dict[str, Service], nc: Client, tmp_path: Path
) -> None:
    await send(nc, "crm", {"crm_id": "D1", "email": "del@example.com", "phone": "+12015550199"})
    await send(
        nc, "web", web("cookie-d", "2026-11-20T10:00:00Z", "app.login", email="del@example.com")
    )
    view = await settled(nc, "crm_id:D1", lambda v: len(v["events"]) == 1)
    pid = view["profile_id"]
    # Records still in flight when the delete is asked for leave nothing behind.
    await send(nc, "web", web("cookie-d", "2026-11-20T11:00:00Z", page={"url": "/late"}))
    reports = await people.delete(nc, "email:del@example.com", timeout=30)
    assert set(reports) == set(people.PRIVACY_SERVICES)
    assert reports["identity"].removed["identities"] == 4
    assert reports["profile"].profile_ids == [pid]
    for identity in ("crm_id:D1", "email:del@example.com", "ecid:cookie-d", "phone:+12015550199"):
        assert await lookup(nc, identity) is None
    with pytest.raises(AdminFailure):
        await people.identity_graph(nc, "ecid:cookie-d")
    for db, sql in [
        ("identity.db", "SELECT count(*) FROM nodes"),
        ("identity.db", "SELECT count(*) FROM edges"),
        ("profile.db", "SELECT count(*) FROM attributes"),
        ("profile.db", "SELECT count(*) FROM events"),
        ("profile.db", "SELECT count(*) FROM identities"),
        ("profile.db", "SELECT count(*) FROM profiles"),
        ("segmentation.db", "SELECT count(*) FROM facts"),
        ("segmentation.db", "SELECT count(*) FROM events"),
    ]:
        with sqlite3.connect(tmp_path / db) as conn:
            assert conn.execute(sql).fetchone() == (0,), (db, sql)

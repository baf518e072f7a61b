"""Destination connectors against real local HTTP servers (tests/destination_servers.py)."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio
from nats.aio.client import Client

from ops.natsd import free_port
from services.destination.connectors import CONNECTORS, Connector, ConnectorSettingsError
from services.destination.connectors.base import http_error, parse_retry_after
from services.destination.model import Activation, DeliveryError, SegmentMeta
from tests.destination_servers import (
    AdsCustomerListServer,
    AudienceManagerServer,
    EmailListServer,
    FakeProvider,
    SmsListServer,
    SocialAudienceServer,
    WebhookServer,
)

SEG = SegmentMeta(name="vip", description="Big spenders", method="streaming")
TOKEN = "tok-123"
SIGNING = "s3cret-signing"


def act(
    pid: str,
    status: str = "realized",
    at: float = 1.0,
    attributes: dict[str, Any] | None = None,
    **identities: list[str],
) -> Activation:
    return Activation(
        profile_id=pid,
        segment=SEG.name,
        status=status,
        at=at,
        identities=dict(identities),
        attributes=attributes or {},
    )


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# -- the registry ------------------------------------------------------------------------


def test_registry_lists_every_kind() -> None:
    assert set(CONNECTORS) == {
        "webhook",
        "email",
        "sms",
        "social",
        "ads",
        "audience_sharing",
        "nats",
    }
    for kind, cls in CONNECTORS.items():
        assert cls.kind == kind


@pytest.mark.parametrize(
    ("kind", "settings", "secrets"),
    [
        ("webhook", {}, {"signing_secret": "x"}),
        ("webhook", {"url": "http://h/x"}, {}),
        ("email", {"url": "http://h"}, {"api_key": "k"}),
        ("email", {"url": "http://h", "list_id": "l"}, {}),
        ("sms", {"list_id": "l"}, {"api_key": "k"}),
        ("social", {"url": "http://h"}, {"api_key": "k"}),
        ("ads", {"url": "http://h", "list_id": "l", "max_per_request": 0}, {"api_key": "k"}),
        ("audience_sharing", {"url": "http://h", "timeout": -1}, {"api_key": "k"}),
        ("sms", {"url": "http://h", "list_id": "l"}, {"api_key": "k"}),  # no phone region
        (
            "social",
            {"url": "http://h", "audience_id": "a", "default_region": "XX"},
            {"api_key": "k"},
        ),
        ("ads", {"url": "http://h", "list_id": "l", "default_region": 33}, {"api_key": "k"}),
        ("nats", {"subject": "out.{segment}"}, {}),
    ],
)
def test_bad_settings_are_refused(
    kind: str, settings: dict[str, Any], secrets: dict[str, str]
) -> None:
    with pytest.raises(ConnectorSettingsError):
        CONNECTORS[kind](settings, secrets)


# -- webhook -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_webhook_posts_signed_batch(session: aiohttp.ClientSession) -> None:
    async with WebhookServer() as server:
        conn = CONNECTORS["webhook"](
            {"url": server.url + "/hooks/cdp"}, {"signing_secret": SIGNING}
        )
        items = [
            act("p1", email=["john.doe@example.com"], attributes={"tier": "gold"}),
            act("p2", "exited", at=2.0, phone=["+14155552671"]),
        ]
        before = int(time.time())
        await conn.send(session, SEG, items)
        (req,) = server.received
        assert (req.method, req.path, req.status) == ("POST", "/hooks/cdp", 200)
        expected = hmac.new(SIGNING.encode(), req.body, hashlib.sha256).hexdigest()
        assert req.headers["X-CDP-Signature"] == f"sha256={expected}"
        assert before <= int(req.headers["X-CDP-Timestamp"]) <= int(time.time())
        assert req.headers["Content-Type"] == "application/json"
        assert req.json["segment"] == {
            "name": "vip",
            "description": "Big spenders",
            "method": "streaming",
        }
        assert req.json["activations"] == [
            {"id": f"vip:{a.profile_id}:{a.status}:{a.at!r}", **msgspec.to_builtins(a)}
            for a in items
        ]
        # identities travel as they come: normalised, not hashed
        assert b"john.doe@example.com" in req.body


@pytest.mark.asyncio
async def test_webhook_server_checks_signature(session: aiohttp.ClientSession) -> None:
    async with WebhookServer(signing_secret=SIGNING) as server:
        good = CONNECTORS["webhook"]({"url": server.url}, {"signing_secret": SIGNING})
        await good.send(session, SEG, [act("p1", email=["a@b.co"])])
        assert len(server.activations) == 1
        bad = CONNECTORS["webhook"]({"url": server.url}, {"signing_secret": "wrong"})
        with pytest.raises(DeliveryError) as err:
            await bad.send(session, SEG, [act("p1", email=["a@b.co"])])
        assert (err.value.status, err.value.retryable) == (401, False)


# -- email and sms -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_email_adds_and_removes_members(session: aiohttp.ClientSession) -> None:
    async with EmailListServer(token=TOKEN) as server:
        conn = CONNECTORS["email"]({"url": server.url, "list_id": "L1"}, {"api_key": TOKEN})
        await conn.send(
            session,
            SEG,
            [
                act("p1", email=["Ann@Example.com"], attributes={"first_name": "Ann"}),
                act("p2", "existing", email=["bob@example.com"]),
                act("p3", email=["cy@example.com"]),
            ],
        )
        assert server.members("L1") == {"ann@example.com", "bob@example.com", "cy@example.com"}
        (add,) = server.received
        assert add.path == "/lists/L1/members"
        assert add.headers["Authorization"] == f"Bearer {TOKEN}"
        assert add.json["members"][0] == {
            "email": "ann@example.com",
            "fields": {"first_name": "Ann"},
        }

        server.clear()
        await conn.send(
            session,
            SEG,
            [
                act("p2", "exited", at=2.0, email=["bob@example.com"]),
                # the latest activation of a profile wins within a batch
                act("p3", "exited", at=2.0, email=["cy@example.com"]),
                act("p3", "realized", at=3.0, email=["cy@example.com"]),
            ],
        )
        assert [r.path for r in server.received] == [
            "/lists/L1/members",
            "/lists/L1/members:remove",
        ]
        assert server.received[1].json == {"emails": ["bob@example.com"]}
        assert server.members("L1") == {"ann@example.com", "cy@example.com"}


@pytest.mark.asyncio
async def test_email_skips_items_without_email(session: aiohttp.ClientSession) -> None:
    async with EmailListServer() as server:
        conn = CONNECTORS["email"]({"url": server.url, "list_id": "L1"}, {"api_key": TOKEN})
        no_email = act("p2", phone=["+14155552671"])
        with_email = act("p1", email=["a@example.com"])
        assert conn.addressable(with_email)
        assert not conn.addressable(no_email)
        await conn.send(session, SEG, [no_email])
        assert server.received == []
        await conn.send(session, SEG, [with_email, no_email])
        (req,) = server.received
        assert req.json == {"members": [{"email": "a@example.com", "fields": {}}]}


@pytest.mark.asyncio
async def test_sms_by_phone_and_skips_items_without_phone(
    session: aiohttp.ClientSession,
) -> None:
    async with SmsListServer(token=TOKEN) as server:
        conn = CONNECTORS["sms"](
            {"url": server.url, "list_id": "S1", "default_region": "US"}, {"api_key": TOKEN}
        )
        no_phone = act("p3", email=["c@example.com"])
        assert not conn.addressable(no_phone)
        await conn.send(
            session,
            SEG,
            [
                act("p1", phone=["+1 (415) 555-2671"], attributes={"city": "SF"}),
                act("p2", phone=["+442071838750"]),
                no_phone,
            ],
        )
        (req,) = server.received
        assert req.path == "/lists/S1/subscribers"
        assert req.json == {
            "subscribers": [
                {"phone": "+14155552671", "fields": {"city": "SF"}},
                {"phone": "+442071838750", "fields": {}},
            ]
        }
        await conn.send(session, SEG, [act("p1", "exited", at=2.0, phone=["+14155552671"])])
        assert server.received[-1].path == "/lists/S1/subscribers:remove"
        assert server.received[-1].json == {"phones": ["+14155552671"]}
        assert server.members("S1") == {"+442071838750"}


@pytest.mark.asyncio
async def test_sms_reads_national_numbers_in_its_region(session: aiohttp.ClientSession) -> None:
    french = act("p1", phone=["06 62 99 23 12"])
    async with SmsListServer(token=TOKEN) as server:
        conn = CONNECTORS["sms"](
            {"url": server.url, "list_id": "S1", "default_region": "fr"}, {"api_key": TOKEN}
        )
        await conn.send(session, SEG, [french])
        assert server.received[-1].json == {
            "subscribers": [{"phone": "+33662992312", "fields": {}}]
        }
    # In region US the same digits are no valid number: nothing is sent, no +1 guess.
    us = CONNECTORS["sms"](
        {"url": "http://h", "list_id": "S1", "default_region": "US"}, {"api_key": TOKEN}
    )
    assert not us.addressable(french)


# -- social and ads: hashed only ---------------------------------------------------------

RAW_EMAIL = " John.Doe@Example.COM "
RAW_PHONE = "+1 (415) 555-2671"
RAW_FORMS = [
    b"John.Doe",
    b"john.doe",
    b"example.com",
    b"Example.COM",
    b"@",
    b"4155552671",
    b"555-2671",
    b"+1415",
]


@pytest.mark.asyncio
async def test_social_sends_only_sha256_of_normalised_values(
    session: aiohttp.ClientSession,
) -> None:
    async with SocialAudienceServer(token=TOKEN) as server:
        conn = CONNECTORS["social"](
            {"url": server.url, "audience_id": "A9", "default_region": "US"}, {"api_key": TOKEN}
        )
        digest = sha("pre@hashed.example").upper()
        items = [
            act("p1", email=[RAW_EMAIL], phone=[RAW_PHONE]),
            act("p2", email_sha256=[digest, "not-a-digest@example.com"]),
            act("p3", phone=["+442071838750"]),
            act("p4", crm_id=["c-4"]),  # nothing a social network can match: left out
        ]
        assert not conn.addressable(items[3])
        await conn.send(session, SEG, items)
        (req,) = server.received
        assert (req.path, req.status) == ("/audiences/A9/users", 200)
        assert req.json == {
            "schema": ["EMAIL_SHA256", "PHONE_SHA256"],
            "data": [
                [sha("john.doe@example.com"), sha("+14155552671")],
                [digest.lower(), ""],
                ["", sha("+442071838750")],
            ],
        }
        assert sha("john.doe@example.com") == hashlib.sha256(b"john.doe@example.com").hexdigest()
        for raw in RAW_FORMS:
            assert raw not in req.body
        await conn.send(session, SEG, [act("p3", "exited", at=2.0, phone=["+442071838750"])])
        assert server.received[-1].path == "/audiences/A9/users:remove"
        assert server.audiences["A9"] == {
            (sha("john.doe@example.com"), sha("+14155552671")),
            (digest.lower(), ""),
        }


@pytest.mark.asyncio
async def test_ads_sends_hashed_members_and_raw_mobile_ids(
    session: aiohttp.ClientSession,
) -> None:
    async with AdsCustomerListServer(token=TOKEN) as server:
        conn = CONNECTORS["ads"](
            {"url": server.url, "list_id": "CL7", "default_region": "US"}, {"api_key": TOKEN}
        )
        gaid = "38400000-8cf0-11bd-b23e-10b96e40000d"
        items = [
            act("p1", email=[RAW_EMAIL], phone=[RAW_PHONE], gaid=[gaid]),
            act("p2", idfa=["AEBE52E7-03EE-455A-B3C4-E57283966239"]),
            act("p3", phone_sha256=[sha("+442071838750")]),
            act("p4", "exited", email=["gone@example.com"]),
        ]
        await conn.send(session, SEG, items)
        add, remove = server.received
        assert add.path == "/customer-lists/CL7:addMembers"
        assert add.json == {
            "members": [
                {
                    "hashedEmail": sha("john.doe@example.com"),
                    "hashedPhoneNumber": sha("+14155552671"),
                    "mobileId": gaid,
                },
                {"mobileId": "AEBE52E7-03EE-455A-B3C4-E57283966239"},
                {"hashedPhoneNumber": sha("+442071838750")},
            ]
        }
        assert remove.path == "/customer-lists/CL7:removeMembers"
        assert remove.json == {"members": [{"hashedEmail": sha("gone@example.com")}]}
        for raw in [*RAW_FORMS, b"gone"]:
            assert raw not in add.body
            assert raw not in remove.body
        assert len(server.lists["CL7"]) == 3


# -- audience sharing --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_audience_sharing_requires_sync_first(session: aiohttp.ClientSession) -> None:
    async with AudienceManagerServer(token=TOKEN) as server:
        conn = CONNECTORS["audience_sharing"]({"url": server.url}, {"api_key": TOKEN})
        items = [act("p1", email=["a@example.com"]), act("p2", "exited", at=2.0)]
        with pytest.raises(DeliveryError) as err:
            await conn.send(session, SEG, items)
        assert err.value.retryable
        assert "segment metadata not synced yet" in str(err.value)
        assert server.received == []

        remote = await conn.sync_segment(session, SEG)
        assert remote == "am-vip"
        assert server.received[0].path == "/segments"
        assert server.received[0].json == {
            "id": "vip",
            "name": "vip",
            "description": "Big spenders",
        }
        assert await conn.sync_segment(session, SEG) == "am-vip"  # idempotent
        assert list(server.segments) == ["am-vip"]

        await conn.send(session, SEG, items)
        req = server.received[-1]
        assert req.path == "/segments/am-vip/members"
        assert req.json == {
            "segment_id": "am-vip",
            "members": [
                {
                    "profile_id": "p1",
                    "status": "realized",
                    "identities": {"email": ["a@example.com"]},
                },
                {"profile_id": "p2", "status": "exited", "identities": {}},
            ],
        }
        assert server.members["am-vip"] == {"p1": "realized", "p2": "exited"}

        # the manager lost the segment: the connector asks for a new sync
        server.forget("am-vip")
        with pytest.raises(DeliveryError) as err:
            await conn.send(session, SEG, items)
        assert err.value.retryable
        assert "not synced" in str(err.value)
        with pytest.raises(DeliveryError):
            await conn.send(session, SEG, items)
        assert await conn.sync_segment(session, SEG) == "am-vip"
        await conn.send(session, SEG, items)
        assert server.members["am-vip"] == {"p1": "realized", "p2": "exited"}


# -- failure classification, for every HTTP connector ------------------------------------

ITEM = act("p1", email=["a@example.com"], phone=["+14155552671"])

HTTP_CASES: dict[str, tuple[type[FakeProvider], dict[str, Any], dict[str, str]]] = {
    "webhook": (WebhookServer, {}, {"signing_secret": "s"}),
    "email": (EmailListServer, {"list_id": "L"}, {"api_key": "k"}),
    "sms": (SmsListServer, {"list_id": "L", "default_region": "US"}, {"api_key": "k"}),
    "social": (
        SocialAudienceServer,
        {"audience_id": "A", "default_region": "US"},
        {"api_key": "k"},
    ),
    "ads": (AdsCustomerListServer, {"list_id": "L", "default_region": "US"}, {"api_key": "k"}),
}
"""kind -> (its fake server, extra settings, secrets)."""


def http_case(kind: str) -> tuple[FakeProvider, Callable[[str], Connector]]:
    server_cls, extra, secrets = HTTP_CASES[kind]

    def make(url: str) -> Connector:
        return CONNECTORS[kind]({"url": url, "timeout": 0.3, **extra}, secrets)

    return server_cls(), make


HTTP_KINDS = list(HTTP_CASES)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_failures_are_classified(kind: str, session: aiohttp.ClientSession) -> None:
    server, make = http_case(kind)
    items = [ITEM]
    async with server:
        conn = make(server.url)
        server.fail_next(503)
        server.fail_next(429, retry_after="7")
        server.fail_next(400, body='{"error": "bad list"}')
        errors: list[DeliveryError] = []
        for _ in range(3):
            with pytest.raises(DeliveryError) as err:
                await conn.send(session, SEG, items)
            errors.append(err.value)
        e503, e429, e400 = errors
        assert (e503.retryable, e503.status, e503.retry_after) == (True, 503, None)
        assert (e429.retryable, e429.status, e429.retry_after) == (True, 429, 7.0)
        assert (e400.retryable, e400.status) == (False, 400)
        assert "bad list" in str(e400)
        # and then it goes through
        await conn.send(session, SEG, items)
        assert server.received[-1].status == 200


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_timeouts_are_retryable(kind: str, session: aiohttp.ClientSession) -> None:
    server, make = http_case(kind)
    items = [ITEM]
    async with server:
        conn = make(server.url)
        server.delay_next(3.0)
        with pytest.raises(DeliveryError) as err:
            await conn.send(session, SEG, items)
        assert err.value.retryable
        assert err.value.status is None
        assert "timed out" in str(err.value)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", [*HTTP_KINDS, "audience_sharing"])
async def test_connection_refused_is_retryable(kind: str, session: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    settings = {"url": url, "list_id": "L", "audience_id": "A", "default_region": "US"}
    conn = CONNECTORS[kind](settings, {"api_key": "k", "signing_secret": "s"})
    with pytest.raises(DeliveryError) as err:
        if kind == "audience_sharing":
            await conn.sync_segment(session, SEG)
        else:
            await conn.send(session, SEG, [ITEM])
    assert err.value.retryable
    assert err.value.status is None


@pytest.mark.asyncio
async def test_retry_after_http_date(session: aiohttp.ClientSession) -> None:
    async with AudienceManagerServer() as server:
        conn = CONNECTORS["audience_sharing"]({"url": server.url}, {"api_key": "k"})
        when = datetime.now(UTC) + timedelta(seconds=120)
        server.fail_next(503, retry_after=format_datetime(when, usegmt=True))
        with pytest.raises(DeliveryError) as err:
            await conn.sync_segment(session, SEG)
        assert err.value.retryable
        assert err.value.retry_after is not None
        assert 100 <= err.value.retry_after <= 121


def test_http_error_and_retry_after() -> None:
    assert http_error(500, {}, "").retryable
    assert http_error(408, {}, "").retryable
    assert not http_error(404, {}, "nope").retryable
    assert not http_error(422, {"Retry-After": "5"}, "").retryable
    assert http_error(429, {"retry-after": "2.5"}, "").retry_after == 2.5
    assert http_error(503, {"Retry-After": "soon"}, "").retry_after is None
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("nan") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # already past


# -- nats --------------------------------------------------------------------------------


def test_nats_needs_a_client_and_a_valid_subject() -> None:
    with pytest.raises(ConnectorSettingsError):
        CONNECTORS["nats"]({"subject": "out.{segment}", "_nc": object()}, {})
    with pytest.raises(ConnectorSettingsError):
        CONNECTORS["nats"]({"subject": "out.>", "_nc": Client()}, {})
    with pytest.raises(ConnectorSettingsError):
        CONNECTORS["nats"]({"subject": "out..x", "_nc": Client()}, {})


@pytest.mark.slow
@pytest.mark.asyncio
async def test_nats_republishes_one_message_per_activation(
    nc: Client, session: aiohttp.ClientSession
) -> None:
    sub = await nc.subscribe("partner.segments.>")
    conn = CONNECTORS["nats"]({"subject": "partner.segments.{segment}", "_nc": nc}, {})
    items = [act("p1", email=["a@example.com"]), act("p2", "exited", at=2.5)]
    await conn.send(session, SEG, items)
    got = [await sub.next_msg(timeout=5) for _ in items]
    assert [m.subject for m in got] == ["partner.segments.vip"] * 2
    decoded = [msgspec.json.decode(m.data, type=Activation) for m in got]
    assert decoded == items
    assert got[0].headers is not None
    assert got[0].headers["Nats-Msg-Id"] == "vip:p1:realized:1.0"


@pytest.mark.asyncio
async def test_nats_closed_connection_is_retryable(session: aiohttp.ClientSession) -> None:
    conn = CONNECTORS["nats"]({"subject": "out.{segment}", "_nc": Client()}, {})
    with pytest.raises(DeliveryError) as err:
        await conn.send(session, SEG, [act("p1")])
    assert err.value.retryable

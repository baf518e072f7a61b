"""The profile lookup's reply, as the README documents it: over NATS `{"ok": true, "result"}`
or `{"ok": false, "error"}`; over HTTP the result itself (200) or `{"error"}` (404, 400)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client

from ops.natsd import NatsServer
from services.identity.service import IdentityService
from services.ingest.service import IngestService
from services.profile.service import ProfileService
from services.segmentation.service import SegmentationService
from shared import subjects
from tests.helpers import eventually, running, settings_for

pytestmark = pytest.mark.asyncio


TOKEN = "s3cret-profile-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def ask(nc: Client, request: bytes) -> dict[str, Any]:
    reply = await nc.request(subjects.PROFILE_LOOKUP, request, timeout=5)
    answer: dict[str, Any] = json.loads(reply.data)
    return answer


async def test_lookup_replies_over_nats_and_http(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    classes = (IngestService, IdentityService, ProfileService, SegmentationService)
    async with running(classes, nats_server.url, tmp_path, nc, profile_token=TOKEN) as services:
        js = nc.jetstream()
        await js.publish("cdp.ingest.crm", b'{"crm_id": "C1", "email": "a@example.com"}')
        login = {"ecid": "c-1", "eventType": "app.login", "timestamp": "2026-11-21T10:00:00Z"}
        await js.publish("cdp.ingest.web", json.dumps({**login, "email": "a@example.com"}).encode())
        gold = {"loyalty_id": "L1", "crm_id": "C1", "loyalty": {"tier": "gold"}}
        await js.publish("cdp.ingest.loyalty", json.dumps(gold).encode())

        async def complete() -> bool:
            answer = await ask(nc, b'{"identity": "crm_id:C1"}')
            return bool(answer["ok"] and answer["result"]["events"])

        await eventually(complete)
        await eventually(lambda: _has_membership(nc))  # written back after the profile
        found = await ask(nc, b'{"identity": "email: A@Example.com ", "events": 1}')
        assert set(found) == {"ok", "result"} and found["ok"] is True
        result = found["result"]
        assert set(result) == {
            "profile_id",
            "merge_policy",
            "attributes",
            "identities",
            "events",
            "memberships",
        }
        assert result["merge_policy"] == "newest-wins"
        assert result["attributes"]["loyalty"] == {"tier": "gold"}
        assert {"namespace": "loyalty_id", "value": "L1"} in result["identities"]
        (event,) = result["events"]
        assert set(event) == {"record_id", "dataset", "event_type", "timestamp", "payload"}
        assert (event["event_type"], event["timestamp"]) == ("app.login", 1795255200.0)
        (membership,) = result["memberships"]
        assert set(membership) == {"segment", "status", "at"}
        assert (membership["segment"], membership["status"]) == ("gold-members", "realized")

        not_found = await ask(nc, b'{"identity": "email:nobody@example.com"}')
        assert not_found == {
            "ok": False,
            "error": {"code": "not_found", "message": "no profile holds email:nobody@example.com"},
        }
        invalid = await ask(nc, b'{"identity": "no-colon"}')
        assert invalid == {
            "ok": False,
            "error": {
                "code": "invalid",
                "message": "expected <namespace>:<value>, got 'no-colon'",
                "field": "identity",
            },
        }
        policy = await ask(nc, b'{"identity": "crm_id:C1", "merge_policy": "nope"}')
        assert policy["error"] == {
            "code": "not_found",
            "message": "no merge policy named 'nope'",
            "kind": "merge_policy",
            "name": "nope",
        }
        neither = await ask(nc, b"{}")
        assert neither == {
            "ok": False,
            "error": {
                "code": "invalid",
                "message": "a lookup names an identity (<namespace>:<value>) or a profile_id",
                "field": "identity",
            },
        }
        for body in (b'{"identity": 7}', b"{not json"):
            malformed = await ask(nc, body)
            assert malformed["ok"] is False and malformed["error"]["code"] == "malformed"

        url = f"http://127.0.0.1:{services['profile'].health.port}/v1/profiles"
        async with aiohttp.ClientSession(headers=BEARER) as http:
            queries: list[tuple[dict[str, str], int, Any]] = [
                ({"identity": "email: A@Example.com ", "events": "1"}, 200, result),
                ({"identity": "email:nobody@example.com"}, 404, {"error": not_found["error"]}),
                ({"identity": "no-colon"}, 400, {"error": invalid["error"]}),
                (
                    {"identity": "crm_id:C1", "merge_policy": "nope"},
                    404,
                    {"error": policy["error"]},
                ),
                (
                    {"identity": "crm_id:C1", "events": "x"},
                    400,
                    {"error": {"code": "invalid", "message": "events must be an integer"}},
                ),
            ]
            for params, status, body in queries:
                async with http.get(url, params=params) as r:
                    assert (r.status, await r.json()) == (status, body), params
        # Personal data needs the token: none, another scheme or a wrong one get 401 only.
        refused = {
            "error": {
                "code": "unauthorized",
                "message": "this endpoint needs `Authorization: Bearer <CDP_PROFILE_TOKEN>`",
            }
        }
        for headers in ({}, {"Authorization": TOKEN}, {"Authorization": "Bearer wrong"}):
            async with (
                aiohttp.ClientSession(headers=headers) as http,
                http.get(url, params={"identity": "crm_id:C1"}) as r,
            ):
                assert (r.status, await r.json()) == (401, refused), headers
                assert r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_profile_http_without_a_configured_token_serves_nobody(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    svc = ProfileService(settings_for("profile", nats_server.url, tmp_path))
    await svc.start()
    try:
        base = f"http://127.0.0.1:{svc.health.port}"
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer x"}):
                async with http.get(
                    f"{base}/v1/profiles", params={"identity": "crm_id:C1"}, headers=headers
                ) as r:
                    assert r.status == 401
                    assert "set CDP_PROFILE_TOKEN" in (await r.json())["error"]["message"]
            for open_path in ("/healthz", "/metrics"):
                async with http.get(base + open_path) as r:
                    assert r.status == 200, open_path
    finally:
        await svc.stop()


async def _has_membership(nc: Client) -> bool:
    answer = await ask(nc, b'{"identity": "crm_id:C1"}')
    return bool(answer["ok"] and answer["result"]["memberships"])

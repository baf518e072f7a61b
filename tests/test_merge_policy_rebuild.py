"""Merge policies travel on the config stream like every configured object: a profile.db
rebuilt from the streams (deleted while the service is stopped) gets them back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from ops.cli import people
from ops.natsd import NatsServer
from shared import admin, subjects
from shared.admin import ApplyMany, ApplyManyResult, ConfigObject, GetRequest, GetResult
from tests.helpers import eventually, lose_db, running
from tests.test_merges import CLASSES, crm, iso, landed

pytestmark = pytest.mark.asyncio
POLICY = {"name": "loyalty-first", "type": "dataset_precedence", "datasets": ["loyalty", "crm"]}


async def policies(nc: Client) -> dict[str, Any]:
    got = await admin.request(
        nc, subjects.admin("profile", "get"), GetRequest("merge_policy"), GetResult
    )
    return {p["name"]: p for p in got.items}


async def answers(nc: Client) -> dict[str, Any]:
    out = {}
    for policy in ("loyalty-first", "crm-first", None):
        found = await people.profile(nc, "crm_id:C1", policy, 10)
        out[str(policy)] = (found["profile_id"], found["attributes"])
    return out


async def test_merge_policies_survive_a_rebuild_of_profile_db(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with running(CLASSES, nats_server.url, data, nc) as services:
        result = await admin.request(
            nc,
            subjects.admin("profile", "apply"),
            ApplyMany([ConfigObject("merge_policy", POLICY)]),
            ApplyManyResult,
        )
        assert [r.action for r in result.results] == ["created"]
        await nc.publish(
            subjects.ingest("crm"),
            json.dumps(crm("C1", "one@example.com", updated_at=iso(2 * 86400.0))).encode(),
        )
        loyalty = {"loyalty_id": "L1", "crm_id": "C1", "updated_at": iso(86400.0)}
        await nc.publish(subjects.ingest("loyalty"), json.dumps(loyalty).encode())
        await landed(nc)
        before_policies = await policies(nc)
        before = await answers(nc)
        assert before["loyalty-first"] != before["crm-first"]  # the policy makes a difference

        await (await lose_db(services, "profile")).start()
        await landed(nc)

        async def restored() -> bool:  # the config stream is followed by its own consumer
            return await policies(nc) == before_policies

        await eventually(restored, timeout=10)
        assert await answers(nc) == before

"""Membership changes end to end: segmentation publishes each change as one public JSON
event on `cdp.membership.<segment>` for applications, and the same changes in batches
(one msgpack envelope per partition and step, `cdp.x.members.<partition>`) for the
profile's write-back and the destination."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
from nats.aio.client import Client

from ops.cli.check import wait_landed
from ops.natsd import NatsServer
from shared import subjects
from shared.messages import MembershipChange, MembershipEvent, json_encoder, members_batch_decoder
from shared.runtime import Service
from tests.destination_servers import WebhookServer
from tests.helpers import eventually, running
from tests.test_activation import CLASSES, SECRET, customer, destination

pytestmark = pytest.mark.asyncio
BURST = 300
SEGMENT = "email-optin"


@pytest_asyncio.fixture
async def platform(
    nats_server: NatsServer, nc: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[dict[str, Service]]:
    monkeypatch.setenv("CDP_SECRET_TEST_WEBHOOK", SECRET)
    async with running(CLASSES, nats_server.url, tmp_path, nc) as services:
        yield services


async def stream_messages(nc: Client, stream: str) -> list[tuple[str, bytes]]:
    """Every message of `stream`, in order: (subject, data)."""
    js = nc.jetstream()
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        out.append((msg.subject or "", msg.data or b""))
    return out


async def test_a_burst_of_changes_reaches_the_write_back_and_a_webhook_once_each(
    platform: dict[str, Service], nc: Client
) -> None:
    async with WebhookServer(signing_secret=SECRET) as hook:
        await destination(
            nc,
            {
                "name": "burst-hook",
                "type": "webhook",
                "segments": [SEGMENT],
                "connection": {"url": hook.url},
                "secrets": {"signing_secret": "CDP_SECRET_TEST_WEBHOOK"},
            },
        )
        emails = [f"b{n}@example.com" for n in range(BURST)]
        for n, email in enumerate(emails):
            await customer(nc, n, email)
        result = await wait_landed(nc, 120.0)
        assert result.landed, result.missing

        # The public events: one JSON message per change, as applications always had them.
        public = [
            (subject, data)
            for subject, data in await stream_messages(nc, subjects.STREAM_MEMBERSHIP.name)
            if not subject.startswith(f"{subjects.MEMBERSHIP_PREFIX}._")
        ]
        events = [msgspec.json.decode(data, type=MembershipEvent) for _, data in public]
        fields = set(MembershipEvent.__struct_fields__)
        assert all(set(json.loads(data)) == fields for _, data in public)
        assert all(
            subject == subjects.membership(e.segment)
            for (subject, _), e in zip(public, events, strict=True)
        )
        joined = [e for e in events if e.segment == SEGMENT]
        assert sorted(e.status for e in joined) == ["realized"] * BURST
        assert len({e.profile_id for e in joined}) == BURST

        # The envelopes: the same changes, byte for byte once encoded as JSON, each once,
        # on the partition of its profile, in fewer messages than changes.
        envelopes = await stream_messages(nc, subjects.STREAM_MEMBERS.name)
        batched: list[bytes] = []
        partitions = platform["segmentation"].settings.partitions
        for subject, data in envelopes:
            for item in members_batch_decoder.decode(data).items:
                if isinstance(item, MembershipChange):
                    part = subjects.partition_of(item.event.profile_id, partitions)
                    assert subject == subjects.members(part)
                    batched.append(json_encoder.encode(item.event))
        assert Counter(batched) == Counter(data for _, data in public)
        assert len(envelopes) < len(public), "the changes travel in batches"

        # The profile's write-back holds every membership.
        rows = await platform["profile"].db.execute_fetchall(
            "SELECT profile_id, status FROM memberships WHERE segment = ?", (SEGMENT,)
        )
        assert sorted((str(r[0]), str(r[1])) for r in rows) == sorted(
            (e.profile_id, "realized") for e in joined
        )

        # The webhook: each change once.
        async def all_sent() -> bool:
            return len(hook.activations) >= BURST

        await eventually(all_sent, timeout=60)
        sent = Counter(a["identities"]["email"][0] for a in hook.activations)
        assert sent == Counter(emails), "each change delivered once, none lost"
        assert {a["status"] for a in hook.activations} == {"realized"}

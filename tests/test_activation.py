"""Activation end to end, from ingest to real local provider servers: a streaming segment
reaching a signed webhook in batches, hashed identities for a social network, recovery
after an outage with everything delivered once, and a consent rule."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from nats.aio.client import Client
from typer.testing import CliRunner

from ops.cli.apply import apply_objects, load_file
from ops.cli.main import app
from ops.natsd import NatsServer
from services.destination.service import DestinationService
from services.identity.service import IdentityService
from services.ingest.service import IngestService
from services.profile.service import ProfileService
from services.scheduler.service import SchedulerService
from services.segmentation.service import SegmentationService
from shared import admin, subjects
from shared.admin import (
    AdminFailure,
    ApplyMany,
    ApplyManyResult,
    ConfigObject,
    DestinationList,
    ExportResult,
    ExportRun,
    JobInfo,
    JobRun,
    ListRequest,
)
from shared.runtime import Service
from tests.destination_servers import (
    AudienceManagerServer,
    SmsListServer,
    SocialAudienceServer,
    WebhookServer,
)
from tests.helpers import eventually, running

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parent.parent
SECRET = "webhook-signing-secret"
CLASSES: tuple[type[Service], ...] = (
    IngestService,
    IdentityService,
    ProfileService,
    SegmentationService,
    SchedulerService,
    DestinationService,
)


@pytest_asyncio.fixture
async def platform(
    nats_server: NatsServer, nc: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[dict[str, Service]]:
    monkeypatch.setenv("CDP_SECRET_TEST_WEBHOOK", SECRET)
    async with running(CLASSES, nats_server.url, tmp_path, nc) as services:
        yield services


async def destination(nc: Client, spec: dict[str, Any]) -> None:
    await admin.request(
        nc,
        subjects.admin("destination", "apply"),
        ApplyMany([ConfigObject("destination", spec)]),
        ApplyManyResult,
    )


async def customer(nc: Client, n: int, email: str, *, sms: str = "y") -> None:
    record = {
        "crm_id": f"C{n}",
        "email": email,
        "consents": {"marketing": {"email": "y", "sms": sms, "any": "y"}},
    }
    await nc.jetstream().publish("cdp.ingest.crm", json.dumps(record).encode())


def activations(server: WebhookServer) -> list[dict[str, Any]]:
    return [a for body in server.bodies() for a in body["activations"]]


async def status(nc: Client, name: str) -> Any:
    listed = await admin.request(
        nc, subjects.admin("destination", "list"), ListRequest(), DestinationList
    )
    return next(d for d in listed.destinations if d.name == name)


async def test_a_streaming_segment_reaches_a_signed_webhook_in_batches(
    platform: dict[str, Service], nc: Client
) -> None:
    async with WebhookServer(signing_secret=SECRET) as hook:
        await destination(
            nc,
            {
                "name": "crm-hook",
                "type": "webhook",
                "segments": ["email-optin"],
                "connection": {"url": hook.url},
                "secrets": {"signing_secret": "CDP_SECRET_TEST_WEBHOOK"},
                "aggregation": {"mode": "configurable", "max_events": 3, "max_batch_age_s": 1.5},
            },
        )
        for n in range(3):
            await customer(nc, n, f"c{n}@example.com")
        await hook.wait_for(1, timeout=20)
        first = hook.accepted[0]
        assert len(first.json["activations"]) == 3, "three changes waited for max_events"
        expected = "sha256=" + hmac.new(SECRET.encode(), first.body, hashlib.sha256).hexdigest()
        assert first.headers["X-CDP-Signature"] == expected
        await customer(nc, 3, "c3@example.com")
        await hook.wait_for(2, timeout=20)  # a lone change goes when it is 1.5 s old
        assert len(hook.accepted[1].json["activations"]) == 1
        sent = activations(hook)
        assert sorted(a["identities"]["email"][0] for a in sent) == [
            f"c{n}@example.com" for n in range(4)
        ]
        assert {a["status"] for a in sent} == {"realized"}
        assert all(a["attributes"] == {} for a in sent), "streaming sends membership only"
        await eventually(lambda: _counts(nc, "crm-hook", delivered=4, failed=0, queued=0))


async def test_a_social_destination_receives_only_hashes_of_normalised_emails(
    platform: dict[str, Service], nc: Client
) -> None:
    async with SocialAudienceServer() as social:
        await destination(
            nc,
            {
                "name": "social",
                "type": "social",
                "segments": ["email-optin"],
                "identity": "email",
                "connection": {"url": social.url, "audience_id": "a1"},
                "secrets": {"api_key": "CDP_SECRET_TEST_WEBHOOK"},
            },
        )
        await customer(nc, 1, "  Ann.Lee@Example.COM ")
        await customer(nc, 2, "bob@example.org")
        await eventually(lambda: _rows(social, 2), timeout=20)
        want = {
            hashlib.sha256(e.encode()).hexdigest()
            for e in ("ann.lee@example.com", "bob@example.org")
        }
        assert {email for email, _phone in social.audiences["a1"]} == want
        for req in social.received:
            assert b"example" not in req.body.lower(), "a raw email left the platform"


async def test_an_outage_then_recovery_delivers_everything_once(
    platform: dict[str, Service], nc: Client
) -> None:
    async with WebhookServer(signing_secret=SECRET) as hook:
        hook.fail_next(503, times=3)
        await destination(
            nc,
            {
                "name": "flaky",
                "type": "webhook",
                "segments": ["email-optin"],
                "connection": {"url": hook.url},
                "secrets": {"signing_secret": "CDP_SECRET_TEST_WEBHOOK"},
            },
        )
        for n in range(5):
            await customer(nc, n, f"o{n}@example.com")
        await eventually(lambda: _delivered(hook, 5), timeout=40)
        assert len([r for r in hook.received if r.status == 503]) == 3
        emails = [a["identities"]["email"][0] for a in activations(hook)]
        assert sorted(emails) == [f"o{n}@example.com" for n in range(5)], "each change once"
        await eventually(lambda: _counts(nc, "flaky", delivered=5, dead_letters=0, queued=0))


async def test_a_consent_rule_keeps_opted_out_profiles_out(
    platform: dict[str, Service], nc: Client
) -> None:
    async with WebhookServer(signing_secret=SECRET) as hook:
        await destination(
            nc,
            {
                "name": "sms-ok",
                "type": "webhook",
                "segments": ["email-optin"],
                "connection": {"url": hook.url},
                "secrets": {"signing_secret": "CDP_SECRET_TEST_WEBHOOK"},
                "consent": {"path": "consents.marketing.sms", "allow": ["y"]},
            },
        )
        await customer(nc, 1, "yes@example.com", sms="y")
        await customer(nc, 2, "no@example.com", sms="n")
        await hook.wait_for(1, timeout=20)
        await eventually(lambda: _skipped(nc, "sms-ok", 1), timeout=20)
        emails = [a["identities"]["email"][0] for a in activations(hook)]
        assert emails == ["yes@example.com"]
        assert (await status(nc, "sms-ok")).excluded == {"no_consent": 1}


async def _counts(nc: Client, name: str, **want: int) -> bool:
    state = await status(nc, name)
    return all(getattr(state, k) == v for k, v in want.items())


async def test_a_destination_missing_settings_is_refused(
    platform: dict[str, Service], nc: Client
) -> None:
    with pytest.raises(AdminFailure) as bad:
        await destination(
            nc,
            {
                "name": "s2",
                "type": "social",
                "segments": ["email-optin"],
                "connection": {"url": "http://127.0.0.1:9"},
            },
        )
    assert bad.value.name == "s2" and "api_key" in bad.value.message
    with pytest.raises(AdminFailure) as region:
        await destination(
            nc,
            {
                "name": "s3",
                "type": "sms",
                "segments": ["email-optin"],
                "connection": {"url": "http://127.0.0.1:9", "list_id": "l", "default_region": "EU"},
                "secrets": {"api_key": "CDP_SECRET_SMS_API_KEY"},
            },
        )
    assert (region.value.name, region.value.field) == ("s3", "connection")
    assert "default_region" in region.value.message


async def _rows(server: SocialAudienceServer, n: int) -> bool:
    return len(server.audiences.get("a1", ())) >= n


async def _delivered(server: WebhookServer, n: int) -> bool:
    return len(activations(server)) >= n


async def _skipped(nc: Client, name: str, n: int) -> bool:
    return bool((await status(nc, name)).skipped >= n)


async def test_the_example_destinations_apply(platform: dict[str, Service], nc: Client) -> None:
    path = ROOT / "examples" / "retail" / "destinations.yaml"
    results = await apply_objects(nc, load_file(path), dry_run=False, file=str(path))
    assert {r.name for r in results if r.action == "created"} == {
        "crm-webhook",
        "newsletter",
        "sms-gold",
        "social-lookalike",
        "ads-match",
        "audience-manager",
        "realtime-bus",
        "crm-file",
        "segmentation-nightly",
        "crm-file-morning",
    }
    listed = await admin.request(
        nc, subjects.admin("destination", "list"), ListRequest(), DestinationList
    )
    assert {d.name: d.type for d in listed.destinations}["crm-file"] == "file"


async def test_audience_sharing_syncs_metadata_first_and_existing_members_at_the_next_job(
    platform: dict[str, Service], nc: Client
) -> None:
    js = nc.jetstream()

    async def gold(n: int) -> None:
        record = {"loyalty_id": f"G{n}", "crm_id": f"GC{n}", "loyalty": {"tier": "gold"}}
        await js.publish("cdp.ingest.loyalty", json.dumps(record).encode())

    await gold(1)
    await gold(2)
    dest_db = platform["destination"].db

    async def seen(n: int) -> bool:
        rows = await dest_db.execute_fetchall(
            "SELECT count(*) FROM memberships WHERE segment = 'gold-members'"
        )
        return bool(next(iter(rows))[0] == n)

    await eventually(lambda: seen(2), timeout=20)
    async with AudienceManagerServer() as manager:
        await destination(
            nc,
            {
                "name": "am",
                "type": "audience_sharing",
                "segments": ["gold-members"],
                "connection": {"url": manager.url},
                "secrets": {"api_key": "CDP_SECRET_TEST_WEBHOOK"},
            },
        )
        await manager.wait_for(1, timeout=20)
        assert [r.path for r in manager.accepted] == ["/segments"], "metadata first"
        remote = "am-gold-members"
        assert manager.segments[remote]["name"] == "gold-members"
        await gold(3)  # realised after the sync: sent as it happens
        await eventually(lambda: _true(len(manager.members.get(remote, {})) == 1), timeout=20)
        assert list(manager.members[remote].values()) == ["realized"]
        await admin.request(nc, subjects.admin("segmentation", "job.run"), JobRun(), JobInfo)
        await eventually(lambda: _true(len(manager.members[remote]) == 3), timeout=30)
        assert sorted(manager.members[remote].values()) == ["existing", "existing", "realized"]


async def _true(value: bool) -> bool:
    return value


async def test_the_destination_list_shows_exclusions_by_reason_and_export_files(
    platform: dict[str, Service],
    nc: Client,
    nats_server: NatsServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await destination(
        nc,
        {
            "name": "phones",
            "type": "webhook",
            "segments": ["email-optin"],
            "connection": {"url": "http://127.0.0.1:9/hook"},
            "secrets": {"signing_secret": "CDP_SECRET_TEST_WEBHOOK"},
            "identity": "phone",
        },
    )
    await destination(
        nc,
        {
            "name": "optin-file",
            "type": "file",
            "segments": ["email-optin"],
            "export": {"folder": "exports", "schedule": "manual"},
        },
    )
    async with SmsListServer(token="sms-key") as sms:
        monkeypatch.setenv("CDP_SECRET_TEST_SMS", "sms-key")
        await destination(
            nc,
            {
                "name": "texts",
                "type": "sms",
                "segments": ["email-optin"],
                "connection": {"url": sms.url, "list_id": "l1", "default_region": "US"},
                "secrets": {"api_key": "CDP_SECRET_TEST_SMS"},
            },
        )
        await customer(nc, 1, "one@example.com")
        await customer(nc, 2, "two@example.com")
        # Neither customer has a phone: both left out of `phones` when planned, and of
        # `texts` (no identity named) when its connector finds no number to send to.
        await eventually(lambda: _counts(nc, "phones", skipped=2), timeout=20)
        await eventually(lambda: _counts(nc, "texts", skipped=2, queued=0), timeout=20)
        assert sms.received == []
    assert (await status(nc, "phones")).excluded == {"missing_identity": 2}
    assert (await status(nc, "texts")).excluded == {"missing_identity": 2}
    assert (await status(nc, "phones")).files == []
    result = await admin.request(
        nc, subjects.admin("destination", "export.run"), ExportRun("optin-file"), ExportResult
    )
    assert (result.status, result.rows) == ("succeeded", 2)
    listed = await status(nc, "optin-file")
    written = Path(result.files[0])
    size = await asyncio.to_thread(os.path.getsize, written)
    assert [(f.name, f.rows, f.bytes) for f in listed.files] == [(written.name, 2, size)]
    assert listed.excluded == {}
    # `cdp destinations` shows the reasons and the latest file.
    env = {"CDP_NATS_URL": nats_server.url, "COLUMNS": "240"}
    shown = await asyncio.to_thread(CliRunner().invoke, app, ["destinations"], env=env)
    assert shown.exit_code == 0, shown.output
    rows = {
        cells[1].strip(): [c.strip() for c in cells[1:-1]]
        for cells in (line.split("│") for line in shown.output.splitlines())
        if len(cells) > 2
    }
    assert rows["phones"][6] == "2 (missing identity 2)"
    assert f"optin-file: latest file {written.name} (2 rows, {size:,} bytes" in shown.output

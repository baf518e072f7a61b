"""Where destinations may write and send, and which secrets they may read: export folders
stay inside the export root, HTTP connectors reach only http(s) URLs off link-local and
metadata addresses, and only `CDP_SECRET_*` variables are secrets. Refused at apply with a
reason; export folders checked again when an export runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from ops.natsd import NatsServer
from services.destination.service import DestinationService
from services.identity.service import IdentityService
from services.ingest.service import IngestService
from services.profile.service import ProfileService
from services.segmentation.service import SegmentationService
from shared import admin, subjects
from shared.admin import (
    AdminFailure,
    ApplyMany,
    ApplyManyResult,
    ConfigObject,
    ExportResult,
    ExportRun,
)
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


async def apply(nc: Client, spec: dict[str, Any], dry_run: bool = False) -> ApplyManyResult:
    return await admin.request(
        nc,
        subjects.admin("destination", "apply"),
        ApplyMany([ConfigObject("destination", spec)], dry_run),
        ApplyManyResult,
    )


def file_dest(folder: str) -> dict[str, Any]:
    return {
        "name": "files",
        "type": "file",
        "segments": ["gold-members"],
        "export": {"folder": folder, "schedule": "manual"},
    }


def webhook(url: str, secret: str = "CDP_SECRET_HOOK") -> dict[str, Any]:
    return {
        "name": "hook",
        "type": "webhook",
        "segments": ["gold-members"],
        "connection": {"url": url},
        "secrets": {"signing_secret": secret},
    }


async def refused(nc: Client, spec: dict[str, Any]) -> AdminFailure:
    for dry_run in (True, False):
        with pytest.raises(AdminFailure) as info:
            await apply(nc, spec, dry_run)
    return info.value


async def test_export_folders_stay_inside_the_export_root(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    async with running(CLASSES, nats_server.url, tmp_path / "data", nc):
        for folder in ("../x", "exports/../../x", str(outside), "/etc", "logs", "."):
            failure = await refused(nc, file_dest(folder))
            assert failure.field == "export.folder", folder
            assert "`..`" in failure.message or "outside the export root" in failure.message
        (tmp_path / "data" / "exports").mkdir(parents=True)
        (tmp_path / "data" / "exports" / "escape").symlink_to(outside)
        failure = await refused(nc, file_dest("exports/escape"))
        assert "outside the export root" in failure.message

        # Inside the root: applied; a symlink planted afterwards is refused when it runs.
        await apply(nc, file_dest("exports/crm"))
        (tmp_path / "data" / "exports" / "crm").symlink_to(outside)
        result = await admin.request(
            nc, subjects.admin("destination", "export.run"), ExportRun("files"), ExportResult
        )
        assert result.status == "failed"
        assert result.error is not None and "outside the export root" in result.error
        assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "only http and https URLs are allowed, not 'file'"),
        ("ftp://127.0.0.1/x", "only http and https URLs are allowed, not 'ftp'"),
        ("http:///no-host", "the URL names no host"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata"),
        ("http://169.254.10.1:8080/", "169.254.10.1 is link-local"),
        ("http://[fe80::1]/hook", "fe80::1 is link-local"),
        ("http://[::ffff:169.254.169.254]/", "169.254.169.254 is a cloud metadata"),
        ("http://10.1.2.3/hook", "10.1.2.3 is in a private network"),
        ("http://0.0.0.0:9000/", "0.0.0.0 is not a unicast address"),
    ],
)
async def test_webhook_urls_are_http_off_link_local_and_metadata(
    nats_server: NatsServer, nc: Client, tmp_path: Path, url: str, reason: str
) -> None:
    async with running(CLASSES, nats_server.url, tmp_path, nc):
        failure = await refused(nc, webhook(url))
        assert failure.field in ("connection.url", "connection"), failure
        assert reason in failure.message, failure.message
        # Loopback stays usable: a receiver on the same machine (local setups, tests).
        for local in ("http://127.0.0.1:9/hook", "http://localhost:9/hook", "http://[::1]:9/"):
            await apply(nc, webhook(local), dry_run=True)


async def test_private_addresses_need_the_setting(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    async with running(CLASSES, nats_server.url, tmp_path, nc, allow_private_destinations=True):
        for url in ("http://10.1.2.3/hook", "http://169.254.10.1/"):
            await apply(nc, webhook(url), dry_run=True)
        failure = await refused(nc, webhook("file:///etc/passwd"))
        assert "only http and https" in failure.message


async def test_secrets_come_only_from_cdp_secret_variables(
    nats_server: NatsServer, nc: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CDP_INGEST_TOKEN", "the-ingest-token")
    async with running(CLASSES, nats_server.url, tmp_path, nc):
        for variable in ("CDP_INGEST_TOKEN", "HOME", "CDP_SECRET_", "CDP_SECRETX"):
            failure = await refused(nc, webhook("http://127.0.0.1:9/", secret=variable))
            assert failure.field == "secrets.signing_secret", variable
            assert "environment variables named CDP_SECRET_*" in failure.message
        spec = webhook("http://127.0.0.1:9/")
        spec["connection"]["_allow_private"] = True
        failure = await refused(nc, spec)
        assert failure.field == "connection._allow_private"
        await apply(nc, webhook("http://127.0.0.1:9/", secret="CDP_SECRET_HOOK"), dry_run=True)

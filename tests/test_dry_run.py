"""`cdp apply --dry-run` on a fresh platform: each object is checked against what is stored
plus the objects of the same file (or files) planned before it, and nothing is created."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from nats.aio.client import Client
from typer.testing import CliRunner

from ops.cli.apply import apply_objects, load_file, load_files
from ops.cli.client import ClientError
from ops.cli.main import app
from ops.natsd import NatsServer
from services.destination.service import DestinationService
from services.ingest.service import IngestService
from services.profile.service import ProfileService
from services.scheduler.service import SchedulerService
from services.segmentation.service import SegmentationService
from shared import admin, subjects
from shared.admin import (
    AdminFailure,
    ApplyMany,
    ConfigObject,
    GetRequest,
    GetResult,
    object_name,
)
from shared.resources import OWNERS
from shared.runtime import Service
from tests.helpers import RETAIL_CONFIG, ROOT, settings_for

pytestmark = pytest.mark.asyncio
RETAIL_DESTINATIONS = ROOT / "examples" / "retail" / "destinations.yaml"
CLASSES: tuple[type[Service], ...] = (
    IngestService,
    ProfileService,
    SegmentationService,
    DestinationService,
    SchedulerService,
)


@pytest_asyncio.fixture
async def fresh(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[None]:
    """The services that own configuration, started with nothing configured."""
    services = [c(settings_for(c.name, nats_server.url, tmp_path)) for c in CLASSES]
    try:
        for svc in services:
            await svc.start()
        yield
    finally:
        for svc in reversed(services):
            await svc.stop()


async def configured(nc: Client, kind: str) -> set[str]:
    got = await admin.request(nc, subjects.admin(OWNERS[kind], "get"), GetRequest(kind), GetResult)
    return {str(object_name(kind, item)) for item in got.items}


async def test_the_retail_example_dry_runs_on_a_fresh_platform(
    fresh: None, nats_server: NatsServer, nc: Client
) -> None:
    objects, sources = load_files([RETAIL_CONFIG, RETAIL_DESTINATIONS])
    results = await apply_objects(nc, objects, True, "retail", sources)
    assert [(r.kind, r.name) for r in results] == [
        (o.kind, object_name(o.kind, o.spec)) for o in objects
    ]
    assert {r.action for r in results} == {"created"}
    assert {"merge_policy", "segment", "destination", "schedule"} <= {r.kind for r in results}

    runner = CliRunner()
    env = {"CDP_NATS_URL": nats_server.url}
    alone = ["apply", "-f", str(RETAIL_CONFIG), "--dry-run"]
    out = await asyncio.to_thread(runner.invoke, app, alone, env=env)
    assert out.exit_code == 0, out.output
    count = len(load_file(RETAIL_CONFIG))
    assert f"{count} objects, {count} to change" in out.output
    assert "would create merge_policy crm-first" in out.output
    both = ["apply", "-f", str(RETAIL_CONFIG), "-f", str(RETAIL_DESTINATIONS), "--dry-run"]
    out = await asyncio.to_thread(runner.invoke, app, both, env=env)
    assert out.exit_code == 0, out.output
    assert f"{len(objects)} objects, {len(objects)} to change" in out.output
    assert "would create destination sms-gold" in out.output

    # Nothing was created: not by the dry runs, not by the context they carried.
    for kind in ("schema", "dataset", "merge_policy", "segment", "destination"):
        assert await configured(nc, kind) == set(), kind
    assert "store_card" not in await configured(nc, "namespace")
    assert "segmentation-nightly" not in await configured(nc, "schedule")

    # Only the objects of the same run count: destinations alone name unknown segments.
    out = await asyncio.to_thread(
        runner.invoke, app, ["apply", "-f", str(RETAIL_DESTINATIONS), "--dry-run"], env=env
    )
    assert out.exit_code == 1
    assert f"{RETAIL_DESTINATIONS}: destination" in out.output
    assert "field segments: unknown segments" in out.output


async def test_a_dry_run_still_refuses_what_is_neither_stored_nor_in_the_file(
    fresh: None, nc: Client, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "schemas:\n"
        "  - {name: s1, class: profile, fields: {crm_id: {type: string, identity: crm_id}}}\n"
        "datasets:\n  - {name: d1, schema: s1}\n"
        "merge_policies:\n"
        "  - {name: d1-first, type: dataset_precedence, datasets: [d1, nope]}\n"
    )
    with pytest.raises(ClientError) as failure:
        await apply_objects(nc, load_file(bad), dry_run=True, file=str(bad))
    assert str(failure.value) == (
        f"{bad}: merge_policy \"d1-first\": field datasets[1]: unknown dataset 'nope'"
    )
    segments = tmp_path / "segments.yaml"
    segments.write_text(
        "segments:\n  - {name: s, expression: 'loyalty.tier = \"gold\"', merge_policy: nope}\n"
    )
    with pytest.raises(ClientError) as failure:
        await apply_objects(nc, load_file(segments), dry_run=True, file=str(segments))
    assert str(failure.value) == (
        f"{segments}: segment \"s\": field merge_policy: unknown merge policy 'nope'"
    )
    # ... while a merge policy of the same file is known to the segment that names it.
    good = tmp_path / "good.yaml"
    good.write_text("merge_policies:\n  - {name: nope, type: timestamp}\n" + segments.read_text())
    results = await apply_objects(nc, load_file(good), dry_run=True, file=str(good))
    assert [(r.kind, r.action) for r in results] == [
        ("merge_policy", "created"),
        ("segment", "created"),
    ]
    assert await configured(nc, "segment") == set()


async def test_context_counts_in_dry_runs_only(fresh: None, nc: Client) -> None:
    policy = {"name": "p", "type": "dataset_precedence", "datasets": ["ghost"]}
    context = [ConfigObject("dataset", {"name": "ghost", "schema": "s"})]
    dry = ApplyMany([ConfigObject("merge_policy", policy)], dry_run=True, context=context)
    await admin.request(nc, subjects.admin("profile", "apply"), dry, dict)
    real = ApplyMany([ConfigObject("merge_policy", policy)], dry_run=False, context=context)
    with pytest.raises(AdminFailure) as failure:
        await admin.request(nc, subjects.admin("profile", "apply"), real, dict)
    assert "unknown dataset 'ghost'" in failure.value.message
    assert await configured(nc, "merge_policy") == set()

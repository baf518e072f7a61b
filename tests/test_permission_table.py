"""The permission table (ops.security) against the platform: every durable consumer on the
server is granted to the service that made it, and every granted durable exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.cli.apply import apply_objects, load_file
from ops.cli.check import wait_landed
from ops.platform import Platform
from ops.security import CONSOLE, granted_consumers, permissions
from shared.config import SERVICES
from shared.subjects import ALL_STREAMS, PROFILE_LOOKUP
from tests.helpers import RETAIL_CONFIG

pytestmark = [pytest.mark.asyncio]


@pytest.mark.timeout(120)
async def test_every_durable_is_granted_to_its_maker_and_every_grant_is_used(
    tmp_path: Path,
) -> None:
    """Scenario: the six services in process, the retail example's configuration applied,
    one event followed through every stage; then the durables on every stream."""
    async with Platform(tmp_path / "var", in_process=True) as platform:
        nc = await platform.connect("test-permission-table")
        try:
            await apply_objects(
                nc, load_file(RETAIL_CONFIG), dry_run=False, file=str(RETAIL_CONFIG)
            )
            await nc.publish("cdp.ingest.web", b'{"eventType": "web.pageview", "ecid": "e1"}')
            assert (await wait_landed(nc, timeout=30)).landed
            js = nc.jetstream()
            on_server = {
                (spec.name, info.config.durable_name)
                for spec in ALL_STREAMS
                for info in await js.consumers_info(spec.name)
                if info.config.durable_name
            }
        finally:
            await nc.close()
        made_by = {
            (runner.spec.stream.name, runner.spec.name): name
            for name, svc in platform.services.items()
            for runner in svc.runners
        }
    granted = granted_consumers()
    unknown = sorted(d for d in on_server if d not in made_by)
    assert unknown == [], "durables no service made"
    not_granted = sorted(
        (maker, *durable)
        for durable, maker in made_by.items()
        if durable not in granted.get(maker, set())
    )
    assert not_granted == [], "durables made by a service the table does not grant them to"
    # Made only when ingest instances share the stream (tests/test_ingest_instances.py).
    shared_only = {("CDP_INGEST", "ingest-shared")}
    unused = {d for grants in granted.values() for d in grants} - on_server - shared_only
    assert unused == set(), "granted durables that no service makes"


async def test_every_console_request_is_one_a_service_serves() -> None:
    """The console's grants name requests some service answers: a grant nobody serves is a
    typo the console would only find as a timeout."""
    served = {f"cdp.admin.{name}." for name in SERVICES}
    for subject in permissions(CONSOLE).publish:
        if subject == PROFILE_LOOKUP:
            continue
        area = subject.split(".")[2]
        assert area == "*" or any(subject.startswith(p) for p in served), subject
        assert area == "*" or f"cdp.admin.{area}.>" in permissions(area).subscribe, subject

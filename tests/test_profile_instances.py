"""The profile service as several instances (`CDP_INSTANCE`), each holding some partitions:
a journey delivered while instances join, leave and die ends in the state one instance
reaches (the journeys' model, which the single-instance suite holds the platform to).

Ingest, identity, segmentation and destination run in this process (one instance each,
segmentation and destination read every partition); each profile instance is a process
of its own with its own data folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError

from ops.cli import people
from ops.natsd import NatsServer, free_port
from services.destination.service import DestinationService
from services.identity.service import IdentityService
from services.ingest.service import IngestService
from services.segmentation.service import SegmentationService
from shared import admin, subjects
from shared.admin import ApplyMany, ApplyManyResult, ConfigObject
from shared.runtime.coordination import ensure_buckets
from shared.runtime.partition_state import partition_path
from shared.runtime.partitions import lease_key
from shared.runtime.snapshots import ensure_snapshot_buckets
from shared.streams import ensure_streams
from shared.subjects import LEASES_BUCKET, partition_of
from tests.helpers import eventually, running
from tests.journeys import SEGMENTS, DeleteStep, Journey, RecordStep, big_journey
from tests.test_equivalence import Platform, assert_matches_model, batch_job, burst, landed

pytestmark = [pytest.mark.asyncio]

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 8
TTL = 4.0
NOW = time.time()
OTHERS = (IngestService, IdentityService, SegmentationService, DestinationService)


class ProfileInstance:
    """One profile process, its own data folder and log."""

    def __init__(self, name: str, nats_url: str, tmp: Path) -> None:
        self.name = name
        self.log = tmp / f"profile-{name}.log"
        self.env = {
            **os.environ,
            "CDP_NATS_URL": nats_url,
            "CDP_DATA_DIR": str(tmp / f"profile-{name}"),
            "CDP_PROFILE_PORT": str(free_port()),
            "CDP_INSTANCE": name,
            "CDP_PARTITIONS": str(PARTITIONS),
            "CDP_SNAPSHOT_INTERVAL": "1",
            "CDP_SNAPSHOT_EVERY": "100",
            "CDP_LOG_FORMAT": "json",
            "CDP_LOG_LEVEL": "info",
            "PYTHONPATH": str(ROOT),
        }
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.profile",
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 60)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


async def _holders(nc: Client) -> dict[int, str]:
    kv = await nc.jetstream().key_value(LEASES_BUCKET)
    out: dict[int, str] = {}
    for p in range(PARTITIONS):
        try:
            e = await kv.get(lease_key("profile", p))
        except KeyNotFoundError:
            continue
        if e.value:
            out[p] = e.value.decode()
    return out


async def _held_by(nc: Client, names: set[str]) -> bool:
    """Every partition held, by exactly these instances."""
    holders = await _holders(nc)
    return len(holders) == PARTITIONS and set(holders.values()) == names


def _chunks(journey: Journey, n: int) -> list[Journey]:
    size = -(-len(journey.steps) // n)
    return [
        Journey(journey.prefix, journey.steps[i : i + size], journey.now)
        for i in range(0, len(journey.steps), size)
    ]


def without_merges(journey: Journey) -> Journey:
    """The journey's CRM rows, logins (each on a cookie of its own) and deletes: every
    record carries one person's identities, so no two profiles ever merge and no identity
    moves."""
    steps: list[RecordStep | DeleteStep] = []
    for step in journey.steps:
        if isinstance(step, DeleteStep) or step.dataset == "crm":
            steps.append(step)
        elif step.dataset == "web" and "email" in step.payload:
            url = step.payload["page"]["url"]
            steps.append(RecordStep("web", {**step.payload, "ecid": f"{journey.prefix}c{url}"}))
    return Journey(journey.prefix, steps, journey.now)


async def _deliver_while_moving(
    nc: Client, tmp: Path, journey: Journey, instances: Sequence[ProfileInstance]
) -> None:
    """Two instances; a third joins; one leaves (SIGTERM); one dies (SIGKILL); a chunk of
    the journey delivered (and landed) at each stage."""
    a, b, c = instances
    first, second, third, fourth = _chunks(journey, 4)
    await burst(nc, first)
    await c.start()
    await eventually(lambda: _held_by(nc, {"a", "b", "c"}), timeout=60)
    await burst(nc, second)
    assert await b.stop() == 0, b.text()[-3000:]
    await eventually(lambda: _held_by(nc, {"a", "c"}), timeout=60)
    await burst(nc, third)
    await a.kill()
    await eventually(lambda: _held_by(nc, {"c"}), timeout=60)
    await burst(nc, fourth)


async def _a_folded_id_leads_to_its_survivor(nc: Client, data: Path) -> None:
    """A lookup by the id of a profile folded into one of another partition answers with
    the survivor (the folded id's partition names it, the routing asks its partition)."""
    folds: dict[str, str] = {}
    for p in range(PARTITIONS):
        path = partition_path(data, "profile", p)
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            folds.update(
                db.execute(
                    "SELECT profile_id, folded_into FROM profiles WHERE folded_into IS NOT NULL"
                ).fetchall()
            )
    across = [
        f for f, s in folds.items() if partition_of(f, PARTITIONS) != partition_of(s, PARTITIONS)
    ]
    assert across, "no merge crossed partitions"
    folded = across[0]
    survivor = folded
    while survivor in folds:
        survivor = folds[survivor]
    view = await people.profile(nc, "", None, 1, profile_id=folded)
    assert view["profile_id"] == survivor


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "journey",
    [
        pytest.param(without_merges(big_journey("pi-", NOW, 120, seed=5)), id="no-merges"),
        pytest.param(big_journey("pm-", NOW, 150, seed=7), id="merges"),
    ],
)
async def test_profile_instances_that_join_leave_and_die_hold_what_one_instance_holds(
    nats_server: NatsServer, nc: Client, tmp_path: Path, journey: Journey
) -> None:
    js = nc.jetstream()
    await ensure_streams(js)
    await ensure_snapshot_buckets(js)
    await ensure_buckets(js, instance_ttl=TTL, lease_ttl=TTL)
    a, b, c = (ProfileInstance(n, nats_server.url, tmp_path) for n in ("a", "b", "c"))
    try:
        await a.start()
        await b.start()
        await eventually(lambda: _held_by(nc, {"a", "b"}), timeout=60)
        data = tmp_path / "data"
        async with running(OTHERS, nats_server.url, data, nc):
            await admin.request(
                nc,
                subjects.admin("segmentation", "apply"),
                ApplyMany(
                    [
                        ConfigObject("segment", {"name": n, "expression": e})
                        for n, e in SEGMENTS.items()
                    ]
                ),
                ApplyManyResult,
            )
            await _deliver_while_moving(nc, tmp_path, journey, (a, b, c))
            await landed(nc)
            await batch_job(nc)
            await assert_matches_model(Platform(nc, data), journey, "three profile instances")
            handed = (await js.stream_info(subjects.STREAM_HANDOFFS.name)).state.messages
            assert (handed > 0) == (journey.prefix == "pm-"), handed
            if handed:
                await _a_folded_id_leads_to_its_survivor(nc, tmp_path / "profile-c")
    finally:
        for i in (a, b, c):
            await i.kill()
    assert "partition acquired" in c.text()

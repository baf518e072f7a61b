"""Segmentation end to end: segments applied as configuration, streaming membership events
after an ingest publish, time-based exits, batch jobs, inSegment chains, estimates."""

from __future__ import annotations

import asyncio
import csv
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from nats.aio.client import Client
from nats.aio.msg import Msg
from typer.testing import CliRunner

from ops.cli import people
from ops.cli.ingest import run_batch
from ops.cli.main import app
from ops.natsd import NatsServer
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
    EstimateRequest,
    EstimateResult,
    Invalid,
    JobInfo,
    JobList,
    JobRun,
    LandedRequest,
    LandedResult,
    ListRequest,
    PublishedSegment,
    SegmentList,
)
from shared.messages import MembershipEvent
from shared.runtime import Service
from tests.helpers import eventually, running

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parent.parent
CLASSES: tuple[type[Service], ...] = (
    IngestService,
    IdentityService,
    ProfileService,
    SegmentationService,
)


@pytest_asyncio.fixture
async def platform(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> AsyncIterator[dict[str, Service]]:
    async with running(CLASSES, nats_server.url, tmp_path, nc) as services:
        yield services


async def apply_segments(nc: Client, *segments: dict[str, Any]) -> ApplyManyResult:
    return await admin.request(
        nc,
        subjects.admin("segmentation", "apply"),
        ApplyMany([ConfigObject("segment", s) for s in segments]),
        ApplyManyResult,
    )


async def segment_list(nc: Client) -> dict[str, Any]:
    result = await admin.request(
        nc, subjects.admin("segmentation", "list"), ListRequest(), SegmentList
    )
    return {s.name: s for s in result.segments}


class Inbox:
    """Membership events as a subscribing application receives them."""

    def __init__(self) -> None:
        self.events: list[MembershipEvent] = []

    async def on_msg(self, msg: Msg) -> None:
        self.events.append(msgspec.json.decode(msg.data, type=MembershipEvent))

    def of(self, segment: str) -> list[tuple[str, str]]:
        return [(e.profile_id, e.status) for e in self.events if e.segment == segment]


async def landed(nc: Client, *stages: str) -> None:
    """Wait until everything published to the ingest stream so far has passed `stages`."""
    result = await admin.request(
        nc,
        subjects.admin("ingest", "landed"),
        LandedRequest(timeout=60.0, stages=list(stages)),
        LandedResult,
        timeout=70.0,
    )
    assert result.landed, f"not landed: {result.missing}"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


async def test_a_streaming_membership_event_follows_an_ingest_publish(
    platform: dict[str, Service], nc: Client
) -> None:
    await apply_segments(
        nc,
        {"name": "gold", "expression": 'loyalty.tier = "gold"'},
        {"name": "gold-fr", "expression": 'inSegment("gold") and homeAddress.country = "FR"'},
    )
    listed = await segment_list(nc)
    assert listed["gold"].method == "streaming" and listed["gold-fr"].method == "streaming"
    inbox = Inbox()
    await nc.subscribe(subjects.MEMBERSHIP_ALL, cb=inbox.on_msg)
    js = nc.jetstream()
    await js.publish(
        "cdp.ingest.crm",
        json.dumps(
            {"crm_id": "G1", "email": "g@example.com", "homeAddress": {"country": "FR"}}
        ).encode(),
    )
    await js.publish(
        "cdp.ingest.loyalty",
        json.dumps({"loyalty_id": "L9", "crm_id": "G1", "loyalty": {"tier": "gold"}}).encode(),
    )
    await eventually(lambda: _true(len(inbox.of("gold-fr")) == 1))
    event = next(e for e in inbox.events if e.segment == "gold")
    assert event.status == "realized" and event.method == "streaming"
    assert {(i.namespace, i.value) for i in event.identities} >= {
        ("crm_id", "G1"),
        ("loyalty_id", "L9"),
    }
    assert inbox.of("gold-fr") == [(event.profile_id, "realized")]
    # Written back to the profile, and an exit when the tier drops.
    view = await _settled(
        nc, "crm_id:G1", lambda v: {"gold", "gold-fr"} <= {m["segment"] for m in v["memberships"]}
    )
    assert {m["segment"] for m in view["memberships"]} == {
        "gold",
        "gold-fr",
        "gold-members",  # from the example configuration
    }
    await js.publish(
        "cdp.ingest.loyalty",
        json.dumps({"loyalty_id": "L9", "crm_id": "G1", "loyalty": {"tier": "silver"}}).encode(),
    )
    await eventually(lambda: _true(inbox.of("gold-fr")[-1:] == [(event.profile_id, "exited")]))
    assert inbox.of("gold")[-1] == (event.profile_id, "exited")


async def test_a_time_based_exit_happens_on_its_own(
    platform: dict[str, Service], nc: Client
) -> None:
    await apply_segments(
        nc, {"name": "just-viewed", "expression": 'event(type = "web.pageview") within 1 minute'}
    )
    inbox = Inbox()
    await nc.subscribe(subjects.membership("just-viewed"), cb=inbox.on_msg)
    viewed = time.time() - 57  # qualifies now, leaves the window in about 3 seconds
    await nc.jetstream().publish(
        "cdp.ingest.web",
        json.dumps({"ecid": "t-1", "eventType": "web.pageview", "timestamp": iso(viewed)}).encode(),
    )
    await eventually(lambda: _true([s for _, s in inbox.of("just-viewed")] == ["realized"]))
    await eventually(
        lambda: _true([s for _, s in inbox.of("just-viewed")] == ["realized", "exited"]),
        timeout=20,
    )
    exited = inbox.events[-1]
    assert exited.at >= viewed + 60


async def test_cycles_are_refused_and_chains_follow_dependencies(
    platform: dict[str, Service], nc: Client
) -> None:
    await apply_segments(
        nc,
        {"name": "a", "expression": "person.gender exists"},
        {"name": "b", "expression": 'inSegment("a")'},
    )
    with pytest.raises(AdminFailure) as cycle:
        await apply_segments(nc, {"name": "a", "expression": 'inSegment("b")'})
    assert cycle.value.code == "cycle" and "a -> b -> a" in cycle.value.message
    with pytest.raises(AdminFailure) as syntax:
        await apply_segments(nc, {"name": "c", "expression": "person.age >=\n  and x = 1"})
    assert syntax.value.field == "expression"
    assert "line 2, column 3" in syntax.value.message
    with pytest.raises(AdminFailure) as unknown:
        await apply_segments(nc, {"name": "d", "expression": 'inSegment("nope")'})
    assert "nope" in unknown.value.message


async def test_a_pathological_pattern_cannot_stall_segmentation(
    platform: dict[str, Service], nc: Client
) -> None:
    """`^(a+)+$` on many `a` and a `!` backtracks exponentially with Python's `re`: the
    record is evaluated at once, and the record after it too."""
    with pytest.raises(AdminFailure) as backreference:
        await apply_segments(nc, {"name": "twice", "expression": r'email matches "(.)\\1"'})
    assert backreference.value.field == "expression"
    assert "RE2" in backreference.value.message and "backreferences" in backreference.value.message
    assert "twice" not in await segment_list(nc)
    await apply_segments(
        nc,
        {"name": "all-a", "expression": 'person.name.first matches "^(a+)+$"'},
        {"name": "not-all-a", "expression": 'not (person.name.first matches "^(a+)+$")'},
    )
    inbox = Inbox()
    await nc.subscribe(subjects.MEMBERSHIP_ALL, cb=inbox.on_msg)
    js = nc.jetstream()
    for crm_id, first in (("P1", "a" * 60 + "!"), ("P2", "aaaa")):
        record = {"crm_id": crm_id, "person": {"name": {"first": first}}}
        await js.publish("cdp.ingest.crm", json.dumps(record).encode())
    await eventually(lambda: _true(len(inbox.of("all-a")) == 1 and len(inbox.of("not-all-a")) == 1))
    stalled = await people.profile(nc, "crm_id:P1", None, 0)
    plain = await people.profile(nc, "crm_id:P2", None, 0)
    assert inbox.of("not-all-a") == [(stalled["profile_id"], "realized")]
    assert inbox.of("all-a") == [(plain["profile_id"], "realized")]


async def test_segments_are_published_on_the_config_stream_and_policies_known_from_it(
    platform: dict[str, Service], nc: Client
) -> None:
    """A segment applied is on `cdp.config.segment.<name>` with its method; one naming a
    merge policy profile published (the example's `crm-first`) is accepted, one naming a
    policy nobody published is refused; a policy applied just before is known at once."""
    js = nc.jetstream()
    await apply_segments(
        nc, {"name": "crm-gold", "expression": 'loyalty.tier = "gold"', "merge_policy": "crm-first"}
    )
    msg = await js.get_last_msg(subjects.STREAM_CONFIG.name, subjects.config("segment", "crm-gold"))
    published = msgspec.json.decode(msg.data or b"", type=PublishedSegment)
    assert (published.merge_policy, published.method, published.deleted) == (
        "crm-first",
        "streaming",
        False,
    )
    with pytest.raises(Invalid) as unknown:
        await apply_segments(
            nc, {"name": "odd", "expression": "person.age > 1", "merge_policy": "nobody"}
        )
    assert unknown.value.field == "merge_policy"
    policy = {"name": "loyalty-first", "type": "dataset_precedence", "datasets": ["loyalty"]}
    await admin.request(
        nc,
        subjects.admin("profile", "apply"),
        ApplyMany([ConfigObject("merge_policy", policy)]),
        ApplyManyResult,
    )
    await apply_segments(
        nc, {"name": "odd", "expression": "person.age > 1", "merge_policy": "loyalty-first"}
    )


def _population(path: Path, n: int) -> set[str]:
    """CRM rows; returns the crm ids that `country in [FR, BE] and email consent y` selects."""
    countries = ["FR", "BE", "US", "DE", "GB"]
    selected = set()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["crm_id", "email", "homeAddress.country", "consents.marketing.email", "person.gender"]
        )
        for i in range(n):
            country = countries[(i * 7) % 5]
            consent = "y" if (i * 13) % 3 else "n"
            crm = f"P{i:05d}"
            w.writerow([crm, f"p{i}@example.com", country, consent, "female" if i % 2 else "male"])
            if country in ("FR", "BE") and consent == "y":
                selected.add(crm)
    return selected


@pytest.mark.timeout(180)
async def test_streaming_and_batch_agree_on_20000_profiles(
    platform: dict[str, Service], nc: Client, tmp_path: Path
) -> None:
    expression = 'homeAddress.country in ["FR", "BE"] and consents.marketing.email = "y"'
    await apply_segments(
        nc,
        {"name": "eu-optin", "expression": expression},
        {"name": "buyers", "expression": 'event(type = "commerce.purchase") within 30 days'},
    )
    listed = await segment_list(nc)
    assert (listed["eu-optin"].method, listed["buyers"].method) == ("streaming", "batch")
    await apply_segments(
        nc, {"name": "browsed-today", "expression": 'event(type = "web.pageview") within 1 day'}
    )
    expected = _population(tmp_path / "crm.csv", 10_000)
    info = await run_batch(nc, "crm", tmp_path / "crm.csv", "csv", lambda _i: None, timeout=90)
    assert info.status == "success"
    # 10,000 visitors more: a page view an hour ago (in the window) or three days ago (out).
    now = time.time()
    recent = {i for i in range(10_000) if i % 4 != 0}
    _visits(tmp_path / "web.jsonl", recent, now)
    info = await run_batch(nc, "web", tmp_path / "web.jsonl", "jsonl", lambda _i: None, timeout=90)
    assert info.status == "success"
    await eventually(lambda: _members(nc, "eu-optin", len(expected)), timeout=90)
    await eventually(lambda: _members(nc, "browsed-today", len(recent)), timeout=90)
    streaming_members = await _member_ids(platform, "eu-optin")
    assert len(streaming_members) == len(expected)
    browsing_members = await _member_ids(platform, "browsed-today")
    assert len(browsing_members) == len(recent)
    estimate = await admin.request(
        nc,
        subjects.admin("segmentation", "estimate"),
        EstimateRequest(expression, 2000),
        EstimateResult,
    )
    assert estimate.sample == 2000 and estimate.profiles == 20_000
    assert abs(estimate.estimate - len(expected)) < 0.1 * 20_000
    # An order makes a buyer only when the batch job runs.
    await nc.jetstream().publish(
        "cdp.ingest.store-orders",
        json.dumps(
            {
                "loyalty_id": "LB",
                "eventType": "commerce.purchase",
                "timestamp": iso(time.time() - 86400),
                "commerce": {"order": {"id": "O", "total": 10.0, "currency": "EUR"}},
            }
        ).encode(),
    )
    await nc.jetstream().publish(
        "cdp.ingest.loyalty", json.dumps({"loyalty_id": "LB", "crm_id": "P00001"}).encode()
    )
    await landed(nc, "identity", "profile", "segmentation")
    assert (await segment_list(nc))["buyers"].members == 0
    job = await admin.request(nc, subjects.admin("segmentation", "job.run"), JobRun(), JobInfo)
    assert job.total == 20_000

    async def done() -> bool:
        jobs = await admin.request(
            nc, subjects.admin("segmentation", "jobs"), ListRequest(), JobList
        )
        return jobs.jobs[0].status == "succeeded"

    await eventually(done, timeout=120)
    final = (
        await admin.request(nc, subjects.admin("segmentation", "jobs"), ListRequest(), JobList)
    ).jobs[0]
    assert final.scanned == 20_000
    assert final.counts["eu-optin"] == {"members": len(expected), "realized": 0, "exited": 0}
    assert final.counts["browsed-today"] == {"members": len(recent), "realized": 0, "exited": 0}
    assert await _member_ids(platform, "browsed-today") == browsing_members
    assert final.counts["buyers"]["members"] == 1
    assert await _member_ids(platform, "eu-optin") == streaming_members


def _visits(path: Path, recent: set[int], now: float) -> None:
    """10,000 visitors: a page view an hour ago for those in `recent`, else three days ago."""
    with open(path, "w") as f:
        for i in range(10_000):
            when = now - 3600 if i in recent else now - 3 * 86400
            event = {"ecid": f"v{i}", "eventType": "web.pageview", "timestamp": iso(when)}
            f.write(json.dumps(event) + "\n")


async def _members(nc: Client, segment: str, n: int) -> bool:
    return bool((await segment_list(nc))[segment].members >= n)


async def _member_ids(platform: dict[str, Service], segment: str) -> set[str]:
    rows = await platform["segmentation"].db.execute_fetchall(
        "SELECT profile_id FROM memberships WHERE segment = ? AND status IN "
        "('realized', 'existing')",
        (segment,),
    )
    return {str(r[0]) for r in rows}


async def _settled(nc: Client, identity: str, check: Any) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    async def ok() -> bool:
        try:
            view = await people.profile(nc, identity, None, 0)
        except AdminFailure:
            return False
        if check(view):
            found.append(view)
            return True
        return False

    await eventually(ok)
    return found[-1]


async def _true(value: bool) -> bool:
    return value


async def test_a_segment_reads_the_profile_through_its_merge_policy(
    platform: dict[str, Service], nc: Client
) -> None:
    # The CRM and the loyalty system disagree on updated_at; the default policy takes the
    # newest (loyalty's), the example's crm-first policy takes the CRM's.
    await apply_segments(
        nc,
        {
            "name": "crm-view",
            "expression": 'updated_at = "2026-01-01T00:00:00Z"',
            "merge_policy": "crm-first",
        },
        {"name": "default-view", "expression": 'updated_at = "2026-01-01T00:00:00Z"'},
    )
    with pytest.raises(AdminFailure) as bad:
        await apply_segments(
            nc, {"name": "x", "expression": "crm_id exists", "merge_policy": "nope"}
        )
    assert bad.value.field == "merge_policy"
    js = nc.jetstream()
    await js.publish(
        "cdp.ingest.crm",
        json.dumps({"crm_id": "V1", "updated_at": "2026-01-01T00:00:00Z"}).encode(),
    )
    await js.publish(
        "cdp.ingest.loyalty",
        json.dumps(
            {"loyalty_id": "LV1", "crm_id": "V1", "updated_at": "2026-06-01T00:00:00Z"}
        ).encode(),
    )
    view = await _settled(nc, "crm_id:V1", lambda v: "loyalty_id" in v["attributes"])
    assert view["attributes"]["updated_at"] == "2026-06-01T00:00:00Z"
    await eventually(lambda: _members(nc, "crm-view", 1))
    assert (await segment_list(nc))["default-view"].members == 0


async def _tier(nc: Client, n: int, tier: str) -> None:
    body = {"loyalty_id": f"T{n}", "loyalty": {"tier": tier}}
    await nc.jetstream().publish("cdp.ingest.loyalty", json.dumps(body).encode())


async def _gold_counts(nc: Client, want: tuple[int, int, int]) -> bool:
    gold = (await segment_list(nc))["gold"]
    return (gold.realized, gold.existing, gold.exited) == want


async def test_the_segment_list_counts_members_by_status_and_the_days_entries_and_exits(
    platform: dict[str, Service], nc: Client, nats_server: NatsServer
) -> None:
    await apply_segments(nc, {"name": "gold", "expression": 'loyalty.tier = "gold"'})
    await _tier(nc, 1, "gold")
    await _tier(nc, 2, "gold")
    await eventually(lambda: _gold_counts(nc, (2, 0, 0)))
    job = await admin.request(nc, subjects.admin("segmentation", "job.run"), JobRun(), JobInfo)
    assert job.job_id
    await eventually(lambda: _gold_counts(nc, (0, 2, 0)))  # the job confirmed both
    await _tier(nc, 3, "gold")
    await _tier(nc, 2, "silver")
    await eventually(lambda: _gold_counts(nc, (1, 1, 1)))
    gold = (await segment_list(nc))["gold"]
    assert gold.members == 2
    assert len(gold.entered_24h) == len(gold.exited_24h) == 24
    # T1 entered (its confirmation keeps the time it entered), T3 entered, T2 left.
    assert (sum(gold.entered_24h), sum(gold.exited_24h)) == (2, 1)
    assert gold.entered_24h[-1] + gold.entered_24h[-2] == 2  # this hour (or the one before)
    # `cdp segments` shows them.
    env = {"CDP_NATS_URL": nats_server.url, "COLUMNS": "240"}
    shown = await asyncio.to_thread(CliRunner().invoke, app, ["segments"], env=env)
    assert shown.exit_code == 0, shown.output
    cells = [line.replace("┃", "│").split("│") for line in shown.output.splitlines()]
    table = [[c.strip() for c in line[1:-1]] for line in cells if len(line) > 2]
    header, gold_row = table[0], next(r for r in table if r[0] == "gold")
    shown_counts = {col: gold_row[header.index(col)] for col in header[2:6]}
    assert shown_counts == {"members": "2", "realized": "1", "existing": "1", "exited": "1"}

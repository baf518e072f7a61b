"""Segmentation's steps at the handler level: real SQLite, no NATS (StepHarness)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import msgspec
import pytest
import pytest_asyncio

from services.segmentation.catalog import Catalog, compile_segment
from services.segmentation.handlers import Handlers
from services.segmentation.store import MIGRATIONS, SegmentationStore
from shared import subjects
from shared.admin import JobInfo, JobRun
from shared.db import Tx
from shared.messages import (
    ChangeEnvelope,
    ChangeItem,
    ExperienceEvent,
    Identity,
    MembershipChange,
    MembershipEvent,
    MembershipItem,
    PrivacyDelete,
    Probe,
    ProfileChanged,
    ProfileDeleted,
    ProfileMerged,
    members_batch_decoder,
    msgpack_encoder,
)
from shared.resources import MergePolicy, Segment
from shared.runtime.actor import Delivery, Outgoing
from shared.runtime.harness import StepHarness, StepOutput

pytestmark = pytest.mark.asyncio
PARTITIONS = 4


class Segmentation:
    """The segmentation steps on one harness, with a catalog of segments."""

    def __init__(self, h: StepHarness, *segments: Segment) -> None:
        self.h = h
        self.store = SegmentationStore(h.db)
        catalog = Catalog()
        for seg in segments:
            catalog.put(compile_segment(seg))
        self.handlers = Handlers(self.store, catalog, partitions=PARTITIONS)

    def changes(self, *items: ChangeItem) -> Delivery:
        return self.h.delivery(
            subjects.changes(0), msgpack_encoder.encode(ChangeEnvelope(list(items)))
        )


@pytest_asyncio.fixture
async def seg() -> AsyncIterator[Segmentation]:
    async with StepHarness.open(MIGRATIONS) as h:
        yield Segmentation(h, Segment(name="gold", expression='loyalty.tier = "gold"'))


def gold(profile_id: str = "p1", record: str = "r1") -> ProfileChanged:
    return ProfileChanged(
        profile_id=profile_id,
        record_ids=[record],
        at=1_700_000_000.0,
        attributes={"loyalty": {"tier": "gold"}},
        changed=["loyalty.tier"],
    )


def memberships(messages: list[Outgoing]) -> list[tuple[str, str]]:
    events = [msgspec.json.decode(m.payload, type=MembershipEvent) for m in messages]
    return [(e.profile_id, e.status) for e in events]


async def test_a_change_realizes_a_segment_and_emits_one_membership_event(
    seg: Segmentation,
) -> None:
    out = await seg.h.run(seg.handlers.changes, [seg.changes(gold())])
    assert memberships(out.on(subjects.membership("gold"))) == [("p1", "realized")]
    stored = await seg.store.memberships(["p1"])
    assert [(m.segment, m.status) for m in stored] == [("gold", "realized")]


async def test_the_same_change_delivered_again_emits_nothing_new(seg: Segmentation) -> None:
    await seg.h.run(seg.handlers.changes, [seg.changes(gold())])
    again = await seg.h.run(seg.handlers.changes, [seg.changes(gold())])
    assert again.on(subjects.MEMBERSHIP_PREFIX) == []
    assert again.handled == 1


async def test_a_profile_that_no_longer_qualifies_exits(seg: Segmentation) -> None:
    await seg.h.run(seg.handlers.changes, [seg.changes(gold())])
    silver = msgspec.structs.replace(gold(), attributes={"loyalty": {"tier": "silver"}})
    out = await seg.h.run(seg.handlers.changes, [seg.changes(silver)])
    assert memberships(out.on(subjects.membership("gold"))) == [("p1", "exited")]


async def test_a_job_request_publishes_its_done_event_once(seg: Segmentation) -> None:
    await seg.h.run(seg.handlers.changes, [seg.changes(gold("p1"), gold("p2", "r2"))])
    request = msgspec.json.encode(JobRun(trigger="schedule", job_id="daily-1"))
    started = await seg.h.run(
        seg.handlers.job_requests, [seg.h.delivery(subjects.SEGMENTATION_JOB_RUN, request)]
    )
    rechecks = started.on(subjects.CHANGES_PREFIX)
    assert rechecks and started.on(subjects.SEGMENTATION_JOB_DONE) == []
    ran = await seg.h.run(
        seg.handlers.changes, [seg.h.delivery(m.subject, m.payload) for m in rechecks]
    )
    done = ran.on(subjects.SEGMENTATION_JOB_DONE)
    assert len(done) == 1
    info = msgspec.json.decode(done[0].payload, type=JobInfo)
    assert (info.job_id, info.status, info.scanned) == ("daily-1", "succeeded", 2)
    assert info.counts["gold"] == {"members": 2, "realized": 0, "exited": 0}
    twice = await seg.h.run(
        seg.handlers.job_requests, [seg.h.delivery(subjects.SEGMENTATION_JOB_RUN, request)]
    )
    assert twice.messages == []


async def test_a_job_counts_every_segment_those_nobody_is_in_too() -> None:
    async with StepHarness.open(MIGRATIONS) as h:
        seg = Segmentation(
            h,
            Segment(name="gold", expression='loyalty.tier = "gold"'),
            Segment(name="platinum", expression='loyalty.tier = "platinum"'),
        )
        await h.run(seg.handlers.changes, [seg.changes(gold())])
        request = msgspec.json.encode(JobRun(trigger="manual", job_id="j-1"))
        started = await h.run(
            seg.handlers.job_requests, [h.delivery(subjects.SEGMENTATION_JOB_RUN, request)]
        )
        rechecks = [h.delivery(m.subject, m.payload) for m in started.on(subjects.CHANGES_PREFIX)]
        ran = await h.run(seg.handlers.changes, rechecks)
        info = msgspec.json.decode(ran.on(subjects.SEGMENTATION_JOB_DONE)[0].payload, type=JobInfo)
        assert info.counts == {
            "gold": {"members": 1, "realized": 0, "exited": 0},
            "platinum": {"members": 0, "realized": 0, "exited": 0},
        }


async def test_a_job_over_no_profile_is_done_at_once(seg: Segmentation) -> None:
    request = msgspec.json.encode(JobRun(job_id="empty"))
    out = await seg.h.run(
        seg.handlers.job_requests, [seg.h.delivery(subjects.SEGMENTATION_JOB_RUN, request)]
    )
    [done] = out.on(subjects.SEGMENTATION_JOB_DONE)
    assert msgspec.json.decode(done.payload, type=JobInfo).status == "succeeded"


async def test_a_job_asked_for_while_another_runs_is_recorded_as_failed(
    seg: Segmentation,
) -> None:
    await seg.h.run(seg.handlers.changes, [seg.changes(gold())])
    first = msgspec.json.encode(JobRun(job_id="one"))
    second = msgspec.json.encode(JobRun(job_id="two"))
    out = await seg.h.run(
        seg.handlers.job_requests,
        [
            seg.h.delivery(subjects.SEGMENTATION_JOB_RUN, first),
            seg.h.delivery(subjects.SEGMENTATION_JOB_RUN, second),
        ],
    )
    [done] = out.on(subjects.SEGMENTATION_JOB_DONE)
    info = msgspec.json.decode(done.payload, type=JobInfo)
    assert (info.job_id, info.status) == ("two", "failed")
    assert info.error == "segmentation job one is still running"


async def test_a_merge_policy_on_the_config_stream_becomes_known(seg: Segmentation) -> None:
    policy = MergePolicy(name="crm-first", type="dataset_precedence", datasets=["crm"])
    d = seg.h.delivery(subjects.config("merge_policy", "crm-first"), msgspec.json.encode(policy))
    await seg.h.run(seg.handlers.policies, [d])
    assert await seg.store.has_policy("crm-first")
    assert not await seg.store.has_policy("other")


# -- the internal membership envelopes (cdp.x.members.<partition>) --------------------------
def envelopes(out: StepOutput) -> list[tuple[str, list[MembershipItem]]]:
    return [
        (m.subject, members_batch_decoder.decode(m.payload).items)
        for m in out.on(subjects.MEMBERS_PREFIX + ".")
    ]


def said(items: list[MembershipItem]) -> list[MembershipEvent]:
    return [i.event for i in items if isinstance(i, MembershipChange)]


async def test_the_envelopes_carry_the_public_events_one_per_partition(seg: Segmentation) -> None:
    pids = ("p1", "p2", "p3", "p4", "p5")
    parts = sorted({subjects.partition_of(pid, PARTITIONS) for pid in pids})
    assert len(parts) < len(pids), "two of the profiles share a partition"
    out = await seg.h.run(
        seg.handlers.changes,
        [seg.changes(*(gold(pid, f"r-{pid}") for pid in pids))],
    )
    public = [
        msgspec.json.decode(m.payload, type=MembershipEvent) for m in out.on("cdp.membership.")
    ]
    batches = envelopes(out)
    assert [subject for subject, _ in batches] == [subjects.members(p) for p in parts]
    for subject, items in batches:
        for e in said(items):
            assert subject == subjects.members(subjects.partition_of(e.profile_id, PARTITIONS))
    assert sorted(e.profile_id for _, items in batches for e in said(items)) == sorted(
        e.profile_id for e in public
    )
    assert {e.profile_id: e for _, items in batches for e in said(items)} == {
        e.profile_id: e for e in public
    }, "the same changes as the public events, field for field"


async def test_a_folded_profiles_exits_are_published_before_the_survivors_realizations(
    seg: Segmentation,
) -> None:
    assert subjects.partition_of("p1", PARTITIONS) != subjects.partition_of("p2", PARTITIONS)
    silver = msgspec.structs.replace(gold("p1"), attributes={"loyalty": {"tier": "silver"}})
    await seg.h.run(seg.handlers.changes, [seg.changes(gold("p2", "r2"), silver)])
    survivor = msgspec.structs.replace(gold("p1", "r3"), folded=["p2"])
    out = await seg.h.run(
        seg.handlers.changes,
        [seg.changes(ProfileMerged("p1", ["p2"], 1_700_000_001.0), survivor)],
    )
    in_order = [
        (e.profile_id, e.status, e.merged_into) for _, items in envelopes(out) for e in said(items)
    ]
    assert in_order == [("p2", "exited", "p1"), ("p1", "realized", None)]
    public = [
        msgspec.json.decode(m.payload, type=MembershipEvent) for m in out.on("cdp.membership.")
    ]
    assert [(e.profile_id, e.status, e.merged_into) for e in public] == in_order


async def test_a_privacy_delete_follows_the_exits_of_the_profiles_it_removes(
    seg: Segmentation,
) -> None:
    """A merge folds p2 (a member) into p1, then the person is deleted, in one step: p2's
    exit is published before the delete that removes both."""
    silver = msgspec.structs.replace(gold("p1"), attributes={"loyalty": {"tier": "silver"}})
    await seg.h.run(seg.handlers.changes, [seg.changes(gold("p2", "r2"), silver)])
    request = PrivacyDelete(
        request_id="rq", identity=Identity("email", "p1@example.com"), requested_at=1.0
    )
    deleted = ProfileDeleted(["p1", "p2"], request)
    out = await seg.h.run(
        seg.handlers.changes,
        [seg.changes(ProfileMerged("p1", ["p2"], 1_700_000_001.0), deleted)],
    )
    flat = [i for _, items in envelopes(out) for i in items]
    assert [type(i) for i in flat] == [MembershipChange, ProfileDeleted]
    assert [(e.profile_id, e.status) for e in said(flat)] == [("p2", "exited")]
    assert out.on(subjects.PRIVACY_MEMBERSHIP), "the public subject still says it"


async def test_a_probe_goes_behind_the_changes_of_its_partition(seg: Segmentation) -> None:
    part = subjects.partition_of("p1", PARTITIONS)
    probe = Probe("pr", partition=part, partitions=PARTITIONS)
    out = await seg.h.run(seg.handlers.changes, [seg.changes(gold("p1"), probe)])
    [(subject, items)] = envelopes(out)
    assert subject == subjects.members(part)
    assert [type(i) for i in items] == [MembershipChange, Probe]
    assert out.on(subjects.MEMBERSHIP_PROBE), "applications still see the probe"


async def test_a_privacy_delete_that_removes_no_profile_still_goes_in_an_envelope(
    seg: Segmentation,
) -> None:
    """The person's identity was no one's any more: the destination still hears of the
    delete (and reports it)."""
    request = PrivacyDelete(
        request_id="rq0", identity=Identity("email", "gone@example.com"), requested_at=1.0
    )
    out = await seg.h.run(seg.handlers.changes, [seg.changes(ProfileDeleted([], request))])
    assert [items for _, items in envelopes(out)] == [[ProfileDeleted([], request)]]


# -- changes that carry events only (same_view) -------------------------------------------------
def _cart(profile_id: str, record: str, *, at: float) -> ProfileChanged:
    """A change with one cart.add event and no view: the profile's view is as stored."""
    return ProfileChanged(
        profile_id=profile_id,
        record_ids=[record],
        at=at,
        events=[
            ExperienceEvent(
                record_id=record, dataset="web", event_type="cart.add", timestamp=at, payload={}
            )
        ],
        same_view=True,
    )


async def test_a_change_without_its_view_is_evaluated_on_the_view_stored() -> None:
    """The CRM change of a US customer is in one step, her cart.add (events only) in a
    later one and in a burst after it: she is realized in a segment that reads both, with
    the identities of her stored view, and the stored view is not overwritten."""
    now = time.time()
    us_cart = Segment(
        name="us-cart",
        expression='homeAddress.country = "US" and event(type = "cart.add") within 1 day',
    )
    async with StepHarness.open(MIGRATIONS) as h:
        s = Segmentation(h, us_cart)
        crm = ProfileChanged(
            profile_id="p1",
            record_ids=["c1"],
            at=now - 60,
            attributes={"homeAddress": {"country": "US"}},
            changed=["homeAddress.country"],
            identities=[Identity("email", "ada@example.com")],
        )
        await h.run(s.handlers.changes, [s.changes(crm)])
        out = await h.run(
            s.handlers.changes,
            [s.changes(_cart("p1", "e1", at=now)), s.changes(_cart("p2", "e2", at=now))],
        )
        events = [
            msgspec.json.decode(m.payload, type=MembershipEvent)
            for m in out.on(subjects.membership("us-cart"))
        ]
        assert [(e.profile_id, e.status, e.identities) for e in events] == [
            ("p1", "realized", [Identity("email", "ada@example.com")])
        ], "p2, whose view segmentation never had, is not evaluated"
        facts = {f.profile_id: f for f in await s.store.facts(["p1"], views=False)}
        assert facts["p1"].attributes == {"homeAddress": {"country": "US"}}
        assert facts["p1"].identities == [Identity("email", "ada@example.com")]


async def _run_job(seg: Segmentation, job_id: str) -> None:
    request = msgspec.json.encode(JobRun(trigger="manual", job_id=job_id))
    started = await seg.h.run(
        seg.handlers.job_requests, [seg.h.delivery(subjects.SEGMENTATION_JOB_RUN, request)]
    )
    rechecks = [seg.h.delivery(m.subject, m.payload) for m in started.on(subjects.CHANGES_PREFIX)]
    await seg.h.run(seg.handlers.changes, rechecks)


async def test_member_counts_follow_realizations_a_confirming_job_and_an_exit(
    seg: Segmentation,
) -> None:
    await seg.h.run(seg.handlers.changes, [seg.changes(gold("p1"), gold("p2", "r2"))])
    assert (await seg.store.member_counts())["gold"].realized == 2
    await _run_job(seg, "confirm")  # p1 and p2 still qualify: existing now
    await seg.h.run(seg.handlers.changes, [seg.changes(gold("p3", "r3"))])
    silver = msgspec.structs.replace(gold("p2", "r4"), attributes={"loyalty": {"tier": "silver"}})
    await seg.h.run(seg.handlers.changes, [seg.changes(silver)])
    counts = (await seg.store.member_counts())["gold"]
    assert (counts.realized, counts.existing, counts.exited) == (1, 1, 1)
    day = (await seg.store.hourly_changes(time.time()))["gold"]
    # p1 entered and was confirmed (its entry stays), p3 entered, p2 left.
    assert (sum(day.entered), sum(day.exited)) == (2, 1)
    assert len(day.entered) == len(day.exited) == 24


async def test_hourly_changes_put_each_membership_in_the_clock_hour_it_changed(
    seg: Segmentation,
) -> None:
    now = 1_700_000_000 // 3600 * 3600 + 1800.0  # half past an hour
    rows = [  # (profile, status, hours ago)
        ("now", "realized", 0),
        ("hour-ago", "realized", 1),
        ("confirmed", "existing", 1),
        ("left", "exited", 2),
        ("first-hour", "realized", 23),
        ("too-old", "realized", 24),
        ("left-long-ago", "exited", 30),
    ]
    tx = Tx()
    for pid, status, ago in rows:
        at = now - ago * 3600
        seg.store.put_membership(
            tx, pid, "gold", status, since=at, last_qualified=None, method="streaming", now=at
        )
    await seg.store.commit(tx)
    day = (await seg.store.hourly_changes(now))["gold"]
    assert day.entered == [1] + [0] * 21 + [2, 1]
    assert day.exited == [0] * 21 + [1, 0, 0]
    counts = (await seg.store.member_counts())["gold"]
    assert (counts.realized, counts.existing, counts.exited) == (4, 1, 2)
    assert await seg.store.hourly_changes(now + 48 * 3600) == {}

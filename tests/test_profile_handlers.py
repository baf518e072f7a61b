"""The profile actor's steps at the handler level: deliveries in, a real SQLite, the
messages it would publish out; no NATS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.profile.config import ProfileConfig
from services.profile.handlers import ProfileHandlers
from services.profile.store import MIGRATIONS, ProfileStore
from shared import subjects
from shared.messages import (
    ChangeEnvelope,
    ChangeItem,
    Deleted,
    Fragment,
    Identity,
    MembershipChange,
    MembershipEnvelope,
    MembershipEvent,
    MembershipItem,
    Merged,
    PrivacyDelete,
    Probe,
    ProfileChanged,
    ProfileDeleted,
    ProfileEnvelope,
    ProfileItem,
    ProfileMerged,
    Reassigned,
    Record,
    msgpack_encoder,
    privacy_report_decoder,
    probe_report_decoder,
)
from shared.resources import MergePolicy
from shared.runtime.actor import Delivery
from shared.runtime.harness import StepHarness, StepOutput

PARTITIONS = 4
NOW = 1_700_000_000.0
_json = msgspec.json.Encoder()


@asynccontextmanager
async def profile_steps() -> AsyncIterator[tuple[StepHarness, ProfileHandlers]]:
    async with StepHarness.open(MIGRATIONS) as h:
        yield h, ProfileHandlers(ProfileStore(h.db), ProfileConfig(), partitions=PARTITIONS)


def items(h: StepHarness, *batch: ProfileItem) -> Delivery:
    return h.delivery(subjects.profiles(0), msgpack_encoder.encode(ProfileEnvelope(list(batch))))


def record(
    rid: str, payload: dict[str, Any], *ids: Identity, ts: float = NOW, event: bool = False
) -> Record:
    return Record(
        record_id=rid,
        dataset="web" if event else "crm",
        ingested_at=ts,
        payload=payload,
        identities=list(ids),
        record_class="event" if event else "profile",
        timestamp=ts,
        event_type="page.view" if event else None,
    )


def changes(out: StepOutput) -> list[ChangeItem]:
    return [
        i
        for m in out.on(subjects.CHANGES_PREFIX)
        for i in msgspec.msgpack.decode(m.payload, type=ChangeEnvelope).items
    ]


async def table(h: StepHarness, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await h.db.execute_fetchall(sql, params)]


ADA = Identity("email", "ada@example.com")
ADA_PHONE = Identity("crm_id", "A1")
TABLET = Identity("ecid", "tablet")
ADA_KEY = "email:ada@example.com"


@pytest.mark.asyncio
async def test_the_records_of_one_profile_merge_into_one_profile_row() -> None:
    async with profile_steps() as (h, handlers):
        out = await h.run(
            handlers.on_items,
            [
                items(h, Fragment("p1", record("r1", {"name": "Ada", "tier": "gold"}, ADA))),
                items(
                    h,
                    Fragment("p1", record("r2", {"tier": "platinum"}, ADA_PHONE, ts=NOW + 1)),
                    Fragment("p1", record("e1", {"page": "/"}, ADA, event=True), anchor=ADA_KEY),
                ),
            ],
        )
        assert await table(h, "SELECT profile_id, folded_into FROM profiles") == [("p1", None)]
        assert await table(h, "SELECT namespace, value FROM identities ORDER BY 1") == [
            ("crm_id", "A1"),
            ("email", "ada@example.com"),
        ]
        assert await table(h, "SELECT record_id, profile_id FROM events") == [("e1", "p1")]
        [change] = changes(out)
        assert isinstance(change, ProfileChanged)
        assert (change.profile_id, change.record_ids) == ("p1", ["r1", "r2", "e1"])
        assert change.attributes == {"name": "Ada", "tier": "platinum"}
        assert [e.record_id for e in change.events] == ["e1"]


async def two_profiles(h: StepHarness, handlers: ProfileHandlers) -> None:
    await h.run(
        handlers.on_items,
        [
            items(
                h,
                Fragment("p1", record("a1", {"name": "Ada"}, ADA)),
                Fragment("p1", record("ae", {"page": "/a"}, ADA, event=True), anchor=ADA_KEY),
                Fragment("p2", record("t1", {"city": "Lyon"}, TABLET, ts=NOW + 1)),
                Fragment(
                    "p2", record("te", {"page": "/t"}, TABLET, event=True), anchor="ecid:tablet"
                ),
            )
        ],
    )


@pytest.mark.asyncio
async def test_a_fold_moves_the_folded_profiles_attributes_and_events_to_the_survivor() -> None:
    async with profile_steps() as (h, handlers):
        await two_profiles(h, handlers)
        out = await h.run(handlers.on_items, [items(h, Merged("p1", ["p2"], NOW + 2))])
        assert await table(h, "SELECT profile_id, folded_into FROM profiles ORDER BY 1") == [
            ("p1", None),
            ("p2", "p1"),
        ]
        assert await table(h, "SELECT DISTINCT profile_id FROM attributes") == [("p1",)]
        assert await table(h, "SELECT record_id, profile_id FROM events ORDER BY 1") == [
            ("ae", "p1"),
            ("te", "p1"),
        ]
        merged, changed = changes(out)
        assert merged == ProfileMerged("p1", ["p2"], NOW + 2), "the fold goes first"
        assert isinstance(changed, ProfileChanged)
        assert changed.attributes == {"name": "Ada", "city": "Lyon"}
        assert changed.folded == ["p2"]


@pytest.mark.asyncio
async def test_a_fold_delivered_again_changes_nothing_and_is_announced_once() -> None:
    async with profile_steps() as (h, handlers):
        await two_profiles(h, handlers)
        fold = Merged("p1", ["p2"], NOW + 2)
        await h.run(handlers.on_items, [items(h, fold)])
        before = await stored(h)
        again = await h.run(handlers.on_items, [items(h, fold)])
        assert await stored(h) == before
        assert not [c for c in changes(again) if isinstance(c, ProfileMerged)]


@pytest.mark.asyncio
async def test_records_delivered_again_leave_the_profile_as_it_was() -> None:
    async with profile_steps() as (h, handlers):
        await two_profiles(h, handlers)
        before = await stored(h)
        await two_profiles(h, handlers)
        assert await stored(h) == before


def membership(profile_id: str, segment: str, status: str, at: float) -> MembershipChange:
    event = MembershipEvent(
        profile_id=profile_id, segment=segment, status=status, at=at, method="streaming"
    )
    return MembershipChange(event)


def members(h: StepHarness, *batch: MembershipItem, partition: int = 0) -> Delivery:
    envelope = MembershipEnvelope(list(batch))
    return h.delivery(subjects.members(partition), msgpack_encoder.encode(envelope))


@pytest.mark.asyncio
async def test_a_membership_write_back_updates_the_memberships_of_live_profiles() -> None:
    async with profile_steps() as (h, handlers):
        await two_profiles(h, handlers)
        await h.run(handlers.on_items, [items(h, Merged("p1", ["p2"], NOW + 2))])
        await h.run(
            handlers.on_memberships,
            [
                members(
                    h,
                    membership("p1", "vip", "realized", NOW + 3),
                    membership("p2", "vip", "realized", NOW + 3),  # folded
                ),
                members(
                    h,
                    membership("p9", "vip", "realized", NOW + 3),  # unknown
                    membership("p1", "vip", "exited", NOW + 1),  # older
                    partition=1,
                ),
            ],
        )
        assert await table(h, "SELECT profile_id, segment, status FROM memberships") == [
            ("p1", "vip", "realized")
        ]
        await h.run(
            handlers.on_memberships, [members(h, membership("p1", "vip", "exited", NOW + 4))]
        )
        assert await table(h, "SELECT status FROM memberships") == [("exited",)]


@pytest.mark.asyncio
async def test_a_privacy_delete_removes_the_profile_and_reports_what_it_removed() -> None:
    async with profile_steps() as (h, handlers):
        await two_profiles(h, handlers)
        await h.run(
            handlers.on_memberships,
            [members(h, membership("p1", "vip", "realized", NOW))],
        )
        request = PrivacyDelete(request_id="rq1", identity=ADA, requested_at=NOW + 5)
        out = await h.run(
            handlers.on_items, [items(h, Deleted(["p1"], request, person_keys=[ADA_KEY]))]
        )
        for name in ("profiles", "attributes", "events", "identities", "memberships"):
            assert await table(h, f"SELECT 1 FROM {name} WHERE profile_id = 'p1'") == [], name
        [sent] = out.on(subjects.privacy_report("rq1", "profile"))
        report = privacy_report_decoder.decode(sent.payload)
        assert (report.service, report.profile_ids) == ("profile", ["p1"])
        assert report.removed == {"attributes": 1, "events": 1, "identities": 1, "memberships": 1}
        assert [c for c in changes(out) if isinstance(c, ProfileDeleted)] == [
            ProfileDeleted(["p1"], request)
        ], "segmentation hears of it once"
        assert await table(h, "SELECT profile_id FROM profiles") == [("p2",)]


@pytest.mark.asyncio
async def test_a_merge_policy_on_the_config_stream_is_stored_and_followed() -> None:
    async with profile_steps() as (h, handlers):
        policy = MergePolicy("crm-first", "dataset_precedence", datasets=["crm"], default=True)
        wrong = MergePolicy("other", "timestamp")
        await h.run(
            handlers.on_policies,
            [
                h.delivery(subjects.config("merge_policy", "crm-first"), _json.encode(policy)),
                h.delivery(subjects.config("merge_policy", "not-other"), _json.encode(wrong)),
            ],
        )
        assert handlers.config.policy_list() == [policy]
        assert handlers.config.default_policy() == policy
        assert await table(h, "SELECT name FROM merge_policies") == [("crm-first",)]


# -- the batch equals its items one at a time ------------------------------------------------
async def stored(h: StepHarness) -> dict[str, list[tuple[Any, ...]]]:
    """The profile state as stored, times of writing left out."""
    queries = {
        "profiles": "SELECT profile_id, folded_into FROM profiles",
        "attributes": "SELECT profile_id, dataset, path, value, ts, record_id FROM attributes",
        "identities": "SELECT namespace, value, profile_id FROM identities",
        "events": "SELECT record_id, profile_id, anchor, dataset, ts, payload FROM events",
        "carried": "SELECT key, record_id, profile_id, kind FROM carried",
        "memberships": "SELECT profile_id, segment, status FROM memberships",
    }
    state = {name: sorted(await table(h, sql)) for name, sql in queries.items()}
    # A fold chain (a folded into b, b into c) and the index of carried records name
    # profiles that every reader follows to their survivor: compared as followed.
    into = {pid: folded for pid, folded in state["profiles"] if folded is not None}

    def follow(pid: str) -> str:
        while pid in into:
            pid = into[pid]
        return pid

    state["profiles"] = sorted((pid, follow(pid)) for pid, _ in state["profiles"])
    state["carried"] = sorted((k, rid, follow(pid), kind) for k, rid, pid, kind in state["carried"])
    return state


class _Journey:
    """Items as the identity service sends them: an identity is held by one profile at a
    time, a fold joins two live profiles, a split moves identities the source holds, and
    nothing names a deleted profile again."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data
        self.redirect: dict[str, str] = {}
        self.owner: dict[str, str] = {}
        """identity key -> the profile holding it"""
        self.live: list[str] = []
        self.fresh = 0
        self.clock = NOW

    def root(self, pid: str) -> str:
        while pid in self.redirect:
            pid = self.redirect[pid]
        return pid

    def new_profile(self) -> str:
        self.fresh += 1
        pid = f"p{self.fresh}"
        self.live.append(pid)
        return pid

    def held(self, pid: str) -> list[str]:
        return sorted(k for k, p in self.owner.items() if p == pid)

    def item(self, n: int) -> ProfileItem:
        draw = self.data.draw
        self.clock += draw(st.sampled_from([0.0, 1.0]))  # ties happen
        kinds = ["fragment"] * 4 + (["fold", "split"] if len(self.live) > 1 else [])
        kinds += ["delete"] if self.live else []
        kind = "fragment" if not self.live else draw(st.sampled_from(kinds))
        if kind == "fold":
            survivor, folded = draw(st.permutations(self.live))[:2]
            self.live.remove(folded)
            self.redirect[folded] = survivor
            for k in self.held(folded):
                self.owner[k] = survivor
            # an id folded before may name the folded profile
            named = draw(
                st.sampled_from([folded, *[p for p, s in self.redirect.items() if s == folded]])
            )
            return Merged(survivor, [named], self.clock)
        if kind == "split":
            source = draw(st.sampled_from(self.live))
            keys = self.held(source)
            if keys:
                moved = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=2, unique=True))
                to = draw(st.sampled_from([None, *[p for p in self.live if p != source], "new"]))
                target = self.new_profile() if to == "new" else to
                for k in moved:
                    if target is None:
                        del self.owner[k]
                    else:
                        self.owner[k] = target
                ids = [Identity(*k.split(":", 1)) for k in moved]
                return Reassigned(source, target, ids, "split", self.clock)
        if kind == "delete":
            gone = draw(st.sampled_from(self.live))
            self.live.remove(gone)
            persons = [k for k in self.held(gone) if k.startswith("crm_id:")]
            for k in self.held(gone):
                del self.owner[k]
            request = PrivacyDelete(
                request_id=f"rq{n}", identity=Identity("crm_id", "x"), requested_at=self.clock
            )
            return Deleted([gone], request, person_keys=persons)
        # a record of a live profile (a new one, or one named by any of its ids)
        if not self.live or (draw(st.booleans()) and len(self.live) < 4):
            pid = self.new_profile()
        else:
            pid = draw(st.sampled_from(self.live))
        names = [pid, *[p for p in self.redirect if self.root(p) == pid]]
        named = draw(st.sampled_from(names))
        keys = self.held(pid)
        if not keys or draw(st.booleans()):
            keys = [*keys, f"{draw(st.sampled_from(['crm_id', 'ecid']))}:{n}"]
        key = draw(st.sampled_from(keys))
        self.owner[key] = pid
        ident = Identity(*key.split(":", 1))
        is_event = draw(st.booleans())
        payload = draw(
            st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 3), max_size=2)
        )
        r = record(f"r{n}", {"x": payload}, ident, ts=self.clock, event=is_event)
        persons = [key] if key.startswith("crm_id:") else []
        return Fragment(named, r, anchor=key, persons=persons)


async def _batch_and_one_by_one(batch: list[ProfileItem]) -> None:
    async with profile_steps() as (one, by_one), profile_steps() as (all_, at_once):
        await all_.run(at_once.on_items, [items(all_, *batch)])
        for item in batch:
            await one.run(by_one.on_items, [items(one, item)])
        assert await stored(all_) == await stored(one)


@settings(max_examples=60)
@given(st.data())
def test_a_fetch_applied_at_once_stores_what_its_items_one_at_a_time_store(
    data: st.DataObject,
) -> None:
    journey = _Journey(data)
    batch = [journey.item(n) for n in range(data.draw(st.integers(1, 12)))]
    asyncio.run(_batch_and_one_by_one(batch))


# -- membership envelopes (cdp.x.members.<partition>) ----------------------------------
@pytest.mark.asyncio
async def test_a_membership_envelope_reports_its_probe_after_writing_the_changes_before_it() -> (
    None
):
    async with profile_steps() as (h, handlers):
        await two_profiles(h, handlers)
        probe = Probe("pr1", partition=2, partitions=PARTITIONS)
        out = await h.run(
            handlers.on_memberships,
            [members(h, membership("p1", "vip", "realized", NOW), probe, partition=2)],
        )
        assert await table(h, "SELECT profile_id, segment FROM memberships") == [("p1", "vip")]
        [(subject, payload)] = out.notes
        report = probe_report_decoder.decode(payload)
        assert subject == subjects.probe_report("pr1")
        assert (report.stage, report.partition, report.partitions) == (
            "profile-memberships",
            2,
            PARTITIONS,
        )
        assert out.messages == [], "the write-back publishes nothing"


@pytest.mark.asyncio
async def test_a_privacy_delete_in_a_membership_envelope_changes_nothing_in_the_profile() -> None:
    async with profile_steps() as (h, handlers):
        await two_profiles(h, handlers)
        before = await stored(h)
        request = PrivacyDelete(request_id="rq1", identity=ADA, requested_at=NOW)
        out = await h.run(handlers.on_memberships, [members(h, ProfileDeleted(["p1"], request))])
        assert (out.handled, out.failed) == (1, 0)
        assert await stored(h) == before


_CHANGE = st.builds(
    membership,
    st.sampled_from(["p1", "p2", "p9"]),
    st.sampled_from(["vip", "gold"]),
    st.sampled_from(["realized", "exited", "existing"]),
    st.sampled_from([NOW, NOW + 1, NOW + 2]),
)


async def _members_at_once_and_one_by_one(
    batches: list[list[MembershipChange]],
) -> None:
    async with profile_steps() as (one, by_one), profile_steps() as (all_, at_once):
        for h, handlers in ((one, by_one), (all_, at_once)):
            await two_profiles(h, handlers)
        await all_.run(at_once.on_memberships, [members(all_, *b) for b in batches])
        for change in (c for b in batches for c in b):
            await one.run(by_one.on_memberships, [members(one, change)])
        sql = "SELECT profile_id, segment, status, at FROM memberships ORDER BY 1, 2"
        assert await table(all_, sql) == await table(one, sql)


@settings(max_examples=60)
@given(st.lists(st.lists(_CHANGE, min_size=1, max_size=6), min_size=1, max_size=4))
def test_membership_envelopes_written_back_at_once_store_what_each_change_alone_stores(
    batches: list[list[MembershipChange]],
) -> None:
    asyncio.run(_members_at_once_and_one_by_one(batches))

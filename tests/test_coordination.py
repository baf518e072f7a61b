"""Several instances of a service: who owns which partition (rendezvous hashing), who is
alive (a KV registry with a TTL), who holds a lease (create/update on a revision)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from nats.aio.client import Client

from shared.runtime.coordination import Lease, Registry, assign, ensure_buckets
from tests.helpers import eventually

TTL = 1.5


# -- assignment ---------------------------------------------------------------------------
def moved(a: dict[int, str], b: dict[int, str]) -> int:
    return sum(1 for p in a if a[p] != b[p])


def test_every_instance_computes_the_same_owners_whatever_the_order_it_sees() -> None:
    live = ["profile-a", "profile-b", "profile-c"]
    first = assign(64, live, "profile")
    assert assign(64, list(reversed(live)), "profile") == first
    assert assign(64, [*live, "profile-b"], "profile") == first
    assert set(first.values()) == set(live)
    assert assign(64, [], "profile") == {}
    assert assign(8, ["solo"], "profile") == dict.fromkeys(range(8), "solo")


def test_a_join_moves_about_a_quarter_and_only_to_the_newcomer() -> None:
    three = ["i1", "i2", "i3"]
    before = assign(64, three, "profile")
    after = assign(64, [*three, "i4"], "profile")
    changed = [p for p in before if before[p] != after[p]]
    assert all(after[p] == "i4" for p in changed), "a join only takes partitions"
    assert 8 <= len(changed) <= 24, f"about 64/4 = 16 move, {len(changed)} did"


def test_a_leave_moves_only_the_leavers_partitions() -> None:
    four = ["i1", "i2", "i3", "i4"]
    before = assign(64, four, "profile")
    after = assign(64, ["i1", "i2", "i4"], "profile")
    assert {p for p in before if before[p] != after[p]} == {
        p for p, owner in before.items() if owner == "i3"
    }


def test_the_spread_is_even_enough() -> None:
    for n in (2, 3, 4, 8):
        live = [f"segmentation-{i}" for i in range(n)]
        counts = Counter(assign(256, live, "segmentation").values())
        fair = 256 / n
        assert min(counts.values()) >= fair * 0.6 and max(counts.values()) <= fair * 1.4, counts


def test_services_spread_their_partitions_independently() -> None:
    live = ["a", "b", "c"]
    assert assign(64, live, "profile") != assign(64, live, "destination")


# -- the registry ---------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_instances_appear_and_one_that_stops_heartbeating_leaves_after_the_ttl(
    nc: Client,
) -> None:
    js = nc.jetstream()
    await ensure_buckets(js, instance_ttl=TTL, lease_ttl=TTL)
    changes: list[list[str]] = []
    a = Registry(js, "profile", "profile-a", on_change=changes.append)
    b = Registry(js, "profile", "profile-b")
    other = Registry(js, "segmentation", "segmentation-a")
    await a.start()
    await b.start()
    await other.start()
    try:
        assert await a.live() == ["profile-a", "profile-b"]
        assert await a.live("segmentation") == ["segmentation-a"]

        async def a_sees(expected: list[str]) -> bool:
            return a.known == expected

        await eventually(lambda: a_sees(["profile-a", "profile-b"]), timeout=5)
        await b.stop(leave=False)  # as if killed: its key stays until the TTL drops it
        stopped = time.monotonic()
        assert await a.live() == ["profile-a", "profile-b"], "still there within the TTL"
        await eventually(lambda: a_sees(["profile-a"]), timeout=TTL * 4)
        assert time.monotonic() - stopped >= TTL * 0.5
        assert changes[-1] == ["profile-a"], "told when the live set changed"
        await other.stop()  # a planned stop leaves at once
        assert await a.live("segmentation") == []
    finally:
        for r in (a, b, other):
            await r.stop()


# -- leases -----------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_one_holder_at_a_time_and_a_stale_holder_is_fenced_off(nc: Client) -> None:
    js = nc.jetstream()
    await ensure_buckets(js, instance_ttl=TTL, lease_ttl=TTL)
    lost: list[str] = []
    first = Lease(
        js, "identity.writer", "identity-a", margin=0.3, auto_renew=False,
        on_lost=lambda: lost.append("a"),
    )  # fmt: skip
    second = Lease(js, "identity.writer", "identity-b", margin=0.3)
    try:
        assert await first.try_acquire()
        assert not await second.try_acquire(), "held by the first"
        assert first.valid() and first.token is not None
        assert await first.renew(), "the holder renews"
        assert await second.holder_of() == ("identity-a", first._revision)
        old_token = first.token

        # The first stops renewing (paused): the second takes the lease after the TTL.
        started = time.monotonic()
        await asyncio.wait_for(second.acquire(poll=0.1), timeout=TTL * 5)
        took = time.monotonic() - started
        assert took >= TTL * 0.5, f"taken after {took:.2f}s, before the lease expired"
        assert second.token is not None and second.token > old_token
        assert not first.valid(), "the local deadline passed, noticed or not"
        assert not await first.renew(), "the stale holder's renewal is refused"
        assert lost == ["a"]
        assert second.valid()

        # The second's lease is renewed by its task past the TTL.
        await asyncio.sleep(TTL * 1.5)
        assert second.valid() and not await first.try_acquire()

        # A release frees it at once; the next holding has a larger token again.
        token = second.token
        await second.release()
        assert not second.valid()
        assert await first.try_acquire() and first.token is not None and first.token > token
        await second.release()  # idempotent, and it does not free someone else's lease
        assert await first.renew()
    finally:
        await first.release()
        await second.release()

"""The profile actor's rules, pure (in memory): what they decide and the messages the
service publishes."""

from __future__ import annotations

import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.profile.merge import AttributeValue, default_policy
from services.profile.rules import Loaded, StoredEvent, apply_items
from shared.messages import (
    ExperienceEvent,
    Fragment,
    Identity,
    Merged,
    ProfileChanged,
    ProfileItem,
    Reassigned,
    Record,
    change_batch_decoder,
)
from shared.resources import MergePolicy
from shared.subjects import MAX_PAYLOAD

PARTITIONS = 8


def test_a_device_that_moves_with_many_events_fits_in_messages_nats_accepts() -> None:
    """A family tablet's cookie has browsed a lot (2,000 page views of 4.5 kB, well within
    the 10 kB event limit and the 5,000 events a profile keeps). P2 logs in on it: the cookie
    and its anonymous views move to P2. The profile service's change for P2 carries every
    view in one message of about 9 MB, above the 8 MB NATS accepts: the publish fails, is
    retried from the outbox forever, and the profile service applies nothing more, for
    anyone."""
    now = time.time()
    loaded = Loaded(known={"p-one", "p-two"})
    loaded.identities["p-one"] = {("crm_id", "P1"), ("ecid", "tab")}
    loaded.identities["p-two"] = {("crm_id", "P2")}
    for i in range(2000):
        event = ExperienceEvent(
            record_id=f"r{i:05d}",
            dataset="web",
            event_type="web.pageview",
            timestamp=now - 86400.0 + i,
            payload={"ecid": "tab", "page": {"url": f"/p/{i}", "name": "x" * 4500}},
        )
        loaded.anchored["ecid:tab"].append(StoredEvent("p-one", "ecid:tab", event))
    fx = apply_items(
        loaded,
        [Reassigned("p-one", "p-two", [Identity("ecid", "tab")], "moved", now)],
        policy=default_policy([]),
        partitions=PARTITIONS,
    )
    sizes = [len(payload) for _, payload in fx.messages]
    assert sum(sizes) > MAX_PAYLOAD, "the moved views are all published"
    assert max(sizes) <= MAX_PAYLOAD, sizes


# -- attribute rows written ---------------------------------------------------------------
_NOW = 1_700_000_000.0


def _record(rid: str, payload: dict[str, Any], *, event: bool = False, ts: float = _NOW) -> Record:
    return Record(
        record_id=rid,
        dataset="web" if event else "crm",
        ingested_at=ts,
        payload=payload,
        identities=[Identity("email", "ada@example.com")],
        record_class="event" if event else "profile",
        timestamp=ts,
        event_type="page.view" if event else None,
    )


def _stored() -> Loaded:
    """Ada (p1: name, tier) and a second profile (p2: city), as stored."""
    loaded = Loaded(known={"p1", "p2", "p3"})
    loaded.rows["p1"] = {
        ("crm", "name"): AttributeValue("crm", "name", "Ada", _NOW - 10, "r0"),
        ("crm", "tier"): AttributeValue("crm", "tier", "gold", _NOW - 10, "r0"),
    }
    loaded.rows["p2"] = {("crm", "city"): AttributeValue("crm", "city", "Lyon", _NOW - 5, "t0")}
    return loaded


def _written(items: list[ProfileItem], loaded: Loaded | None = None) -> list[tuple[str, str, Any]]:
    fx = apply_items(loaded or _stored(), items, policy=default_policy([]), partitions=PARTITIONS)
    return sorted((pid, row.path, row.value) for pid, row in fx.rows)


def test_an_event_writes_none_of_the_profiles_attribute_rows_again() -> None:
    event = _record("e1", {"page": "/"}, event=True)
    assert _written([Fragment("p1", event, anchor="email:ada@example.com")]) == []


def test_a_new_value_writes_its_row_only() -> None:
    assert _written([Fragment("p1", _record("r1", {"tier": "platinum"}))]) == [
        ("p1", "tier", "platinum")
    ]


def test_a_merge_writes_the_folded_profiles_rows_on_the_survivor() -> None:
    assert _written([Merged("p1", ["p2"], _NOW)]) == [("p1", "city", "Lyon")]


_ITEMS = st.lists(
    st.one_of(
        st.builds(
            lambda pid, key, value, n: Fragment(pid, _record(f"r{n}", {key: value}, ts=_NOW + n)),
            st.sampled_from(["p1", "p2", "p3"]),
            st.sampled_from(["name", "tier", "city"]),
            st.sampled_from(["Ada", "gold", "Lyon", "x"]),
            st.integers(-20, 20),
        ),
        st.builds(
            lambda survivor, folded: Merged(survivor, [folded], _NOW),
            st.sampled_from(["p1", "p2", "p3"]),
            st.sampled_from(["p1", "p2", "p3"]),
        ),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(_ITEMS)
def test_the_rows_left_unwritten_are_the_rows_stored(items: list[ProfileItem]) -> None:
    """Against the reference (every row of every live profile touched written again): a
    row not written is the very row stored under that profile."""
    loaded = _stored()
    stored = {(pid, key): row for pid, rows in loaded.rows.items() for key, row in rows.items()}
    fx = apply_items(loaded, items, policy=default_policy([]), partitions=PARTITIONS)
    written = {(pid, row.dataset, row.path): row for pid, row in fx.rows}
    live = {pid for pid, _ in fx.profiles}
    for pid in live:
        for key, row in loaded.rows.get(pid, {}).items():
            if (pid, *key) not in written:
                assert stored.get((pid, key)) is row, (pid, key)
    assert {pid for pid, _ in fx.rows} <= live


# -- views under other merge policies ---------------------------------------------------------
def _views_sent(items: list[ProfileItem]) -> dict[str, dict[str, dict[str, Any]]]:
    """profile id -> the views its change to segmentation carries, with a second policy
    (loyalty first) next to the default (newest first)."""
    loyalty_first = MergePolicy("loyalty-first", "dataset_precedence", datasets=["loyalty"])
    fx = apply_items(
        _stored(),
        items,
        policy=default_policy([]),
        others=[loyalty_first],
        partitions=PARTITIONS,
    )
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for subject, payload in fx.messages:
        if subject.startswith("cdp.x.changes."):
            for item in change_batch_decoder.decode(payload).items:
                if isinstance(item, ProfileChanged):
                    out[item.profile_id] = item.views
    return out


def test_a_view_that_picks_the_default_winners_is_not_sent() -> None:
    """Only the CRM has spoken for p1: both policies pick the same rows, so the change
    carries no view (segmentation reads the default attributes for it)."""
    assert _views_sent([Fragment("p1", _record("r1", {"tier": "platinum"}))]) == {"p1": {}}


def test_a_view_that_differs_from_the_default_is_sent_whole() -> None:
    """Loyalty says silver, older than the CRM's gold: the default (newest) says gold,
    loyalty-first says silver, and its view carries the whole profile under it."""
    older = _record("l1", {"tier": "silver"}, ts=_NOW - 100)
    older.dataset = "loyalty"
    assert _views_sent([Fragment("p1", older)]) == {
        "p1": {"loyalty-first": {"name": "Ada", "tier": "silver"}}
    }


# -- a change without the view (same_view) -----------------------------------------------------
def _changes_sent(items: list[ProfileItem]) -> dict[str, ProfileChanged]:
    loaded = _stored()
    loaded.identities["p1"] = {("email", "ada@example.com")}
    fx = apply_items(loaded, items, policy=default_policy([]), partitions=PARTITIONS)
    out: dict[str, ProfileChanged] = {}
    for subject, payload in fx.messages:
        if subject.startswith("cdp.x.changes."):
            for item in change_batch_decoder.decode(payload).items:
                if isinstance(item, ProfileChanged):
                    out[item.profile_id] = item
    return out


def test_events_alone_send_the_profile_without_its_view() -> None:
    """Two page views of Ada, whose identities are known: her change carries the events and
    says her view is the same; nothing is merged or encoded for it."""
    views: list[ProfileItem] = [
        Fragment("p1", _record(f"e{i}", {"page": "/"}, event=True), anchor="email:ada@example.com")
        for i in range(2)
    ]
    sent = _changes_sent(views)
    assert sent["p1"].same_view
    assert (sent["p1"].attributes, sent["p1"].identities, sent["p1"].changed) == ({}, [], [])
    assert [e.record_id for e in sent["p1"].events] == ["e0", "e1"]


def test_a_new_identity_an_attribute_or_a_merge_sends_the_whole_view() -> None:
    """An event bringing an identity the profile did not have, a profile record, a merge:
    each may change what segments see, so the change carries the whole view."""
    known = Loaded(known={"p1", "p2"})
    known.rows["p1"] = {("crm", "name"): AttributeValue("crm", "name", "Ada", _NOW - 10, "r0")}
    known.identities["p1"] = {("email", "ada@example.com")}
    event = _record("e1", {"page": "/"}, event=True)
    event.identities = [Identity("email", "ada@example.com"), Identity("cookie", "c1")]
    for items in (
        [Fragment("p1", event, anchor="email:ada@example.com")],
        [Fragment("p1", _record("r1", {"tier": "gold"}))],
        [Merged("p1", ["p2"], _NOW)],
    ):
        loaded = Loaded(known=set(known.known))
        loaded.rows["p1"] = dict(known.rows["p1"])
        loaded.identities["p1"] = set(known.identities["p1"])
        fx = apply_items(loaded, items, policy=default_policy([]), partitions=PARTITIONS)
        changes = [
            item
            for subject, payload in fx.messages
            if subject.startswith("cdp.x.changes.")
            for item in change_batch_decoder.decode(payload).items
            if isinstance(item, ProfileChanged) and item.profile_id == "p1"
        ]
        assert changes and not changes[0].same_view, items
        assert changes[0].attributes["name"] == "Ada"


_WITH_EVENTS = st.lists(
    st.one_of(
        _ITEMS.filter(bool).map(lambda items: items[0]),
        st.builds(
            lambda pid, n: Fragment(
                pid,
                _record(f"e{n}", {"page": "/"}, event=True, ts=_NOW + n),
                anchor="email:ada@example.com",
            ),
            st.sampled_from(["p1", "p2", "p3"]),
            st.integers(0, 50),
        ),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(_WITH_EVENTS)
def test_a_change_says_same_view_only_when_nothing_of_the_view_was_written(
    items: list[ProfileItem],
) -> None:
    """Whenever a profile's change leaves its view out, the fetch wrote none of that
    profile's attribute rows or identities and folded nothing into it: what segmentation
    and destination hold for it is still right."""
    loaded = _stored()
    for pid in ("p1", "p2", "p3"):
        loaded.identities[pid] = {("email", "ada@example.com")} if pid == "p1" else set()
    fx = apply_items(loaded, items, policy=default_policy([]), partitions=PARTITIONS)
    written = {pid for pid, _ in fx.rows} | {pid for _, _, pid in fx.identities}
    folded_into = {survivor for _, survivor, _ in fx.folds}
    for subject, payload in fx.messages:
        if not subject.startswith("cdp.x.changes."):
            continue
        for item in change_batch_decoder.decode(payload).items:
            if isinstance(item, ProfileChanged) and item.same_view:
                assert item.profile_id not in written | folded_into, items
                assert (item.attributes, item.identities, item.views) == ({}, [], {})

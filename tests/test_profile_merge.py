"""Profile merging, pure: what a user sees of attribute updates, merge policies and retention."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.profile.merge import (
    DEFAULT_POLICY,
    MAX_POLICIES,
    AttributeValue,
    PolicyError,
    changed_paths,
    check_policies,
    default_policy,
    flatten,
    fold_rows,
    fragment_updates,
    merge,
    merge_flat,
    record_time,
    unflatten,
)
from shared.messages import Record
from shared.resources import MergePolicy

DAY = 86400.0
NOW = 1_700_000_000.0

TIMESTAMP = MergePolicy("newest", "timestamp")
CRM_FIRST = MergePolicy("crm-first", "dataset_precedence", datasets=["crm"])


class Store:
    """The attribute rows of one profile, as the service keeps them."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], AttributeValue] = {}

    def ingest(
        self,
        dataset: str,
        payload: dict[str, Any],
        ts: float,
        record_id: str,
    ) -> list[AttributeValue]:
        updates = fragment_updates(self.rows, dataset, payload, ts, record_id)
        for v in updates:
            self.rows[v.dataset, v.path] = v
        return updates

    def profile(self, policy: MergePolicy = DEFAULT_POLICY) -> dict[str, Any]:
        return merge(self.rows.values(), policy)


# -- flatten / unflatten ------------------------------------------------------------------------


def test_flatten_nested_paths_and_arrays() -> None:
    payload = {
        "person": {"name": {"first": "Ada", "last": "Lovelace"}, "tags": ["vip", "early"]},
        "orders": [{"sku": "A1"}, {"sku": "B2"}],
        "empty": {},
        "email": None,
    }
    flat = flatten(payload)
    assert flat == {
        "person.name.first": "Ada",
        "person.name.last": "Lovelace",
        "person.tags": ["vip", "early"],
        "orders": [{"sku": "A1"}, {"sku": "B2"}],
        "email": None,
    }
    assert unflatten(flat) == {k: v for k, v in payload.items() if k != "empty"}


def test_the_keys_of_a_map_field_are_attributes_merged_one_by_one() -> None:
    s = Store()
    s.ingest("crm", {"prefs": {"lang": "fr", "tz": "CET"}}, NOW, "r1")
    s.ingest("crm", {"prefs": {"lang": "en"}}, NOW + 1, "r2")
    assert s.profile() == {"prefs": {"lang": "en", "tz": "CET"}}


def test_unflatten_prefix_conflict_deeper_path_wins() -> None:
    assert unflatten({"address": "1 Main St", "address.city": "Paris"}) == {
        "address": {"city": "Paris"}
    }
    leaf = {"lang": "fr"}
    assert unflatten({"prefs": leaf, "prefs.theme": "dark"}) == {"prefs": {"theme": "dark"}}
    assert leaf == {"lang": "fr"}, "a leaf value is never modified"


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
keys = st.text(alphabet="abcxyz_", min_size=1, max_size=4)
json_objects = st.recursive(
    st.dictionaries(keys, json_scalars | st.lists(json_scalars, max_size=3), max_size=4),
    lambda inner: st.dictionaries(keys, inner, min_size=1, max_size=3),
    max_leaves=20,
)


def _prune_empty(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        pruned = _prune_empty(v) if isinstance(v, dict) else v
        if pruned != {}:
            out[k] = pruned
    return out


@given(json_objects)
def test_unflatten_inverts_flatten(payload: dict[str, Any]) -> None:
    assert unflatten(flatten(payload)) == _prune_empty(payload)


# -- attribute updates ---------------------------------------------------------------------------


def test_crm_email_updated_by_newer_crm_record() -> None:
    s = Store()
    s.ingest("crm", {"email": "ada@old.example", "name": "Ada"}, NOW, "r1")
    s.ingest("crm", {"email": "ada@new.example"}, NOW + 60, "r2")
    assert s.profile() == {"email": "ada@new.example", "name": "Ada"}
    winner = merge_flat(s.rows.values(), DEFAULT_POLICY)["email"][1]
    assert (winner.record_id, winner.ts) == ("r2", NOW + 60)


def test_older_out_of_order_record_does_not_overwrite() -> None:
    s = Store()
    s.ingest("crm", {"email": "ada@new.example", "tier": "gold"}, NOW, "r2")
    updates = s.ingest("crm", {"email": "ada@old.example", "phone": "+331"}, NOW - 3600, "r1")
    assert [u.path for u in updates] == ["phone"], "only the path nobody newer has set"
    assert s.profile() == {"email": "ada@new.example", "tier": "gold", "phone": "+331"}


def test_equal_timestamp_last_write_wins() -> None:
    s = Store()
    s.ingest("crm", {"email": "first@example.com"}, NOW, "r1")
    s.ingest("crm", {"email": "second@example.com"}, NOW, "r2")
    assert s.profile() == {"email": "second@example.com"}


def test_null_clears_a_value() -> None:
    s = Store()
    s.ingest("crm", {"phone": "+331"}, NOW, "r1")
    s.ingest("crm", {"phone": None}, NOW + 1, "r2")
    assert s.profile() == {"phone": None}


def test_folding_two_profiles_keeps_the_newest_row_per_dataset_and_path() -> None:
    a, b = Store(), Store()
    a.ingest("crm", {"email": "old@example.com", "tier": "gold"}, NOW, "a1")
    b.ingest("crm", {"email": "new@example.com"}, NOW + 1, "b1")
    b.ingest("web", {"city": "Lyon"}, NOW - 1, "b2")
    folded = fold_rows([*a.rows.values(), *b.rows.values()])
    assert merge(folded.values(), TIMESTAMP) == {
        "email": "new@example.com",
        "tier": "gold",
        "city": "Lyon",
    }
    assert fold_rows([*b.rows.values(), *a.rows.values()]) == folded


def test_record_time_prefers_the_records_own_timestamp() -> None:
    r = Record(record_id="r", dataset="crm", ingested_at=NOW, payload={})
    assert record_time(r) == NOW
    r.timestamp = NOW - 100
    assert record_time(r) == NOW - 100


# -- merge policies -------------------------------------------------------------------------------


def two_datasets() -> Store:
    s = Store()
    s.ingest("crm", {"email": "ada@crm.example", "name": {"first": "Ada"}}, NOW - DAY, "c1")
    s.ingest("web", {"email": "ada@web.example", "city": "Lyon"}, NOW, "w1")
    return s


def test_timestamp_policy_picks_the_newest() -> None:
    assert two_datasets().profile(TIMESTAMP) == {
        "email": "ada@web.example",
        "name": {"first": "Ada"},
        "city": "Lyon",
    }


def test_dataset_precedence_picks_the_listed_dataset_even_when_older() -> None:
    assert two_datasets().profile(CRM_FIRST) == {
        "email": "ada@crm.example",
        "name": {"first": "Ada"},
        "city": "Lyon",  # an unlisted dataset fills what the listed ones lack
    }


def test_dataset_precedence_order_then_unlisted_by_time() -> None:
    s = Store()
    s.ingest("loyalty", {"tier": "silver", "email": "l@example.com"}, NOW - 10, "l1")
    s.ingest("crm", {"tier": "gold"}, NOW - 20, "c1")
    s.ingest("web", {"email": "w-old@example.com", "city": "Lyon"}, NOW - 5, "w1")
    s.ingest("app", {"email": "a@example.com", "city": "Nice"}, NOW - 1, "a1")
    policy = MergePolicy("p", "dataset_precedence", datasets=["crm", "loyalty"])
    assert s.profile(policy) == {"tier": "gold", "email": "l@example.com", "city": "Nice"}
    flat = merge_flat(s.rows.values(), policy)
    assert {p: w.dataset for p, (_, w) in flat.items()} == {
        "city": "app",
        "email": "loyalty",
        "tier": "crm",
    }
    assert list(flat) == sorted(flat)


def test_timestamp_ties_are_deterministic() -> None:
    a = AttributeValue("alpha", "x", 1, NOW, "r1")
    b = AttributeValue("beta", "x", 2, NOW, "r2")
    assert merge([a, b], TIMESTAMP) == merge([b, a], TIMESTAMP) == {"x": 2}


def test_nested_and_array_attributes_merge_per_leaf() -> None:
    s = Store()
    s.ingest("crm", {"person": {"name": {"first": "Ada", "last": "L"}}, "tags": ["a"]}, NOW, "c1")
    s.ingest("web", {"person": {"name": {"last": "Lovelace"}}, "tags": ["b", "c"]}, NOW + 1, "w1")
    assert s.profile(TIMESTAMP) == {
        "person": {"name": {"first": "Ada", "last": "Lovelace"}},
        "tags": ["b", "c"],
    }
    assert s.profile(CRM_FIRST) == {
        "person": {"name": {"first": "Ada", "last": "L"}},
        "tags": ["a"],
    }


def test_colliding_shapes_across_datasets_follow_the_policy() -> None:
    s = Store()
    s.ingest("crm", {"address": "1 Main St, Paris"}, NOW - 10, "c1")
    s.ingest("web", {"address": {"city": "Lyon", "zip": "69001"}}, NOW, "w1")
    assert s.profile(TIMESTAMP) == {"address": {"city": "Lyon", "zip": "69001"}}
    assert s.profile(CRM_FIRST) == {"address": "1 Main St, Paris"}
    assert list(merge_flat(s.rows.values(), CRM_FIRST)) == ["address"]


def test_changed_paths() -> None:
    before = {"email": "a@x", "tags": ["a"], "age": 30, "vip": True, "gone": 1}
    after = {"email": "a@x", "tags": ["a", "b"], "age": 30.0, "vip": True, "city": "Lyon"}
    assert changed_paths(before, after) == ["age", "city", "gone", "tags"]
    assert changed_paths(after, after) == []
    assert changed_paths({"x": None}, {}) == ["x"]
    assert changed_paths({"x": 1}, {"x": True}) == ["x"]


def test_changed_paths_between_two_merges() -> None:
    s = two_datasets()
    before = {p: v for p, (v, _) in merge_flat(s.rows.values(), TIMESTAMP).items()}
    s.ingest("web", {"city": "Nice", "email": "ada@web.example"}, NOW + 5, "w2")
    after = {p: v for p, (v, _) in merge_flat(s.rows.values(), TIMESTAMP).items()}
    assert changed_paths(before, after) == ["city"]


datasets = st.sampled_from(["crm", "loyalty", "web"])
paths = st.sampled_from(["email", "person.name.first", "person.name.last", "tags", "a.b.c"])
attribute_values = st.builds(
    AttributeValue,
    dataset=datasets,
    path=paths,
    value=st.integers() | st.lists(st.integers(), max_size=2) | st.none(),
    ts=st.integers(0, 5).map(float),
    record_id=st.text(alphabet="r0123", min_size=1, max_size=3),
)


@given(st.lists(attribute_values, max_size=30, unique_by=lambda v: (v.dataset, v.path)))
def test_timestamp_merge_is_the_newest_value_per_path(values: list[AttributeValue]) -> None:
    """One row per (dataset, path), as stored; ts collide often, to exercise the ties."""
    newest: dict[str, AttributeValue] = {}
    for v in values:
        held = newest.get(v.path)
        if held is None or (v.ts, v.dataset, v.record_id) > (
            held.ts,
            held.dataset,
            held.record_id,
        ):
            newest[v.path] = v
    assert merge(values, TIMESTAMP) == unflatten({p: v.value for p, v in newest.items()})
    assert merge_flat(reversed(values), TIMESTAMP) == {
        p: (v.value, v) for p, v in sorted(newest.items())
    }


# -- policy configuration --------------------------------------------------------------------------

KNOWN = {"crm", "loyalty", "web"}


def test_policy_decodes_strictly_and_encodes_compactly() -> None:
    p = msgspec.convert(
        {"name": "crm-first", "type": "dataset_precedence", "datasets": ["crm", "web"]},
        MergePolicy,
    )
    assert p == MergePolicy("crm-first", "dataset_precedence", datasets=["crm", "web"])
    assert msgspec.to_builtins(DEFAULT_POLICY) == {
        "name": "timestamp-ordered",
        "type": "timestamp",
        "default": True,
    }
    with pytest.raises(msgspec.ValidationError, match="unknown field `dataset`"):
        msgspec.convert({"name": "x", "type": "timestamp", "dataset": ["crm"]}, MergePolicy)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.type"):
        msgspec.convert({"name": "x", "type": "newest"}, MergePolicy)


def test_valid_policies_and_default() -> None:
    policies = [
        TIMESTAMP,
        MergePolicy("crm-first", "dataset_precedence", ["crm", "loyalty"], default=True),
    ]
    check_policies(policies, KNOWN)
    check_policies([], KNOWN)
    assert default_policy(policies).name == "crm-first"
    assert default_policy([TIMESTAMP]) is DEFAULT_POLICY


@pytest.mark.parametrize(
    ("policies", "path", "message"),
    [
        (
            [MergePolicy(f"p{i}", "timestamp") for i in range(MAX_POLICIES + 1)],
            "policies",
            "at most 5 merge policies, got 6",
        ),
        (
            [
                MergePolicy("a", "timestamp", default=True),
                MergePolicy("b", "timestamp"),
                MergePolicy("c", "dataset_precedence", ["crm"], default=True),
            ],
            "policies[2].default",
            "only one default",
        ),
        (
            [MergePolicy("a", "dataset_precedence", ["crm", "erp"])],
            "policies[0].datasets[1]",
            "unknown dataset 'erp'",
        ),
        (
            [TIMESTAMP, MergePolicy("a", "dataset_precedence")],
            "policies[1].datasets",
            "at least one dataset",
        ),
        (
            [MergePolicy("a", "dataset_precedence", ["crm", "web", "crm"])],
            "policies[0].datasets[2]",
            "'crm' listed twice",
        ),
        (
            [MergePolicy("a", "timestamp", ["crm"])],
            "policies[0].datasets",
            "only a dataset_precedence policy",
        ),
        (
            [MergePolicy("a", "timestamp"), MergePolicy("a", "dataset_precedence", ["crm"])],
            "policies[1].name",
            "duplicate name 'a'",
        ),
        ([MergePolicy("Bad Name", "timestamp")], "policies[0].name", "invalid name"),
    ],
)
def test_policy_errors(policies: list[MergePolicy], path: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as info:
        check_policies(policies, KNOWN)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: ")
    assert isinstance(info.value, ValueError)

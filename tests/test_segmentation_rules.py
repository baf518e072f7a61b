"""Segmentation's rules, pure (no NATS, no SQLite): the membership state machine, and the
fast paths production runs held to their references (column-wise and remembered
evaluation to `evaluate` profile by profile, `CompiledSegment.touches` to
`Reads.touches_paths`)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.segmentation.catalog import compile_segment, path_closure
from services.segmentation.evaluate import (
    Evaluation,
    ProfileFacts,
    evaluate,
    evaluate_on,
    next_change,
    next_change_of,
)
from services.segmentation.membership import Group, Transition, evaluate_many, step
from shared.messages import ExperienceEvent
from shared.resources import Segment

NOW = 1_700_000_000.0


def seg(expression: str, name: str = "s") -> Any:
    return compile_segment(Segment(name=name, expression=expression))


# -- the membership state machine --------------------------------------------------------------
def test_a_profile_that_qualifies_for_the_first_time_is_realized() -> None:
    assert step(None, True, batch=False) == Transition("realized", True)


def test_a_profile_that_exited_and_qualifies_again_is_realized() -> None:
    assert step("exited", True, batch=True) == Transition("realized", True)


def test_a_member_that_still_qualifies_keeps_its_status_in_the_stream() -> None:
    assert step("realized", True, batch=False) == Transition("realized", False)
    assert step("existing", True, batch=False) == Transition("existing", False)


def test_a_batch_job_confirms_a_member_that_still_qualifies_as_existing() -> None:
    assert step("realized", True, batch=True) == Transition("existing", False)


def test_a_member_that_no_longer_qualifies_exits() -> None:
    assert step("realized", False, batch=False) == Transition("exited", True)
    assert step("existing", False, batch=True) == Transition("exited", True)


def test_a_profile_that_neither_qualifies_nor_was_a_member_has_nothing_to_write() -> None:
    assert step(None, False, batch=False) is None
    assert step("exited", False, batch=True) is None


# -- column-wise, remembered evaluation against evaluate ------------------------------------------
EXPRESSIONS = (
    "a = 0",
    "a = false",
    "a = 0.0",
    "a = 1",
    "a != 1",
    "a >= 0",
    'a in [0, "x", true]',
    "b.c > 0",
    "b.c exists",
    "b exists",
    "not (a exists)",
    'a = "x" or b.c = true',
    'a matches "^x"',
    'inSegment("gold") and a = 1',
    'not inSegment("gold") or b.c = 0',
    'not event(type = "x") within 1 day',
    'event(type = "x") within 1 day or a = 0',
    'not (a = 0 and b.c = 0) or (inSegment("gold") and not b exists)',
    '(a = 1 or a = "x" or b.c = 1) and not inSegment("gold")',
    'count(event(type = "x") within 1 day) >= 0 and (a exists or b.c = false)',
    'not (a in [1, "x"] or (b.c startsWith "x" and not a = 0))',
)
SCALARS = st.sampled_from([0, 0.0, -0.0, False, True, 1, 1.0, 2, -1, "x", "", "xy", None])
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=2), st.dictionaries(st.just("c"), SCALARS))
ATTRIBUTES = st.fixed_dictionaries(
    {},
    optional={
        "a": st.one_of(SCALARS, VALUES),
        "b": st.one_of(st.fixed_dictionaries({"c": SCALARS}), VALUES),
    },
)
EVENT = ExperienceEvent(
    record_id="r", dataset="web", event_type="x", timestamp=NOW - 60, payload={}
)
PROFILES = st.lists(
    st.tuples(ATTRIBUTES, st.booleans(), st.booleans()).map(
        lambda t: ProfileFacts(t[0], [EVENT] if t[2] else [], {"gold"} if t[1] else set())
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(expression=st.sampled_from(EXPRESSIONS), profiles=PROFILES)
def test_column_wise_evaluation_equals_evaluation_profile_by_profile(
    expression: str, profiles: list[ProfileFacts]
) -> None:
    s = seg(expression)
    expected = {i for i, f in enumerate(profiles) if evaluate(s.node, f, NOW)}
    assert evaluate_many(s, Group(profiles), range(len(profiles)), NOW, {}) == expected


@settings(max_examples=300, deadline=None)
@given(
    expression=st.sampled_from(EXPRESSIONS),
    first=PROFILES,
    then=PROFILES,
)
def test_remembered_answers_equal_evaluation_across_groups(
    expression: str, first: list[ProfileFacts], then: list[ProfileFacts]
) -> None:
    """One memo for a whole step (two groups: two merge policies' views)."""
    s = seg(expression)
    memo: dict[tuple[Any, ...], bool] = {}
    for profiles in (first, then):
        expected = {i for i, f in enumerate(profiles) if evaluate(s.node, f, NOW)}
        assert evaluate_many(s, Group(profiles), range(len(profiles)), NOW, memo) == expected


def test_zero_zero_point_zero_and_false_do_not_share_a_remembered_answer() -> None:
    s = seg("a = 0")
    profiles = [ProfileFacts({"a": v}, [], set()) for v in (0, 0.0, False)]
    assert evaluate_many(s, Group(profiles), range(3), NOW, {}) == {0, 1}


def test_only_the_profiles_asked_about_are_answered() -> None:
    s = seg("a = 1")
    profiles = [ProfileFacts({"a": 1}, [], set()) for _ in range(4)]
    assert evaluate_many(s, Group(profiles), [1, 3], NOW, {}) == {1, 3}


# -- touches against touches_paths ----------------------------------------------------------------
PATHS = st.lists(st.sampled_from(["a", "b", "ab"]), min_size=1, max_size=3).map(".".join)


@settings(max_examples=500, deadline=None)
@given(reads=st.lists(PATHS, min_size=1, max_size=3), changed=st.sets(PATHS, max_size=4))
def test_touches_equals_touches_paths(reads: list[str], changed: set[str]) -> None:
    s = seg(" and ".join(f"{p} exists" for p in reads))
    assert s.touches(changed, path_closure(changed)) == s.reads.touches_paths(changed)


EVENT_EXPRESSIONS = (
    'event(type = "x") within 1 hour',
    'not event(type = "x") within 1 day',
    'count(event(type = "x") within 2 hours) >= 2',
    'sum(v of event(type = "y") within 1 day) > 3',
    "min(v of event() within 3 hours) < 2",
    'event(type = "x") then event(type = "y") within 1 day',
    'event(type = "y") within 1 day and not event(type = "x") within 1 hour',
    "count(event() within 7 days) >= 3",
)
EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["x", "y", "z"]),
        st.floats(min_value=-3 * 86400, max_value=3600, allow_nan=False),
        st.sampled_from([0, 1, 2.5, 4, "a"]),
    ),
    max_size=8,
).map(
    lambda rows: [
        ExperienceEvent(
            record_id=f"r{i}", dataset="web", event_type=t, timestamp=NOW + dt, payload={"v": v}
        )
        for i, (t, dt, v) in enumerate(rows)
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    expressions=st.lists(st.sampled_from(EVENT_EXPRESSIONS), min_size=1, max_size=5),
    events=EVENTS,
)
def test_one_shared_evaluation_answers_as_a_fresh_one_for_every_segment(
    expressions: list[str], events: list[ExperienceEvent]
) -> None:
    """A step shares one evaluation of a profile among its segments and between the
    result and the timer: the same answers as evaluating each segment afresh."""
    facts = ProfileFacts({}, sorted(events, key=lambda e: (e.timestamp, e.record_id)), set())
    shared = Evaluation(facts)
    for n, expression in enumerate(expressions):
        node = seg(expression, f"s{n}").node
        now_in = evaluate_on(shared, node, NOW)
        assert now_in == evaluate(node, facts, NOW)
        assert next_change_of(shared, node, NOW, now_in) == next_change(node, facts, NOW)

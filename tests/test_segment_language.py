"""The segment language, pure: grammar, AST and its JSON, errors, streaming or batch, what a
segment reads, cycles, evaluation with window edges, and time-based changes."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.segmentation.evaluate import ProfileFacts, evaluate, next_change
from services.segmentation.language import (
    AGGREGATES,
    COMPARE_OPS,
    EVER,
    STRING_FUNCS,
    And,
    Compare,
    EventAggregate,
    EventCount,
    EventExists,
    Exists,
    InList,
    InSegment,
    Method,
    Node,
    Not,
    Or,
    Reads,
    SegmentError,
    SegmentSyntaxError,
    Sequence,
    StringTest,
    Window,
    check_cycles,
    dependencies,
    from_json,
    method,
    method_reason,
    parse,
    reads,
    to_json,
    to_text,
    validate,
)
from shared.messages import ExperienceEvent

DOCS = Path(__file__).resolve().parent.parent / "docs" / "segments.md"

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
NOW = 1_781_524_800.0  # 2026-06-15T12:00:00Z
EPS = 1e-6  # a microsecond
PURCHASE = "commerce.purchase"

# The 14 examples of docs/segments.md: text, canonical JSON, method.
EXAMPLES: list[tuple[str, str, Method]] = [
    (
        'person.loyalty.tier = "gold"',
        '{"op":"compare","path":"person.loyalty.tier","operator":"=","value":"gold"}',
        "streaming",
    ),
    (
        'person.age >= 21 and homeAddress.country in ["FR", "BE"]',
        '{"op":"and","items":[{"op":"compare","path":"person.age","operator":">=","value":21},'
        '{"op":"in_list","path":"homeAddress.country","values":["FR","BE"],"negate":false}]}',
        "streaming",
    ),
    ("person.email exists", '{"op":"exists","path":"person.email"}', "streaming"),
    (
        "not person.phone exists",
        '{"op":"not","item":{"op":"exists","path":"person.phone"}}',
        "streaming",
    ),
    (
        'person.name.first startsWith "Jo"',
        '{"op":"string_test","path":"person.name.first","func":"startsWith","value":"Jo",'
        '"ignore_case":false}',
        "streaming",
    ),
    (
        'consents.marketing.email = "y"',
        '{"op":"compare","path":"consents.marketing.email","operator":"=","value":"y"}',
        "streaming",
    ),
    (
        'event(type = "commerce.purchase") within 7 days',
        '{"op":"event_exists","condition":{"op":"compare","path":"type","operator":"=",'
        '"value":"commerce.purchase"},"window":{"kind":"last","seconds":604800.0,"start":null,'
        '"end":null}}',
        "batch",
    ),
    (
        'count(event(type = "commerce.purchase") within 30 days) >= 3',
        '{"op":"event_count","condition":{"op":"compare","path":"type","operator":"=",'
        '"value":"commerce.purchase"},"window":{"kind":"last","seconds":2592000.0,"start":null,'
        '"end":null},"operator":">=","value":3}',
        "batch",
    ),
    (
        'sum(commerce.order.total of event(type = "commerce.purchase") within 90 days) > 500',
        '{"op":"event_aggregate","func":"sum","path":"commerce.order.total","condition":'
        '{"op":"compare","path":"type","operator":"=","value":"commerce.purchase"},"window":'
        '{"kind":"last","seconds":7776000.0,"start":null,"end":null},"operator":">","value":500}',
        "batch",
    ),
    (
        'event(type = "web.pageview" and page.url contains "/checkout") within 1 hour',
        '{"op":"event_exists","condition":{"op":"and","items":[{"op":"compare","path":"type",'
        '"operator":"=","value":"web.pageview"},{"op":"string_test","path":"page.url",'
        '"func":"contains","value":"/checkout","ignore_case":false}]},"window":{"kind":"last",'
        '"seconds":3600.0,"start":null,"end":null}}',
        "streaming",
    ),
    (
        'event(type = "cart.add") then event(type = "commerce.purchase") within 2 days',
        '{"op":"sequence","steps":[{"op":"compare","path":"type","operator":"=",'
        '"value":"cart.add"},{"op":"compare","path":"type","operator":"=",'
        '"value":"commerce.purchase"}],"window":{"kind":"last","seconds":172800.0,"start":null,'
        '"end":null}}',
        "batch",
    ),
    (
        'not event(type = "commerce.purchase") within 30 days',
        '{"op":"not","item":{"op":"event_exists","condition":{"op":"compare","path":"type",'
        '"operator":"=","value":"commerce.purchase"},"window":{"kind":"last",'
        '"seconds":2592000.0,"start":null,"end":null}}}',
        "batch",
    ),
    (
        'event(type = "commerce.purchase") between 2026-01-01 and 2026-03-31',
        '{"op":"event_exists","condition":{"op":"compare","path":"type","operator":"=",'
        '"value":"commerce.purchase"},"window":{"kind":"between","seconds":null,'
        '"start":"2026-01-01","end":"2026-03-31"}}',
        "batch",
    ),
    ('inSegment("gold-buyers")', '{"op":"in_segment","name":"gold-buyers"}', "batch"),
]
TEXTS = [text for text, _, _ in EXAMPLES]


def ev(event_type: str | None, ts: float, **payload: Any) -> ExperienceEvent:
    return ExperienceEvent(
        record_id=f"r-{event_type}-{ts}",
        dataset="web",
        event_type=event_type,
        timestamp=ts,
        payload=payload,
    )


def facts(
    attributes: dict[str, Any] | None = None,
    events: list[ExperienceEvent] | None = None,
    segments: set[str] | None = None,
) -> ProfileFacts:
    return ProfileFacts(attributes or {}, events or [], segments or set())


def holds(text: str, f: ProfileFacts, now: float = NOW) -> bool:
    return evaluate(parse(text), f, now)


def utc(year: int, month: int, day: int) -> float:
    return dt.datetime(year, month, day, tzinfo=dt.UTC).timestamp()


# -- the examples: JSON, round trips, methods, docs ----------------------------------------


@pytest.mark.parametrize(("text", "expected", "_method"), EXAMPLES)
def test_example_parses_to_documented_json(text: str, expected: str, _method: str) -> None:
    node = parse(text)
    assert to_json(node) == expected.encode()
    assert from_json(to_json(node)) == node
    assert parse(to_text(node)) == node
    assert to_json(parse(to_text(node))) == expected.encode()


@pytest.mark.parametrize(("text", "_json", "expected"), EXAMPLES)
def test_example_method(text: str, _json: str, expected: Method) -> None:
    assert method(parse(text)) == expected
    assert method_reason(parse(text)).startswith(expected + ": ")


def test_docs_show_the_examples_their_json_and_the_method_table() -> None:
    docs = DOCS.read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| `(.+?)` \| (streaming|batch) \|", docs, re.MULTILINE)
    assert [(text, m) for _, text, m in rows] == [(text, m) for text, _, m in EXAMPLES]
    assert [int(n) for n, _, _ in rows] == list(range(1, 15))
    for _, expected, _ in EXAMPLES:
        assert expected in docs


def test_the_examples_with_their_comments_parse() -> None:
    text = (
        'event(type = "commerce.purchase") within 7 days       -- at least one such event\n'
        "-- a comment line\n"
    )
    assert parse(text) == parse(TEXTS[6])


# -- evaluation of each example -------------------------------------------------------------


def test_attribute_examples() -> None:
    gold = facts({"person": {"loyalty": {"tier": "gold"}}})
    assert holds(TEXTS[0], gold)
    assert not holds(TEXTS[0], facts({"person": {"loyalty": {"tier": "silver"}}}))
    assert not holds(TEXTS[0], facts())

    adult_fr = {"person": {"age": 21}, "homeAddress": {"country": "FR"}}
    assert holds(TEXTS[1], facts(adult_fr))
    assert holds(TEXTS[1], facts({"person": {"age": 40.5}, "homeAddress": {"country": "BE"}}))
    assert not holds(TEXTS[1], facts({"person": {"age": 20}, "homeAddress": {"country": "FR"}}))
    assert not holds(TEXTS[1], facts({"person": {"age": 30}, "homeAddress": {"country": "DE"}}))
    assert not holds(TEXTS[1], facts({"person": {"age": "30"}, "homeAddress": {"country": "FR"}}))

    assert holds(TEXTS[2], facts({"person": {"email": "a@example.com"}}))
    assert holds(TEXTS[2], facts({"person": {"email": ""}}))
    assert not holds(TEXTS[2], facts({"person": {"email": None}}))
    assert not holds(TEXTS[2], facts({"person": "not an object"}))

    assert holds(TEXTS[3], facts({"person": {}}))
    assert not holds(TEXTS[3], facts({"person": {"phone": "+33600000000"}}))

    assert holds(TEXTS[4], facts({"person": {"name": {"first": "John"}}}))
    assert not holds(TEXTS[4], facts({"person": {"name": {"first": "john"}}}))
    assert not holds(TEXTS[4], facts({"person": {"name": {"first": 7}}}))

    assert holds(TEXTS[5], facts({"consents": {"marketing": {"email": "y"}}}))
    assert not holds(TEXTS[5], facts({"consents": {"marketing": {"email": "n"}}}))


def test_event_within_7_days_window_edges() -> None:
    text = TEXTS[6]
    assert holds(text, facts(events=[ev(PURCHASE, NOW - 7 * DAY)]))  # exactly 7 days: in
    assert not holds(text, facts(events=[ev(PURCHASE, NOW - 7 * DAY - EPS)]))
    assert holds(text, facts(events=[ev(PURCHASE, NOW)]))
    assert not holds(text, facts(events=[ev(PURCHASE, NOW + EPS)]))  # future: out
    assert not holds(text, facts(events=[ev("web.pageview", NOW - HOUR)]))
    assert not holds(text, facts(events=[ev(None, NOW - HOUR)]))


def test_count_window_edges() -> None:
    text = TEXTS[7]
    two = [ev(PURCHASE, NOW - DAY), ev(PURCHASE, NOW - 2 * DAY)]
    assert not holds(text, facts(events=two))
    assert holds(text, facts(events=[*two, ev(PURCHASE, NOW - 30 * DAY)]))
    assert not holds(text, facts(events=[*two, ev(PURCHASE, NOW - 30 * DAY - EPS)]))
    assert not holds(text, facts(events=[*two, ev("cart.add", NOW - DAY)]))
    assert holds('count(event(type = "x") within 1 day) = 0', facts())
    assert holds("count(event() within 1 day) < 1", facts())


def test_sum_and_the_other_aggregates() -> None:
    text = TEXTS[8]

    def buy(ts: float, total: Any) -> ExperienceEvent:
        return ev(PURCHASE, ts, commerce={"order": {"total": total}})

    events = [buy(NOW - DAY, 300), buy(NOW - 90 * DAY, 200.5)]
    assert holds(text, facts(events=events))
    assert not holds(text, facts(events=[buy(NOW - DAY, 300), buy(NOW - 90 * DAY - EPS, 200.5)]))
    # a missing or non-numeric total skips the event: not an error
    skipped = [*events[:1], buy(NOW - DAY, "200.5"), ev(PURCHASE, NOW - DAY), buy(NOW, True)]
    assert not holds(text, facts(events=skipped))
    assert holds(text, facts(events=[buy(NOW - DAY, 501)]))
    assert not holds(text, facts(events=[ev("cart.add", NOW, commerce={"order": {"total": 900}})]))

    on = '(commerce.order.total of event(type = "commerce.purchase") within 90 days)'
    assert holds(f"avg{on} = 250.25", facts(events=events))
    assert holds(f"min{on} = 200.5", facts(events=events))
    assert holds(f"max{on} = 300", facts(events=events))
    assert holds(f"sum{on} = 0", facts())  # the sum of nothing is 0
    for agg in ("avg", "min", "max"):  # no comparison holds on nothing
        for op in COMPARE_OPS:
            assert not holds(f"{agg}{on} {op} 0", facts(events=[ev(PURCHASE, NOW)]))


def test_event_with_a_payload_condition_within_1_hour() -> None:
    text = TEXTS[9]

    def view(ts: float, url: str) -> ExperienceEvent:
        return ev("web.pageview", ts, page={"url": url})

    assert holds(text, facts(events=[view(NOW - HOUR, "https://shop/checkout/1")]))
    assert not holds(text, facts(events=[view(NOW - HOUR - EPS, "https://shop/checkout/1")]))
    assert not holds(text, facts(events=[view(NOW - MINUTE, "https://shop/cart")]))
    assert not holds(text, facts(events=[ev("web.pageview", NOW - MINUTE)]))


def test_sequence_is_ordered_and_inside_the_window() -> None:
    text = TEXTS[10]
    add, buy = "cart.add", PURCHASE
    assert holds(text, facts(events=[ev(add, NOW - 2 * DAY), ev(buy, NOW - DAY)]))
    assert holds(text, facts(events=[ev(buy, NOW - DAY), ev(add, NOW - 2 * DAY)]))  # any order in
    assert not holds(text, facts(events=[ev(add, NOW - 2 * DAY - EPS), ev(buy, NOW - DAY)]))
    assert not holds(text, facts(events=[ev(buy, NOW - 2 * DAY), ev(add, NOW - DAY)]))
    assert holds(
        text, facts(events=[ev(buy, NOW - 2 * DAY), ev(add, NOW - DAY), ev(buy, NOW - HOUR)])
    )
    assert not holds(text, facts(events=[ev(add, NOW - DAY), ev(buy, NOW + 1)]))  # future: out
    # equal timestamps keep their order of arrival
    assert holds(text, facts(events=[ev(add, NOW - DAY), ev(buy, NOW - DAY)]))
    assert not holds(text, facts(events=[ev(buy, NOW - DAY), ev(add, NOW - DAY)]))
    # one event does not fill two steps
    assert not holds('event(type = "a") then event(type = "a")', facts(events=[ev("a", NOW)]))
    assert holds('event(type = "a") then event(type = "a")', facts(events=[ev("a", 1), ev("a", 1)]))


def test_not_event_within_30_days() -> None:
    text = TEXTS[11]
    assert holds(text, facts())
    assert holds(text, facts(events=[ev(PURCHASE, NOW - 30 * DAY - EPS)]))
    assert not holds(text, facts(events=[ev(PURCHASE, NOW - 30 * DAY)]))


def test_between_inclusive_utc_days() -> None:
    text = TEXTS[12]
    assert holds(text, facts(events=[ev(PURCHASE, utc(2026, 1, 1))]))
    assert holds(text, facts(events=[ev(PURCHASE, utc(2026, 4, 1) - 0.001)]))  # 31 Mar 23:59
    assert not holds(text, facts(events=[ev(PURCHASE, utc(2026, 1, 1) - EPS)]))
    assert not holds(text, facts(events=[ev(PURCHASE, utc(2026, 4, 1))]))
    # not after now, even inside the dates
    assert not holds(text, facts(events=[ev(PURCHASE, utc(2026, 2, 1))]), now=utc(2026, 1, 15))


def test_in_segment() -> None:
    assert holds(TEXTS[13], facts(segments={"gold-buyers"}))
    assert not holds(TEXTS[13], facts(segments={"silver"}))


def test_ever_and_any_event() -> None:
    assert holds('event(type = "x")', facts(events=[ev("x", 0.0)]))
    assert not holds('event(type = "x")', facts(events=[ev("x", NOW + 1)]))
    assert holds("event()", facts(events=[ev(None, NOW)]))
    assert not holds("event()", facts())


# -- comparison semantics ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "attributes", "expected"),
    [
        ("a = 1", {"a": 1.0}, True),
        ("a = 1", {"a": "1"}, False),  # a string is not a number
        ("a != 1", {"a": "1"}, False),  # mixed kinds: every comparison is false
        ("a != 1", {}, False),  # missing: false
        ("not a = 1", {}, True),
        ("a < 2", {"a": True}, False),  # booleans are not numbers
        ("a = true", {"a": True}, True),
        ("a = true", {"a": 1}, False),
        ('a < "b"', {"a": "a"}, True),
        ('a > "B"', {"a": "a"}, True),  # code point order
        ("birth < 2000-01-01", {"birth": "1999-12-31"}, True),  # ISO strings as strings
        ("birth < 2000-01-01", {"birth": 946684800}, False),
        ('a in ["x", 1]', {"a": 1.0}, True),
        ('a notIn ["x", 1]', {"a": "y"}, True),
        ('a notIn ["x", 1]', {}, False),  # missing is never in nor not in
        ('a notIn ["x"]', {"a": ["y"]}, False),
        ('a not in ["x"]', {"a": "x"}, False),
        ("a in []", {"a": 1}, False),
        ('a containsIgnoreCase "OLD"', {"a": "Gold"}, True),
        ('a endsWithIgnoreCase "LD"', {"a": "Gold"}, True),
        ('a startsWithIgnoreCase "GO"', {"a": "Gold"}, True),
        ('a equalsIgnoreCase "GOLD"', {"a": "Gold"}, True),
        ('a equals "GOLD"', {"a": "Gold"}, False),
        ('a contains "1"', {"a": 10}, False),
        ('a matches "^[a-z]+\\\\d$"', {"a": "abc1"}, True),
        ('a matches "b"', {"a": "abc"}, True),  # search, not full match
        ('a matches "^B"', {"a": "bc"}, False),
        ('a matchesIgnoreCase "^B"', {"a": "bc"}, True),
        # long texts are searched afresh, short ones remembered: the same answers
        ('a matches "z$"', {"a": "y" * 400 + "z"}, True),
        ('a matches "^z"', {"a": "y" * 400 + "z"}, False),
        ('a matches "^b"', {"a": "bc"}, True),  # the same text as above, another pattern
        ("a.b exists", {"a": [{"b": 1}]}, False),  # lists are not walked
        ("a exists", {"a": False}, True),
    ],
)
def test_comparison_semantics(text: str, attributes: dict[str, Any], expected: bool) -> None:
    assert holds(text, facts(attributes)) is expected


def test_logic_and_precedence() -> None:
    f = facts({"a": 1, "b": 2, "c": 3})
    assert holds("a = 1 or b = 0 and c = 0", f)  # and binds tighter than or
    assert not holds("(a = 1 or b = 0) and c = 0", f)
    assert holds("not a = 0 and b = 2", f)
    assert parse("not a = 0 and b = 2") == And((Not(Compare("a", "=", 0)), Compare("b", "=", 2)))
    assert parse("a = 1 and (b = 1 and c = 1)") == And(
        (Compare("a", "=", 1), And((Compare("b", "=", 1), Compare("c", "=", 1))))
    )
    assert parse("a = 1 and b = 1 and c = 1") == And(
        (Compare("a", "=", 1), Compare("b", "=", 1), Compare("c", "=", 1))
    )


def test_keywords_are_case_insensitive_and_paths_can_be_quoted() -> None:
    assert parse('NOT Event(TYPE = "x") WITHIN 7 DAYS') == Not(
        EventExists(Compare("TYPE", "=", "x"), Window("last", seconds=7 * DAY))
    )
    assert parse('a STARTSWITHIGNORECASE "x"') == StringTest("a", "startsWith", "x", True)
    assert parse("a == TRUE") == Compare("a", "=", True)
    assert parse("order.count >= 2") == Compare("order.count", ">=", 2)
    assert parse("`event`.`first name` exists") == Exists("event.first name")
    assert to_text(Exists("event.first name")) == "`event`.`first name` exists"
    assert to_text(Exists("a.not")) == "a.not exists"
    assert parse(r'a = "say \"hi\"\n\u00e9"') == Compare("a", "=", 'say "hi"\né')
    assert parse("event() within 1.5 hours") == EventExists(None, Window("last", 5400.0))
    assert parse("event() within 90 minutes") == parse("event() within 1.5 hours")
    assert to_text(parse("event() within 24 hours")) == "event() within 1 day"
    assert to_text(parse("event() within 1 second")) == "event() within 1 second"


# -- errors ---------------------------------------------------------------------------------


def test_syntax_error_reports_line_column_and_what_was_expected() -> None:
    text = 'person.age >= 21 and\n  homeAddress.country in ["FR", == ]'
    with pytest.raises(SegmentSyntaxError) as info:
        parse(text)
    e = info.value
    assert (e.line, e.column, e.got) == (2, 33, "==")
    assert e.expected == ["a string", "a number", "a date", "true", "false", "]"]
    assert str(e) == (
        'line 2, column 33: expected a string, a number, a date, "true", "false" or "]", got "=="'
    )
    assert isinstance(e, ValueError)
    assert e.code == "segment_syntax"


@pytest.mark.parametrize(
    ("text", "line", "column", "expected", "got"),
    [
        ("person.age >= == 3", 1, 15, "a number", "=="),
        ("person.tier ~ 3", 1, 13, "exists", "~"),
        ("a = 1\nand\n", 2, 4, "an attribute path", ""),  # end of input: after "and"
        ("(a = 1 -- open\n", 1, 7, ")", ""),
        ("", 1, 1, "event", ""),
        (
            'event(type = "x") within 7 light-years',
            1,
            28,
            "a unit (minutes, hours, days, ...)",
            "light",
        ),
        ("a in [1 2]", 1, 9, "]", "2"),
    ],
)
def test_syntax_errors(text: str, line: int, column: int, expected: str, got: str) -> None:
    with pytest.raises(SegmentSyntaxError) as info:
        parse(text)
    e = info.value
    assert (e.line, e.column) == (line, column), str(e)
    assert expected in e.expected
    assert e.got == got
    assert str(e).startswith(f"line {line}, column {column}: expected ")


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        ('a = 1 and\n median(x of event(type = "b")) > 3', 2, 2, 'unknown aggregate "median"'),
        ('a matches "(unclosed"', 1, 11, "not a valid regular expression"),
        ('a matches "(x)\\\\1"', 1, 11, "invalid escape sequence: \\1"),
        ('a matches "x(?=y)"', 1, 11, "no lookaround"),
        ("event() between 2026-03-01 and 2026-01-31", 1, 9, "is before the start"),
        ("event() between 2026-02-01 and 2026-02-30", 1, 9, "not a date"),
        ("event() within 0 days", 1, 16, "longer than 0"),
        ("a < true", 1, 3, "a boolean can only be compared with = or !="),
        ('event(event(type = "x"))', 1, 7, "cannot contain another event condition"),
        ('event(inSegment("a"))', 1, 7, "inSegment() cannot be used inside event()"),
        ('inSegment("")', 1, 1, "cannot be empty"),
        ('a = "\\q"', 1, 6, 'invalid escape "\\q"'),
        ("a = 99999999999999999999", 1, 5, "64 bits"),
        ("a = 1e999", 1, 5, "finite"),
        ("not " * 70 + "a = 1", 1, 261, "nested more than 64 levels"),
    ],
)
def test_semantic_errors_have_a_position(text: str, line: int, column: int, message: str) -> None:
    with pytest.raises(SegmentSyntaxError) as info:
        parse(text)
    e = info.value
    assert (e.line, e.column) == (line, column), str(e)
    assert message in str(e)


def test_unknown_aggregate_names_the_known_ones() -> None:
    with pytest.raises(SegmentSyntaxError) as info:
        parse("median(x of event()) > 3")
    assert info.value.expected == list(AGGREGATES)
    assert info.value.got == "median"


@pytest.mark.parametrize(
    "data",
    [
        b'{"op":"exists","path":"a","extra":1}',
        b'{"op":"median","path":"a"}',
        b'{"op":"and","items":[{"op":"exists","path":"a"}]}',
        b'{"op":"compare","path":"a","operator":"<","value":true}',
        b'{"op":"compare","path":"a..b","operator":"=","value":1}',
        b'{"op":"event_exists","condition":null,"window":{"kind":"last","seconds":-1,'
        b'"start":null,"end":null}}',
        b'{"op":"event_exists","condition":null,"window":{"kind":"ever","seconds":5,'
        b'"start":null,"end":null}}',
        b'{"op":"event_exists","condition":{"op":"in_segment","name":"x"},"window":'
        b'{"kind":"ever","seconds":null,"start":null,"end":null}}',
        b'{"op":"string_test","path":"a","func":"matches","value":"(","ignore_case":false}',
        b"not json",
        b'{"op":"not","item":' * 100 + b'{"op":"exists","path":"a"}' + b"}" * 100,
        b'{"op":"not","item":' * 100_000 + b'{"op":"exists","path":"a"}' + b"}" * 100_000,
    ],
)
def test_from_json_is_strict(data: bytes) -> None:
    with pytest.raises(SegmentError):
        from_json(data)


# -- streaming or batch -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('event(type = "x") within 24 hours', "streaming"),
        ('count(event(type = "x") within 1 day) >= 2', "streaming"),
        ('event(type = "x") within 25 hours', "batch"),
        ('event(type = "x")', "batch"),
        ('event(type = "a") then event(type = "b") within 1 hour', "streaming"),
        ('event(type = "a") then event(type = "b")', "batch"),
        ('not event(type = "x") within 1 hour', "streaming"),
        ('person.age > 21 and event(type = "x") within 1 hour', "streaming"),
        ('person.age > 21 or event(type = "x") within 2 days', "batch"),
        ('max(a of event(type = "x") within 1 hour) > 1', "batch"),
    ],
)
def test_method_rule(text: str, expected: Method) -> None:
    assert method(parse(text)) == expected


def test_method_of_segments_of_segments() -> None:
    node = parse('inSegment("gold-buyers") and inSegment("recent")')

    def streaming(name: str) -> bool:
        return name in {"gold-buyers", "recent"}

    assert method(node, streaming) == "streaming"
    assert method(node, lambda name: name == "recent") == "batch"
    assert 'inSegment("gold-buyers") is a batch segment' in method_reason(
        node, lambda name: name == "recent"
    )
    assert method_reason(parse(TEXTS[7])) == (
        'batch: count(event(type = "commerce.purchase") within 30 days) >= 3 looks back 30 days,'
        " over 24 hours"
    )
    assert method_reason(parse(TEXTS[0])) == "streaming: reads only profile attributes"


# -- what a segment reads, dependencies, cycles ------------------------------------------------


def test_dependencies_and_cycles() -> None:
    node = parse('inSegment("b") or (a = 1 and not inSegment("c"))')
    assert dependencies(node) == {"b", "c"}
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": set(), "e": {"e"}}

    def deps_of(name: str) -> set[str]:
        return graph.get(name, set())

    assert check_cycles("a", deps_of) == ["a", "b", "a"]
    assert check_cycles("c", deps_of) is None
    assert check_cycles("e", deps_of) == ["e", "e"]
    graph["d"] = {"x", "c"}
    assert check_cycles("c", deps_of) == ["c", "d", "c"]
    # a long chain, without recursion limits
    chain = {f"s{i}": {f"s{i + 1}"} for i in range(5000)}
    chain["s5000"] = {"s0"}
    found = check_cycles("s0", lambda name: chain.get(name, set()))
    assert found is not None
    assert len(found) == 5002


def test_reads() -> None:
    node = parse(
        'person.age > 21 and (event(type = "a" or type in ["b", "c"]) within 1 hour'
        ' or count(event(type = "d" and page.url contains "x")) > 1) and inSegment("s")'
    )
    assert reads(node) == Reads(
        event_types={"a", "b", "c", "d"},
        attribute_paths={"person.age"},
        segments={"s"},
        uses_events=True,
    )
    assert reads(parse("a exists")) == Reads(set(), {"a"}, set(), uses_events=False)
    assert reads(parse('event(page.url contains "x")')).event_types is None
    assert reads(parse('event(type != "x")')).event_types is None
    assert reads(parse("event()")).event_types is None
    assert reads(parse('event(type equals "x" or type = "y") within 1 day')).event_types == {
        "x",
        "y",
    }
    assert reads(parse('event(type = "x" or a = 1)')).event_types is None
    assert reads(parse('sum(v of event(type = "x")) > 1')) == Reads({"x"}, set(), set(), True)
    r = reads(parse("person.name exists"))
    assert r.touches_paths(["person.name.first"])
    assert r.touches_paths(["person"])
    assert not r.touches_paths(["person.names"])
    assert reads(node).touches_event("a")
    assert not reads(node).touches_event("z")
    assert not reads(parse("a exists")).touches_event("a")


# -- time-based changes -----------------------------------------------------------------------


def test_next_change_within_1_hour_is_newest_matching_event_plus_3600() -> None:
    node = parse(TEXTS[9])
    url = {"url": "/checkout"}
    events = [
        ev("web.pageview", NOW - 50 * MINUTE, page=url),
        ev("web.pageview", NOW - 10 * MINUTE, page=url),
        ev("web.pageview", NOW - 5 * MINUTE, page={"url": "/home"}),  # does not match
        ev("web.pageview", NOW - 30 * MINUTE, page=url),
    ]
    f = facts(events=events)
    newest = NOW - 10 * MINUTE
    assert next_change(node, f, NOW) == newest + 3600
    assert evaluate(node, f, newest + 3600)  # still in at the boundary
    assert not evaluate(node, f, newest + 3600 + EPS)  # out just after
    assert next_change(node, facts(), NOW) is None


def test_next_change_other_cases() -> None:
    x = [ev("x", NOW - 50 * MINUTE), ev("x", NOW - 40 * MINUTE), ev("x", NOW - 30 * MINUTE)]
    count = parse('count(event(type = "x") within 1 hour) >= 2')
    assert next_change(count, facts(events=x), NOW) == NOW - 40 * MINUTE + HOUR
    negated = parse('not event(type = "x") within 1 hour')
    assert next_change(negated, facts(events=x), NOW) == NOW - 30 * MINUTE + HOUR
    future = parse('event(type = "x") within 1 hour')
    assert next_change(future, facts(events=[ev("x", NOW + 60)]), NOW) == NOW + 60
    assert next_change(parse(TEXTS[0]), facts({"person": {}}), NOW) is None
    assert next_change(parse(TEXTS[12]), facts(events=[ev(PURCHASE, utc(2026, 2, 1))]), NOW) is None
    sequence = parse('event(type = "a") then event(type = "b") within 1 hour')
    ab = [ev("a", NOW - 50 * MINUTE), ev("b", NOW - 10 * MINUTE)]
    assert next_change(sequence, facts(events=ab), NOW) == NOW - 50 * MINUTE + HOUR
    # an event exactly at the boundary now leaves right after now
    assert next_change(future, facts(events=[ev("x", NOW - HOUR)]), NOW) == NOW
    # a result that does not change when one event leaves: the next one that matters
    either = parse('event(type = "x") within 1 hour or a = 1')
    assert next_change(either, facts({"a": 1}, x), NOW) is None


# -- property: random ASTs round-trip -----------------------------------------------------------

_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
_odd = st.text(
    alphabet=st.characters(exclude_characters="`.\r\n", exclude_categories=["Cs"]),
    min_size=1,
    max_size=5,
)
_keywords = st.sampled_from(["not", "Event", "COUNT", "inSegment", "and", "in", "type", "true"])
_paths = st.lists(st.one_of(_names, _odd, _keywords), min_size=1, max_size=3).map(".".join)
_event_paths = st.one_of(st.just("type"), _paths)
_ints = st.integers(-(2**63), 2**63 - 1)
_floats = st.floats(allow_nan=False, allow_infinity=False)
_numbers = st.one_of(_ints, _floats)
_strings = st.text(max_size=8)
_non_bool = st.one_of(_strings, _numbers)
_scalars = st.one_of(_non_bool, st.booleans())
_regexes = st.sampled_from(["^a", "b$", "[0-9]+", ".*", r"\d{2}", "(x|y)", ""])
_ops = st.sampled_from(COMPARE_OPS)


def _leaves(paths: st.SearchStrategy[str]) -> st.SearchStrategy[Node]:
    string_tests = st.one_of(
        st.builds(
            StringTest,
            paths,
            st.sampled_from([f for f in STRING_FUNCS if f != "matches"]),
            _strings,
            st.booleans(),
        ),
        st.builds(StringTest, paths, st.just("matches"), _regexes, st.booleans()),
    )
    return st.one_of(
        st.builds(Compare, paths, _ops, _non_bool),
        st.builds(Compare, paths, st.sampled_from(["=", "!="]), st.booleans()),
        st.builds(Exists, paths),
        st.builds(InList, paths, st.lists(_scalars, max_size=3).map(tuple), st.booleans()),
        string_tests,
    )


def _logic(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    items = st.lists(children, min_size=2, max_size=3).map(tuple)
    return st.one_of(st.builds(And, items), st.builds(Or, items), st.builds(Not, children))


_conditions = st.recursive(_leaves(_event_paths), _logic, max_leaves=4)
_optional_conditions = st.one_of(st.none(), _conditions)


@st.composite
def _windows(draw: st.DrawFn) -> Window:
    kind = draw(st.sampled_from(["last", "between", "ever"]))
    if kind == "ever":
        return EVER
    if kind == "between":
        a, b = sorted(draw(st.lists(st.dates(), min_size=2, max_size=2)))
        return Window("between", start=a.isoformat(), end=b.isoformat())
    seconds = draw(
        st.one_of(
            st.builds(
                lambda n, unit: float(n * unit),
                st.integers(1, 10**6),
                st.sampled_from([1, 60, 3600, 86400, 604800]),
            ),
            st.floats(min_value=1e-3, max_value=1e9),
        )
    )
    return Window("last", seconds=seconds)


_event_nodes = st.one_of(
    st.builds(EventExists, _optional_conditions, _windows()),
    st.builds(EventCount, _optional_conditions, _windows(), _ops, _numbers),
    st.builds(
        EventAggregate,
        st.sampled_from(AGGREGATES),
        _paths,
        _optional_conditions,
        _windows(),
        _ops,
        _numbers,
    ),
    st.builds(
        Sequence, st.lists(_optional_conditions, min_size=2, max_size=3).map(tuple), _windows()
    ),
)
_profile_leaves = st.one_of(
    _leaves(_paths), _event_nodes, st.builds(InSegment, st.text(min_size=1, max_size=8))
)
_asts = st.recursive(_profile_leaves, _logic, max_leaves=6)


@given(_asts)
def test_random_asts_round_trip(node: Node) -> None:
    text = to_text(node)
    assert parse(text) == node, text
    data = to_json(node)
    assert from_json(data) == node
    assert to_json(from_json(data)) == data
    assert to_text(parse(text)) == text
    method(node)
    reads(node)


@given(_asts, st.floats(min_value=0, max_value=2e9))
def test_random_asts_evaluate_without_errors(node: Node, now: float) -> None:
    f = facts(
        {"a": 1, "type": "x", "b": {"c": "text"}},
        [ev("x", now - 10, a=1.5), ev(None, now - 4000, b={"c": 2}), ev("y", now + 5)],
        {"s"},
    )
    result = evaluate(node, f, now)
    change = next_change(node, f, now)
    if change is not None:
        assert change >= now
        middle = now + (change - now) / 2  # nothing changes before `change`
        if now < middle < change:
            assert evaluate(node, f, middle) == result


def test_validate_trees_built_in_code() -> None:
    validate(parse(TEXTS[10]))
    with pytest.raises(SegmentError, match="at least two"):
        validate(Or((Exists("a"),)))
    with pytest.raises(SegmentError, match="cannot contain another event"):
        validate(EventExists(EventExists(None, EVER), EVER))


def test_profile_facts_is_a_struct() -> None:
    f = ProfileFacts({"a": 1}, [ev("x", 1.0)], {"s"})
    assert msgspec.structs.asdict(f)["segments"] == {"s"}

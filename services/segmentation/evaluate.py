"""Evaluation of a segment definition (language.py's AST) on one profile.

`evaluate` says whether the profile is in the segment at time `now`; `next_change` says when,
with no new data, the answer could change next (events entering or leaving windows), so that
streaming segments can schedule time-based exits and entries. Semantics: docs/segments.md.

Pure: the caller gives the facts and the time.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import msgspec

from services.segmentation.language import (
    EVENT_TYPE_PATH,
    And,
    Compare,
    CompareOp,
    EventAggregate,
    EventCount,
    EventExists,
    Exists,
    InList,
    InSegment,
    Node,
    Not,
    Or,
    Scalar,
    Sequence,
    StringTest,
    Window,
    compile_regex,
    day_range,
)
from shared.messages import ExperienceEvent


class ProfileFacts(msgspec.Struct):
    """What evaluation sees of a profile."""

    attributes: dict[str, Any] = {}
    """Merged attributes, nested objects."""
    events: list[ExperienceEvent] = []
    segments: set[str] = set()
    """Names of the segments the profile is currently a member of."""


def evaluate(node: Node, facts: ProfileFacts, now: float) -> bool:
    """Whether the profile qualifies at time `now` (epoch seconds)."""
    return Evaluation(facts).truth(node, now, after=False)


def next_change(node: Node, facts: ProfileFacts, now: float) -> float | None:
    """The earliest time T >= now from which the result could differ from the result at
    `now`, with no new data; None if time alone cannot change it.

    Windows include their lower boundary, so an event leaving a "within 1 hour" window is
    still inside at timestamp + 3600 (T) and outside just after: evaluate again at T or
    later (any real clock reading after T). An event with a future timestamp enters at it.
    """
    ev = Evaluation(facts)
    return next_change_of(ev, node, now, ev.truth(node, now, after=False))


def evaluate_on(ev: Evaluation, node: Node, now: float) -> bool:
    """`evaluate`, on a shared evaluation of the profile."""
    return ev.truth(node, now, after=False)


def next_change_of(ev: Evaluation, node: Node, now: float, before: bool) -> float | None:
    """`next_change`, on a shared evaluation of the profile whose result at `now` is
    `before`."""
    for t in ev.candidates(node, now):
        if ev.truth(node, t, after=False) != before or ev.truth(node, t, after=True) != before:
            return t
    return None


# -- attribute and event conditions -------------------------------------------------------

_MISSING: Any = None


@lru_cache(maxsize=4096)
def _steps(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def resolve(data: Any, path: str) -> Any:
    """The value at a dotted path in nested objects; None if any step is missing."""
    for key in _steps(path):
        if not isinstance(data, dict):
            return _MISSING
        data = data.get(key)
    return data


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def compare(actual: Any, op: CompareOp, expected: Scalar) -> bool:
    """`actual op expected` for values of the same kind (numbers, strings, booleans);
    false for anything else, missing values and mixed kinds included."""
    if isinstance(actual, bool) and isinstance(expected, bool):
        if op not in ("=", "!="):
            return False
    elif not (
        (_is_number(actual) and _is_number(expected))
        or (isinstance(actual, str) and isinstance(expected, str))
    ):
        return False
    match op:
        case "=":
            return bool(actual == expected)
        case "!=":
            return bool(actual != expected)
        case "<":
            return bool(actual < expected)
        case "<=":
            return bool(actual <= expected)
        case ">":
            return bool(actual > expected)
        case ">=":
            return bool(actual >= expected)


def _scalar(x: Any) -> bool:
    return isinstance(x, str | int | float)


@lru_cache(maxsize=1024)
def _regex(pattern: str, ignore_case: bool) -> Any:
    """RE2 (linear time), as checked when the segment was applied."""
    return compile_regex(pattern, ignore_case)


@lru_cache(maxsize=65_536)
def _matches_short(pattern: str, ignore_case: bool, text: str) -> bool:
    return _regex(pattern, ignore_case).search(text) is not None


_MEMO_TEXT = 256
"""Texts up to this long have their `matches` results remembered (bounded): RE2 from
Python costs some microseconds a search, and names, cities and emails repeat."""


def _matches(pattern: str, ignore_case: bool, text: str) -> bool:
    if len(text) <= _MEMO_TEXT:
        return _matches_short(pattern, ignore_case, text)
    return _regex(pattern, ignore_case).search(text) is not None


def _string_test(node: StringTest, actual: Any) -> bool:
    if not isinstance(actual, str):
        return False
    if node.func == "matches":
        return _matches(node.value, node.ignore_case, actual)
    text: str = actual
    value = node.value
    if node.ignore_case:
        text, value = text.casefold(), value.casefold()
    match node.func:
        case "startsWith":
            return text.startswith(value)
        case "endsWith":
            return text.endswith(value)
        case "contains":
            return value in text
        case "equals":
            return text == value


def _field_test(node: Compare | Exists | InList | StringTest, get: Callable[[str], Any]) -> bool:
    return value_test(node, get(node.path))


def value_test(node: Compare | Exists | InList | StringTest, actual: Any) -> bool:
    match node:
        case Compare():
            return compare(actual, node.operator, node.value)
        case Exists():
            return actual is not None
        case InList():
            found = any(compare(actual, "=", v) for v in node.values)
            return (_scalar(actual) and not found) if node.negate else found
        case StringTest():
            return _string_test(node, actual)


def _event_field(event: ExperienceEvent) -> Callable[[str], Any]:
    def get(path: str) -> Any:
        if path == EVENT_TYPE_PATH:
            return event.event_type
        return resolve(event.payload, path)

    return get


def matches_event(condition: Node | None, event: ExperienceEvent) -> bool:
    """Whether one event satisfies the condition of an event(...) (None: any event)."""
    if condition is None:
        return True
    return _condition(condition, _event_field(event))


def _condition(node: Node, get: Callable[[str], Any]) -> bool:
    match node:
        case Compare() | Exists() | InList() | StringTest():
            return _field_test(node, get)
        case And():
            return all(_condition(i, get) for i in node.items)
        case Or():
            return any(_condition(i, get) for i in node.items)
        case Not():
            return not _condition(node.item, get)
        case _:  # event conditions and inSegment are refused inside event() by the parser
            return False


# -- events in windows ----------------------------------------------------------------------


class _Matched:
    """The events matching one condition, in time order (ties: the order they came in)."""

    def __init__(self, keys: list[tuple[float, int]]) -> None:
        self.keys = keys
        self.times = [k[0] for k in keys]

    def span(self, window: Window, now: float, after: bool) -> tuple[int, int]:
        """The index range [lo, hi) of the matched events inside the window at `now`, or
        just after `now` if `after` (a boundary exactly `seconds` ago is then outside)."""
        lo: float
        lo_open = False
        hi, hi_open = now, False
        if window.kind == "last":
            assert window.seconds is not None
            lo, lo_open = now - window.seconds, after
        elif window.kind == "between":
            lo, end = day_range(window)
            if end <= now:
                hi, hi_open = end, True
        else:
            lo = -math.inf
        i = bisect_right(self.times, lo) if lo_open else bisect_left(self.times, lo)
        j = bisect_left(self.times, hi) if hi_open else bisect_right(self.times, hi)
        return i, max(i, j)


class Evaluation:
    """One profile's evaluation: the events matching each condition are found once, so
    that it is shared among the segments of a step and between `evaluate_on` and
    `next_change_of` (conditions are told apart by identity, each held by the evaluation
    while it lives)."""

    def __init__(self, facts: ProfileFacts) -> None:
        self.facts = facts
        self._matched: dict[int, _Matched] = {}
        self._values: dict[tuple[int, str], list[float | None]] = {}
        self._held: list[Node | None] = []
        """The conditions keyed by identity: held, so that no other takes their id."""

    def matched(self, condition: Node | None) -> _Matched:
        key = id(condition)
        found = self._matched.get(key)
        if found is None:
            keys = sorted(
                (e.timestamp, i)
                for i, e in enumerate(self.facts.events)
                if matches_event(condition, e)
            )
            found = self._matched[key] = _Matched(keys)
            self._held.append(condition)
        return found

    def values(self, node: EventAggregate) -> list[float | None]:
        """The numeric values at the aggregate's path, aligned with `matched`."""
        key = (id(node.condition), node.path)
        found = self._values.get(key)
        if found is None:
            found = []
            for _, i in self.matched(node.condition).keys:
                v = resolve(self.facts.events[i].payload, node.path)
                ok = _is_number(v) and math.isfinite(v)
                found.append(float(v) if ok else None)
            self._values[key] = found
        return found

    def truth(self, node: Node, now: float, after: bool) -> bool:
        match node:
            case Compare() | Exists() | InList() | StringTest():
                return value_test(node, resolve(self.facts.attributes, node.path))
            case And():
                return all(self.truth(i, now, after) for i in node.items)
            case Or():
                return any(self.truth(i, now, after) for i in node.items)
            case Not():
                return not self.truth(node.item, now, after)
            case EventExists():
                i, j = self.matched(node.condition).span(node.window, now, after)
                return j > i
            case EventCount():
                i, j = self.matched(node.condition).span(node.window, now, after)
                return compare(j - i, node.operator, node.value)
            case EventAggregate():
                return self._aggregate(node, now, after)
            case Sequence():
                return self._sequence(node, now, after)
            case InSegment():
                return node.name in self.facts.segments

    def _aggregate(self, node: EventAggregate, now: float, after: bool) -> bool:
        i, j = self.matched(node.condition).span(node.window, now, after)
        values = [v for v in self.values(node)[i:j] if v is not None]
        if node.func == "sum":
            return compare(math.fsum(values), node.operator, node.value)
        if not values:  # avg, min and max of nothing: no comparison holds
            return False
        if node.func == "avg":
            result = math.fsum(values) / len(values)
        elif node.func == "min":
            result = min(values)
        else:
            result = max(values)
        return compare(result, node.operator, node.value)

    def _sequence(self, node: Sequence, now: float, after: bool) -> bool:
        previous = (-math.inf, -1)
        for step in node.steps:
            matched = self.matched(step)
            i, j = matched.span(node.window, now, after)
            k = max(i, bisect_right(matched.keys, previous))
            if k >= j:
                return False
            previous = matched.keys[k]
        return True

    def candidates(self, node: Node, now: float) -> list[float]:
        """Every time from `now` on at which an event enters or leaves a window of `node`."""
        out: set[float] = set()
        for condition, window in _event_parts(node):
            times = self.matched(condition).times
            start, end = day_range(window) if window.kind == "between" else (-math.inf, math.inf)
            for ts in times[bisect_right(times, now) :]:
                if start <= ts < end:
                    out.add(ts)
            if window.kind == "last":
                assert window.seconds is not None
                first = bisect_left(times, now - window.seconds)
                out.update(t for ts in times[first:] if (t := _leaves(ts, window.seconds)) >= now)
        return sorted(out)


def _leaves(ts: float, seconds: float) -> float:
    """The last instant at which an event at `ts` is inside a window of `seconds`."""
    t = ts + seconds
    while t - seconds < ts:  # float rounding: make sure the event is out just after t
        t = math.nextafter(t, math.inf)
    return t


def _event_parts(node: Node) -> Iterator[tuple[Node | None, Window]]:
    match node:
        case And() | Or():
            for item in node.items:
                yield from _event_parts(item)
        case Not():
            yield from _event_parts(node.item)
        case EventExists() | EventCount() | EventAggregate():
            yield node.condition, node.window
        case Sequence():
            for step in node.steps:
                yield step, node.window
        case _:
            pass

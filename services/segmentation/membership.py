"""The membership rules, pure: who qualifies for a segment, and what a result does to a
membership.

- `step` is the one membership state machine. A profile that qualifies and was not a
  member is `realized`; one that no longer qualifies is `exited` (both announced on
  `cdp.membership.<segment>`); a member that still qualifies stays, confirmed as
  `existing` by a batch job, with its status kept by the stream; anyone else has no
  membership to write.
- `evaluate_many` says who of a group of profiles qualifies for one segment, the
  streaming path and the batch job alike. A profile without events qualifies or not by the
  values at the paths the segment reads and its memberships of the segments it names,
  nothing else (an event condition over no event has one answer at any time): such
  profiles are evaluated condition by condition over columns of values (`Group.column`,
  each path read once per profile for every segment), each condition's answer remembered
  per typed value (`memo`), so that a step answers `city = "London"` once per city, not
  once per profile. It gives the same answers as `evaluate` profile by profile (a property
  test holds it to that): values of different types never share a remembered answer (`0`,
  `0.0` and `False` are equal in Python, not in a segment).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from services.segmentation.catalog import CompiledSegment
from services.segmentation.evaluate import (
    Evaluation,
    ProfileFacts,
    evaluate,
    evaluate_on,
    resolve,
    value_test,
)
from services.segmentation.language import (
    And,
    Compare,
    Exists,
    InList,
    InSegment,
    Node,
    Not,
    Or,
    StringTest,
)

MEMBER = ("realized", "existing")
"""The statuses of a member."""


class Transition(NamedTuple):
    """A membership after an evaluation: its status, and whether it changed (announced)."""

    status: str
    changed: bool


def is_member(status: str | None) -> bool:
    return status in MEMBER


def step(status: str | None, qualifies: bool, *, batch: bool) -> Transition | None:
    """The membership after an evaluation of a profile whose membership was `status`
    (None: it never had one); None when there is no membership to write."""
    was = status in MEMBER
    if qualifies != was:
        return Transition("realized" if qualifies else "exited", True)
    if qualifies:
        assert status is not None
        return Transition("existing" if batch else status, False)
    return None


class Group:
    """The profiles evaluated together, as they are seen by segments (one merge policy's
    view), with the values at each path read once for all of them."""

    def __init__(self, facts: Sequence[ProfileFacts]) -> None:
        self.facts = facts
        self._columns: dict[str, list[Any]] = {}
        self._evaluations: dict[int, Evaluation] = {}

    def evaluation(self, i: int) -> Evaluation:
        """The evaluation of profile `i`, shared by every segment that reads its events."""
        found = self._evaluations.get(i)
        if found is None:
            found = self._evaluations[i] = Evaluation(self.facts[i])
        return found

    def column(self, path: str) -> list[Any]:
        found = self._columns.get(path)
        if found is None:
            found = self._columns[path] = [resolve(f.attributes, path) for f in self.facts]
        return found


def evaluate_many(
    seg: CompiledSegment,
    group: Group,
    which: Iterable[int],
    now: float,
    memo: dict[tuple[Any, ...], bool],
) -> set[int]:
    """The indices in `which` of the profiles of `group` that qualify for `seg` at `now`.

    A profile with events is evaluated on its own (its shared `Evaluation`). The others are
    evaluated condition by condition over the column of values each reads: a leaf's answer
    is remembered per typed value (`memo`, keyed by the condition's identity, so that a
    condition of another segment, or `0` beside `False`, never shares it), an `and` asks
    its next item only about the profiles still in, an `or` only about those still out,
    and an event condition has one answer for every profile without events."""
    facts = group.facts
    out: set[int] = set()
    without: list[int] = []
    for i in which:
        if facts[i].events:
            if evaluate_on(group.evaluation(i), seg.node, now):
                out.add(i)
        else:
            without.append(i)
    if without:
        out.update(_qualifying(seg.node, group, without, now, memo))
    return out


def _qualifying(
    node: Node, group: Group, which: list[int], now: float, memo: dict[tuple[Any, ...], bool]
) -> list[int]:
    """The profiles of `which` (none with events) for which `node` holds, in their order."""
    match node:
        case Compare() | Exists() | InList() | StringTest():
            column = group.column(node.path)
            nid = id(node)
            out: list[int] = []
            for i in which:
                value = column[i]
                key = (nid, value.__class__, value)
                try:
                    answer = memo.get(key)
                    if answer is None:
                        answer = memo[key] = value_test(node, value)
                except TypeError:  # an object or a list: not hashable, tested alone
                    answer = value_test(node, value)
                if answer:
                    out.append(i)
            return out
        case And():
            for item in node.items:
                if not which:
                    break
                which = _qualifying(item, group, which, now, memo)
            return which
        case Or():
            held: set[int] = set()
            rest = which
            for item in node.items:
                if not rest:
                    break
                found = _qualifying(item, group, rest, now, memo)
                held.update(found)
                rest = [i for i in rest if i not in held]
            return [i for i in which if i in held]
        case Not():
            inside = set(_qualifying(node.item, group, which, now, memo))
            return [i for i in which if i not in inside]
        case InSegment():
            facts = group.facts
            return [i for i in which if node.name in facts[i].segments]
        case _:  # an event condition: over no event, one answer at any time for everyone
            constant = (id(node),)
            answer = memo.get(constant)
            if answer is None:
                answer = memo[constant] = evaluate(node, _NO_EVENTS, now)
            return list(which) if answer else []


_NO_EVENTS = ProfileFacts()
"""A profile with no events, no attributes and no memberships: what an event condition
sees of a profile without events (it reads neither attributes nor memberships)."""

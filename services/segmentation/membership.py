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
  nothing else (an event condition over no event has one answer at any time): the answer
  is remembered by those (`memo`), so that profiles alike (most of a batch job) are
  evaluated once; the values are read column by column (`Group.column`, each path once
  per profile for every segment). It gives the same answers as `evaluate` profile by
  profile (a property test holds it to that): values of different types never share a
  remembered answer (`0`, `0.0` and `False` are equal in Python, not in a segment).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from services.segmentation.catalog import CompiledSegment
from services.segmentation.evaluate import Evaluation, ProfileFacts, evaluate, evaluate_on, resolve

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


def _typed(value: Any) -> tuple[type, Any]:
    return (value.__class__, value)


def evaluate_many(
    seg: CompiledSegment,
    group: Group,
    which: Iterable[int],
    now: float,
    memo: dict[tuple[Any, ...], bool],
) -> set[int]:
    """The indices in `which` of the profiles of `group` that qualify for `seg` at `now`."""
    facts = group.facts
    columns = [group.column(path) for path in seg.read_paths]
    reads = seg.read_segments
    node = seg.node
    name = seg.name
    out: set[int] = set()
    for i in which:
        f = facts[i]
        if f.events:
            if evaluate_on(group.evaluation(i), node, now):
                out.add(i)
            continue
        try:
            key = (
                name,
                *[_typed(c[i]) for c in columns],
                *[s in f.segments for s in reads],
            )
            answer = memo.get(key)
            if answer is None:
                answer = memo[key] = evaluate(node, f, now)
        except TypeError:  # an object or a list at a path: not hashable, evaluate it alone
            answer = evaluate(node, f, now)
        if answer:
            out.add(i)
    return out

"""Profile merging, pure: attribute rows per dataset and merge policies.

The profile service keeps, per profile, one row per (dataset, attribute path): the latest
value that dataset gave for that path, with its time. A profile record is a partial update:
the paths it carries replace that dataset's rows (unless the stored row is newer), the paths
it lacks are left as they were. At read time a merge policy picks, per attribute path, the
dataset whose value wins:

- ``timestamp``: the newest value wins, whatever its dataset.
- ``dataset_precedence``: the value of the earliest listed dataset that has the path wins,
  even when older; datasets not listed come after the listed ones, newest first.

Paths are dotted leaf paths through nested objects ("person.name.first"). Arrays are leaves
(their whole value is one attribute); the keys of an object are paths, a map field's too.
A JSON ``null`` is a value like any other: a dataset that sends ``null`` for a path has
cleared it, and that ``null`` takes part in merging.

Nothing here does I/O; the service stores `AttributeValue` rows and calls these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import msgspec

from services.profile.errors import ProfileError
from shared.messages import Record
from shared.resources import NAME_RE, MergePolicy

SEP = "."
"""Separator of the parts of an attribute path."""

MAX_POLICIES = 5
"""At most this many merge policies (the leading CDPs' limit)."""


# -- attribute rows ----------------------------------------------------------------------------
class AttributeValue(msgspec.Struct, frozen=True):
    """The latest value one dataset gave for one attribute path of one profile."""

    dataset: str
    path: str
    """Dotted leaf path, e.g. "person.name.first"."""
    value: Any
    """JSON-compatible; arrays and maps are whole values."""
    ts: float
    """The record's own time if it has one, else its ingestion time (see `record_time`)."""
    record_id: str
    """The record that gave this value."""


def record_time(record: Record) -> float:
    """The time a record's attributes are dated by: its own timestamp, else its ingestion."""
    return record.timestamp if record.timestamp is not None else record.ingested_at


def flatten(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A nested object as {dotted leaf path: value}.

    Nested objects are walked; an empty object produces nothing. Lists, scalars and
    ``None`` are leaf values, kept whole. Keys are joined with "." unescaped: field names
    containing "." are ambiguous.
    """
    out: dict[str, Any] = {}
    _flatten_into(out, payload, "")
    return out


def _flatten_into(out: dict[str, Any], node: Mapping[str, Any], prefix: str) -> None:
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten_into(out, value, path + SEP)
        else:
            out[path] = value


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested object of {dotted leaf path: value}; the inverse of `flatten`.

    If one path is a prefix of another ("address" and "address.city"), which one schema never
    produces, the deeper path wins: paths are applied in sorted order and a prefix sorts first,
    so its value is replaced by the object holding the deeper one. Leaf values are not copied.
    """
    root: dict[str, Any] = {}
    built: set[int] = {id(root)}
    """Objects made here; any other object met on a path is a leaf value, replaced."""
    for path in sorted(flat):
        parts = path.split(SEP)
        node = root
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict) or id(child) not in built:
                child = {}
                built.add(id(child))
                node[part] = child
            node = child
        node[parts[-1]] = flat[path]
    return root


def _covered(path: str, prefixes: Collection[str]) -> bool:
    """Whether `path` or one of its ancestors is in `prefixes`."""
    if path in prefixes:
        return True
    i = path.rfind(SEP)
    while i > 0:
        if path[:i] in prefixes:
            return True
        i = path.rfind(SEP, 0, i)
    return False


def fragment_updates(
    current: Mapping[tuple[str, str], AttributeValue],
    dataset: str,
    payload: Mapping[str, Any],
    ts: float,
    record_id: str,
) -> list[AttributeValue]:
    """The attribute rows a new profile record of `dataset` writes, sorted by path.

    `current` holds the stored rows by (dataset, path). Each leaf path of `payload` gives a
    new row, unless the stored row for (dataset, path) is newer (a greater ts): a record that
    arrives out of order never overwrites newer data. At equal ts the new record wins (last
    write wins).
    """
    out: list[AttributeValue] = []
    for path, value in sorted(flatten(payload).items()):
        stored = current.get((dataset, path))
        if stored is not None and stored.ts > ts:
            continue
        out.append(AttributeValue(dataset, path, value, ts, record_id))
    return out


def fold_rows(rows: Iterable[AttributeValue]) -> dict[tuple[str, str], AttributeValue]:
    """One row per (dataset, path), the newest (ties: the greater record id), e.g. to fold the
    rows of profiles whose identity graphs were merged."""
    out: dict[tuple[str, str], AttributeValue] = {}
    for v in rows:
        held = out.get((v.dataset, v.path))
        if held is None or (v.ts, v.record_id) > (held.ts, held.record_id):
            out[v.dataset, v.path] = v
    return out


# -- merge policies ------------------------------------------------------------------------------
DEFAULT_POLICY = MergePolicy("timestamp-ordered", "timestamp", default=True)
"""Used when no configured policy is the default."""


class PolicyError(ProfileError, ValueError):
    """A set of merge policies is invalid; `path` names the field, e.g. "policies[1].datasets"."""

    code = "invalid_policy"

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message


def check_policies(policies: Sequence[MergePolicy], known_datasets: Collection[str]) -> None:
    """Raise `PolicyError` for the first problem of a complete set of merge policies.

    Checked: at most `MAX_POLICIES`; names valid and distinct; at most one default;
    dataset_precedence lists at least one dataset, each known and listed once; a timestamp
    policy lists none (it would be ignored).
    """
    if len(policies) > MAX_POLICIES:
        raise PolicyError("policies", f"at most {MAX_POLICIES} merge policies, got {len(policies)}")
    names: dict[str, int] = {}
    default_at: int | None = None
    for i, p in enumerate(policies):
        at = f"policies[{i}]"
        if not NAME_RE.match(p.name):
            raise PolicyError(
                f"{at}.name",
                f"invalid name {p.name!r}: lower-case letters, digits, '_' and '-', "
                "starting with a letter, at most 63 characters",
            )
        if p.name in names:
            raise PolicyError(
                f"{at}.name", f"duplicate name {p.name!r} (also policies[{names[p.name]}])"
            )
        names[p.name] = i
        if p.default:
            if default_at is not None:
                raise PolicyError(
                    f"{at}.default",
                    f"only one default policy; policies[{default_at}] "
                    f"({policies[default_at].name!r}) is already the default",
                )
            default_at = i
        if p.type == "timestamp":
            if p.datasets:
                raise PolicyError(
                    f"{at}.datasets", "only a dataset_precedence policy lists datasets"
                )
            continue
        if not p.datasets:
            raise PolicyError(
                f"{at}.datasets", "a dataset_precedence policy lists at least one dataset"
            )
        seen: dict[str, int] = {}
        for j, ds in enumerate(p.datasets):
            if ds in seen:
                raise PolicyError(
                    f"{at}.datasets[{j}]", f"dataset {ds!r} listed twice (also at [{seen[ds]}])"
                )
            seen[ds] = j
            if ds not in known_datasets:
                raise PolicyError(f"{at}.datasets[{j}]", f"unknown dataset {ds!r}")


def default_policy(policies: Iterable[MergePolicy]) -> MergePolicy:
    """The policy marked default, else `DEFAULT_POLICY`."""
    return next((p for p in policies if p.default), DEFAULT_POLICY)


_Rank = tuple[int, int, float, str, str]
"""Sort key of a candidate value; the greatest wins."""


def _ranker(policy: MergePolicy) -> Callable[[AttributeValue], _Rank]:
    """The ranking function of a policy."""
    if policy.type == "timestamp":

        def by_time(v: AttributeValue) -> _Rank:
            return (0, 0, v.ts, v.dataset, v.record_id)

        return by_time
    order = {ds: i for i, ds in reversed(list(enumerate(policy.datasets)))}

    def by_dataset(v: AttributeValue) -> _Rank:
        i = order.get(v.dataset)
        if i is None:
            return (0, 0, v.ts, v.dataset, v.record_id)
        return (1, -i, v.ts, v.dataset, v.record_id)

    return by_dataset


def merge_flat(
    values: Iterable[AttributeValue], policy: MergePolicy
) -> dict[str, tuple[Any, AttributeValue]]:
    """Per attribute path, the winning value and its row, by `policy`; sorted by path.

    timestamp: the greatest ts wins; ties go to the greater dataset name, then the greater
    record id, so the result does not depend on the order of `values`.
    dataset_precedence: the earliest listed dataset wins; unlisted datasets rank after all
    listed ones and among themselves as in timestamp.

    When the winners' paths collide (one dataset sent "address" as a value, another
    "address.city"), the better-ranked winner keeps its shape and the paths colliding with it
    are left out, so that `merge` and this function always agree.
    """
    rank = _ranker(policy)
    best: dict[str, tuple[_Rank, AttributeValue]] = {}
    for v in values:
        r = rank(v)
        held = best.get(v.path)
        if held is None or r > held[0]:
            best[v.path] = (r, v)
    best = _drop_collisions(best)
    return {path: (best[path][1].value, best[path][1]) for path in sorted(best)}


def _drop_collisions(
    best: dict[str, tuple[_Rank, AttributeValue]],
) -> dict[str, tuple[_Rank, AttributeValue]]:
    inner: set[str] = set()
    for path in best:
        i = path.find(SEP)
        while i > 0:
            inner.add(path[:i])
            i = path.find(SEP, i + 1)
    if inner.isdisjoint(best):
        return best
    taken: set[str] = set()
    inner.clear()
    kept: dict[str, tuple[_Rank, AttributeValue]] = {}
    for path, held in sorted(best.items(), key=lambda kv: (kv[1][0], kv[0]), reverse=True):
        if path in inner or _covered(path, taken):
            continue
        taken.add(path)
        kept[path] = held
        i = path.find(SEP)
        while i > 0:
            inner.add(path[:i])
            i = path.find(SEP, i + 1)
    return kept


def merge(values: Iterable[AttributeValue], policy: MergePolicy) -> dict[str, Any]:
    """The merged profile attributes, as a nested object."""
    return unflatten({path: value for path, (value, _) in merge_flat(values, policy).items()})


def changed_paths(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """The sorted paths of two flat attribute maps whose value differs: added, removed or
    changed. Types count (1, 1.0 and True differ); NaN equals NaN."""
    out = [p for p, v in after.items() if p not in before or not _same(before[p], v)]
    out.extend(p for p in before if p not in after)
    return sorted(out)


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)

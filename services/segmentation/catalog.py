"""The segments: definitions applied with `cdp apply` (kind segment), compiled once, with
the evaluation method the system chose for each and an index of what each one reads."""

from __future__ import annotations

import graphlib
from collections.abc import Iterable

import msgspec

from services.segmentation.language import (
    Node,
    Reads,
    SegmentSyntaxError,
    check_cycles,
    dependencies,
    from_json,
    method,
    method_reason,
    parse,
    reads,
    to_json,
)
from shared.admin import AdminFailure, ApplyResult, PublishedSegment, apply_result
from shared.resources import NAME_RE, Segment

KIND = "segment"


class CompiledSegment(msgspec.Struct):
    spec: Segment
    node: Node
    method: str
    reason: str
    reads: Reads
    deps: set[str]
    parents: frozenset[str] = frozenset()
    """Every proper prefix of the attribute paths it reads (`person` for `person.age`)."""
    read_paths: tuple[str, ...] = ()
    """The attribute paths it reads, sorted."""
    read_segments: tuple[str, ...] = ()
    """The segments it reads with inSegment, sorted."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def streaming(self) -> bool:
        return self.method == "streaming"

    def touches(self, changed: set[str], closure: set[str]) -> bool:
        """Whether a change at the paths `changed` can affect the result (`closure`: those
        paths and their parents, from `path_closure`). The same answer as
        `Reads.touches_paths`, by set look-ups instead of comparing every pair."""
        paths = self.reads.attribute_paths
        return any(p in closure for p in paths) or any(c in self.parents for c in changed)


def path_closure(changed: set[str]) -> set[str]:
    """The changed paths and every parent of each (`person.name.first`: also `person.name`
    and `person`)."""
    out = set(changed)
    for path in changed:
        out.update(path[:i] for i, ch in enumerate(path) if ch == ".")
    return out


def compile_segment(spec: Segment, node: Node | None = None) -> CompiledSegment:
    """Parse (unless `node` is given); the method is set by `Catalog.refresh_methods`."""
    if node is None:
        try:
            node = parse(spec.expression)
        except SegmentSyntaxError as exc:
            raise AdminFailure(
                "syntax", str(exc), kind=KIND, name=spec.name, field="expression"
            ) from None
    read = reads(node)
    parents = frozenset(
        path[:i] for path in read.attribute_paths for i, ch in enumerate(path) if ch == "."
    )
    return CompiledSegment(
        spec,
        node,
        "batch",
        "",
        read,
        dependencies(node),
        parents,
        tuple(sorted(read.attribute_paths)),
        tuple(sorted(read.segments)),
    )


class Catalog:
    def __init__(self) -> None:
        self.segments: dict[str, CompiledSegment] = {}
        self.order: list[str] = []
        """Dependencies before dependants (inSegment sees fresh memberships)."""
        self._dependants: dict[frozenset[str], frozenset[str]] = {}

    def snapshot(self) -> Catalog:
        """The segments as they are now: what one step evaluates, while `adopt` may
        replace them (an apply) before the step ends."""
        out = Catalog()
        out.segments, out.order, out._dependants = self.segments, self.order, self._dependants
        return out

    def scratch(self) -> Catalog:
        """A copy to plan changes on (`put`), adopted once they are stored."""
        out = Catalog()
        # Copies: planning sets the methods of the segments that follow a changed one.
        out.segments = {n: msgspec.structs.replace(s) for n, s in self.segments.items()}
        out.refresh_methods()
        return out

    def adopt(self, other: Catalog) -> None:
        """Take `other`'s segments (planned on a `scratch`, then stored)."""
        self.segments, self.order, self._dependants = other.segments, other.order, {}

    def get(self, name: str) -> CompiledSegment | None:
        return self.segments.get(name)

    def load(self, rows: Iterable[tuple[bytes, bytes]]) -> None:
        """Compile stored segments: (spec JSON, AST JSON) each."""
        for spec_json, ast_json in rows:
            spec = msgspec.json.decode(spec_json, type=Segment)
            self.segments[spec.name] = compile_segment(spec, from_json(ast_json))
        self.refresh_methods()

    @property
    def policies_used(self) -> bool:
        """Whether any segment reads the profile through a merge policy of its own."""
        return any(s.spec.merge_policy for s in self.segments.values())

    def refresh_methods(self) -> None:
        self._dependants = {}
        sorter = graphlib.TopologicalSorter({n: s.deps for n, s in self.segments.items()})
        self.order = [n for n in sorter.static_order() if n in self.segments]

        def streaming_of(name: str) -> bool:
            seg = self.segments.get(name)
            return seg is not None and seg.streaming

        for name in self.order:  # dependencies first: inSegment follows their method
            seg = self.segments[name]
            seg.method = method(seg.node, streaming_of)
            seg.reason = method_reason(seg.node, streaming_of)

    def dependants(self, names: set[str]) -> frozenset[str]:
        """Segments that read any of `names` through inSegment, transitively (remembered
        until the segments change: profiles of a batch mostly ask the same)."""
        key = frozenset(names)
        found = self._dependants.get(key)
        if found is not None:
            return found
        out: set[str] = set()
        frontier = set(names)
        while frontier:
            nxt = {s.name for s in self.segments.values() if s.deps & frontier} - out
            out |= nxt
            frontier = nxt
        if len(self._dependants) > 1024:
            self._dependants.clear()
        found = self._dependants[key] = frozenset(out)
        return found

    def plan(self, spec: Segment) -> tuple[CompiledSegment, ApplyResult]:
        if not NAME_RE.match(spec.name):
            raise AdminFailure(
                "invalid",
                "must start with a lower-case letter and hold only a-z, 0-9, '_' and '-'",
                kind=KIND,
                name=spec.name,
                field="name",
            )
        compiled = compile_segment(spec)
        missing = sorted(d for d in compiled.deps if d not in self.segments and d != spec.name)
        if missing:
            raise AdminFailure(
                "invalid",
                f"inSegment names unknown segments: {', '.join(missing)}",
                kind=KIND,
                name=spec.name,
                field="expression",
            )

        def deps_of(n: str) -> set[str]:
            if n == spec.name:
                return compiled.deps
            seg = self.segments.get(n)
            return seg.deps if seg else set()

        cycle = check_cycles(spec.name, deps_of)
        if cycle:
            raise AdminFailure(
                "cycle",
                f"inSegment makes a cycle: {' -> '.join(cycle)}",
                kind=KIND,
                name=spec.name,
                field="expression",
            )
        current = self.segments.get(spec.name)
        return compiled, apply_result(KIND, spec.name, current.spec if current else None, spec)

    def put(self, compiled: CompiledSegment) -> None:
        self.segments[compiled.name] = compiled
        self.refresh_methods()

    @staticmethod
    def ast_json(compiled: CompiledSegment) -> bytes:
        return to_json(compiled.node)


def published(seg: CompiledSegment) -> PublishedSegment:
    """The segment as it is published on `cdp.config.segment.<name>`."""
    return PublishedSegment(
        name=seg.name,
        expression=seg.spec.expression,
        description=seg.spec.description,
        merge_policy=seg.spec.merge_policy,
        method=seg.method,
        reason=seg.reason,
    )

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
from shared.admin import AdminFailure, ApplyResult, apply_result
from shared.resources import NAME_RE, Segment

KIND = "segment"


class CompiledSegment(msgspec.Struct):
    spec: Segment
    node: Node
    method: str
    reason: str
    reads: Reads
    deps: set[str]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def streaming(self) -> bool:
        return self.method == "streaming"


def compile_segment(spec: Segment, node: Node | None = None) -> CompiledSegment:
    """Parse (unless `node` is given); the method is set by `Catalog.refresh_methods`."""
    if node is None:
        try:
            node = parse(spec.expression)
        except SegmentSyntaxError as exc:
            raise AdminFailure(
                "syntax", str(exc), kind=KIND, name=spec.name, field="expression"
            ) from None
    return CompiledSegment(spec, node, "batch", "", reads(node), dependencies(node))


class Catalog:
    def __init__(self) -> None:
        self.segments: dict[str, CompiledSegment] = {}
        self.order: list[str] = []
        """Dependencies before dependants (inSegment sees fresh memberships)."""

    def get(self, name: str) -> CompiledSegment | None:
        return self.segments.get(name)

    def load(self, rows: Iterable[tuple[bytes, bytes]]) -> None:
        for spec_json, ast_json in rows:
            spec = msgspec.json.decode(spec_json, type=Segment)
            self.segments[spec.name] = compile_segment(spec, from_json(ast_json))
        self.refresh_methods()

    def refresh_methods(self) -> None:
        sorter = graphlib.TopologicalSorter({n: s.deps for n, s in self.segments.items()})
        self.order = [n for n in sorter.static_order() if n in self.segments]

        def streaming_of(name: str) -> bool:
            seg = self.segments.get(name)
            return seg is not None and seg.streaming

        for name in self.order:  # dependencies first: inSegment follows their method
            seg = self.segments[name]
            seg.method = method(seg.node, streaming_of)
            seg.reason = method_reason(seg.node, streaming_of)

    def dependants(self, names: set[str]) -> set[str]:
        """Segments that read any of `names` through inSegment, transitively."""
        out: set[str] = set()
        frontier = set(names)
        while frontier:
            nxt = {s.name for s in self.segments.values() if s.deps & frontier} - out
            out |= nxt
            frontier = nxt
        return out

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

"""The segment language: audience definitions as a typed AST, and what follows from them.

`parse` turns a definition into a tree of msgspec Structs tagged by their field "op"; the
tree is validated once, here, and evaluated (evaluate.py) with `match`. Its canonical JSON
is `to_json` (what the service stores), its canonical text `to_text`. `method` decides
streaming or batch evaluation, `reads` and `dependencies` say which changes can affect a
segment, `check_cycles` refuses segments that include themselves through `inSegment`.

Pure: no I/O apart from reading the grammar shipped beside this module. The language is
described, with one example per form, in docs/segments.md.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from typing import Any, Final, Literal, TypeAlias

import msgspec
import re2
from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from services.segmentation.errors import SegmentationError

# -- the AST --------------------------------------------------------------------------------

Scalar: TypeAlias = str | int | float | bool
CompareOp: TypeAlias = Literal["=", "!=", "<", "<=", ">", ">="]
StringFunc: TypeAlias = Literal["startsWith", "endsWith", "contains", "equals", "matches"]
AggregateFunc: TypeAlias = Literal["sum", "avg", "min", "max"]
WindowKind: TypeAlias = Literal["last", "between", "ever"]
Method: TypeAlias = Literal["streaming", "batch"]

COMPARE_OPS: Final[tuple[CompareOp, ...]] = ("=", "!=", "<", "<=", ">", ">=")
STRING_FUNCS: Final[tuple[StringFunc, ...]] = (
    "startsWith",
    "endsWith",
    "contains",
    "equals",
    "matches",
)
AGGREGATES: Final[tuple[AggregateFunc, ...]] = ("sum", "avg", "min", "max")
EVENT_TYPE_PATH: Final = "type"
"""Inside event(...), this path is the event type; every other path reads the payload."""
STREAMING_WINDOW: Final = 86400.0
"""Event windows up to this many seconds (24 hours) can be evaluated in streaming."""
MAX_DEPTH: Final = 64
"""Nesting limit of a definition (conditions inside conditions)."""
_INT_LIMIT: Final = 2**63


class Window(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """When an event must have happened, relative to the evaluation time `now`.

    last: now - seconds <= timestamp <= now. between: from the start of UTC day `start` to
    the end of UTC day `end`, both YYYY-MM-DD, and not after now. ever: not after now.
    """

    kind: WindowKind
    seconds: float | None = None
    start: str | None = None
    end: str | None = None


EVER: Final = Window("ever")


class _Node(msgspec.Struct, frozen=True, tag_field="op", forbid_unknown_fields=True):
    pass


class Compare(_Node, tag="compare", frozen=True):
    path: str
    operator: CompareOp
    value: Scalar


class Exists(_Node, tag="exists", frozen=True):
    path: str


class InList(_Node, tag="in_list", frozen=True):
    path: str
    values: tuple[Scalar, ...]
    negate: bool


class StringTest(_Node, tag="string_test", frozen=True):
    path: str
    func: StringFunc
    value: str
    ignore_case: bool


class And(_Node, tag="and", frozen=True):
    items: tuple[Node, ...]


class Or(_Node, tag="or", frozen=True):
    items: tuple[Node, ...]


class Not(_Node, tag="not", frozen=True):
    item: Node


class EventExists(_Node, tag="event_exists", frozen=True):
    """At least one event matching `condition` (None: any event) in the window."""

    condition: Node | None
    window: Window


class EventCount(_Node, tag="event_count", frozen=True):
    condition: Node | None
    window: Window
    operator: CompareOp
    value: int | float


class EventAggregate(_Node, tag="event_aggregate", frozen=True):
    func: AggregateFunc
    path: str
    condition: Node | None
    window: Window
    operator: CompareOp
    value: int | float


class Sequence(_Node, tag="sequence", frozen=True):
    """Events matching each step, in this order of time, all in the window."""

    steps: tuple[Node | None, ...]
    window: Window


class InSegment(_Node, tag="in_segment", frozen=True):
    name: str


Node: TypeAlias = (
    Compare
    | Exists
    | InList
    | StringTest
    | And
    | Or
    | Not
    | EventExists
    | EventCount
    | EventAggregate
    | Sequence
    | InSegment
)
EventNode: TypeAlias = EventExists | EventCount | EventAggregate | Sequence

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Node)


# -- errors ---------------------------------------------------------------------------------


class SegmentError(SegmentationError, ValueError):
    """A segment definition that cannot be accepted."""

    code = "invalid_segment"


class SegmentSyntaxError(SegmentError):
    """A definition that does not parse, or that parses into something meaningless.

    `line` and `column` are 1-based; `expected` names what could come there ("a string",
    "]", "end of input", ...); `got` is the offending text.
    """

    code = "segment_syntax"

    def __init__(
        self,
        detail: str,
        *,
        line: int,
        column: int,
        expected: list[str] | None = None,
        got: str = "",
    ) -> None:
        super().__init__(f"line {line}, column {column}: {detail}")
        self.detail = detail
        self.line = line
        self.column = column
        self.expected = expected or []
        self.got = got


class _Invalid(Exception):
    """A semantic check failed; `part` says where (for the position), `expected` what."""

    def __init__(self, detail: str, part: str = "", expected: Iterable[str] = ()) -> None:
        super().__init__(detail)
        self.detail = detail
        self.part = part
        self.expected = list(expected)


# -- parsing --------------------------------------------------------------------------------

GRAMMAR: Final = resources.files(__package__ or "services.segmentation").joinpath("grammar.lark")
_parser: Final = Lark(
    GRAMMAR.read_text(encoding="utf-8"),
    parser="lalr",
    lexer="contextual",
    propagate_positions=True,
    maybe_placeholders=True,
)

_UNITS: Final[dict[str, float]] = {
    "second": 1.0,
    "minute": 60.0,
    "hour": 3600.0,
    "day": 86400.0,
    "week": 604800.0,
}
_FUNC_BY_LOWER: Final[dict[str, StringFunc]] = {f.lower(): f for f in STRING_FUNCS}
_OP_ALIASES: Final[dict[str, CompareOp]] = {op: op for op in COMPARE_OPS} | {"==": "="}
_IGNORE_CASE: Final = "ignorecase"


def parse(text: str) -> Node:
    """The AST of a segment definition; SegmentSyntaxError if it is not one."""
    try:
        tree = _parser.parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text) from None
    return _Builder().node(tree, in_event=False, depth=0)


def to_json(node: Node) -> bytes:
    """The canonical JSON of a definition: msgspec's encoding of the AST."""
    return _encoder.encode(node)


def from_json(data: bytes | str) -> Node:
    """The AST of `to_json`'s output, decoded strictly and validated as `parse` does."""
    try:
        node: Node = _decoder.decode(data)
    except msgspec.DecodeError as e:
        raise SegmentError(f"not a segment definition: {e}") from None
    except RecursionError:
        raise SegmentError(f"nested more than {MAX_DEPTH} levels deep") from None
    validate(node)
    return node


def validate(node: Node) -> None:
    """Raise SegmentError if the tree is not one `parse` could produce (a tree built in
    code or decoded: `parse` checks as it builds)."""
    try:
        _validate(node, in_event=False, depth=0)
    except _Invalid as e:
        raise SegmentError(e.detail) from None


def _validate(node: Node | None, *, in_event: bool, depth: int) -> None:
    if node is None:
        if not in_event:
            raise _Invalid("a missing condition is only allowed inside event()")
        return
    if depth > MAX_DEPTH:
        raise _Invalid(f"nested more than {MAX_DEPTH} levels deep")
    _check(node, in_event)
    for child, child_in_event in _children(node):
        _validate(child, in_event=in_event or child_in_event, depth=depth + 1)


def _children(node: Node) -> Iterator[tuple[Node | None, bool]]:
    """The direct sub-conditions, each with whether it is an event condition."""
    match node:
        case And() | Or():
            for item in node.items:
                yield item, False
        case Not():
            yield node.item, False
        case EventExists() | EventCount() | EventAggregate():
            yield node.condition, True
        case Sequence():
            for step in node.steps:
                yield step, True
        case _:
            pass


class _Builder:
    """Lark's tree to the AST, checking each node where its text is."""

    def node(self, tree: Tree[Token], *, in_event: bool, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise _error_at(tree, f"nested more than {MAX_DEPTH} levels deep")
        kids = [c for c in tree.children if c is not None]
        parts: dict[str, Tree[Token] | Token] = {}
        node: Node
        match str(tree.data):
            case "or_expr" | "and_expr":
                items = tuple(self._sub(c, in_event, depth) for c in kids)
                node = Or(items) if tree.data == "or_expr" else And(items)
            case "negation":
                node = Not(self._sub(kids[0], in_event, depth))
            case "compare":
                path, op, value = kids
                parts = {"value": value, "operator": op}
                node = Compare(self._path(path), _OP_ALIASES[str(op)], self._value(_token(value)))
            case "exists":
                node = Exists(self._path(kids[0]))
            case "in_list" | "not_in_list":
                path, values = kids
                node = InList(
                    self._path(path),
                    tuple(self._value(_token(v)) for v in _tree(values).children if v),
                    negate=tree.data == "not_in_list",
                )
            case "string_test":
                path, func, value = kids
                parts = {"value": value}
                name = str(func).lower()
                ignore_case = name.endswith(_IGNORE_CASE)
                base = name.removesuffix(_IGNORE_CASE) if ignore_case else name
                node = StringTest(
                    self._path(path), _FUNC_BY_LOWER[base], self._string(_token(value)), ignore_case
                )
            case "event_exists":
                first, window = tree.children
                parts = {"window": window or tree}
                node = EventExists(self._event(_tree(first), depth), self._window(window))
            case "sequence":
                *events, window = tree.children
                parts = {"window": window or tree}
                node = Sequence(
                    tuple(self._event(_tree(e), depth) for e in events if e),
                    self._window(window),
                )
            case "count":
                event, window, op, value = tree.children
                parts = {"window": window or tree, "value": _token(value)}
                node = EventCount(
                    self._event(_tree(event), depth),
                    self._window(window),
                    _OP_ALIASES[str(op)],
                    self._number(_token(value)),
                )
            case "aggregate":
                func, path, event, window, op, value = tree.children
                parts = {"func": _token(func), "window": window or tree, "value": _token(value)}
                name = str(func).lower()
                if name not in AGGREGATES:
                    raise SegmentSyntaxError(
                        f"unknown aggregate {_quote(str(func))}: expected sum, avg, min or max",
                        line=_token(func).line or 1,
                        column=_token(func).column or 1,
                        expected=list(AGGREGATES),
                        got=str(func),
                    )
                node = EventAggregate(
                    _agg(name),
                    self._path(path),
                    self._event(_tree(event), depth),
                    self._window(window),
                    _OP_ALIASES[str(op)],
                    self._number(_token(value)),
                )
            case "in_segment":
                node = InSegment(self._string(_token(kids[0])))
            case other:  # pragma: no cover - the grammar has no other rule
                raise _error_at(tree, f"unexpected rule {other}")
        try:
            _check(node, in_event)
        except _Invalid as e:
            at = parts.get(e.part, tree)
            raise _error_at(at, e.detail, e.expected) from None
        return node

    def _sub(self, child: Tree[Token] | Token | None, in_event: bool, depth: int) -> Node:
        return self.node(_tree(child), in_event=in_event, depth=depth + 1)

    def _event(self, event: Tree[Token], depth: int) -> Node | None:
        cond = event.children[0] if event.children else None
        if cond is None:
            return None
        return self.node(_tree(cond), in_event=True, depth=depth + 1)

    def _window(self, window: Tree[Token] | Token | None) -> Window:
        if window is None:
            return EVER
        tree = _tree(window)
        a, b = (_token(c) for c in tree.children)
        if tree.data == "between":
            return Window("between", start=str(a), end=str(b))
        unit = str(b).lower().removesuffix("s")
        amount = self._number(a)
        if not amount > 0:
            raise _error_at(a, "a window must be longer than 0")
        return Window("last", seconds=float(amount * _UNITS[unit]))

    def _path(self, path: Tree[Token] | Token | None) -> str:
        return ".".join(str(s).strip("`") for s in _tree(path).children if s is not None)

    def _value(self, tok: Token) -> Scalar:
        match tok.type:
            case "STRING":
                return self._string(tok)
            case "NUMBER":
                return self._number(tok)
            case "TRUE":
                return True
            case "FALSE":
                return False
            case _:  # DATE: an ISO date is compared as a string
                return str(tok)

    def _string(self, tok: Token) -> str:
        try:
            value = json.loads(str(tok))
        except json.JSONDecodeError as e:
            bad = str(tok)[e.pos : e.pos + 2]
            raise SegmentSyntaxError(
                f"invalid escape {_quote(bad)} in a string: "
                'the escapes are \\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX',
                line=tok.line or 1,
                column=(tok.column or 1) + e.pos,
                got=bad,
            ) from None
        assert isinstance(value, str)
        return value

    def _number(self, tok: Token) -> int | float:
        text = str(tok)
        if any(c in text for c in ".eE"):
            return float(text)
        return int(text)


def _agg(name: str) -> AggregateFunc:
    for func in AGGREGATES:
        if func == name:
            return func
    raise _Invalid(f"unknown aggregate {name}")  # pragma: no cover - checked before


def _tree(x: Tree[Token] | Token | None) -> Tree[Token]:
    assert isinstance(x, Tree)
    return x


def _token(x: Tree[Token] | Token | None) -> Token:
    assert isinstance(x, Token)
    return x


def _error_at(
    at: Tree[Token] | Token, detail: str, expected: Iterable[str] = ()
) -> SegmentSyntaxError:
    if isinstance(at, Token):
        line, column, got = at.line, at.column, str(at)
    else:
        line = getattr(at.meta, "line", None)
        column = getattr(at.meta, "column", None)
        got = ""
    return SegmentSyntaxError(
        detail, line=line or 1, column=column or 1, expected=list(expected), got=got
    )


# -- semantic checks (shared by parse and from_json) --------------------------------------

_PLAIN_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RESERVED_FIRST: Final = frozenset({"not", "event", "count", "insegment"})
"""Keywords that can start a condition: a path starting with one needs backticks."""
_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")


def compile_regex(pattern: str, ignore_case: bool) -> Any:
    """A `matches` pattern compiled with RE2: matching takes time linear in the text, so no
    pattern and no record can stall segmentation. Raises `re2.error` for what RE2 refuses
    (backreferences, lookaround, invalid syntax)."""
    options = re2.Options()
    options.log_errors = False
    options.case_sensitive = not ignore_case
    return re2.compile(pattern, options)


def _re2_reason(error: Exception) -> str:
    reason = error.args[0] if error.args else str(error)
    return reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)


def _check(node: Node, in_event: bool) -> None:
    """The checks of one node on its own (its children are checked separately)."""
    match node:
        case Compare():
            _check_path(node.path)
            _check_scalar(node.value)
            if isinstance(node.value, bool) and node.operator not in ("=", "!="):
                raise _Invalid(
                    "a boolean can only be compared with = or !=", "operator", ("=", "!=")
                )
        case Exists():
            _check_path(node.path)
        case InList():
            _check_path(node.path)
            for v in node.values:
                _check_scalar(v)
        case StringTest():
            _check_path(node.path)
            _check_text(node.value)
            if node.func == "matches":
                try:
                    compile_regex(node.value, node.ignore_case)
                except re2.error as e:
                    raise _Invalid(
                        "not a valid regular expression for RE2 (linear-time matching: no "
                        f"backreferences, no lookaround): {_re2_reason(e)}",
                        "value",
                    ) from None
        case And() | Or():
            if len(node.items) < 2:
                raise _Invalid(f"{type(node).__name__} needs at least two items")
        case Not():
            pass
        case EventExists() | EventCount() | EventAggregate() | Sequence():
            if in_event:
                raise _Invalid("an event condition cannot contain another event condition")
            _check_window(node.window)
            if isinstance(node, EventCount | EventAggregate):
                _check_number(node.value)
            if isinstance(node, EventAggregate):
                _check_path(node.path)
            if isinstance(node, Sequence) and len(node.steps) < 2:
                raise _Invalid("a sequence needs at least two steps")
        case InSegment():
            if in_event:
                raise _Invalid("inSegment() cannot be used inside event()")
            if not node.name:
                raise _Invalid("a segment name cannot be empty", "", ("a segment name",))
            _check_text(node.name)


def _check_path(path: str) -> None:
    for seg in path.split("."):
        if not seg or "`" in seg or "\n" in seg or "\r" in seg:
            raise _Invalid(f"not a valid path: {_quote(path)}")
        _check_text(seg)


def _check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid("a string cannot hold a lone surrogate", "value") from None


def _check_scalar(value: Scalar) -> None:
    if isinstance(value, str):
        _check_text(value)
    elif not isinstance(value, bool):
        _check_number(value)


def _check_number(value: float) -> None:
    if isinstance(value, bool):
        raise _Invalid("expected a number, got a boolean", "value", ("a number",))
    if isinstance(value, int):
        if not -_INT_LIMIT <= value < _INT_LIMIT:
            raise _Invalid("an integer must fit in 64 bits", "value")
    elif not math.isfinite(value):
        raise _Invalid("a number must be finite", "value")


def _check_window(window: Window) -> None:
    match window.kind:
        case "last":
            s = window.seconds
            if s is None or not math.isfinite(s) or not s > 0:
                raise _Invalid("a window must be longer than 0", "window")
            if window.start is not None or window.end is not None:
                raise _Invalid("a `last` window has no dates", "window")
        case "between":
            if window.seconds is not None or window.start is None or window.end is None:
                raise _Invalid("a `between` window has a start and an end date", "window")
            start, end = _date(window.start), _date(window.end)
            if end < start:
                raise _Invalid(f"the end {window.end} is before the start {window.start}", "window")
        case "ever":
            if window.seconds is not None or window.start is not None or window.end is not None:
                raise _Invalid("an `ever` window has no seconds and no dates", "window")


def _date(text: str) -> dt.date:
    if not _DATE.fullmatch(text):
        raise _Invalid(f"not a date (YYYY-MM-DD): {_quote(text)}", "window")
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise _Invalid(f"not a date: {text}", "window") from None


def day_range(window: Window) -> tuple[float, float]:
    """The epoch seconds [start, end) of a `between` window: whole UTC days."""
    assert window.start is not None
    assert window.end is not None
    start = dt.datetime.combine(_date(window.start), dt.time(), dt.UTC)
    end = dt.datetime.combine(_date(window.end), dt.time(), dt.UTC) + dt.timedelta(days=1)
    return start.timestamp(), end.timestamp()


# -- syntax errors ---------------------------------------------------------------------------

_TERMINAL_NAMES: Final[dict[str, str]] = {
    "STRING": "a string",
    "NUMBER": "a number",
    "DATE": "a date",
    "TRUE": "true",
    "FALSE": "false",
    "NAME": "an attribute path",
    "QUOTED_NAME": "an attribute path",
    "CMP_OP": "a comparison (=, !=, <, <=, >, >=)",
    "_EXISTS": "exists",
    "_IN": "in",
    "_NOTIN": "notIn",
    "STRING_FUNC": "a string test (startsWith, endsWith, contains, equals, matches)",
    "UNIT": "a unit (minutes, hours, days, ...)",
    "_NOT": "not",
    "_EVENT": "event",
    "_COUNT": "count",
    "_INSEGMENT": "inSegment",
    "_OF": "of",
    "_THEN": "then",
    "_WITHIN": "within",
    "_BETWEEN": "between",
    "_AND": "and",
    "_OR": "or",
    "LPAR": "(",
    "RPAR": ")",
    "LSQB": "[",
    "RSQB": "]",
    "COMMA": ",",
    "DOT": ".",
    "$END": "end of input",
}
_ORDER: Final = {name: i for i, name in enumerate(dict.fromkeys(_TERMINAL_NAMES.values()))}
_LEXEME: Final = re.compile(
    r'"(?:[^"\\\n]|\\.)*"?|`[^`\n]*`?|[A-Za-z_][A-Za-z0-9_]*|-?\d[\w.+-]*|[=!<>]+|\S'
)
_GOT_LIMIT: Final = 40


def _syntax_error(e: UnexpectedInput, text: str) -> SegmentSyntaxError:
    line, column = e.line, e.column
    accepted: Iterable[str] = ()
    if isinstance(e, UnexpectedToken):
        accepted = e.accepts or e.expected
        if e.token.type == "$END":
            got = ""
            line, column = _end_position(text)
        else:
            got = str(e.token)
    elif isinstance(e, UnexpectedCharacters):
        accepted = e.allowed or ()
        pos = e.pos_in_stream or 0
        m = _LEXEME.match(text, pos)
        got = m.group() if m else text[pos : pos + 1]
    else:  # pragma: no cover - LALR raises only the two above
        got = ""
    names = sorted(
        {_TERMINAL_NAMES.get(t, t) for t in accepted}, key=lambda n: (_ORDER.get(n, 99), n)
    )
    if len(got) > _GOT_LIMIT:
        got = got[:_GOT_LIMIT] + "..."
    detail = f"expected {_alternatives(names)}, got {_quote(got) if got else 'end of input'}"
    return SegmentSyntaxError(
        detail, line=max(line, 1), column=max(column, 1), expected=names, got=got
    )


def _end_position(text: str) -> tuple[int, int]:
    """Just after the last character that is not a blank or part of a comment."""
    lines = text.split("\n")
    for i in range(len(lines) - 1, -1, -1):
        content = _strip_comment(lines[i]).rstrip()
        if content:
            return i + 1, len(content) + 1
    return 1, 1


def _strip_comment(line: str) -> str:
    in_string = False
    escaped = False
    for i, c in enumerate(line):
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif line.startswith("--", i):
            return line[:i]
    return line


def _alternatives(names: list[str]) -> str:
    shown = [n if n.startswith(("a ", "an ", "end of")) else _quote(n) for n in names]
    if not shown:
        return "nothing more"
    if len(shown) == 1:
        return shown[0]
    return ", ".join(shown[:-1]) + " or " + shown[-1]


def _quote(text: str) -> str:
    if text.startswith('"'):
        return text
    return '"' + text + '"'


# -- canonical text ------------------------------------------------------------------------


def to_text(node: Node) -> str:
    """The canonical text of a definition: `parse(to_text(n)) == n`."""
    match node:
        case Compare():
            return f"{_path_text(node.path)} {node.operator} {_value_text(node.value)}"
        case Exists():
            return f"{_path_text(node.path)} exists"
        case InList():
            keyword = "notIn" if node.negate else "in"
            values = ", ".join(_value_text(v) for v in node.values)
            return f"{_path_text(node.path)} {keyword} [{values}]"
        case StringTest():
            func = node.func + ("IgnoreCase" if node.ignore_case else "")
            return f"{_path_text(node.path)} {func} {_string_text(node.value)}"
        case And():
            return " and ".join(_grouped(i) for i in node.items)
        case Or():
            return " or ".join(_grouped(i) for i in node.items)
        case Not():
            return f"not {_grouped(node.item)}"
        case EventExists():
            return _event_text(node.condition) + _window_text(node.window)
        case EventCount():
            inner = _event_text(node.condition) + _window_text(node.window)
            return f"count({inner}) {node.operator} {_value_text(node.value)}"
        case EventAggregate():
            inner = _event_text(node.condition) + _window_text(node.window)
            return (
                f"{node.func}({_path_text(node.path)} of {inner}) "
                f"{node.operator} {_value_text(node.value)}"
            )
        case Sequence():
            steps = " then ".join(_event_text(s) for s in node.steps)
            return steps + _window_text(node.window)
        case InSegment():
            return f"inSegment({_string_text(node.name)})"


def _grouped(node: Node) -> str:
    text = to_text(node)
    return f"({text})" if isinstance(node, And | Or) else text


def _event_text(condition: Node | None) -> str:
    return "event()" if condition is None else f"event({to_text(condition)})"


def _window_text(window: Window) -> str:
    match window.kind:
        case "ever":
            return ""
        case "between":
            return f" between {window.start} and {window.end}"
        case "last":
            assert window.seconds is not None
            return f" within {duration_text(window.seconds)}"


def duration_text(seconds: float) -> str:
    """ "7 days", "1 hour", "90 seconds": the largest unit that divides `seconds` exactly."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds.is_integer() and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'' if n == 1 else 's'}"
    return f"{seconds!r} seconds"


def _path_text(path: str) -> str:
    out = []
    for i, seg in enumerate(path.split(".")):
        plain = _PLAIN_NAME.fullmatch(seg) and not (i == 0 and seg.lower() in _RESERVED_FIRST)
        out.append(seg if plain else f"`{seg}`")
    return ".".join(out)


def _value_text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _string_text(value)
    return repr(value)


def _string_text(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


# -- streaming or batch ---------------------------------------------------------------------


def method(node: Node, streaming_of: Callable[[str], bool] = lambda name: False) -> Method:
    """How a segment is evaluated. Streaming: on every profile change and at `next_change`;
    batch: by the scheduled job. The rule is in docs/segments.md."""
    return "batch" if _batch_reasons(node, streaming_of) else "streaming"


def method_reason(node: Node, streaming_of: Callable[[str], bool] = lambda name: False) -> str:
    """Why `method` decided as it did, for people."""
    reasons = _batch_reasons(node, streaming_of)
    if reasons:
        return "batch: " + "; ".join(reasons)
    r = reads(node)
    kinds = []
    if r.attribute_paths:
        kinds.append("profile attributes")
    if r.uses_events:
        kinds.append("events within 24 hours")
    if r.segments:
        kinds.append("streaming segments")
    return "streaming: reads only " + _and_list(kinds)


def _and_list(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _batch_reasons(node: Node, streaming_of: Callable[[str], bool]) -> list[str]:
    out: list[str] = []
    for n in walk(node):
        match n:
            case EventAggregate():
                out.append(f"{n.func}() over events is computed in batch")
            case EventExists() | EventCount() | Sequence():
                what = _short(n)
                match n.window.kind:
                    case "ever":
                        out.append(f"{what} has no window (it looks at every event ever)")
                    case "between":
                        out.append(f"{what} looks at a date range")
                    case "last":
                        seconds = n.window.seconds or 0.0
                        if seconds > STREAMING_WINDOW:
                            out.append(f"{what} looks back {duration_text(seconds)}, over 24 hours")
            case InSegment():
                if not streaming_of(n.name):
                    out.append(f"inSegment({_string_text(n.name)}) is a batch segment")
            case _:
                pass
    return out


def _short(node: Node) -> str:
    text = to_text(node)
    return text if len(text) <= 80 else text[:77] + "..."


# -- what a segment reads ---------------------------------------------------------------------


class Reads(msgspec.Struct):
    """What a definition looks at, so that a change re-evaluates only the segments it can
    affect."""

    event_types: set[str] | None
    """The event types its event conditions can match; None: any type (a condition with no
    test on `type`, or one that cannot be enumerated such as `type != "x"`)."""
    attribute_paths: set[str]
    """Profile attribute paths (outside event conditions)."""
    segments: set[str]
    """Segments it reads with inSegment."""
    uses_events: bool

    def touches_paths(self, changed: Iterable[str]) -> bool:
        """Whether a change at these dotted paths can affect the result: a changed path
        equals a read path or one is inside the other (`person.name` and `person.name.first`)."""
        return any(
            c == p or c.startswith(p + ".") or p.startswith(c + ".")
            for c in changed
            for p in self.attribute_paths
        )

    def touches_event(self, event_type: str | None) -> bool:
        if not self.uses_events:
            return False
        return self.event_types is None or event_type in self.event_types


def walk(node: Node) -> Iterator[Node]:
    """Every node of the tree, parents first, event conditions included."""
    yield node
    for child, _ in _children(node):
        if child is not None:
            yield from walk(child)


def dependencies(node: Node) -> set[str]:
    """The segments named by inSegment."""
    return {n.name for n in walk(node) if isinstance(n, InSegment)}


def reads(node: Node) -> Reads:
    paths: set[str] = set()
    types: set[str] | None = set()
    uses_events = False
    stack: list[tuple[Node, bool]] = [(node, False)]
    while stack:
        n, in_event = stack.pop()
        if isinstance(n, EventExists | EventCount | EventAggregate | Sequence):
            uses_events = True
            conditions = n.steps if isinstance(n, Sequence) else (n.condition,)
            for cond in conditions:
                matched = None if cond is None else _event_types(cond)
                types = None if types is None or matched is None else types | matched
        elif not in_event and isinstance(n, Compare | Exists | InList | StringTest):
            paths.add(n.path)
        stack.extend((c, in_event or e) for c, e in _children(n) if c is not None)
    return Reads(
        event_types=types,
        attribute_paths=paths,
        segments=dependencies(node),
        uses_events=uses_events,
    )


def _event_types(cond: Node) -> set[str] | None:
    """The event types an event condition can match, or None for any."""
    match cond:
        case Compare(path="type", operator="="):
            return {cond.value} if isinstance(cond.value, str) else set()
        case InList(path="type", negate=False):
            return {v for v in cond.values if isinstance(v, str)}
        case StringTest(path="type", func="equals", ignore_case=False):
            return {cond.value}
        case And():
            known = [t for t in map(_event_types, cond.items) if t is not None]
            return set.intersection(*known) if known else None
        case Or():
            out: set[str] = set()
            for item in cond.items:
                t = _event_types(item)
                if t is None:
                    return None
                out |= t
            return out
        case _:
            return None


def check_cycles(name: str, deps_of: Callable[[str], set[str]]) -> list[str] | None:
    """The cycle through `name` that its inSegment dependencies would make, as the path
    [name, ..., name]; None if there is none. `deps_of` gives each segment's dependencies
    (those of `name` as it would be saved)."""
    path = [name]
    seen = {name}
    stack = [iter(sorted(deps_of(name)))]
    while stack:
        dep = next(stack[-1], None)
        if dep is None:
            stack.pop()
            path.pop()
        elif dep == name:
            return [*path, dep]
        elif dep not in seen:
            seen.add(dep)
            path.append(dep)
            stack.append(iter(sorted(deps_of(dep))))
    return None

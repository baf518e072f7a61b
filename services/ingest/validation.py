"""Validation of one incoming record against its dataset's schema: pure domain logic, no I/O.

A `Schema` is compiled once (`CompiledSchema`) into dynamically defined msgspec Structs, so that
type checks, required fields, enums and unknown fields are done by msgspec in C: JSON bytes
through a `msgspec.json.Decoder`, already decoded objects and CSV rows through
`msgspec.convert`. What msgspec cannot check (identity values, identity counts, sizes, event
time) is checked afterwards along paths computed once at compile time, without walking the
record.

Every outcome is either an `Accepted` record or a non-empty list of `Problem`s; nothing a
record holds makes the validator raise. msgspec stops at the first type error, so a record
that is wrong in several places is reported with the first one only.

Conventions:

- an optional field may be absent or `null`; both mean absent and are left out of the payload;
- a required field must be present and not `null`; a required field inside an optional object
  is only required when that object is present;
- dotted keys (`"person.name.first"`) of objects and CSV rows are unflattened first; JSON bytes
  are taken as they are;
- identity fields are fields with `Field.identity` reached through objects only (not through
  arrays or maps); their values are stripped of surrounding whitespace;
- a value of namespace `phone` must be a valid phone number (international with a leading
  "+", else national in the schema's phone region) and travels on in E.164.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
import sys
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, Literal

import msgspec

from shared.messages import Identity
from shared.normalize import PHONE, Unusable, phone_e164
from shared.resources import Field, Schema

__all__ = [
    "DEFAULT_EVENT_TYPE_FIELD",
    "DEFAULT_LIMITS",
    "DEFAULT_TIMESTAMP_FIELD",
    "PLACEHOLDER_RE",
    "Accepted",
    "CompiledSchema",
    "Limits",
    "Problem",
    "effective_fields",
    "is_placeholder",
]

DEFAULT_TIMESTAMP_FIELD: Final = "timestamp"
DEFAULT_EVENT_TYPE_FIELD: Final = "eventType"
MAX_TEXT: Final = 200
"""`Problem.expected` and `Problem.got` are shortened to this many characters."""


class Limits(msgspec.Struct, frozen=True):
    max_record_bytes: int = 1_048_576
    """Any record over this is rejected."""
    max_event_bytes: int = 10_240
    """A record of an event schema over this is rejected."""
    max_identities: int = 20
    """Distinct identity values in one record."""
    max_identity_length: int = 1024
    placeholders: frozenset[str] = frozenset(
        {"null", "anonymous", "undefined", "unknown", "invalid", "none", "nil", "n/a"}
    )
    """Identity values that stand for "no value". Always placeholders as well: `-1` and any
    value made only of zeros and dashes (`PLACEHOLDER_RE`, which includes `0` and the empty
    string). Compared case-insensitively after stripping whitespace."""


DEFAULT_LIMITS: Final = Limits()

PLACEHOLDER_RE: Final = re.compile(r"^[0-]*$")
"""Identity values made only of zeros and dashes ("", "0", "000", "--", "0-0") are placeholders."""


class Problem(msgspec.Struct):
    reason: str
    """Short human text, e.g. "wrong type", "missing required field", "invalid identity"."""
    path: str
    """Dotted field path, e.g. "person.name.first" or "items[3].sku"; "" for the whole record."""
    expected: str
    """What was expected, e.g. "integer", "one of gold, silver", "at most 10240 bytes"."""
    got: str
    """What came, e.g. "string 'abc'", "'null'", "23 identities" (at most 200 characters)."""


class Accepted(msgspec.Struct):
    payload: dict[str, Any]
    """The record as JSON-compatible builtins (dates and datetimes as ISO strings); absent and
    null optional fields are left out, and so are unknown fields of an "ignore" schema."""
    identities: list[Identity]
    """Every distinct identity value, in schema field order (phones in E.164)."""
    primary_identity: Identity | None
    """The value of the first present field marked primary, else the first identity."""
    timestamp: float | None
    """Epoch seconds (UTC; naive datetimes are taken as UTC). Events: the event time. Profile
    records: the value of the schema's `timestamp_field`, if it has one and it is present."""
    event_type: str | None
    """Events: the value of the event type field."""


@functools.lru_cache(maxsize=64)
def _folded(placeholders: frozenset[str]) -> frozenset[str]:
    return frozenset(p.strip().lower() for p in placeholders)


def is_placeholder(value: str, limits: Limits = DEFAULT_LIMITS) -> bool:
    """True if `value` stands for "no identity" (see `Limits.placeholders`)."""
    stripped = value.strip()
    # `not stripped.strip("0-")` is PLACEHOLDER_RE.match(stripped), without the regex engine.
    return (
        not stripped.strip("0-")
        or stripped == "-1"
        or stripped.lower() in _folded(limits.placeholders)
    )


# -- schema -> effective fields ------------------------------------------------------------------
def _resolve(fields: Mapping[str, Field], parts: list[str]) -> Field | None:
    """The field at a name path through objects, or None."""
    field: Field | None = None
    current: Mapping[str, Field] | None = fields
    for part in parts:
        if current is None or part not in current:
            return None
        field = current[part]
        current = field.fields if field.type == "object" else None
    return field


def _required_along(fields: dict[str, Field], parts: list[str]) -> dict[str, Field]:
    """A copy of `fields` in which every field along `parts` is required."""
    out = dict(fields)
    field = out[parts[0]]
    if len(parts) == 1:
        out[parts[0]] = msgspec.structs.replace(field, required=True)
    else:
        assert field.fields is not None
        out[parts[0]] = msgspec.structs.replace(
            field, required=True, fields=_required_along(field.fields, parts[1:])
        )
    return out


def _name_path(fields: Mapping[str, Field], name: str) -> list[str] | None:
    """The name path of a top-level or dotted field name, or None if not declared."""
    if name in fields:
        return [name]
    parts = name.split(".")
    if len(parts) > 1 and _resolve(fields, parts) is not None:
        return parts
    return None


def effective_fields(schema: Schema) -> dict[str, Field]:
    """The fields a record of `schema` has.

    Profile schemas: the declared fields. Event schemas: the declared fields plus, when not
    declared, the timestamp field (`timestamp_field`, default `timestamp`) as a required datetime
    and the event type field (`event_type_field`, default `eventType`) as a required string. A
    declared timestamp field (and every object on its path) is made required: an event always
    has a time. Dotted names refer to fields inside objects.
    """
    fields = dict(schema.fields)
    if schema.class_ != "event":
        return fields
    ts_name = schema.timestamp_field or DEFAULT_TIMESTAMP_FIELD
    ts_path = _name_path(fields, ts_name)
    if ts_path is None:
        fields[ts_name] = Field(type="datetime", required=True)
    else:
        fields = _required_along(fields, ts_path)
    et_name = schema.event_type_field or DEFAULT_EVENT_TYPE_FIELD
    if _name_path(fields, et_name) is None:
        fields[et_name] = Field(type="string", required=True)
    return fields


# -- schema -> msgspec types ---------------------------------------------------------------------
_FINITE: Final[Any] = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
_SCALARS: Final[dict[str, Any]] = {
    "string": str,
    "integer": int,
    "number": _FINITE,
    "boolean": bool,
    "date": dt.date,
    "datetime": dt.datetime,
}
# Typed Any so that types can be built from runtime values.
_literal: Any = Literal
_list: Any = list
_dict: Any = dict

_IdentityField = tuple[tuple[str, ...], str, str, bool]
"""(attribute path in the Struct, dotted field path, namespace, primary)."""


class _Compiler:
    """Builds the Struct types of one schema and records the paths reached through objects."""

    def __init__(self, schema_name: str, forbid_unknown: bool) -> None:
        self.schema_name = schema_name
        self.forbid_unknown = forbid_unknown
        self.attr_paths: dict[tuple[str, ...], tuple[str, ...]] = {}
        self.identity_fields: list[_IdentityField] = []
        self.json_columns: set[str] = set()
        """Dotted paths of structured fields: a CSV cell for them holds JSON text."""

    def struct(
        self, fields: Mapping[str, Field], names: tuple[str, ...], attrs: tuple[str, ...] | None
    ) -> type[msgspec.Struct]:
        """`attrs` is the attribute path of this object, None if it is inside an array or map."""
        specs: list[tuple[str, Any] | tuple[str, Any, Any]] = []
        rename: dict[str, str] = {}
        for i, (name, field) in enumerate(fields.items()):
            attr = f"f{i}"
            rename[attr] = name
            path = (*names, name)
            field_attrs = None if attrs is None else (*attrs, attr)
            if field_attrs is not None:
                self.attr_paths[path] = field_attrs
                if field.identity is not None:
                    self.identity_fields.append(
                        (field_attrs, ".".join(path), field.identity, field.primary)
                    )
                if field.type in ("object", "array", "map"):
                    self.json_columns.add(".".join(path))
            tp = self.type_of(field, path, field_attrs)
            if field.required:
                specs.append((attr, tp))
            else:
                specs.append((attr, tp | None, None))
        return msgspec.defstruct(
            "_".join((self.schema_name, *names)) or "record",
            specs,
            rename=rename,
            kw_only=True,
            omit_defaults=True,
            forbid_unknown_fields=self.forbid_unknown,
            gc=False,
        )

    def type_of(self, field: Field, names: tuple[str, ...], attrs: tuple[str, ...] | None) -> Any:
        kind = field.type
        if kind in _SCALARS:
            return _SCALARS[kind]
        if kind == "enum":
            return _literal[tuple(field.enum)] if field.enum else str
        if kind == "object":
            if field.fields is None:
                return _dict[str, Any]
            return self.struct(field.fields, names, attrs)
        if kind == "array":
            if field.items is None:
                return _list[Any]
            return _list[self.type_of(field.items, (*names, "items"), None)]
        if kind == "map":
            if field.values is None:
                return _dict[str, Any]
            return _dict[str, self.type_of(field.values, (*names, "values"), None)]
        raise ValueError(f"unknown field type {kind!r}")  # pragma: no cover - Field is typed


# -- describing values and fields ----------------------------------------------------------------
def _shorten(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def _repr_str(value: str) -> str:
    # repr of a prefix only: a record may hold a huge string.
    if len(value) > MAX_TEXT:
        return _shorten(repr(value[:MAX_TEXT]))
    return repr(value)


def describe_value(value: Any) -> str:
    """A value as a user would want to read it in `Problem.got`, e.g. "string 'abc'"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        if value.bit_length() > 200:
            return f"integer of {value.bit_length()} bits"
        return _shorten(f"integer {value}")
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        return _shorten(f"string {_repr_str(value)}")
    if isinstance(value, (list, tuple)):
        return f"array of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, dt.datetime):
        return f"datetime {value.isoformat()}"
    if isinstance(value, dt.date):
        return f"date {value.isoformat()}"
    return _shorten(type(value).__name__)


def describe_field(field: Field) -> str:
    """What a field expects, e.g. "integer", "one of gold, silver", "array of string"."""
    kind = field.type
    if kind == "enum":
        return _shorten("one of " + ", ".join(field.enum)) if field.enum else "string"
    if kind == "date":
        return "date (YYYY-MM-DD)"
    if kind == "datetime":
        return "datetime (RFC 3339)"
    if kind == "array":
        return "array" if field.items is None else f"array of {describe_field(field.items)}"
    if kind == "map":
        return "map" if field.values is None else f"map of {describe_field(field.values)}"
    return kind


_MSGSPEC_TYPES: Final = {
    "int": "integer",
    "float": "number",
    "str": "string",
    "bool": "boolean",
    "object": "object",
    "array": "array",
    "null": "null",
    "date": "date",
    "datetime": "datetime",
}


def _msgspec_type(text: str) -> str:
    names = [t for t in text.split(" | ") if t != "null"] or ["null"]
    return " or ".join(_MSGSPEC_TYPES.get(t, t) for t in names)


# -- msgspec.ValidationError -> Problem ----------------------------------------------------------
_ERROR_RE: Final = re.compile(
    r"^(?P<msg>.*?)(?: - at `(?P<at>[^`]*)`(?: in `(?P<within>[^`]*)`)?)?$", re.DOTALL
)
_WRONG_TYPE_RE: Final = re.compile(r"^Expected `(?P<expected>[^`]*)`, got `(?P<got>[^`]*)`$")
_MISSING_RE: Final = re.compile(r"^Object missing required field `(?P<name>.*)`$", re.DOTALL)
_UNKNOWN_RE: Final = re.compile(r"^Object contains unknown field `(?P<name>.*)`$", re.DOTALL)
_SEGMENT_RE: Final = re.compile(r"\[(\d+|\.\.\.)\]|\.?([^.\[]+)")
_MISSING: Final[Any] = object()


def _user_path(at: str) -> str:
    """`$.items[3].sku` -> `items[3].sku`; `$` -> ``."""
    if at.startswith("$."):
        return at[2:]
    return at[1:] if at.startswith("$") else at


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _segments(path: str) -> list[str]:
    """`items[3].sku` -> ["items", "[3]", "sku"]."""
    return [f"[{index}]" if index else name for index, name in _SEGMENT_RE.findall(path)]


def _value_at(source: Any, segments: list[str]) -> Any:
    value = source
    for seg in segments:
        if seg.startswith("[") and seg != "[...]" and isinstance(value, list):
            index = int(seg[1:-1])
            if index >= len(value):
                return _MISSING
            value = value[index]
        elif isinstance(value, dict) and seg in value:
            value = value[seg]
        else:
            return _MISSING
    return value


def _field_at(fields: Mapping[str, Field], segments: list[str]) -> Field | None:
    field: Field | None = None
    current: Mapping[str, Field] | None = fields
    for seg in segments:
        if seg.startswith("["):
            if field is None:
                return None
            field = field.items if field.type == "array" else field.values
        else:
            if current is None or seg not in current:
                return None
            field = current[seg]
        current = field.fields if field is not None and field.type == "object" else None
    return field


def _epoch(value: Any) -> float | None:
    """Epoch seconds of a datetime (naive = UTC), a date (midnight UTC), a number or an RFC 3339
    or numeric string; None if it is none of these."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        seconds: float = value.timestamp()
        return seconds
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC).timestamp()
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            return None
        return seconds if math.isfinite(seconds) else None
    if isinstance(value, str):
        try:
            parsed: dt.datetime = msgspec.convert(value, dt.datetime, strict=False)
        except msgspec.ValidationError:
            return None
        return _epoch(parsed)
    return None


class _Unflattened(msgspec.Struct):
    obj: dict[str, Any] | None = None
    problem: Problem | None = None


def _unflatten(obj: dict[Any, Any]) -> _Unflattened:
    """Nests dotted keys: {"person.name.first": "A"} -> {"person": {"name": {"first": "A"}}}.

    A null under a dotted key is absent (it does not create its parent objects). The input is
    not modified."""
    out: dict[Any, Any] = {}
    owned: set[int] = set()
    dotted: list[tuple[str, Any]] = []
    for key, value in obj.items():
        if isinstance(key, str) and "." in key:
            dotted.append((key, value))
        else:
            out[key] = value
    for key, value in dotted:
        if value is None:
            continue
        *parents, last = key.split(".")
        current = out
        for i, part in enumerate(parents):
            child = current.get(part)
            if child is None:
                child = {}
                owned.add(id(child))
                current[part] = child
            elif isinstance(child, dict):
                if id(child) not in owned:
                    child = dict(child)
                    owned.add(id(child))
                    current[part] = child
            else:
                where = ".".join(parents[: i + 1])
                return _Unflattened(
                    problem=Problem(
                        "wrong type",
                        where,
                        _shorten(f"object (because of the key '{key}')"),
                        describe_value(child),
                    )
                )
            current = child
        if last in current:
            return _Unflattened(
                problem=Problem(
                    "invalid value",
                    key,
                    "one value per field",
                    _shorten(f"a second value {describe_value(value)}"),
                )
            )
        current[last] = value
    return _Unflattened(obj=out)


# -- the compiled schema -------------------------------------------------------------------------
class CompiledSchema:
    """A schema compiled for fast validation of many records. Build it once per schema."""

    record_class: str
    """"profile" or "event"."""

    def __init__(
        self,
        schema: Schema,
        limits: Limits = DEFAULT_LIMITS,
        require_identity: bool = False,
        *,
        phone_region: str,
    ) -> None:
        """`phone_region`: the region of phone identities written without a country code
        (`CDP_PHONE_REGION`)."""
        self.schema = schema
        self.limits = limits
        self.require_identity = require_identity
        self.phone_region = phone_region
        self._phone_expected = (
            f"a valid phone number (E.164, or national in region {_shorten(phone_region)})"
        )
        self.record_class = schema.class_
        self.fields = effective_fields(schema)
        compiler = _Compiler(schema.name, forbid_unknown=schema.unknown_fields == "reject")
        self.record_type: type[msgspec.Struct] = compiler.struct(self.fields, (), ())
        self._decoder = msgspec.json.Decoder(self.record_type)
        self._encoder = msgspec.json.Encoder()
        self._any_decoder = msgspec.json.Decoder()
        self._identity_fields: tuple[_IdentityField, ...] = tuple(compiler.identity_fields)
        self._json_columns = frozenset(compiler.json_columns)
        self._placeholders = _folded(limits.placeholders)
        self._is_event = schema.class_ == "event"
        self._max_bytes = (
            min(limits.max_record_bytes, limits.max_event_bytes)
            if self._is_event
            else limits.max_record_bytes
        )

        self._ts_attrs: tuple[str, ...] | None = None
        self._ts_path = ""
        self._et_attrs: tuple[str, ...] | None = None
        if self._is_event:
            ts_name: str | None = schema.timestamp_field or DEFAULT_TIMESTAMP_FIELD
            et_path = _name_path(self.fields, schema.event_type_field or DEFAULT_EVENT_TYPE_FIELD)
            assert et_path is not None
            self._et_attrs = compiler.attr_paths[tuple(et_path)]
        else:
            ts_name = schema.timestamp_field
        if ts_name is not None:
            ts_path = _name_path(self.fields, ts_name)
            if ts_path is not None:
                self._ts_attrs = compiler.attr_paths[tuple(ts_path)]
                self._ts_path = ".".join(ts_path)

    # -- the three doors ---------------------------------------------------------------------
    def validate_json(self, data: bytes) -> Accepted | list[Problem]:
        """The raw bytes of one JSON record (NATS message, HTTP body)."""
        try:
            size = len(data)
            if size > self._max_bytes:
                return [self._size_problem(size)]
            try:
                record = self._decoder.decode(data)
            except msgspec.ValidationError as exc:
                if " - at `" not in str(exc):
                    # The top level is no object: the typed decoder stopped there, before
                    # reading the rest, so `3<garbage>` is malformed JSON, not a number.
                    try:
                        self._any_decoder.decode(data)
                    except (msgspec.DecodeError, UnicodeError, RecursionError) as bad:
                        return [Problem("malformed JSON", "", "valid JSON", _shorten(str(bad)))]
                return [self._problem(exc, lambda: self._any_decoder.decode(data))]
            except (msgspec.DecodeError, UnicodeError) as exc:
                # msgspec raises UnicodeDecodeError for invalid UTF-8 inside strings
                return [Problem("malformed JSON", "", "valid JSON", _shorten(str(exc)))]
            return self._accept(record)
        except Exception as exc:
            return [_unexpected(exc)]

    def validate_object(self, obj: Any) -> Accepted | list[Problem]:
        """An already decoded record (JSON Lines element, HTTP array element, Parquet row).
        Dotted keys are unflattened first; types must match as in JSON."""
        try:
            if not isinstance(obj, dict):
                if not isinstance(obj, Mapping):
                    return [Problem("not a JSON object", "", "a JSON object", describe_value(obj))]
                obj = dict(obj)
            problem = self._check_size(obj)
            if problem is not None:
                return [problem]
            return self._convert(obj, strict=True)
        except Exception as exc:
            return [_unexpected(exc)]

    def validate_row(self, row: Mapping[str, str]) -> Accepted | list[Problem]:
        """A CSV row: dotted column names, string values; "" is absent. Values are converted
        to the schema's types ("42" -> integer, "true" -> boolean, "2026-01-02" -> date); a cell
        of an object, array or map field holds JSON text."""
        try:
            if not isinstance(row, dict):
                row = dict(row)
            problem = self._check_size(row)
            if problem is not None:
                return [problem]
            json_columns = self._json_columns
            prepared: dict[Any, Any] = {}
            for key, value in row.items():
                if value == "" or value is None:
                    continue
                if key in json_columns and isinstance(value, str):
                    prepared[key] = self._json_cell(value)
                else:
                    prepared[key] = value
            return self._convert(prepared, strict=False)
        except Exception as exc:
            return [_unexpected(exc)]

    # -- steps ---------------------------------------------------------------------------------
    def _json_cell(self, text: str) -> Any:
        """The JSON in a CSV cell of a structured field; the text itself if it is not JSON (it is
        then reported as a wrong type)."""
        try:
            return self._any_decoder.decode(text)
        except (msgspec.DecodeError, UnicodeError):
            return text

    def _size_problem(self, size: int) -> Problem:
        if size > self.limits.max_record_bytes:
            return Problem(
                "record too large",
                "",
                f"at most {self.limits.max_record_bytes} bytes",
                f"{size} bytes",
            )
        return Problem(
            "event too large", "", f"at most {self.limits.max_event_bytes} bytes", f"{size} bytes"
        )

    def _check_size(self, obj: Any) -> Problem | None:
        """The size of `obj` as JSON, as it would travel."""
        try:
            size = len(self._encoder.encode(obj))
        except (TypeError, ValueError, OverflowError) as exc:
            return Problem(
                "invalid value",
                "",
                "JSON-compatible values under string keys",
                _shorten(str(exc)),
            )
        return self._size_problem(size) if size > self._max_bytes else None

    def _convert(self, obj: dict[Any, Any], strict: bool) -> Accepted | list[Problem]:
        for key in obj:
            if isinstance(key, str) and "." in key:
                unflattened = _unflatten(obj)
                if unflattened.problem is not None:
                    return [unflattened.problem]
                assert unflattened.obj is not None
                obj = unflattened.obj
                break
        try:
            record = msgspec.convert(obj, self.record_type, strict=strict)
        except msgspec.ValidationError as exc:
            return [self._problem(exc, lambda: obj)]
        return self._accept(record)

    def _accept(self, record: msgspec.Struct) -> Accepted | list[Problem]:
        limits = self.limits
        identities: list[Identity] = []
        primary: Identity | None = None
        problems: list[Problem] = []
        for attrs, path, namespace, is_primary in self._identity_fields:
            value: Any = record
            for attr in attrs:
                value = getattr(value, attr)
                if value is None:
                    break
            if value is None:
                continue
            if value.__class__ is not str:
                problems.append(
                    Problem("invalid identity", path, "a string", describe_value(value))
                )
                continue
            stripped = value.strip()
            if len(stripped) > limits.max_identity_length:
                problems.append(
                    Problem(
                        "invalid identity",
                        path,
                        f"at most {limits.max_identity_length} characters",
                        f"{len(stripped)} characters",
                    )
                )
            elif (
                not stripped.strip("0-")
                or stripped == "-1"
                or stripped.lower() in self._placeholders
            ):
                problems.append(
                    Problem(
                        "invalid identity",
                        path,
                        "a non-placeholder identity value",
                        _shorten(_repr_str(value)),
                    )
                )
            else:
                if namespace == PHONE:
                    e164 = phone_e164(stripped, self.phone_region)
                    if isinstance(e164, Unusable):
                        problems.append(
                            Problem(
                                "invalid identity",
                                path,
                                self._phone_expected,
                                _shorten(_repr_str(value)),
                            )
                        )
                        continue
                    stripped = e164
                identity = Identity(namespace, stripped)
                if identity not in identities:
                    identities.append(identity)
                if is_primary and primary is None:
                    primary = identity
        if len(identities) > limits.max_identities:
            problems.append(
                Problem(
                    "too many identities",
                    "",
                    f"at most {limits.max_identities} identities",
                    f"{len(identities)} identities",
                )
            )
        if self.require_identity and not identities and not problems:
            problems.append(Problem("no identity", "", self._identity_hint(), "none"))

        timestamp: float | None = None
        if self._ts_attrs is not None:
            raw = _get(record, self._ts_attrs)
            if raw is not None:
                timestamp = _epoch(raw)
                if timestamp is None:
                    problems.append(
                        Problem(
                            "invalid value",
                            self._ts_path,
                            "a datetime (RFC 3339) or epoch seconds",
                            describe_value(raw),
                        )
                    )
        if problems:
            return problems

        event_type: str | None = None
        if self._et_attrs is not None:
            raw = _get(record, self._et_attrs)
            if raw is not None:
                event_type = raw if isinstance(raw, str) else str(raw)
        payload: dict[str, Any] = msgspec.to_builtins(record)
        return Accepted(
            payload=payload,
            identities=identities,
            primary_identity=primary if primary is not None or not identities else identities[0],
            timestamp=timestamp,
            event_type=event_type,
        )

    def _identity_hint(self) -> str:
        paths = [path for _, path, _, _ in self._identity_fields]
        if not paths:
            return "an identity value (the schema declares no identity field)"
        return _shorten("an identity value in one of: " + ", ".join(paths))

    def _problem(self, exc: msgspec.ValidationError, source: Callable[[], Any]) -> Problem:
        """A Problem from msgspec's error text and the value it is about."""
        text = str(exc)
        match = _ERROR_RE.match(text)
        assert match is not None  # the pattern matches any text
        message = match["msg"]
        if match["within"] is not None:  # a bad key of an object or map
            return Problem(
                "invalid value",
                _user_path(match["within"]),
                "an object with string keys",
                "a key that is not a string",
            )
        path = _user_path(match["at"] or "$")

        def got_at(at: str, fallback: str) -> str:
            try:
                value = _value_at(source(), _segments(at))
            except Exception:
                value = _MISSING
            return fallback if value is _MISSING else describe_value(value)

        def expected_at(at: str, fallback: str) -> str:
            field = _field_at(self.fields, _segments(at))
            return fallback if field is None else describe_field(field)

        wrong = _WRONG_TYPE_RE.match(message)
        if wrong is not None:
            msgspec_got = _msgspec_type(wrong["got"])
            if not path:
                return Problem("not a JSON object", "", "a JSON object", got_at(path, msgspec_got))
            return Problem(
                "wrong type",
                path,
                expected_at(path, _msgspec_type(wrong["expected"])),
                got_at(path, msgspec_got),
            )
        missing = _MISSING_RE.match(message)
        if missing is not None:
            path = _join(path, missing["name"])
            return Problem("missing required field", path, expected_at(path, "a value"), "nothing")
        unknown = _UNKNOWN_RE.match(message)
        if unknown is not None:
            parent = _field_at(self.fields, _segments(path)) if path else None
            known = self.fields if not path else (parent.fields if parent else None) or {}
            path = _join(path, unknown["name"])
            expected = (
                "one of the declared fields: " + ", ".join(known) if known else "no fields here"
            )
            return Problem("unknown field", path, _shorten(expected), got_at(path, "a value"))
        if message.startswith("Number out of range") or message.startswith("Expected `float` "):
            return Problem(
                "invalid value", path, "a finite number", got_at(path, "a number out of range")
            )
        return Problem(
            "invalid value",
            path,
            expected_at(path, _shorten(message)),
            got_at(path, _shorten(message)),
        )


def _get(record: Any, attrs: tuple[str, ...]) -> Any:
    value = record
    for attr in attrs:
        value = getattr(value, attr)
        if value is None:
            return None
    return value


def _unexpected(exc: Exception) -> Problem:
    """Whatever a record holds, the validator answers with a Problem rather than raising."""
    if isinstance(exc, RecursionError):
        return Problem("invalid value", "", "a record nested less deeply", "too deep nesting")
    return Problem(
        "invalid value",
        "",
        "a record the validator can read",
        _shorten(f"{type(exc).__name__}: {exc}"),
    )

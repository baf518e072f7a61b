"""The ingest service's configuration: identity namespaces, schemas and datasets.

Pure domain logic: decoding a specification with errors that name the field, checking it
against what is configured (references, immutable properties, additive-only schema
evolution) and computing what an apply would change. No NATS, no SQLite.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec

from shared.admin import (
    AdminFailure,
    ApplyResult,
    apply_result,
    spec_name,
    validation_failure,
)
from shared.resources import (
    BUILTIN_NAMESPACES,
    NAME_RE,
    Dataset,
    Field,
    Namespace,
    Schema,
)

DEFAULT_TIMESTAMP_FIELD = "timestamp"
DEFAULT_EVENT_TYPE_FIELD = "eventType"


def _fail(kind: str, name: str | None, field: str | None, message: str) -> AdminFailure:
    return AdminFailure("invalid", message, kind=kind, name=name, field=field)


def _walk(fields: dict[str, Field], prefix: str = "") -> Iterator[tuple[str, Field, bool]]:
    """Every field with its dotted path and whether it sits inside an array."""
    for key, f in fields.items():
        path = f"{prefix}{key}"
        yield path, f, False
        if f.type == "object" and f.fields:
            yield from _walk(f.fields, f"{path}.")
        if f.type == "array" and f.items is not None:
            for sub, g, _ in _walk({"[]": f.items}, f"{path}"):
                yield sub, g, True
        if f.type == "map" and f.values is not None:
            for sub, g, _ in _walk({"{}": f.values}, f"{path}"):
                yield sub, g, True


def _locate_field_error(raw: Any, prefix: str) -> tuple[str, str] | None:
    """Find the deepest field spec in `raw` that does not decode; (path, message)."""
    if not isinstance(raw, dict):
        return prefix.rstrip("."), "expected a mapping of field name to field spec"
    for key, spec in raw.items():
        path = f"{prefix}{key}"
        if isinstance(spec, dict):
            for child_key in ("fields",):
                if child_key in spec:
                    found = _locate_field_error(spec[child_key], f"{path}.")
                    if found:
                        return found
            for child_key in ("items", "values"):
                if isinstance(spec.get(child_key), dict):
                    found = _locate_field_error({child_key: spec[child_key]}, f"{path}.")
                    if found:
                        return found
        try:
            msgspec.convert(spec, Field)
        except msgspec.ValidationError as exc:
            text = str(exc)
            if " - at `$." in text:
                sub = text.split(" - at `$.", 1)[1].rstrip("`")
                return f"{path}.{sub}", text.split(" - at ", 1)[0]
            return path, text
    return None


def decode_spec(kind: str, raw: dict[str, Any]) -> Namespace | Schema | Dataset:
    """Decode a raw specification strictly; errors name the object and the field."""
    name = spec_name(raw)
    targets: dict[str, type[Namespace | Schema | Dataset]] = {
        "namespace": Namespace,
        "schema": Schema,
        "dataset": Dataset,
    }
    target = targets[kind]
    try:
        spec = msgspec.convert(raw, target)
    except msgspec.ValidationError as exc:
        if kind == "schema" and "fields" in raw:
            found = _locate_field_error(raw["fields"], "fields.")
            if found:
                raise _fail(kind, name, found[0], found[1]) from None
        raise validation_failure(kind, name, exc) from None
    key = spec.symbol if isinstance(spec, Namespace) else spec.name
    if not NAME_RE.match(key):
        raise _fail(
            kind,
            key,
            "symbol" if kind == "namespace" else "name",
            "must start with a lower-case letter and hold only a-z, 0-9, '_' and '-' "
            "(at most 63 characters)",
        )
    return spec


class Registry:
    """Namespaces, schemas and datasets as configured; the authority on what is valid."""

    def __init__(self) -> None:
        self.namespaces: dict[str, Namespace] = {n.symbol: n for n in BUILTIN_NAMESPACES}
        self.schemas: dict[str, Schema] = {}
        self.datasets: dict[str, Dataset] = {}

    # -- reading ---------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Namespace | Schema | Dataset | None:
        table: dict[str, Any] = self._table(kind)
        found: Namespace | Schema | Dataset | None = table.get(name)
        return found

    def items(self, kind: str) -> list[Namespace | Schema | Dataset]:
        return [v for _, v in sorted(self._table(kind).items())]

    def _table(self, kind: str) -> dict[str, Any]:
        if kind == "namespace":
            return self.namespaces
        if kind == "schema":
            return self.schemas
        if kind == "dataset":
            return self.datasets
        raise AdminFailure("unknown_kind", f"unknown kind {kind!r}", kind=kind)

    def put(self, spec: Namespace | Schema | Dataset) -> None:
        match spec:
            case Namespace():
                self.namespaces[spec.symbol] = spec
            case Schema():
                self.schemas[spec.name] = spec
            case Dataset():
                self.datasets[spec.name] = spec

    # -- planning an apply ---------------------------------------------------------------
    def plan(
        self, kind: str, raw: dict[str, Any]
    ) -> tuple[Namespace | Schema | Dataset, ApplyResult]:
        """Validate `raw` against the current configuration; what applying it would do."""
        spec = decode_spec(kind, raw)
        match spec:
            case Namespace():
                self._check_namespace(spec)
            case Schema():
                self._check_schema(spec)
            case Dataset():
                self._check_dataset(spec)
        name = spec.symbol if isinstance(spec, Namespace) else spec.name
        return spec, apply_result(kind, name, self.get(kind, name), spec)

    def _check_namespace(self, ns: Namespace) -> None:
        if ns.builtin and ns.symbol not in {b.symbol for b in BUILTIN_NAMESPACES}:
            raise _fail(
                "namespace", ns.symbol, "builtin", "only the standard namespaces are built in"
            )
        current = self.namespaces.get(ns.symbol)
        if current is None:
            return
        if current.builtin and not ns.builtin:
            ns.builtin = True
        for attr in ("type", "hashed"):
            if getattr(current, attr) != getattr(ns, attr):
                raise _fail(
                    "namespace",
                    ns.symbol,
                    attr,
                    f"cannot change once created ({getattr(current, attr)!r} -> "
                    f"{getattr(ns, attr)!r}); create a namespace with another symbol",
                )

    def _check_schema(self, schema: Schema) -> None:
        name = schema.name
        if not schema.fields:
            raise _fail("schema", name, "fields", "a schema needs at least one field")
        primaries = []
        for path, f, in_array in _walk(schema.fields):
            where = f"fields.{path}"
            if f.type == "enum" and not f.enum:
                raise _fail("schema", name, where, "an enum field needs `enum: [values]`")
            if f.type != "enum" and f.enum is not None:
                raise _fail("schema", name, where, "`enum` is only for fields of type enum")
            if f.type == "object" and not f.fields:
                raise _fail("schema", name, where, "an object field needs `fields`")
            if f.type == "array" and f.items is None:
                raise _fail("schema", name, where, "an array field needs `items`")
            if f.type == "map" and f.values is None:
                raise _fail("schema", name, where, "a map field needs `values`")
            if f.identity is not None:
                if f.identity not in self.namespaces:
                    raise _fail(
                        "schema", name, f"{where}.identity", f"unknown namespace {f.identity!r}"
                    )
                if f.type != "string":
                    raise _fail("schema", name, where, "an identity field must be of type string")
                if in_array:
                    raise _fail(
                        "schema",
                        name,
                        where,
                        "identity fields inside arrays or maps are not supported",
                    )
            if f.primary:
                if f.identity is None:
                    raise _fail(
                        "schema", name, f"{where}.primary", "only an identity field can be primary"
                    )
                primaries.append(path)
        if len(primaries) > 1:
            raise _fail(
                "schema",
                name,
                f"fields.{primaries[1]}.primary",
                f"only one primary identity per schema (already {primaries[0]})",
            )
        self._check_special_fields(schema)
        current = self.schemas.get(name)
        if current is not None:
            self._check_evolution(current, schema)

    def _check_special_fields(self, schema: Schema) -> None:
        name = schema.name
        if schema.class_ == "event":
            ts = schema.timestamp_field or DEFAULT_TIMESTAMP_FIELD
            et = schema.event_type_field or DEFAULT_EVENT_TYPE_FIELD
            tf = schema.fields.get(ts)
            if tf is not None and (tf.type != "datetime"):
                raise _fail(
                    "schema", name, f"fields.{ts}", "an event's timestamp must be a datetime"
                )
            ef = schema.fields.get(et)
            if ef is not None and ef.type not in ("string", "enum"):
                raise _fail(
                    "schema", name, f"fields.{et}", "an event type must be a string or enum"
                )
        elif schema.event_type_field is not None:
            raise _fail("schema", name, "event_type_field", "only event schemas have an event type")
        elif schema.timestamp_field is not None:
            tf = schema.fields.get(schema.timestamp_field)
            if tf is None or tf.type not in ("datetime", "date"):
                raise _fail(
                    "schema",
                    name,
                    "timestamp_field",
                    f"{schema.timestamp_field!r} must name a top-level date or datetime field",
                )

    def _check_evolution(self, old: Schema, new: Schema) -> None:
        """Schemas evolve additively: new optional fields, new enum values, relaxed rules."""
        name = new.name

        def refuse(field: str, why: str) -> AdminFailure:
            return AdminFailure(
                "breaking_change",
                f"{why}; schemas evolve additively only (add optional fields or enum values)",
                kind="schema",
                name=name,
                field=field,
            )

        if old.class_ != new.class_:
            raise refuse("class", f"class cannot change ({old.class_} -> {new.class_})")
        for attr in ("timestamp_field", "event_type_field"):
            if getattr(old, attr) != getattr(new, attr):
                raise refuse(attr, f"{attr} cannot change")
        if old.unknown_fields == "ignore" and new.unknown_fields == "reject":
            raise refuse("unknown_fields", "unknown fields were accepted and cannot be refused now")
        self._compare_fields(old.fields, new.fields, "fields.", refuse, existing=True)

    def _compare_fields(
        self,
        old: dict[str, Field],
        new: dict[str, Field],
        prefix: str,
        refuse: Any,
        existing: bool,
    ) -> None:
        for key, of in old.items():
            path = f"{prefix}{key}"
            nf = new.get(key)
            if nf is None:
                raise refuse(path, "field removed")
            if of.type != nf.type:
                raise refuse(path, f"type changed ({of.type} -> {nf.type})")
            if nf.required and not of.required:
                raise refuse(path, "an optional field cannot become required")
            if of.identity != nf.identity and of.identity is not None:
                raise refuse(path, f"identity namespace changed ({of.identity} -> {nf.identity})")
            if of.primary and not nf.primary:
                raise refuse(path, "the primary identity cannot change")
            if of.enum and nf.enum:
                removed = [v for v in of.enum if v not in nf.enum]
                if removed:
                    raise refuse(path, f"enum values removed: {', '.join(removed)}")
            if of.fields and nf.fields:
                self._compare_fields(of.fields, nf.fields, f"{path}.", refuse, existing)
            for sub in ("items", "values"):
                og, ng = getattr(of, sub), getattr(nf, sub)
                if og is not None and ng is not None:
                    self._compare_fields({sub: og}, {sub: ng}, f"{path}.", refuse, existing)
        for key, nf in new.items():
            if key not in old:
                if nf.required:
                    raise refuse(f"{prefix}{key}", "a new field cannot be required")
                if nf.primary:
                    raise refuse(f"{prefix}{key}", "the primary identity cannot change")

    def _check_dataset(self, ds: Dataset) -> None:
        name = ds.name
        schema = self.schemas.get(ds.schema)
        if schema is None:
            raise _fail("dataset", name, "schema", f"unknown schema {ds.schema!r}")
        if not 0.0 <= ds.error_threshold <= 1.0:
            raise _fail("dataset", name, "error_threshold", "must be between 0 and 1 (0.05 is 5%)")
        if ds.expiration_days is not None:
            if schema.class_ != "event":
                raise _fail(
                    "dataset", name, "expiration_days", "only event datasets have an expiration"
                )
            if ds.expiration_days < 1:
                raise _fail("dataset", name, "expiration_days", "must be at least 1 day")
        current = self.datasets.get(name)
        if current is not None and current.schema != ds.schema:
            raise _fail(
                "dataset",
                name,
                "schema",
                f"a dataset stays bound to its schema ({current.schema}); create a new dataset",
            )

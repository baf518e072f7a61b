"""Validation of single records against a schema: what a user sees for each rule."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.ingest.validation import (
    PLACEHOLDER_RE,
    Accepted,
    CompiledSchema,
    Limits,
    Problem,
    effective_fields,
    is_placeholder,
)
from shared.messages import Identity
from shared.resources import Field, Schema

# -- schemas -----------------------------------------------------------------------------------


def people_schema(unknown_fields: str = "reject", timestamp_field: str | None = None) -> Schema:
    return msgspec.convert(
        {
            "name": "people",
            "class": "profile",
            "unknown_fields": unknown_fields,
            "timestamp_field": timestamp_field,
            "fields": {
                "email": {"type": "string", "identity": "email"},
                "crmId": {"type": "string", "identity": "crm", "primary": True},
                "age": {"type": "integer"},
                "score": {"type": "number"},
                "vip": {"type": "boolean"},
                "birthDate": {"type": "date"},
                "lastSeen": {"type": "datetime"},
                "tier": {"type": "enum", "enum": ["gold", "silver"]},
                "person": {
                    "type": "object",
                    "fields": {
                        "name": {
                            "type": "object",
                            "fields": {
                                "first": {"type": "string", "required": True},
                                "last": {"type": "string"},
                            },
                        },
                        "phone": {"type": "string", "identity": "phone"},
                        "age": {"type": "integer"},
                    },
                },
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "fields": {
                            "sku": {"type": "string", "required": True},
                            "owner": {"type": "string", "identity": "email"},
                        },
                    },
                },
                "tags": {"type": "array", "items": {"type": "string"}},
                "attributes": {"type": "map", "values": {"type": "integer"}},
                "loyalty": {
                    "type": "object",
                    "required": True,
                    "fields": {"points": {"type": "integer"}},
                },
            },
        },
        Schema,
    )


def event_schema(**extra: Any) -> Schema:
    return msgspec.convert(
        {
            "name": "web",
            "class": "event",
            "fields": {
                "ecid": {"type": "string", "identity": "ecid"},
                "pad": {"type": "string"},
            },
            **extra,
        },
        Schema,
    )


PEOPLE = CompiledSchema(people_schema(), phone_region="US")
EVENTS = CompiledSchema(event_schema(), phone_region="US")
LOYALTY: dict[str, Any] = {"loyalty": {}}


def accepted(result: Accepted | list[Problem]) -> Accepted:
    assert isinstance(result, Accepted), result
    return result


def problem(result: Accepted | list[Problem]) -> Problem:
    """The one problem of a rejected record."""
    assert isinstance(result, list), result
    assert len(result) == 1, result
    return result[0]


def people_json(**fields: Any) -> bytes:
    return msgspec.json.encode({**LOYALTY, **fields})


# -- accepted records --------------------------------------------------------------------------


def test_accepted_json_record_has_builtins_payload_and_identities() -> None:
    result = accepted(
        PEOPLE.validate_json(
            people_json(
                email=" ann@example.com ",
                age=42,
                score=3,
                vip=True,
                birthDate="1984-02-03",
                lastSeen="2026-01-02T03:04:05Z",
                tier="gold",
                person={"name": {"first": "Ann"}, "phone": "+33 6 62 99 23 12"},
                items=[{"sku": "a", "owner": "bob@example.com"}],
                attributes={"visits": 3},
                crmId=None,
            )
        )
    )
    assert result.payload == {
        "email": " ann@example.com ",
        "age": 42,
        "score": 3.0,
        "vip": True,
        "birthDate": "1984-02-03",
        "lastSeen": "2026-01-02T03:04:05Z",
        "tier": "gold",
        "person": {"name": {"first": "Ann"}, "phone": "+33 6 62 99 23 12"},
        "items": [{"sku": "a", "owner": "bob@example.com"}],
        "attributes": {"visits": 3},
        "loyalty": {},
    }
    # in schema field order; stripped; phones in E.164; fields inside arrays are not identities
    assert result.identities == [
        Identity("email", "ann@example.com"),
        Identity("phone", "+33662992312"),
    ]
    assert result.primary_identity == Identity("email", "ann@example.com")
    assert result.timestamp is None
    assert result.event_type is None
    assert PEOPLE.record_class == "profile"


def test_null_optional_field_is_absent_and_null_required_field_is_wrong_type() -> None:
    result = accepted(PEOPLE.validate_json(people_json(age=None, person=None)))
    assert result.payload == {"loyalty": {}}
    got = problem(PEOPLE.validate_json(b'{"loyalty": null}'))
    assert got == Problem("wrong type", "loyalty", "object", "null")


# -- malformed input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b'{"age": 1',
        b"{'age': 1}",
        b"",
        b'{"age": NaN}',
        b"\xff\xfe{}",
        b"3\xac\x05hwC",  # a number, then garbage (found by the fuzz test)
    ],
)
def test_malformed_json(data: bytes) -> None:
    got = problem(PEOPLE.validate_json(data))
    assert (got.reason, got.path, got.expected) == ("malformed JSON", "", "valid JSON")
    assert got.got


def test_non_utf8_string_is_malformed_json() -> None:
    got = problem(PEOPLE.validate_json(b'{"email": "\xc3\x28"}'))
    assert got.reason == "malformed JSON"


@pytest.mark.parametrize(
    ("data", "description"),
    [(b"[1, 2]", "array of 2 items"), (b'"text"', "string 'text'"), (b"42", "integer 42")],
)
def test_top_level_not_an_object(data: bytes, description: str) -> None:
    expected = Problem("not a JSON object", "", "a JSON object", description)
    assert problem(PEOPLE.validate_json(data)) == expected
    assert problem(PEOPLE.validate_object(msgspec.json.decode(data))) == expected


# -- types ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "path", "expected", "got"),
    [
        ({"age": "abc"}, "age", "integer", "string 'abc'"),
        ({"age": 1.5}, "age", "integer", "number 1.5"),
        ({"age": True}, "age", "integer", "boolean true"),
        ({"vip": "yes"}, "vip", "boolean", "string 'yes'"),
        ({"score": "1"}, "score", "number", "string '1'"),
        ({"email": 5}, "email", "string", "integer 5"),
        ({"tier": 1}, "tier", "one of gold, silver", "integer 1"),
        ({"person": {"age": "x"}}, "person.age", "integer", "string 'x'"),
        ({"person": {"name": {"first": 7}}}, "person.name.first", "string", "integer 7"),
        ({"person": []}, "person", "object", "array of 0 items"),
        ({"tags": "a,b"}, "tags", "array of string", "string 'a,b'"),
        ({"tags": ["a", 2]}, "tags[1]", "string", "integer 2"),
        ({"birthDate": 20260102}, "birthDate", "date (YYYY-MM-DD)", "integer 20260102"),
    ],
)
def test_wrong_type(fields: dict[str, Any], path: str, expected: str, got: str) -> None:
    want = Problem("wrong type", path, expected, got)
    assert problem(PEOPLE.validate_json(people_json(**fields))) == want
    assert problem(PEOPLE.validate_object({**LOYALTY, **fields})) == want


def test_wrong_type_inside_array_of_objects_has_indexed_path() -> None:
    items = [{"sku": "a"}, {"sku": "b"}, {"sku": "c"}, {"sku": 4}]
    got = problem(PEOPLE.validate_json(people_json(items=items)))
    assert got == Problem("wrong type", "items[3].sku", "string", "integer 4")


def test_wrong_type_inside_map_names_the_map() -> None:
    got = problem(PEOPLE.validate_json(people_json(attributes={"visits": "many"})))
    assert got == Problem("wrong type", "attributes[...]", "integer", "string")


def test_invalid_enum_value() -> None:
    got = problem(PEOPLE.validate_json(people_json(tier="bronze")))
    assert got == Problem("invalid value", "tier", "one of gold, silver", "string 'bronze'")


@pytest.mark.parametrize(
    ("fields", "path", "expected", "got"),
    [
        ({"birthDate": "2026-13-01"}, "birthDate", "date (YYYY-MM-DD)", "string '2026-13-01'"),
        ({"lastSeen": "yesterday"}, "lastSeen", "datetime (RFC 3339)", "string 'yesterday'"),
    ],
)
def test_invalid_date_and_datetime(
    fields: dict[str, Any], path: str, expected: str, got: str
) -> None:
    assert problem(PEOPLE.validate_json(people_json(**fields))) == Problem(
        "invalid value", path, expected, got
    )


def test_non_finite_numbers_are_invalid() -> None:
    got = problem(PEOPLE.validate_json(b'{"loyalty": {}, "score": 1e999}'))
    assert (got.reason, got.path, got.expected) == ("invalid value", "score", "a finite number")
    got = problem(PEOPLE.validate_object({**LOYALTY, "score": float("nan")}))
    assert got == Problem("invalid value", "score", "a finite number", "number nan")
    got = problem(PEOPLE.validate_object({**LOYALTY, "score": float("-inf")}))
    assert got == Problem("invalid value", "score", "a finite number", "number -inf")


def test_huge_string_is_shortened_in_got() -> None:
    got = problem(PEOPLE.validate_json(people_json(age="x" * 100_000)))
    assert (got.reason, got.path, got.expected) == ("wrong type", "age", "integer")
    assert got.got.startswith("string 'xxx")
    assert len(got.got) <= 200


# -- required and unknown fields -------------------------------------------------------------


def test_missing_required_field() -> None:
    got = problem(PEOPLE.validate_json(b'{"age": 1}'))
    assert got == Problem("missing required field", "loyalty", "object", "nothing")


def test_missing_required_field_in_present_object() -> None:
    got = problem(PEOPLE.validate_json(people_json(person={"name": {"last": "Lee"}})))
    assert got == Problem("missing required field", "person.name.first", "string", "nothing")
    got = problem(PEOPLE.validate_json(people_json(items=[{"sku": "a"}, {}])))
    assert got == Problem("missing required field", "items[1].sku", "string", "nothing")


def test_required_field_inside_absent_optional_object_is_not_required() -> None:
    accepted(PEOPLE.validate_json(people_json(person={"phone": "+12015550123"})))
    accepted(PEOPLE.validate_json(people_json()))


def test_unknown_field_rejected() -> None:
    got = problem(PEOPLE.validate_json(people_json(nickname="Annie")))
    assert (got.reason, got.path, got.got) == ("unknown field", "nickname", "string 'Annie'")
    assert got.expected.startswith("one of the declared fields: email, crmId, age")
    got = problem(PEOPLE.validate_object({**LOYALTY, "person": {"nick": 1}}))
    assert got == Problem(
        "unknown field", "person.nick", "one of the declared fields: name, phone, age", "integer 1"
    )


def test_unknown_field_ignored() -> None:
    ignoring = CompiledSchema(people_schema(unknown_fields="ignore"), phone_region="US")
    result = accepted(
        ignoring.validate_json(people_json(nickname="Annie", person={"nick": 1, "age": 3}))
    )
    assert result.payload == {"person": {"age": 3}, "loyalty": {}}


# -- objects and CSV rows ----------------------------------------------------------------------


def test_object_with_dotted_keys_is_unflattened() -> None:
    result = accepted(
        PEOPLE.validate_object(
            {
                "loyalty.points": 5,
                "person.name.first": "Ann",
                "person.name.last": None,
                "person": {"phone": "+12015550123"},
            }
        )
    )
    assert result.payload == {
        "person": {"name": {"first": "Ann"}, "phone": "+12015550123"},
        "loyalty": {"points": 5},
    }
    got = problem(PEOPLE.validate_object({**LOYALTY, "person.name.last": "Lee"}))
    assert got == Problem("missing required field", "person.name.first", "string", "nothing")


def test_object_dotted_key_under_a_non_object() -> None:
    got = problem(PEOPLE.validate_object({"loyalty": 3, "loyalty.points": 5}))
    assert got == Problem(
        "wrong type", "loyalty", "object (because of the key 'loyalty.points')", "integer 3"
    )


def test_object_keeps_python_dates() -> None:
    result = accepted(
        PEOPLE.validate_object(
            {
                **LOYALTY,
                "birthDate": dt.date(1984, 2, 3),
                "lastSeen": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
            }
        )
    )
    assert result.payload["birthDate"] == "1984-02-03"
    assert result.payload["lastSeen"] == "2026-01-02T03:04:05Z"


def test_csv_row_values_are_converted() -> None:
    result = accepted(
        PEOPLE.validate_row(
            {
                "email": "ann@example.com",
                "crmId": "",
                "age": "42",
                "score": "3.5",
                "vip": "true",
                "birthDate": "1984-02-03",
                "lastSeen": "2026-01-02T03:04:05+01:00",
                "tier": "silver",
                "person.name.first": "Ann",
                "person.name.last": "",
                "person.phone": "",
                "tags": '["a", "b"]',
                "loyalty.points": "7",
            }
        )
    )
    assert result.payload == {
        "email": "ann@example.com",
        "age": 42,
        "score": 3.5,
        "vip": True,
        "birthDate": "1984-02-03",
        "lastSeen": "2026-01-02T03:04:05+01:00",
        "tier": "silver",
        "person": {"name": {"first": "Ann"}},
        "tags": ["a", "b"],
        "loyalty": {"points": 7},
    }
    assert result.identities == [Identity("email", "ann@example.com")]


def test_csv_empty_cell_is_absent() -> None:
    got = problem(PEOPLE.validate_row({"age": "", "loyalty.points": ""}))
    assert got == Problem("missing required field", "loyalty", "object", "nothing")
    result = accepted(PEOPLE.validate_row({"age": "", "loyalty.points": "1"}))
    assert result.payload == {"loyalty": {"points": 1}}


@pytest.mark.parametrize(
    ("column", "value", "reason", "expected"),
    [
        ("age", "4x2", "wrong type", "integer"),
        ("score", "many", "wrong type", "number"),
        ("vip", "yes", "wrong type", "boolean"),
        ("birthDate", "03/02/1984", "invalid value", "date (YYYY-MM-DD)"),
        ("lastSeen", "soon", "invalid value", "datetime (RFC 3339)"),
        ("tier", "bronze", "invalid value", "one of gold, silver"),
        ("person.age", "old", "wrong type", "integer"),
        ("tags", "a,b", "wrong type", "array of string"),
    ],
)
def test_csv_value_that_does_not_convert(
    column: str, value: str, reason: str, expected: str
) -> None:
    got = problem(PEOPLE.validate_row({"loyalty.points": "1", column: value}))
    assert got == Problem(reason, column, expected, f"string {value!r}")


def test_csv_unknown_column() -> None:
    got = problem(PEOPLE.validate_row({"loyalty.points": "1", "nickname": "Annie"}))
    assert (got.reason, got.path, got.got) == ("unknown field", "nickname", "string 'Annie'")


# -- identities ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["null", "Anonymous", " undefined ", "0", "000", "--", "-1", "", "N/A", "NONE"]
)
def test_placeholder_identity_is_invalid(value: str) -> None:
    assert is_placeholder(value)
    got = problem(PEOPLE.validate_json(people_json(email=value)))
    assert got == Problem(
        "invalid identity", "email", "a non-placeholder identity value", repr(value)
    )


def test_nested_placeholder_identity_names_its_path() -> None:
    got = problem(PEOPLE.validate_row({"loyalty.points": "1", "person.phone": "unknown"}))
    assert got == Problem(
        "invalid identity", "person.phone", "a non-placeholder identity value", "'unknown'"
    )


@pytest.mark.parametrize("value", ["ann", "0-1", "10", "-2", "nullable", "a-0", "none of these"])
def test_real_values_are_not_placeholders(value: str) -> None:
    assert not is_placeholder(value)
    result = accepted(PEOPLE.validate_json(people_json(email=value)))
    assert result.identities == [Identity("email", value)]


def test_placeholder_regex_and_custom_placeholders() -> None:
    assert PLACEHOLDER_RE.match("0-0-") and PLACEHOLDER_RE.match("")
    assert not PLACEHOLDER_RE.match("01")
    limits = Limits(placeholders=frozenset({"Guest"}))
    assert is_placeholder(" guest ", limits)
    assert not is_placeholder("anonymous", limits)
    assert is_placeholder("-1", limits) and is_placeholder("00", limits)
    custom = CompiledSchema(people_schema(), limits, phone_region="US")
    got = problem(custom.validate_json(people_json(crmId="GUEST")))
    assert got == Problem(
        "invalid identity", "crmId", "a non-placeholder identity value", "'GUEST'"
    )
    accepted(custom.validate_json(people_json(crmId="null")))


def test_identity_length_limit() -> None:
    result = accepted(PEOPLE.validate_json(people_json(email="a" * 1024)))
    assert result.identities == [Identity("email", "a" * 1024)]
    got = problem(PEOPLE.validate_json(people_json(email="a" * 1025)))
    assert got == Problem("invalid identity", "email", "at most 1024 characters", "1025 characters")


def test_identity_must_be_a_string() -> None:
    schema = Schema(
        name="numbers",
        class_="profile",
        fields={"loyaltyNo": Field(type="integer", identity="loyalty")},
    )
    got = problem(CompiledSchema(schema, phone_region="US").validate_json(b'{"loyaltyNo": 12}'))
    assert got == Problem("invalid identity", "loyaltyNo", "a string", "integer 12")


def many_ids_schema(count: int) -> CompiledSchema:
    fields = {f"id{i}": Field(type="string", identity=f"ns{i}") for i in range(count)}
    return CompiledSchema(Schema(name="many", class_="profile", fields=fields), phone_region="US")


def test_identity_count_limit() -> None:
    record = {f"id{i}": f"value-{i}" for i in range(21)}
    twenty = {key: value for key, value in record.items() if key != "id20"}
    result = accepted(many_ids_schema(21).validate_json(msgspec.json.encode(twenty)))
    assert len(result.identities) == 20
    got = problem(many_ids_schema(21).validate_object(record))
    assert got == Problem("too many identities", "", "at most 20 identities", "21 identities")


def test_same_identity_twice_counts_once() -> None:
    schema = Schema(
        name="twice",
        class_="profile",
        fields={
            "email": Field(type="string", identity="email"),
            "workEmail": Field(type="string", identity="email"),
        },
    )
    result = accepted(
        CompiledSchema(schema, phone_region="US").validate_object(
            {"email": "a@x", "workEmail": " a@x"}
        )
    )
    assert result.identities == [Identity("email", "a@x")]


def test_phone_identities_must_be_valid_numbers_and_travel_in_e164() -> None:
    got = problem(PEOPLE.validate_json(people_json(person={"phone": "0662992312"})))
    assert got == Problem(
        "invalid identity",
        "person.phone",
        "a valid phone number (E.164, or national in region US)",
        "'0662992312'",
    )
    french = CompiledSchema(people_schema(), phone_region="FR")
    for result in (
        french.validate_json(people_json(person={"phone": "06 62 99 23 12"})),
        french.validate_row({"loyalty.points": "1", "person.phone": "0662992312"}),
        PEOPLE.validate_object({**LOYALTY, "person": {"phone": " +33 6 62 99 23 12 "}}),
    ):
        assert accepted(result).identities == [Identity("phone", "+33662992312")]
    # the reason is given once per bad field, with the other problems of the record
    both = PEOPLE.validate_json(people_json(crmId="unknown", person={"phone": "+1 555"}))
    assert isinstance(both, list)
    assert [(p.path, p.reason) for p in both] == [
        ("crmId", "invalid identity"),
        ("person.phone", "invalid identity"),
    ]


def test_require_identity() -> None:
    strict = CompiledSchema(people_schema(), require_identity=True, phone_region="US")
    got = problem(strict.validate_json(people_json(age=3)))
    assert got == Problem(
        "no identity", "", "an identity value in one of: email, crmId, person.phone", "none"
    )
    accepted(strict.validate_json(people_json(person={"phone": "+12015550123"})))
    assert accepted(PEOPLE.validate_json(people_json(age=3))).identities == []


def test_primary_identity_selection() -> None:
    both = accepted(PEOPLE.validate_json(people_json(email="a@x", crmId="C1")))
    assert both.identities == [Identity("email", "a@x"), Identity("crm", "C1")]
    assert both.primary_identity == Identity("crm", "C1")
    first = accepted(
        PEOPLE.validate_json(people_json(email="a@x", person={"phone": "+12015550123"}))
    )
    assert first.primary_identity == Identity("email", "a@x")
    none = accepted(PEOPLE.validate_json(people_json()))
    assert none.primary_identity is None


# -- sizes -------------------------------------------------------------------------------------


def sized_event(size: int) -> bytes:
    head = b'{"timestamp":"2026-01-01T00:00:00Z","eventType":"view","pad":"'
    data = head + b"x" * (size - len(head) - 2) + b'"}'
    assert len(data) == size
    return data


def test_event_size_limit() -> None:
    accepted(EVENTS.validate_json(sized_event(10_240)))
    assert problem(EVENTS.validate_json(sized_event(10_241))) == Problem(
        "event too large", "", "at most 10240 bytes", "10241 bytes"
    )
    as_object = msgspec.json.decode(sized_event(10_241))
    assert problem(EVENTS.validate_object(as_object)).reason == "event too large"
    accepted(EVENTS.validate_object(msgspec.json.decode(sized_event(10_240))))


def test_record_size_limit() -> None:
    big = people_json(person={"name": {"first": "x" * 1_048_576}})
    assert problem(PEOPLE.validate_json(big)) == Problem(
        "record too large", "", "at most 1048576 bytes", f"{len(big)} bytes"
    )
    got = problem(PEOPLE.validate_row({"loyalty.points": "1", "email": "y" * 1_048_576}))
    assert (got.reason, got.expected) == ("record too large", "at most 1048576 bytes")
    got = problem(EVENTS.validate_json(b" " * 2_000_000))
    assert got.reason == "record too large"
    small = CompiledSchema(people_schema(), Limits(max_record_bytes=100), phone_region="US")
    accepted(small.validate_json(people_json(email="a@x")))
    assert problem(small.validate_json(people_json(email="a" * 100))).reason == "record too large"


# -- events and timestamps ---------------------------------------------------------------------


def test_effective_fields() -> None:
    fields = effective_fields(event_schema())
    assert list(fields) == ["ecid", "pad", "timestamp", "eventType"]
    assert fields["timestamp"] == Field(type="datetime", required=True)
    assert fields["eventType"] == Field(type="string", required=True)
    custom = event_schema(
        timestamp_field="meta.at",
        event_type_field="kind",
        fields={
            "meta": {"type": "object", "fields": {"at": {"type": "datetime"}}},
            "kind": {"type": "enum", "enum": ["view", "click"]},
        },
    )
    fields = effective_fields(custom)
    assert list(fields) == ["meta", "kind"]
    assert fields["meta"].required
    assert fields["meta"].fields is not None and fields["meta"].fields["at"].required
    assert effective_fields(people_schema()) == people_schema().fields


def test_event_without_timestamp_is_rejected() -> None:
    got = problem(EVENTS.validate_json(b'{"eventType": "view"}'))
    assert got == Problem("missing required field", "timestamp", "datetime (RFC 3339)", "nothing")
    got = problem(EVENTS.validate_row({"eventType": "view", "timestamp": ""}))
    assert got.path == "timestamp"
    got = problem(EVENTS.validate_json(b'{"timestamp": "2026-01-01T00:00:00Z"}'))
    assert got == Problem("missing required field", "eventType", "string", "nothing")


@pytest.mark.parametrize(
    ("timestamp", "epoch"),
    [
        ("2026-01-01T00:00:00Z", 1_767_225_600.0),
        ("2026-01-01T02:00:00+02:00", 1_767_225_600.0),
        ("2026-01-01T00:00:00", 1_767_225_600.0),
        ("2026-01-01T00:00:00.250Z", 1_767_225_600.25),
    ],
)
def test_event_timestamp_to_epoch(timestamp: str, epoch: float) -> None:
    data = msgspec.json.encode({"timestamp": timestamp, "eventType": "view", "ecid": "E1"})
    result = accepted(EVENTS.validate_json(data))
    assert result.timestamp == epoch
    assert result.event_type == "view"
    as_datetime = msgspec.convert(result.payload["timestamp"], dt.datetime)
    assert as_datetime == msgspec.convert(timestamp, dt.datetime)
    assert result.primary_identity == Identity("ecid", "E1")
    assert EVENTS.record_class == "event"
    row = accepted(EVENTS.validate_row({"timestamp": timestamp, "eventType": "view"}))
    assert row.timestamp == epoch


def test_event_timestamp_from_csv_epoch_seconds() -> None:
    row = accepted(EVENTS.validate_row({"timestamp": "1767225600", "eventType": "view"}))
    assert row.timestamp == 1_767_225_600.0
    assert row.payload["timestamp"] == "2026-01-01T00:00:00Z"


def test_event_with_custom_nested_timestamp_and_type_fields() -> None:
    custom = CompiledSchema(
        event_schema(
            timestamp_field="meta.at",
            event_type_field="kind",
            fields={
                "meta": {"type": "object", "fields": {"at": {"type": "datetime"}}},
                "kind": {"type": "enum", "enum": ["view", "click"]},
            },
        ),
        phone_region="US",
    )
    result = accepted(custom.validate_object({"meta.at": "2026-01-01T00:00:00Z", "kind": "click"}))
    assert (result.timestamp, result.event_type) == (1_767_225_600.0, "click")
    got = problem(custom.validate_object({"meta": {}, "kind": "click"}))
    assert got == Problem("missing required field", "meta.at", "datetime (RFC 3339)", "nothing")


def test_profile_timestamp_field() -> None:
    timed = CompiledSchema(people_schema(timestamp_field="lastSeen"), phone_region="US")
    result = accepted(timed.validate_json(people_json(lastSeen="2026-01-01T00:00:00Z")))
    assert result.timestamp == 1_767_225_600.0
    assert accepted(timed.validate_json(people_json())).timestamp is None
    assert (
        accepted(PEOPLE.validate_json(people_json(lastSeen="2026-01-01T00:00:00Z"))).timestamp
        is None
    )


# -- hostile input -----------------------------------------------------------------------------


def test_deep_nesting_is_a_problem_not_a_crash() -> None:
    ignoring = CompiledSchema(people_schema(unknown_fields="ignore"), phone_region="US")
    deep = b'{"loyalty": {}, "junk": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert problem(ignoring.validate_json(deep)).reason == "invalid value"
    nested: Any = []
    for _ in range(100_000):
        nested = [nested]
    got = problem(PEOPLE.validate_object({"loyalty": {}, "tags": nested}))
    assert got.reason == "invalid value"


def test_non_json_values_in_objects() -> None:
    got = problem(PEOPLE.validate_object({"loyalty": {}, "email": object()}))
    assert (got.reason, got.path) == ("invalid value", "")
    got = problem(PEOPLE.validate_object({"loyalty": {}, 5: "x"}))
    assert got.reason in ("invalid value", "unknown field")
    got = problem(PEOPLE.validate_object({"loyalty": {}, "age": 10**5000}))
    assert got.reason == "invalid value"
    got = problem(PEOPLE.validate_object({"loyalty": {}, "email": "\ud800"}))
    assert got.reason == "invalid value"
    got = problem(PEOPLE.validate_row({"loyalty.points": "1", "tags": "[\ud800]"}))
    assert (got.reason, got.path) == ("invalid value", "")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from(["email", "age", "person", "name", "first", "items", "sku"])
            | st.text(max_size=10),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)
records = st.dictionaries(
    st.sampled_from(
        [
            "email",
            "crmId",
            "age",
            "score",
            "tier",
            "person",
            "person.name.first",
            "items",
            "loyalty",
            "timestamp",
            "eventType",
            "ecid",
        ]
    )
    | st.text(max_size=10),
    json_values,
)


def assert_outcome(result: Accepted | list[Problem]) -> None:
    if isinstance(result, list):
        assert result
        assert all(isinstance(p, Problem) and len(p.got) <= 200 for p in result)
    else:
        assert isinstance(result, Accepted)
        msgspec.json.encode(result.payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.binary(max_size=300),
    value=json_values | records,
    row=st.dictionaries(st.text(max_size=20), st.text(max_size=20)),
)
def test_fuzz_never_raises(raw: bytes, value: Any, row: dict[str, str]) -> None:
    for compiled in (PEOPLE, EVENTS):
        assert_outcome(compiled.validate_json(raw))
        assert_outcome(compiled.validate_json(msgspec.json.encode(value)))
        assert_outcome(compiled.validate_object(value))
        assert_outcome(compiled.validate_row(row))

"""The ingest service's fast paths agree with their plain references on any input: what
a rejected record is found by (`payload_keys`) and how the HTTP door splits a body
(`split_body`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from services.ingest import records
from services.ingest.http import split_body
from services.ingest.records import identity_keys, payload_keys

# -- references: the plain versions the fast paths replace ------------------------------


def reference_leaves(node: Any, depth: int = 0) -> Iterator[str]:
    if depth > 64:
        return
    if isinstance(node, dict):
        for v in node.values():
            yield from reference_leaves(v, depth + 1)
    elif isinstance(node, list):
        for v in node:
            yield from reference_leaves(v, depth + 1)
    elif isinstance(node, str):
        yield node
    elif isinstance(node, int) and not isinstance(node, bool):
        yield str(node)


def reference_payload_keys(payload: bytes) -> list[str]:
    keys: set[str] = set()
    try:
        values: Iterator[str] = reference_leaves(msgspec.json.decode(payload))
    except (msgspec.DecodeError, RecursionError, ValueError):
        text = payload.decode("utf-8", "replace")
        values = iter([*records._TOKEN_SPLIT.split(text), *records._FIELD_SPLIT.split(text)])
    for value in values:
        keys |= identity_keys(value)
        if len(keys) >= records.MAX_KEYS:
            break
    return sorted(keys)[: records.MAX_KEYS]


def reference_split_body(body: bytes) -> list[bytes]:
    try:
        value = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeError, RecursionError):
        return [body]
    if isinstance(value, list):
        return [msgspec.json.encode(v) for v in value]
    return [body]


# -- inputs ----------------------------------------------------------------------------------
texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        ["+1 415 555 0100", "(415) 555-0100", " a@b.co ", "A@B.CO", "0", "-1", "", "x" * 1100]
    ),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=5), inner, max_size=6)
    ),
    max_leaves=40,
)


def nested(value: Any, depth: int) -> Any:
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


# -- the tests -------------------------------------------------------------------------------
@given(json_values)
def test_the_keys_of_a_json_payload_are_those_of_the_reference(value: Any) -> None:
    payload = msgspec.json.encode(value)
    assert payload_keys(payload) == reference_payload_keys(payload)


@given(st.binary(max_size=64) | texts.map(str.encode))
def test_the_keys_of_a_payload_that_is_no_json_are_those_of_the_reference(payload: bytes) -> None:
    assert payload_keys(payload) == reference_payload_keys(payload)


@given(st.lists(texts, max_size=5), st.integers(min_value=55, max_value=75))
def test_the_keys_of_a_deeply_nested_payload_stop_where_the_reference_stops(
    values: list[str], depth: int
) -> None:
    payload = msgspec.json.encode([nested(v, depth) for v in values] + ["top@example.com"])
    assert payload_keys(payload) == reference_payload_keys(payload)


def test_the_keys_of_a_payload_of_many_values_are_cut_where_the_reference_cuts_them() -> None:
    payload = msgspec.json.encode({f"k{i}": f"value-{i % 400}" for i in range(1000)})
    assert payload_keys(payload) == reference_payload_keys(payload)
    assert len(payload_keys(payload)) == records.MAX_KEYS


@given(json_values)
def test_a_json_body_is_split_as_the_reference_splits_it(value: Any) -> None:
    body = msgspec.json.encode(value)
    assert split_body(body) == reference_split_body(body)
    assert split_body(b" \n" + body) == reference_split_body(b" \n" + body)


@given(st.binary(max_size=64))
def test_a_body_that_is_no_json_is_split_as_the_reference_splits_it(body: bytes) -> None:
    assert split_body(body) == reference_split_body(body)
    assert split_body(b"[" + body) == reference_split_body(b"[" + body)

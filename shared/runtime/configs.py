"""Reading the config stream: each object as its owner published it on
`cdp.config.<kind>.<name>`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec

from shared import subjects
from shared.resources import name_of
from shared.runtime.actor import Delivery

T = TypeVar("T", bound=msgspec.Struct)


def published(
    deliveries: Sequence[Delivery], kind: str, decoder: msgspec.json.Decoder[T], log: Any
) -> list[tuple[Delivery, T]]:
    """The objects of `kind` in a step's deliveries, decoded, each on its own name's subject.
    A message that does not decode, or names another object than its subject does, is
    logged and skipped: a consumer acts on what a message says, never on its subject alone."""
    out: list[tuple[Delivery, T]] = []
    for d in deliveries:
        try:
            obj = decoder.decode(d.data)
        except msgspec.DecodeError:  # ValidationError included
            log.warning("undecodable configuration", kind=kind, subject=d.subject, seq=d.seq)
            continue
        if d.subject != subjects.config(kind, name_of(kind, obj)):
            log.warning("configuration on another name's subject", kind=kind, subject=d.subject)
            continue
        out.append((d, obj))
    return out

"""From a membership change and the profile view to an activation (pure)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

from services.destination.model import Activation
from shared.messages import Identity
from shared.resources import Destination

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0


def lookup(attributes: Mapping[str, Any], path: str) -> Any:
    node: Any = attributes
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def identity_map(identities: Iterable[Identity]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i in identities:
        out.setdefault(i.namespace, []).append(i.value)
    return out


def consents(dest: Destination, attributes: Mapping[str, Any]) -> bool:
    rule = dest.consent
    if rule is None:
        return True
    value = lookup(attributes, rule.path)
    return isinstance(value, str) and value in rule.allow


def build(
    dest: Destination,
    *,
    profile_id: str,
    segment: str,
    status: str,
    at: float,
    identities: Iterable[Identity],
    attributes: Mapping[str, Any],
    with_attributes: bool,
) -> tuple[Activation | None, str | None]:
    """The activation, or None and why it is skipped (no identity, no consent).

    Exits are always sent (a destination must learn that someone left), consent or not.
    Attributes travel only with changes from batch jobs, mapped by the destination.
    """
    ids = identity_map(identities)
    if dest.identity is not None and not ids.get(dest.identity):
        return None, f"no {dest.identity} identity"
    if status != "exited" and not consents(dest, attributes):
        return None, "no consent"
    mapped = (
        {
            field: v
            for path, field in dest.mappings.items()
            if (v := lookup(attributes, path)) is not None
        }
        if with_attributes
        else {}
    )
    return (
        Activation(
            profile_id=profile_id,
            segment=segment,
            status=status,
            at=at,
            identities=ids,
            attributes=mapped,
        ),
        None,
    )


def backoff(attempts: int, retry_after: float | None = None) -> float:
    """Seconds before the next attempt: exponential with full jitter, at least Retry-After."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * (2 ** max(0, attempts - 1)))
    delay = random.uniform(ceiling / 2, ceiling)
    return max(delay, retry_after or 0.0)

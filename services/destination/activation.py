"""From membership changes and the profile view to activations (pure).

`plan` takes a whole batch of changes and returns its effects: for each destination
connected to a change's segment, the activation to queue, or one more skipped, by reason
(`MISSING_IDENTITY`: no identity the destination needs; `NO_CONSENT`). The delivery queue,
the membership consumer, a newly connected destination's backfill and the audience
managers' `existing` members all go through it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from services.destination.model import Activation
from shared.messages import Identity, MembershipEvent
from shared.resources import Destination

STREAMING_TYPES = frozenset(
    {"webhook", "email", "sms", "social", "ads", "audience_sharing", "nats"}
)
"""Destination types that receive each membership change (the others export files)."""
MISSING_IDENTITY = "missing_identity"
"""A profile without an identity the destination needs (its `identity`, or one its
connector can address: an email list and a profile without an email)."""
NO_CONSENT = "no_consent"
"""A profile whose consent attribute does not allow the destination."""


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
    """The activation, or None and why it is skipped (`MISSING_IDENTITY`, `NO_CONSENT`).

    Exits are always sent (a destination must learn that someone left), consent or not.
    Attributes travel only with changes from batch jobs, mapped by the destination.
    """
    ids = identity_map(identities)
    if dest.identity is not None and not ids.get(dest.identity):
        return None, MISSING_IDENTITY
    if status != "exited" and not consents(dest, attributes):
        return None, NO_CONSENT
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


class View(msgspec.Struct, frozen=True):
    """What the destination service knows of a profile: its attributes and identities."""

    attributes: dict[str, Any] = {}
    identities: list[Identity] = []


class Queued(msgspec.Struct, frozen=True):
    destination: str
    activation: Activation


class Plan(msgspec.Struct):
    queued: list[Queued]
    skipped: dict[str, dict[str, int]]
    """Per destination: changes it does not receive, by reason."""

    @property
    def touched(self) -> set[str]:
        return {q.destination for q in self.queued}


def unseen(
    changes: Iterable[MembershipEvent], held: Mapping[tuple[str, str], tuple[str, float]]
) -> list[MembershipEvent]:
    """The changes not applied already, in order: a change whose status and time are those
    held for its segment and profile (`held`: (segment, profile) -> (status, at)), or those
    of a change before it in the batch, is one delivered again and is left out."""
    seen = dict(held)
    out = []
    for ev in changes:
        key = (ev.segment, ev.profile_id)
        if seen.get(key) == (ev.status, ev.at):
            continue
        seen[key] = (ev.status, ev.at)
        out.append(ev)
    return out


def plan(
    changes: Iterable[MembershipEvent],
    destinations: Iterable[Destination],
    views: Mapping[str, View],
) -> Plan:
    """The activations of `changes` for the streaming `destinations` connected to their
    segments. A change's own identities win over the view's; attributes travel only with
    changes from batch jobs (`method` batch)."""
    dests = [d for d in destinations if d.type in STREAMING_TYPES]
    out = Plan([], {})
    for ev in changes:
        view = views.get(ev.profile_id, View())
        for dest in dests:
            if ev.segment not in dest.segments:
                continue
            activation, why = build(
                dest,
                profile_id=ev.profile_id,
                segment=ev.segment,
                status=ev.status,
                at=ev.at,
                identities=ev.identities or view.identities,
                attributes=view.attributes,
                with_attributes=ev.method == "batch",
            )
            if activation is None:
                reasons = out.skipped.setdefault(dest.name, {})
                reason = why or MISSING_IDENTITY
                reasons[reason] = reasons.get(reason, 0) + 1
            else:
                out.queued.append(Queued(dest.name, activation))
    return out

"""Message types on the platform's subjects (msgspec Structs), with their codecs.

Internal subjects carry msgpack batches; public subjects carry JSON. Types evolve
additively: new fields get defaults, nothing is renamed or removed. Encoders and
decoders are built once, here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")


class Identity(msgspec.Struct, frozen=True):
    namespace: str
    value: str


class Record(msgspec.Struct, kw_only=True):
    """One accepted record on its way from ingest to identity and profile."""

    record_id: str
    dataset: str
    ingested_at: float
    payload: dict[str, Any]
    identities: list[Identity] = []
    source_msg_id: str | None = None
    record_class: str = "profile"
    """"profile" (attributes of a person) or "event" (something that happened)."""
    timestamp: float | None = None
    """Events: when it happened. Profile records: the record's own time, if its schema has one."""
    event_type: str | None = None
    primary_identity: Identity | None = None
    batch_id: str | None = None


class PrivacyDelete(msgspec.Struct, kw_only=True):
    """Remove everything the platform holds about the person with this identity.

    It travels in-band, behind any record of the person published before it, so that a
    delete leaves nothing behind. Each service reports on `cdp.privacy.<request_id>.<service>`.
    """

    request_id: str
    identity: Identity
    requested_at: float


class Probe(msgspec.Struct, tag="probe"):
    """A marker that follows the data through every service, behind everything published
    before it, to tell when that data has landed (reflected in profiles and memberships).

    Identity sends one copy on every partition (`partition`, of `partitions`); each stage
    reports each copy it passes on `cdp.probe.<probe_id>` (see `ProbeReport`)."""

    probe_id: str
    partition: int = -1
    partitions: int = 0


class ProbeReport(msgspec.Struct, kw_only=True):
    """A stage (a consumer of a service) passed a probe: everything before it is applied."""

    probe_id: str
    stage: str
    partition: int = -1
    partitions: int = 0
    at: float


# -- ingest -> identity ---------------------------------------------------------
class RecordEnvelope(msgspec.Struct, tag="records"):
    records: list[Record]
    deletes: list[PrivacyDelete] = []
    """A message carries records, deletes or probes; each comes after the records before it."""
    probes: list[Probe] = []


# -- identity -> profile (cdp.x.profiles.<partition>) ---------------------------
class Fragment(msgspec.Struct, tag="fragment"):
    """A record that belongs to `profile_id`, with its identities normalised."""

    profile_id: str
    record: Record
    anchor: str | None = None
    """The record's anchor: its highest-ranked identity key ("namespace:value"). An event
    sits on the profile that holds its anchor and follows it when it moves."""
    persons: list[str] = []
    """The record's person identities (keys, the anchor among them if it is one): a
    privacy delete of whoever holds one of them removes the record too, wherever it sits
    (a profile record's attributes stay where they are when their anchor splits off)."""
    unlinked: list[str] = []
    """The record's identity keys that are not in this profile's graph (a link the rules
    refused): the record carries them, the profile does not hold them."""


class Merged(msgspec.Struct, tag="merged"):
    """Graphs merged: `folded` profile ids now belong to `profile_id` (the older one)."""

    profile_id: str
    folded: list[str]
    at: float


class Reassigned(msgspec.Struct, tag="reassigned"):
    """Identities left `profile_id`: to `to_profile` (a split, or a device that moved to the
    person who logged in last), or out of the graph (`to_profile` None, the size limit)."""

    profile_id: str
    to_profile: str | None
    identities: list[Identity]
    reason: str
    at: float


class Deleted(msgspec.Struct, tag="deleted"):
    """A privacy delete: remove these profiles entirely, and every record that carries one
    of `person_keys` (the person identities the deleted graph held), wherever it sits."""

    profile_ids: list[str]
    request: PrivacyDelete
    person_keys: list[str] = []


class HandOver(msgspec.Struct, tag="hand_over"):
    """A merge's folded profile `source` that sits on another partition than the merge's
    own item (the first folded profile's): on `source`'s partition, right behind the merge,
    so that the instance holding it folds it into `profile_id`. A profile service that
    holds every partition in one file applied the merge whole and ignores it."""

    profile_id: str
    source: str
    at: float


class Awaits(msgspec.Struct, tag="awaits"):
    """On the partition of `profile_id`, when a merge folds `source` into it or identities
    move from `source` to it and `source` sits on another partition: placed at the same
    point of the causal order as the merge or the move, it holds `profile_id`'s partition
    back until the owner of `source`'s partition has handed its state over (`Handoff`
    `key`). A profile service that holds every partition in one file ignores it."""

    profile_id: str
    source: str
    key: str


class Sweep(msgspec.Struct, tag="sweep"):
    """A privacy delete's half on every partition but its own (`Deleted`'s), at the same
    point of the causal order: the instance that holds the partition removes there the
    records that carry one of `person_keys` and those of `profile_ids` it holds. A profile
    service that holds every partition applied the delete whole and ignores it."""

    profile_ids: list[str]
    request: PrivacyDelete
    person_keys: list[str] = []


ProfileItem = Fragment | Merged | Reassigned | Deleted | Probe | HandOver | Awaits | Sweep


def fold_key(folded: str) -> str:
    """The handoff key of a profile folded into one of another partition (once ever)."""
    return f"fold:{folded}"


def move_key(source: str, target: str, keys: list[str], at: float) -> str:
    """The handoff key of identities that moved from `source` to `target`."""
    digest = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:16]
    return f"move:{source}:{target}:{at!r}:{digest}"


class ProfileEnvelope(msgspec.Struct, tag="profiles"):
    items: list[ProfileItem]


# -- profile -> profile (cdp.x.handoff.<partition>) ---------------------------------
class HandedRow(msgspec.Struct, array_like=True):
    dataset: str
    path: str
    value: bytes
    """msgpack, as stored"""
    ts: float
    record_id: str


class HandedEvent(msgspec.Struct, array_like=True):
    record_id: str
    dataset: str
    event_type: str | None
    ts: float
    identity_keys: bytes
    payload: bytes
    """msgpack, as stored"""
    anchor: str | None
    announce: bool
    """Segmentation has not seen it on `profile_id` yet (new, or moved with its anchor);
    the events of a folded profile reach it through the merge."""


class Handoff(msgspec.Struct, tag="handoff"):
    """What the owner of one partition held of profiles folded into `profile_id`, or of
    identities that moved to it, handed to the owner of `profile_id`'s partition: the
    attribute rows, identities, events and carried index rows. `keys` are the `Awaits`
    it answers; `sources` the profiles it came from."""

    profile_id: str
    keys: list[str]
    sources: list[str]
    rows: list[HandedRow] = []
    identities: list[Identity] = []
    events: list[HandedEvent] = []
    carried: list[tuple[str, str, str]] = []
    """(person key, record id, kind)"""


# -- profile -> segmentation (cdp.x.changes.<partition>) --------------------------
class ExperienceEvent(msgspec.Struct, kw_only=True):
    record_id: str
    dataset: str
    event_type: str | None
    timestamp: float
    payload: dict[str, Any]


class ProfileChanged(msgspec.Struct, tag="changed"):
    """What segmentation needs to evaluate a profile: its merged attributes (default merge
    policy), the paths that changed, the new events, and its identities."""

    profile_id: str
    record_ids: list[str]
    at: float
    attributes: dict[str, Any] = {}
    changed: list[str] = []
    events: list[ExperienceEvent] = []
    identities: list[Identity] = []
    views: dict[str, dict[str, Any]] = {}
    """The merged attributes under each configured merge policy other than the default,
    for segments that name one; only those that differ from `attributes` (a policy left out
    sees the profile as `attributes` does)."""
    folded: list[str] = []
    """Profiles folded into this one by the batch this change sums up (their merge went
    before it): every segment is checked again."""
    removed_events: list[str] = []
    """Record ids of events that left this profile (they moved with their anchor identity
    to another profile, whose change carries them in `events`, or a privacy delete
    removed them)."""
    same_view: bool = False
    """The profile's attributes, views and identities are those its previous change
    carried: this change carries none of them (`attributes`, `views`, `identities` and
    `changed` are empty), only its events. Profile sends it for a fetch that gave the
    profile events only."""


class ProfileMerged(msgspec.Struct, tag="merged"):
    profile_id: str
    folded: list[str]
    at: float


class ProfileDeleted(msgspec.Struct, tag="deleted"):
    profile_ids: list[str]
    request: PrivacyDelete


class Recheck(msgspec.Struct, tag="recheck"):
    """Evaluate a profile again without new data: a time-based exit is due (`job_id` None),
    or a batch segmentation job reaches the profile (`job_id` set)."""

    profile_ids: list[str]
    at: float
    job_id: str | None = None


ChangeItem = ProfileChanged | ProfileMerged | ProfileDeleted | Recheck | Probe


class ChangeEnvelope(msgspec.Struct, tag="changes"):
    items: list[ChangeItem]


class ProfileView(msgspec.Struct, tag="changed"):
    """A `ProfileChanged` as a reader of the profile's view only decodes it: attributes
    and identities, without the events, views and paths it carries (msgspec skips them)."""

    profile_id: str
    at: float
    attributes: dict[str, Any] = {}
    identities: list[Identity] = []
    same_view: bool = False
    """The view is the one the profile's previous change carried (none in this one)."""


class ViewEnvelope(msgspec.Struct, tag="changes"):
    """A `ChangeEnvelope` read for the profiles' views (`ProfileView` for its changes)."""

    items: list[ProfileView | ProfileMerged | ProfileDeleted | Recheck | Probe]


# -- privacy: cdp.privacy.<request_id>.<service> ---------------------------------------
class PrivacyReport(msgspec.Struct, kw_only=True):
    request_id: str
    service: str
    identity: Identity
    profile_ids: list[str] = []
    removed: dict[str, int] = {}
    """What was removed, by kind (identities, attributes, events, memberships, ...)."""
    at: float


# -- public: cdp.membership.<segment> ---------------------------------------------
class MembershipEvent(msgspec.Struct, kw_only=True):
    profile_id: str
    segment: str
    status: str
    at: float
    method: str
    identities: list[Identity] = []
    merged_into: str | None = None
    """Set on the exits of a profile folded into another by a merge: the surviving profile
    id (which a lookup by the folded id also answers with)."""


# -- segmentation -> profile, destination (cdp.x.members.<partition>) -------------------
class MembershipChange(msgspec.Struct, tag="change"):
    """A membership change, as its public event on `cdp.membership.<segment>` says it."""

    event: MembershipEvent


MembershipItem = MembershipChange | ProfileDeleted | Probe


class MembershipEnvelope(msgspec.Struct, tag="members"):
    """The membership items of one step for one partition, in the order they happened: the
    changes, the privacy deletes (after every earlier change of the profiles they remove)
    and the probes (behind everything of their partition before them)."""

    items: list[MembershipItem]


MAX_ITEMS_PER_MESSAGE = 500
"""Most items (records, profile items, changes) one internal message carries: a batch of
many thousand records is sent as several messages, each well under NATS' payload limit."""


MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Most bytes one internal message carries: half of what the platform's nats-server accepts
(8 MB), so that no message of many items is refused for its size."""


class MessageTooLarge(ValueError):
    """One item alone encodes past the message size limit."""


def chunks(items: list[Any], size: int = MAX_ITEMS_PER_MESSAGE) -> list[list[Any]]:
    """`items` in order, `size` at a time."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def encode_fitting(
    items: list[T],
    encode: Callable[[list[T]], bytes],
    *,
    max_items: int = MAX_ITEMS_PER_MESSAGE,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> list[bytes]:
    """`items` in order as encoded messages of at most `max_items` items and `max_bytes`
    bytes each (a chunk too large is split in two until it fits). Raises `MessageTooLarge`
    when one item alone does not fit: better a clear error than a publish refused forever."""
    out: list[bytes] = []

    def fit(part: list[T]) -> None:
        data = encode(part)
        if len(data) <= max_bytes:
            out.append(data)
        elif len(part) == 1:
            raise MessageTooLarge(f"one item encodes to {len(data)} bytes, over {max_bytes}")
        else:
            mid = len(part) // 2
            fit(part[:mid])
            fit(part[mid:])

    for chunk in chunks(items, max_items):
        fit(chunk)
    return out


# -- codecs, built once -------------------------------------------------------------
msgpack_encoder = msgspec.msgpack.Encoder()
json_encoder = msgspec.json.Encoder()
record_batch_decoder = msgspec.msgpack.Decoder(RecordEnvelope)
profile_batch_decoder = msgspec.msgpack.Decoder(ProfileEnvelope)
handoff_decoder = msgspec.msgpack.Decoder(Handoff)
change_batch_decoder = msgspec.msgpack.Decoder(ChangeEnvelope)
view_batch_decoder = msgspec.msgpack.Decoder(ViewEnvelope)
membership_decoder = msgspec.json.Decoder(MembershipEvent)
members_batch_decoder = msgspec.msgpack.Decoder(MembershipEnvelope)
privacy_report_decoder = msgspec.json.Decoder(PrivacyReport)
probe_decoder = msgspec.json.Decoder(Probe)
probe_report_decoder = msgspec.json.Decoder(ProbeReport)

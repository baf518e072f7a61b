"""Message types on the platform's subjects (msgspec Structs), with their codecs.

Internal subjects carry msgpack batches; public subjects carry JSON. Types evolve
additively: new fields get defaults, nothing is renamed or removed. Encoders and
decoders are built once, here.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Identity(msgspec.Struct, frozen=True, array_like=True):
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


# -- ingest -> identity ---------------------------------------------------------
class RecordBatch(msgspec.Struct, tag="records"):
    records: list[Record]


# -- identity -> profile (cdp.x.profiles.<partition>) ---------------------------
class Fragment(msgspec.Struct, tag="fragment"):
    """A record that belongs to `profile_id`."""

    profile_id: str
    record: Record


ProfileItem = Fragment


class ProfileBatch(msgspec.Struct, tag="profiles"):
    items: list[ProfileItem]


# -- profile -> segmentation (cdp.x.changes.<partition>) --------------------------
class ProfileChanged(msgspec.Struct, tag="changed"):
    profile_id: str
    record_ids: list[str]
    at: float


ChangeItem = ProfileChanged


class ChangeBatch(msgspec.Struct, tag="changes"):
    items: list[ChangeItem]


# -- public: cdp.membership.<segment> ---------------------------------------------
class MembershipEvent(msgspec.Struct, kw_only=True):
    profile_id: str
    segment: str
    status: str
    at: float
    method: str
    identities: list[Identity] = []


# -- codecs, built once -------------------------------------------------------------
msgpack_encoder = msgspec.msgpack.Encoder()
json_encoder = msgspec.json.Encoder()
record_batch_decoder = msgspec.msgpack.Decoder(RecordBatch)
profile_batch_decoder = msgspec.msgpack.Decoder(ProfileBatch)
change_batch_decoder = msgspec.msgpack.Decoder(ChangeBatch)
membership_decoder = msgspec.json.Decoder(MembershipEvent)

"""Configuration objects (`cdp apply`): identity namespaces, schemas, datasets.

These are the public shapes of the admin API. They are decoded strictly (unknown keys are
errors) so that a typo in a configuration file is reported with its path. Later kinds
(merge policies, segments, destinations, schedules) are added beside them.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

FieldType = Literal[
    "string", "integer", "number", "boolean", "date", "datetime", "enum", "object", "array", "map"
]
NamespaceType = Literal["person", "device", "cookie"]
SchemaClass = Literal["profile", "event"]

NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]{0,62}$")
"""Names of datasets, schemas, namespaces: safe as a NATS subject token and a file name."""


class Field(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    type: FieldType
    required: bool = False
    description: str = ""
    enum: list[str] | None = None
    """Allowed values, for type enum."""
    fields: dict[str, Field] | None = None
    """Sub-fields, for type object."""
    items: Field | None = None
    """Element type, for type array."""
    values: Field | None = None
    """Value type, for type map (keys are strings)."""
    identity: str | None = None
    """Namespace symbol: the field's value is an identity of that namespace."""
    primary: bool = False
    """This identity field is the record's primary identity."""


class Namespace(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    symbol: str
    type: NamespaceType
    name: str = ""
    description: str = ""
    hashed: bool = False
    """Values are SHA-256 hex digests; they are linked as they come, never normalised."""
    unique: bool = False
    """At most one value of this namespace in one identity graph."""
    priority: int = 100
    """Order among namespaces of the same type; lower ranks first."""
    builtin: bool = False


BUILTIN_NAMESPACES: tuple[Namespace, ...] = (
    Namespace("crm_id", "person", name="CRM id", unique=True, priority=10, builtin=True),
    Namespace("loyalty_id", "person", name="Loyalty id", unique=True, priority=20, builtin=True),
    Namespace("email", "person", name="Email", priority=30, builtin=True),
    Namespace("phone", "person", name="Phone (E.164)", priority=40, builtin=True),
    Namespace(
        "email_sha256", "person", name="Email SHA-256", hashed=True, priority=50, builtin=True
    ),
    Namespace(
        "phone_sha256", "person", name="Phone SHA-256", hashed=True, priority=60, builtin=True
    ),
    Namespace("idfa", "device", name="Apple IDFA", priority=10, builtin=True),
    Namespace("gaid", "device", name="Google Advertising id", priority=20, builtin=True),
    Namespace("ecid", "cookie", name="Experience Cloud id (cookie)", priority=10, builtin=True),
)
"""The standard namespaces, always present. Their linking rules (unique, priority) may be
changed with `cdp apply`; their type and hashing may not."""


class Schema(
    msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, rename={"class_": "class"}
):
    name: str
    class_: SchemaClass
    fields: dict[str, Field]
    description: str = ""
    timestamp_field: str | None = None
    """Event schemas: the event's time (default `timestamp`, added if not declared).
    Profile schemas: optional; a record's own time, used by timestamp-ordered merging."""
    event_type_field: str | None = None
    """Event schemas: the event type (default `eventType`, added if not declared)."""
    unknown_fields: Literal["reject", "ignore"] = "reject"


class Dataset(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: str
    schema: str
    description: str = ""
    profile_enabled: bool = False
    """Only records of profile-enabled datasets feed identity and profile."""
    expiration_days: int | None = None
    """Event datasets: events older than this are dropped from profiles."""
    error_threshold: float = 0.05
    """A batch fails as a whole when its share of bad rows is above this."""


class MergePolicy(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """How the values of several datasets for one attribute are merged into one profile."""

    name: str
    type: Literal["timestamp", "dataset_precedence"]
    datasets: list[str] = []
    """dataset_precedence: ordered, an earlier dataset wins per attribute; datasets not listed
    come after the listed ones, ordered by timestamp (newest first)."""
    default: bool = False
    """The policy used when a reader names none (at most one policy is the default)."""
    description: str = ""


class Segment(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """An audience, written in the segment language (docs/segments.md)."""

    name: str
    expression: str
    description: str = ""
    merge_policy: str | None = None
    """The merge policy whose view of the profile the segment reads (default: the default)."""


DestinationType = Literal[
    "webhook", "email", "sms", "social", "ads", "audience_sharing", "nats", "file"
]


class Aggregation(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """When a streaming destination sends: `best_effort` at once, up to
    `max_users_per_request` per call; `configurable` when the oldest waiting change is
    `max_batch_age_s` old or `max_events` are waiting, whichever comes first."""

    mode: Literal["best_effort", "configurable"] = "best_effort"
    max_users_per_request: int = 1000
    max_batch_age_s: float = 60.0
    max_events: int = 1000


class ConsentRule(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Only profiles whose attribute at `path` equals one of `allow` are activated."""

    path: str
    allow: list[str] = msgspec.field(default_factory=lambda: ["y"])


class SftpTarget(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    host: str
    username: str
    remote_dir: str
    port: int = 22
    password_secret: str | None = None
    """Name of the entry in the destination's `secrets` that holds the password."""
    client_key: str | None = None
    """Path of a private key file on the destination service's machine."""
    known_hosts: str | None = None
    """Path of a known_hosts file; without one any host key is accepted."""


class Export(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A file destination's export: when, what and where."""

    folder: str
    """Where files are written (relative paths are under the service's data folder); it must
    lie inside the export root (`CDP_EXPORT_ROOT`, default `<data dir>/exports`)."""
    format: Literal["csv", "jsonl", "parquet"] = "csv"
    mode: Literal["full", "incremental"] = "full"
    """incremental: only changes since the last export, exits included; the first is full."""
    split_rows: int = 5_000_000
    schedule: str = "after_segmentation"
    """"after_segmentation" (when the daily batch segmentation job ends) or "manual"."""
    sftp: SftpTarget | None = None


class Destination(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: str
    type: DestinationType
    segments: list[str]
    connection: dict[str, Any] = {}
    """Connector settings (url, list_id, subject, folder, ...); never secrets."""
    secrets: dict[str, str] = {}
    """Secret name -> the environment variable that holds it (e.g. signing_secret:
    CDP_SECRET_WEBHOOK); values are read at delivery time, never stored or shown."""
    identity: str | None = None
    """The identity namespace the destination needs; profiles without it are skipped."""
    mappings: dict[str, str] = {}
    """Profile attribute path -> destination field. Event attributes are never exported."""
    consent: ConsentRule | None = None
    aggregation: Aggregation = Aggregation()
    export: Export | None = None
    """File destinations: how and where memberships are exported."""
    description: str = ""


class Schedule(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """When a batch job runs: the daily segmentation job, or a file destination's export."""

    name: str
    job: Literal["segmentation", "export"]
    cron: str
    """A cron expression, e.g. "0 2 * * *" (02:00 every day)."""
    timezone: str = "UTC"
    destination: str | None = None
    """For export jobs: the file destination to export."""
    description: str = ""


KINDS: dict[str, type[msgspec.Struct]] = {
    "namespace": Namespace,
    "schema": Schema,
    "dataset": Dataset,
    "merge_policy": MergePolicy,
    "segment": Segment,
    "destination": Destination,
    "schedule": Schedule,
}
"""Kind name -> type. A configuration file lists them under the plural key."""

PLURALS: dict[str, str] = {
    "namespaces": "namespace",
    "schemas": "schema",
    "datasets": "dataset",
    "merge_policies": "merge_policy",
    "segments": "segment",
    "destinations": "destination",
    "schedules": "schedule",
}

APPLY_ORDER: tuple[str, ...] = (
    "namespace",
    "schema",
    "dataset",
    "merge_policy",
    "segment",
    "destination",
    "schedule",
)

OWNERS: dict[str, str] = {
    "namespace": "ingest",
    "schema": "ingest",
    "dataset": "ingest",
    "merge_policy": "profile",
    "segment": "segmentation",
    "destination": "destination",
    "schedule": "scheduler",
}
"""Which service owns (validates, stores and publishes) each kind of object."""


def name_of(kind: str, spec: msgspec.Struct) -> str:
    return str(getattr(spec, "symbol" if kind == "namespace" else "name"))


def to_builtins(spec: msgspec.Struct) -> dict[str, Any]:
    out = msgspec.to_builtins(spec)
    assert isinstance(out, dict)
    return out

"""Every NATS subject and JetStream stream name the platform uses, in one place.

Public subjects (JSON, one record or event per message, for any NATS client):
    cdp.ingest.<dataset>          a record for a dataset           (stream CDP_INGEST)
    cdp.membership.<segment>      a segment membership change      (stream CDP_MEMBERSHIP)
    cdp.profile.lookup            request/reply profile lookup
    cdp.admin.>                   request/reply admin API

Internal subjects (msgpack, one message carries a batch of records):
    cdp.x.records                 accepted records, ingest -> identity        (CDP_RECORDS)
    cdp.x.profiles.<partition>    records with profile ids, identity -> profile (CDP_PROFILES)
    cdp.x.changes.<partition>     profile changes, profile -> segmentation    (CDP_CHANGES)
    cdp.x.members.<partition>     membership changes, privacy deletes and probes, one
                                  envelope per partition per step, segmentation -> profile,
                                  destination (CDP_MEMBERS); the public JSON events on
                                  cdp.membership.<segment> are committed in the same outbox
    cdp.jobs.>                    job requests and job status events          (CDP_JOBS)
      cdp.jobs.segmentation.run   run a segmentation job   scheduler, cdp -> segmentation
      cdp.jobs.segmentation.done  a job finished           segmentation -> scheduler, destination
      cdp.jobs.export.<d>.run     export a file now        scheduler, cdp -> destination
      cdp.jobs.export.<d>.done    an export finished       destination -> scheduler
    cdp.config.<kind>.<name>      the latest version of each configured object (CDP_CONFIG),
                                  published by its owner: dataset and namespace (ingest),
                                  merge_policy (profile), segment (segmentation),
                                  destination (destination), schedule (scheduler)
    cdp.batches.<id>.progress     progress of a batch file ingestion (core NATS, not stored)
    cdp.ingest._delete            a privacy delete request, in-band with the records
    cdp.ingest._probe             a probe that follows the records to tell when they landed
    cdp.membership._probe         the probe, passed on behind the membership changes (for
                                  applications; the platform reads it from cdp.x.members)
    cdp.probe.<id>                each stage's report that it passed probe <id> (core NATS)
    cdp.privacy.<id>.<service>    a service's report that it removed a person  (CDP_PRIVACY)
"""

from __future__ import annotations

from functools import lru_cache

import msgspec

# -- public ------------------------------------------------------------------
INGEST_PREFIX = "cdp.ingest"
INGEST_ALL = f"{INGEST_PREFIX}.>"
MEMBERSHIP_PREFIX = "cdp.membership"
MEMBERSHIP_ALL = f"{MEMBERSHIP_PREFIX}.>"
PRIVACY_MEMBERSHIP = f"{MEMBERSHIP_PREFIX}._deleted"
"""Profiles removed by a privacy delete, for applications (segment names never start
with '_'); profile and destination read the delete from the membership envelopes."""
PROFILE_LOOKUP = "cdp.profile.lookup"
ADMIN_PREFIX = "cdp.admin"

# -- internal ----------------------------------------------------------------
RECORDS = "cdp.x.records"
PROFILES_PREFIX = "cdp.x.profiles"
CHANGES_PREFIX = "cdp.x.changes"
MEMBERS_PREFIX = "cdp.x.members"
HANDOFFS_PREFIX = "cdp.x.handoff"
JOBS_PREFIX = "cdp.jobs"
JOBS_ALL = f"{JOBS_PREFIX}.>"
SEGMENTATION_JOB_RUN = f"{JOBS_PREFIX}.segmentation.run"
"""A request to run a batch segmentation job (JSON JobRun, with the job id chosen by whoever
asks, so that a request published twice runs once)."""
SEGMENTATION_JOB_DONE = f"{JOBS_PREFIX}.segmentation.done"
"""A batch segmentation job finished (JSON JobInfo); exports "after segmentation" follow."""
EXPORT_JOB_PREFIX = f"{JOBS_PREFIX}.export"
CONFIG_PREFIX = "cdp.config"
CONFIG_ALL = f"{CONFIG_PREFIX}.>"
BATCHES_PREFIX = "cdp.batches"
PRIVACY_PREFIX = "cdp.privacy"
PRIVACY_DELETE = f"{INGEST_PREFIX}._delete"
"""Privacy deletes enter through the ingest stream, behind the records before them."""
PROBE = f"{INGEST_PREFIX}._probe"
"""A probe enters through the ingest stream, behind the records published before it."""
MEMBERSHIP_PROBE = f"{MEMBERSHIP_PREFIX}._probe"
"""The probe, passed on by segmentation behind the membership changes before it (for
applications; profile and destination read it from the membership envelopes)."""
PROBE_REPORT_PREFIX = "cdp.probe"
BATCH_BUCKET = "cdp-batches"
"""Object store bucket that holds uploaded batch files until they are ingested."""
INSTANCES_BUCKET = "cdp-instances"
"""KV bucket of the live instances, key `<service>.<instance>`, kept by heartbeats; the
bucket's max age is the time after which an instance that stopped heartbeating is gone."""
LEASES_BUCKET = "cdp-leases"
"""KV bucket of leases, one key per lease (`identity.writer`, `scheduler.active`); the
bucket's max age is the lease time, and a key's revision is its holder's fencing token."""
IDENTITY_WRITER_LEASE = "identity.writer"
SCHEDULER_ACTIVE_LEASE = "scheduler.active"


MAX_PAYLOAD = 8 * 1024 * 1024
"""Above NATS' 1 MB default, so that an oversize record reaches ingest and is rejected
there with a reason (the ingest limit is 1 MB) instead of failing at the client."""

SNAPSHOT_BUCKET = "cdp-snapshots"
"""Object store bucket of partition snapshots: `<service>/<partition>/<token>-<seq>`."""
SNAPSHOT_INDEX_BUCKET = "cdp-snapshot-index"
"""KV bucket naming each partition's latest snapshot: `<service>.<partition>`."""


def inbox_prefix(account: str) -> str:
    """The reply-subject root of a key's connections: `_INBOX_<name>` for every key, an
    application's included (connect with `inbox_prefix="_INBOX_client"` for the default
    application key). No key may read another's root, so no application reads another's
    answers, and none reads the platform's."""
    return f"_INBOX_{account}"


def ingest(dataset: str) -> str:
    return f"{INGEST_PREFIX}.{dataset}"


def membership(segment: str) -> str:
    return f"{MEMBERSHIP_PREFIX}.{segment}"


def admin(area: str, operation: str) -> str:
    """`cdp.admin.<area>.<operation>`, e.g. `cdp.admin.schema.apply`."""
    return f"{ADMIN_PREFIX}.{area}.{operation}"


def config(kind: str, name: str) -> str:
    return f"{CONFIG_PREFIX}.{kind}.{name}"


def export_run(destination: str) -> str:
    """A request to export a destination's file now (JSON ExportRun, with its job id)."""
    return f"{EXPORT_JOB_PREFIX}.{destination}.run"


def export_done(destination: str) -> str:
    """A destination's export finished (JSON ExportResult, with the job id it ran)."""
    return f"{EXPORT_JOB_PREFIX}.{destination}.done"


def privacy_report(request_id: str, service: str) -> str:
    return f"{PRIVACY_PREFIX}.{request_id}.{service}"


def probe_report(probe_id: str) -> str:
    return f"{PROBE_REPORT_PREFIX}.{probe_id}"


def batch_progress(batch_id: str) -> str:
    return f"{BATCHES_PREFIX}.{batch_id}.progress"


_FNV_OFFSET = 2166136261
_FNV_PRIME = 16777619


@lru_cache(maxsize=1 << 16)
def partition_of(key: str, partitions: int) -> int:
    """The partition a key (a profile id) belongs to; stable across processes and versions.

    The server's own function: a subject transform `{{partition(N,k)}}` puts a token in
    partition FNV-1a-32(token's UTF-8 bytes) mod N, so a stream that partitions by a
    subject token and a client that computes it here agree (tests/test_partition_parity.py).
    """
    h = _FNV_OFFSET
    for b in key.encode():
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFF
    return h % partitions


def profiles(partition: int) -> str:
    return f"{PROFILES_PREFIX}.{partition}"


def changes(partition: int) -> str:
    return f"{CHANGES_PREFIX}.{partition}"


def handoffs(partition: int) -> str:
    """State handed from one profile partition to another (a merge or a move across)."""
    return f"{HANDOFFS_PREFIX}.{partition}"


def profile_partition_lookup(partition: int) -> str:
    """A lookup asked of the instance that holds a profile partition (request/reply, the
    profile service's own: its instances route `cdp.profile.lookup` here)."""
    return f"{PROFILE_LOOKUP}.partition.{partition}"


def members(partition: int) -> str:
    """Membership changes of the profiles of `partition`, as batches (MembershipEnvelope)."""
    return f"{MEMBERS_PREFIX}.{partition}"


def dataset_of(subject: str) -> str:
    """`cdp.ingest.crm` -> `crm`; what follows the prefix, dots included."""
    return subject[len(INGEST_PREFIX) + 1 :]


# -- streams -------------------------------------------------------------------
PARTITIONS_METADATA = "cdp.partitions"
"""The stream metadata key that holds the partition count a partitioned stream was set
up with (CDP_PARTITIONS at the first `cdp setup`)."""


class StreamSpec(msgspec.Struct, frozen=True):
    name: str
    subjects: tuple[str, ...]
    description: str
    max_age_s: float = 7 * 24 * 3600.0
    duplicate_window_s: float = 120.0
    max_msgs_per_subject: int = -1
    partitioned: bool = False
    """Its subjects end in a partition number: the stream records the partition count
    it was set up with (`PARTITIONS_METADATA`), which is fixed from then on."""


STREAM_INGEST = StreamSpec(
    "CDP_INGEST", (INGEST_ALL,), "public: raw records published by clients, one JSON per message"
)
STREAM_RECORDS = StreamSpec(
    "CDP_RECORDS",
    (RECORDS,),
    "internal: validated record batches, ingest -> identity",
    duplicate_window_s=600.0,
)
STREAM_PROFILES = StreamSpec(
    "CDP_PROFILES",
    (f"{PROFILES_PREFIX}.*",),
    "internal: records with profile ids, identity -> profile",
    duplicate_window_s=600.0,
    partitioned=True,
)
STREAM_CHANGES = StreamSpec(
    "CDP_CHANGES",
    (f"{CHANGES_PREFIX}.*",),
    "internal: profile changes, profile -> segmentation",
    duplicate_window_s=600.0,
    partitioned=True,
)
STREAM_MEMBERSHIP = StreamSpec(
    "CDP_MEMBERSHIP", (MEMBERSHIP_ALL,), "public: segment membership changes, one JSON per event"
)
STREAM_MEMBERS = StreamSpec(
    "CDP_MEMBERS",
    (f"{MEMBERS_PREFIX}.*",),
    "internal: membership changes in batches, segmentation -> profile, destination",
    duplicate_window_s=600.0,
    partitioned=True,
)
STREAM_HANDOFFS = StreamSpec(
    "CDP_HANDOFFS",
    (f"{HANDOFFS_PREFIX}.*",),
    "internal: profile state handed between partitions' owners, profile -> profile",
    duplicate_window_s=600.0,
    partitioned=True,
)
STREAM_JOBS = StreamSpec("CDP_JOBS", (JOBS_ALL,), "internal: job requests and job status events")
STREAM_CONFIG = StreamSpec(
    "CDP_CONFIG",
    (CONFIG_ALL,),
    "internal: the latest version of every configured object, one subject per object",
    max_age_s=0.0,
    max_msgs_per_subject=1,
)

STREAM_PRIVACY = StreamSpec(
    "CDP_PRIVACY",
    (f"{PRIVACY_PREFIX}.>",),
    "privacy deletes: one completion report per service and request",
    max_age_s=30 * 24 * 3600.0,
)

ALL_STREAMS: tuple[StreamSpec, ...] = (
    STREAM_INGEST,
    STREAM_RECORDS,
    STREAM_PROFILES,
    STREAM_CHANGES,
    STREAM_MEMBERSHIP,
    STREAM_MEMBERS,
    STREAM_HANDOFFS,
    STREAM_JOBS,
    STREAM_CONFIG,
    STREAM_PRIVACY,
)

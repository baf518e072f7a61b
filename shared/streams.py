"""Create or update the JetStream streams the platform needs (idempotent), and check that
they exist. Only the admin key (`cdp up`, `cdp setup`, compose's setup step) may create or
change streams; a service only checks (`missing_streams`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from shared.errors import CdpError
from shared.subjects import ALL_STREAMS, BATCH_BUCKET, PARTITIONS_METADATA, StreamSpec


class PartitionCountFixed(CdpError):
    """A partitioned stream was set up with another partition count than the one asked
    for: profiles would be looked for on other partitions than the ones they were put on."""

    code = "partition_count_fixed"

    def __init__(self, stream: str, recorded: int, asked: int) -> None:
        super().__init__(
            f"stream {stream} was set up with {recorded} partitions, and CDP_PARTITIONS is "
            f"{asked}: the partition count is fixed at the first set-up; set "
            f"CDP_PARTITIONS={recorded} (or start over with empty streams)"
        )
        self.stream = stream
        self.recorded = recorded
        self.asked = asked


def recorded_partitions(config: StreamConfig) -> int | None:
    """The partition count a stream's metadata records, if any."""
    raw = (config.metadata or {}).get(PARTITIONS_METADATA)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def stream_config(
    spec: StreamSpec, replicas: int = 1, partitions: int | None = None
) -> StreamConfig:
    """The stream of `spec`, kept by `replicas` servers of a cluster (1: one server); a
    partitioned one records `partitions` in its metadata."""
    metadata = (
        {PARTITIONS_METADATA: str(partitions)}
        if spec.partitioned and partitions is not None
        else None
    )
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=spec.max_age_s,
        duplicate_window=spec.duplicate_window_s,
        max_msgs_per_subject=spec.max_msgs_per_subject,
        num_replicas=replicas,
        metadata=metadata,
    )


async def ensure_streams(
    js: JetStreamContext,
    specs: Iterable[StreamSpec] = ALL_STREAMS,
    buckets: Iterable[str] = (BATCH_BUCKET,),
    *,
    replicas: int = 1,
    key_values: Iterable[KeyValueConfig] = (),
    partitions: int | None = None,
) -> None:
    """Create missing streams, object-store buckets and key-value buckets, each kept by
    `replicas` servers (CDP_REPLICAS); update streams whose settings differ from the
    code's, and any stream or bucket kept by another number of servers (JetStream moves
    or adds copies in place: nothing is lost).

    `partitions` (CDP_PARTITIONS) is recorded on the partitioned streams when they are
    created (or, set up before it was recorded, when first met); a stream that recorded
    another count raises `PartitionCountFixed` before anything is changed."""
    if partitions is not None:
        for spec in specs:
            if not spec.partitioned:
                continue
            try:
                info = await js.stream_info(spec.name)
            except NotFoundError:
                continue
            recorded = recorded_partitions(info.config)
            if recorded is not None and recorded != partitions:
                raise PartitionCountFixed(spec.name, recorded, partitions)
    for bucket in buckets:
        try:
            await js.object_store(bucket)
        except NotFoundError:
            await js.create_object_store(
                bucket, ObjectStoreConfig(bucket=bucket, replicas=replicas)
            )
        else:
            await _ensure_replicas(js, f"OBJ_{bucket}", replicas)
    for kv in key_values:
        try:
            await js.key_value(kv.bucket)
        except NotFoundError:
            await js.create_key_value(dataclasses.replace(kv, replicas=replicas))
        else:
            await _ensure_replicas(js, f"KV_{kv.bucket}", replicas)
    for spec in specs:
        config = stream_config(spec, replicas, partitions)
        try:
            info = await js.stream_info(spec.name)
        except NotFoundError:
            await js.add_stream(config)
            continue
        current = info.config
        if config.metadata is None:
            config.metadata = current.metadata  # what the stream records is kept
        else:
            config.metadata = {**(current.metadata or {}), **config.metadata}
        if (
            recorded_partitions(current) != recorded_partitions(config)
            or sorted(current.subjects or []) != sorted(config.subjects or [])
            or current.max_age != config.max_age
            or current.duplicate_window != config.duplicate_window
            or current.description != config.description
            or (current.max_msgs_per_subject or -1) != config.max_msgs_per_subject
            or (current.num_replicas or 1) != replicas
        ):
            await js.update_stream(config)


async def _ensure_replicas(js: JetStreamContext, stream: str, replicas: int) -> None:
    """Keep the stream behind a bucket on `replicas` servers, its other settings as they are."""
    config = (await js.stream_info(stream)).config
    if (config.num_replicas or 1) != replicas:
        await js.update_stream(dataclasses.replace(config, num_replicas=replicas))


async def missing_streams(
    js: JetStreamContext, specs: Iterable[StreamSpec], partitions: int | None = None
) -> list[str]:
    """The names of the streams in `specs` that do not exist. With `partitions`: raises
    `PartitionCountFixed` if a partitioned stream recorded another count (a service
    started with another CDP_PARTITIONS than the platform was set up with)."""
    missing = []
    for spec in specs:
        try:
            info = await js.stream_info(spec.name)
        except NotFoundError:
            missing.append(spec.name)
            continue
        recorded = recorded_partitions(info.config) if spec.partitioned else None
        if partitions is not None and recorded is not None and recorded != partitions:
            raise PartitionCountFixed(spec.name, recorded, partitions)
    return missing

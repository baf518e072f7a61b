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

from shared.subjects import ALL_STREAMS, BATCH_BUCKET, StreamSpec


def stream_config(spec: StreamSpec, replicas: int = 1) -> StreamConfig:
    """The stream of `spec`, kept by `replicas` servers of a cluster (1: one server)."""
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
    )


async def ensure_streams(
    js: JetStreamContext,
    specs: Iterable[StreamSpec] = ALL_STREAMS,
    buckets: Iterable[str] = (BATCH_BUCKET,),
    *,
    replicas: int = 1,
    key_values: Iterable[KeyValueConfig] = (),
) -> None:
    """Create missing streams, object-store buckets and key-value buckets, each kept by
    `replicas` servers (CDP_REPLICAS); update streams whose settings differ from the
    code's, and any stream or bucket kept by another number of servers (JetStream moves
    or adds copies in place: nothing is lost)."""
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
        config = stream_config(spec, replicas)
        try:
            info = await js.stream_info(spec.name)
        except NotFoundError:
            await js.add_stream(config)
            continue
        current = info.config
        if (
            sorted(current.subjects or []) != sorted(config.subjects or [])
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


async def missing_streams(js: JetStreamContext, specs: Iterable[StreamSpec]) -> list[str]:
    """The names of the streams in `specs` that do not exist."""
    missing = []
    for spec in specs:
        try:
            await js.stream_info(spec.name)
        except NotFoundError:
            missing.append(spec.name)
    return missing

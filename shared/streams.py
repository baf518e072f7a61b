"""Create or update the JetStream streams the platform needs (idempotent)."""

from __future__ import annotations

from collections.abc import Iterable

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from shared.subjects import ALL_STREAMS, StreamSpec


def stream_config(spec: StreamSpec) -> StreamConfig:
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
    )


async def ensure_streams(js: JetStreamContext, specs: Iterable[StreamSpec] = ALL_STREAMS) -> None:
    for spec in specs:
        config = stream_config(spec)
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
        ):
            await js.update_stream(config)

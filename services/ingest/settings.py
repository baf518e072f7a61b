"""Ingestion rules that can be changed through the environment."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import msgspec

from services.ingest.validation import Limits
from shared.config import ConfigError


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, raw, "a positive integer") from None
    if value < 1:
        raise ConfigError(name, raw, "a positive integer")
    return value


def load_limits(env: Mapping[str, str] | None = None) -> Limits:
    env = os.environ if env is None else env
    base = Limits()
    placeholders = env.get("CDP_INGEST_PLACEHOLDERS")
    return Limits(
        max_record_bytes=_int(env, "CDP_INGEST_MAX_RECORD_BYTES", base.max_record_bytes),
        max_event_bytes=_int(env, "CDP_INGEST_MAX_EVENT_BYTES", base.max_event_bytes),
        max_identities=_int(env, "CDP_INGEST_MAX_IDENTITIES", base.max_identities),
        max_identity_length=_int(env, "CDP_INGEST_MAX_IDENTITY_LENGTH", base.max_identity_length),
        placeholders=(
            frozenset(p.strip().lower() for p in placeholders.split(",") if p.strip())
            if placeholders is not None
            else base.placeholders
        ),
    )


class Scaling(msgspec.Struct, frozen=True):
    """How this ingest process shares the work with others (`CDP_INSTANCE`,
    `CDP_INGEST_SHARED`)."""

    instance: str = "ingest"
    """The name it answers the gathered admin requests with."""
    shared: bool = False
    """Whether it is one of several instances that share the ingest stream."""


def load_scaling(env: Mapping[str, str] | None = None) -> Scaling:
    """Shared when `CDP_INSTANCE` names this instance or `CDP_INGEST_SHARED` is 1/true."""
    env = os.environ if env is None else env
    instance = env.get("CDP_INSTANCE", "").strip()
    raw = env.get("CDP_INGEST_SHARED", "").strip().lower()
    if raw not in ("", "0", "1", "false", "true", "no", "yes"):
        raise ConfigError("CDP_INGEST_SHARED", raw, "1 or 0")
    shared = bool(instance) or raw in ("1", "true", "yes")
    if shared and not instance:
        instance = f"ingest-{socket.gethostname()}-{os.getpid()}"
    return Scaling(instance or "ingest", shared)

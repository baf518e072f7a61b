"""NATS: republish each activation as one JSON message on a subject the user chooses.

Settings: `subject` (required; "{segment}" is replaced by the segment name), `_nc` (required:
the connected `nats.aio.client.Client` to publish with; the service passes its own
connection under this key, it is not part of the stored configuration), `max_per_request`,
`timeout` (seconds to wait for the server to acknowledge the flush). No secrets.
Each message is the Activation as JSON with header `Nats-Msg-Id` (its `change_id`,
segment:profile:status:at), so a JetStream stream on the subject drops duplicates.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import aiohttp
import nats.errors
from nats.aio.client import Client

from services.destination.connectors.base import (
    ConnectorSettingsError,
    json_encoder,
    positive_float,
    positive_int,
    require,
)
from services.destination.model import Activation, DeliveryError, SegmentMeta, change_id

DEFAULT_MAX_PER_REQUEST = 1000
DEFAULT_TIMEOUT = 10.0
_TOKEN = re.compile(r"[^\s.*>]+")


def valid_subject(subject: str) -> bool:
    """A publishable subject: dot-separated non-empty tokens, no spaces, no wildcards."""
    return all(_TOKEN.fullmatch(t) for t in subject.split("."))


class NatsConnector:
    kind: ClassVar[str] = "nats"

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
        nc = settings.get("_nc")
        if not isinstance(nc, Client):
            raise ConnectorSettingsError(f"{self.kind}: setting '_nc' (a NATS client) is required")
        self.nc = nc
        self.subject = require(settings, "subject", self.kind)
        if not valid_subject(self.subject.replace("{segment}", "segment")):
            raise ConnectorSettingsError(f"{self.kind}: invalid subject {self.subject!r}")
        self.max_per_request = positive_int(
            settings, "max_per_request", DEFAULT_MAX_PER_REQUEST, self.kind
        )
        self.timeout = positive_float(settings, "timeout", DEFAULT_TIMEOUT, self.kind)

    def subject_for(self, segment: SegmentMeta) -> str:
        return self.subject.replace("{segment}", segment.name)

    def addressable(self, a: Activation) -> bool:
        return True

    async def sync_segment(
        self, session: aiohttp.ClientSession, segment: SegmentMeta
    ) -> str | None:
        return None

    async def send(
        self, session: aiohttp.ClientSession, segment: SegmentMeta, items: Sequence[Activation]
    ) -> None:
        if not items:
            return
        subject = self.subject_for(segment)
        if not valid_subject(subject):
            raise DeliveryError(f"{self.kind}: invalid subject {subject!r}", retryable=False)
        try:
            for a in items:
                await self.nc.publish(
                    subject, json_encoder.encode(a), headers={"Nats-Msg-Id": change_id(a)}
                )
            await self.nc.flush(timeout=max(1, round(self.timeout)))
        except (nats.errors.BadSubjectError, nats.errors.MaxPayloadError) as e:
            raise DeliveryError(f"{self.kind}: {type(e).__name__}", retryable=False) from e
        except (nats.errors.Error, OSError) as e:
            raise DeliveryError(f"{self.kind}: {type(e).__name__}: {e}", retryable=True) from e

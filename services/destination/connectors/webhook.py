"""Webhook: POST each batch as JSON to a URL the user chooses, signed with HMAC-SHA256.

Settings: `url` (required), `max_per_request`, `timeout`. Secrets: `signing_secret`.
Body: `{"segment": {"name", "description", "method"}, "activations": [Activation, ...]}`,
each activation with an `id` (`change_id`: the same on every delivery of that change, so a
receiver can drop one it has already seen; delivery is at least once); identities are sent
as they come (normalised, not hashed). Headers:
`X-CDP-Timestamp` (Unix seconds) and `X-CDP-Signature: sha256=<hex HMAC-SHA256 of the exact
body bytes keyed with the signing secret>`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import aiohttp
import msgspec

from services.destination.connectors.base import HttpConnector, json_encoder, require_secret
from services.destination.model import Activation, SegmentMeta, change_id

SIGNATURE_HEADER = "X-CDP-Signature"
TIMESTAMP_HEADER = "X-CDP-Timestamp"


def signature(secret: bytes, body: bytes) -> str:
    """The X-CDP-Signature value of `body`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookConnector(HttpConnector):
    kind: ClassVar[str] = "webhook"

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
        super().__init__(settings, secrets)
        self.endpoint = str(settings["url"]).strip()
        self._secret = require_secret(secrets, "signing_secret", self.kind).encode("utf-8")

    def headers(self, body: bytes) -> dict[str, str]:
        out = super().headers(body)
        out[TIMESTAMP_HEADER] = str(int(time.time()))
        out[SIGNATURE_HEADER] = signature(self._secret, body)
        return out

    async def send(
        self, session: aiohttp.ClientSession, segment: SegmentMeta, items: Sequence[Activation]
    ) -> None:
        if not items:
            return
        payload = {
            "segment": msgspec.to_builtins(segment),
            "activations": [{"id": change_id(a), **msgspec.to_builtins(a)} for a in items],
        }
        await self.request(session, "POST", self.endpoint, json_encoder.encode(payload))

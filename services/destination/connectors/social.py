"""Social network custom audience API: add and remove users by hashed email and phone.

Settings: `url` (API base), `audience_id` (required), `default_region` (the service's
`CDP_PHONE_REGION` unless set), `max_per_request`, `timeout`. Secrets: `api_key` (bearer token).
- realized/existing -> POST {url}/audiences/{audience_id}/users
- exited -> POST {url}/audiences/{audience_id}/users:remove
Body: `{"schema": ["EMAIL_SHA256", "PHONE_SHA256"], "data": [[email hash or "", phone hash
or ""], ...]}`, one row per email/phone pair of a profile (the shorter list padded with "").
Values are normalised (trimmed, lower-cased email; E.164 phone), then SHA-256, lower-case
hex, no salt; `email_sha256`/`phone_sha256` digests are taken as they are. Raw emails and
phones never leave. Activations with neither are not sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import zip_longest
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp

from services.destination.connectors.base import (
    HttpConnector,
    phone_region,
    require,
    split_by_status,
)
from services.destination.connectors.identities import email_hashes, phone_hashes
from services.destination.model import Activation, SegmentMeta

SCHEMA = ["EMAIL_SHA256", "PHONE_SHA256"]


class SocialConnector(HttpConnector):
    kind: ClassVar[str] = "social"
    token_secret: ClassVar[str | None] = "api_key"

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
        super().__init__(settings, secrets)
        self.default_region = phone_region(settings, self.kind)
        audience = require(settings, "audience_id", self.kind)
        self.users_path = "/audiences/" + quote(audience, safe="") + "/users"

    def rows(self, a: Activation) -> list[list[str]]:
        """The hashed rows of one activation."""
        pairs = zip_longest(email_hashes(a), phone_hashes(a, self.default_region), fillvalue="")
        return [[e, p] for e, p in pairs]

    def addressable(self, a: Activation) -> bool:
        return bool(self.rows(a))

    async def send(
        self, session: aiohttp.ClientSession, segment: SegmentMeta, items: Sequence[Activation]
    ) -> None:
        adds, removals = split_by_status(items)
        for path, group in ((self.users_path, adds), (self.users_path + ":remove", removals)):
            data = [row for a in group for row in self.rows(a)]
            if data:
                await self.post(session, path, {"schema": SCHEMA, "data": data})

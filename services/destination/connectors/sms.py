"""SMS provider list API: add and remove subscribers by phone number (E.164).

Settings: `url` (API base), `list_id` (required), `default_region` (for numbers without a
country code; the service's `CDP_PHONE_REGION` unless set), `max_per_request`, `timeout`.
Secrets: `api_key` (bearer token).
- realized/existing -> POST {url}/lists/{list_id}/subscribers
  `{"subscribers": [{"phone": <first phone>, "fields": {mapped attributes}}]}`
- exited -> POST {url}/lists/{list_id}/subscribers:remove `{"phones": [every phone]}`
Only the latest activation of each profile in a batch counts; activations without a usable
phone are not sent (`addressable` is False for them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp

from services.destination.connectors.base import (
    HttpConnector,
    phone_region,
    require,
    split_by_status,
)
from services.destination.connectors.identities import phones
from services.destination.model import Activation, SegmentMeta


class SmsConnector(HttpConnector):
    kind: ClassVar[str] = "sms"
    token_secret: ClassVar[str | None] = "api_key"

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
        super().__init__(settings, secrets)
        self.default_region = phone_region(settings, self.kind)
        self.list_path = "/lists/" + quote(require(settings, "list_id", self.kind), safe="")

    def addressable(self, a: Activation) -> bool:
        return bool(phones(a, self.default_region))

    async def send(
        self, session: aiohttp.ClientSession, segment: SegmentMeta, items: Sequence[Activation]
    ) -> None:
        adds, removals = split_by_status([a for a in items if self.addressable(a)])
        if adds:
            subs = [
                {"phone": phones(a, self.default_region)[0], "fields": a.attributes} for a in adds
            ]
            await self.post(session, self.list_path + "/subscribers", {"subscribers": subs})
        if removals:
            gone = list(dict.fromkeys(p for a in removals for p in phones(a, self.default_region)))
            await self.post(session, self.list_path + "/subscribers:remove", {"phones": gone})

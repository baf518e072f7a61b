"""Destination connectors: one module per kind, all behind `base.Connector`.

`CONNECTORS` maps a destination kind to its connector class; build one with
`CONNECTORS[kind](settings, secrets)`.
"""

from __future__ import annotations

from services.destination.connectors.ads import AdsConnector
from services.destination.connectors.audience_sharing import AudienceSharingConnector
from services.destination.connectors.base import (
    Connector,
    ConnectorSettingsError,
    http_error,
    parse_retry_after,
)
from services.destination.connectors.email import EmailConnector
from services.destination.connectors.nats import NatsConnector
from services.destination.connectors.sms import SmsConnector
from services.destination.connectors.social import SocialConnector
from services.destination.connectors.webhook import WebhookConnector

CONNECTORS: dict[str, type[Connector]] = {
    c.kind: c
    for c in (
        WebhookConnector,
        EmailConnector,
        SmsConnector,
        SocialConnector,
        AdsConnector,
        AudienceSharingConnector,
        NatsConnector,
    )
}

__all__ = [
    "CONNECTORS",
    "AdsConnector",
    "AudienceSharingConnector",
    "Connector",
    "ConnectorSettingsError",
    "EmailConnector",
    "NatsConnector",
    "SmsConnector",
    "SocialConnector",
    "WebhookConnector",
    "http_error",
    "parse_retry_after",
]

"""The ingest service's root exception."""

from __future__ import annotations

from shared.errors import CdpError


class IngestError(CdpError):
    """Base of every error the ingest service raises on purpose."""

    code = "ingest_error"

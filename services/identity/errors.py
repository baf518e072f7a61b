"""The identity service's root exception."""

from __future__ import annotations

from shared.errors import CdpError


class IdentityError(CdpError):
    """Base of every error the identity service raises on purpose."""

    code = "identity_error"

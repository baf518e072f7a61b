"""The profile service's root exception."""

from __future__ import annotations

from shared.errors import CdpError


class ProfileError(CdpError):
    """Base of every error the profile service raises on purpose."""

    code = "profile_error"

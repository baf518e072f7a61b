"""The segmentation service's root exception."""

from __future__ import annotations

from shared.errors import CdpError


class SegmentationError(CdpError):
    """Base of every error the segmentation service raises on purpose."""

    code = "segmentation_error"

"""`python -m services.segmentation`: run the segmentation service until SIGTERM/SIGINT."""

from services.segmentation.service import SegmentationService
from shared.runtime import run_service

if __name__ == "__main__":
    run_service(SegmentationService)

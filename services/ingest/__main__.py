"""`python -m services.ingest`: run the ingest service until SIGTERM/SIGINT."""

from services.ingest.service import IngestService
from shared.runtime import run_service

if __name__ == "__main__":
    run_service(IngestService)

"""`python -m services.destination`: run the destination service until SIGTERM/SIGINT."""

from services.destination.service import DestinationService
from shared.runtime import run_service

if __name__ == "__main__":
    run_service(DestinationService)

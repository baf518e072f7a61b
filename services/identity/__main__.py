"""`python -m services.identity`: run the identity service until SIGTERM/SIGINT."""

from services.identity.service import IdentityService
from shared.runtime import run_service

if __name__ == "__main__":
    run_service(IdentityService)

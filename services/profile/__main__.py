"""`python -m services.profile`: run the profile service until SIGTERM/SIGINT."""

from services.profile.service import ProfileService
from shared.runtime import run_service

if __name__ == "__main__":
    run_service(ProfileService)

"""`python -m services.profile`: run the profile service until SIGTERM/SIGINT.

With `CDP_INSTANCE` set it runs as one of several instances, each holding some of the
partitions (services.profile.partitioned); without, as the one instance that holds them
all in one file (services.profile.service)."""

import os

from services.profile.partitioned import PartitionedProfileService
from services.profile.service import ProfileService
from shared.runtime import run_service

if __name__ == "__main__":
    run_service(PartitionedProfileService if os.environ.get("CDP_INSTANCE") else ProfileService)

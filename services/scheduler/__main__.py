"""`python -m services.scheduler`: run the scheduler service until SIGTERM/SIGINT."""

from services.scheduler.service import SchedulerService
from shared.runtime import run_service

if __name__ == "__main__":
    run_service(SchedulerService)

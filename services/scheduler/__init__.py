"""Scheduler: runs the daily batch segmentation job and scheduled exports, keeps job records."""

"""Scheduler: asks for the daily batch segmentation job and scheduled exports on the jobs
stream when they are due, and records each run and how it ended."""

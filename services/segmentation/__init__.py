"""Segmentation: evaluates audiences on profile changes (streaming) and in batch jobs."""

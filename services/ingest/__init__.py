"""Ingest: takes records in (NATS `cdp.ingest.<dataset>`), keeps rejects with their reason,
and passes accepted records to identity in batches."""

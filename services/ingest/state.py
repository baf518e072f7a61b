"""What the ingest service holds in memory, shared by its step, its doors, its admin API
and its batch jobs: the configuration in force (with each dataset's compiled schema) and
the prefix of record ids. The wiring owns the one instance; nothing here does I/O."""

from __future__ import annotations

import time
from datetime import datetime

from services.ingest.registry import Registry
from services.ingest.validation import CompiledSchema, Limits
from shared.resources import Dataset


class IngestState:
    def __init__(self, limits: Limits, phone_region: str, registry: Registry | None = None):
        self.limits = limits
        self.phone_region = phone_region
        self.registry = registry or Registry()
        self._compiled: dict[str, CompiledSchema] = {}
        self.id_prefix = "r"
        """Set at start from the ingest stream's creation time (see `record_id`)."""

    def replace(self, registry: Registry) -> None:
        """Put a new configuration in force; compiled schemas are rebuilt on next use."""
        self.registry = registry
        self._compiled.clear()

    def compiled(self, dataset: str) -> tuple[Dataset, CompiledSchema] | None:
        """A dataset and its compiled schema, or None if there is no such dataset."""
        ds = self.registry.datasets.get(dataset)
        if ds is None:
            return None
        compiled = self._compiled.get(dataset)
        if compiled is None:
            compiled = CompiledSchema(
                self.registry.schemas[ds.schema],
                self.limits,
                require_identity=ds.profile_enabled,
                phone_region=self.phone_region,
            )
            self._compiled[dataset] = compiled
        return ds, compiled

    def record_id(self, seq: int) -> str:
        """Record id of the message at `seq` in CDP_INGEST (unique even if the stream is
        ever re-created: the prefix comes from the stream's creation time)."""
        return f"{self.id_prefix}{seq}"

    def applied_before(self, record_id: str, seq: int) -> bool:
        """Whether a rejected record comes before the message at `seq` of the stream (a
        batch row, or a record of an older stream, counts as before)."""
        prefix = self.id_prefix
        if not record_id.startswith(prefix):
            return True
        try:
            return int(record_id[len(prefix) :]) < seq
        except ValueError:
            return True


def id_prefix(created: object) -> str:
    """The prefix of record ids, from the ingest stream's creation time (a datetime, or an
    ISO string on some client versions)."""
    if isinstance(created, datetime):
        stamp = int(created.timestamp())
    elif isinstance(created, str):
        try:
            stamp = int(datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp())
        except ValueError:
            stamp = int(time.time())
    else:
        stamp = 0
    return f"r{stamp:x}-"

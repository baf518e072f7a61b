"""What the destination service keeps in memory, owned by the wiring and handed explicitly
to those that read or change it (the handlers, the admin API, the delivery worker):

- the destinations, as applied (the database holds them; this is their read copy);
- the segments, as their owner published them on the config stream: their metadata
  (what an audience manager is told) and which were deleted (nothing of them is sent);
- the audience managers' sync state: which segments each one knows, by remote id.

Every change here follows a committed write (a step's `after_commit`, or after the API's
or the worker's own commit), so a restart loads the same state from the database.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.destination.activation import STREAMING_TYPES
from services.destination.model import SegmentMeta
from shared.resources import Destination


class State:
    def __init__(self) -> None:
        self.destinations: dict[str, Destination] = {}
        self.segments: dict[str, SegmentMeta] = {}
        """Live segments by name (published, not deleted)."""
        self.deleted: set[str] = set()
        self._synced: dict[tuple[str, str], str] = {}

    # -- destinations ------------------------------------------------------------------------
    def put_destination(self, dest: Destination) -> None:
        self.destinations[dest.name] = dest

    def streaming(self, name: str) -> Destination | None:
        dest = self.destinations.get(name)
        return dest if dest is not None and dest.type in STREAMING_TYPES else None

    def exporting_after_segmentation(self) -> list[Destination]:
        return [
            d
            for _, d in sorted(self.destinations.items())
            if d.export is not None and d.export.schedule == "after_segmentation"
        ]

    # -- segments -------------------------------------------------------------------------------
    def put_segment(self, meta: SegmentMeta) -> None:
        self.segments[meta.name] = meta
        self.deleted.discard(meta.name)

    def delete_segment(self, name: str) -> None:
        self.segments.pop(name, None)
        self.deleted.add(name)

    def live(self, segment: str) -> bool:
        """Whether changes of `segment` are delivered: not deleted by its owner (a segment
        not heard of yet is delivered: its owner publishes it before its members)."""
        return segment not in self.deleted

    def meta(self, segment: str) -> SegmentMeta:
        return self.segments.get(segment) or SegmentMeta(name=segment)

    # -- audience managers' sync state -------------------------------------------------------
    def synced(self, destination: str, segment: str) -> bool:
        return (destination, segment) in self._synced

    def mark_synced(self, destination: str, segment: str, remote: str) -> None:
        self._synced[(destination, segment)] = remote

    def forget_sync(self, destination: str) -> None:
        for key in [k for k in self._synced if k[0] == destination]:
            del self._synced[key]

    def load(
        self,
        destinations: Iterable[Destination],
        segments: Iterable[tuple[SegmentMeta, bool]],
        synced: Iterable[tuple[str, str, str]],
    ) -> None:
        for dest in destinations:
            self.put_destination(dest)
        for meta, deleted in segments:
            if deleted:
                self.delete_segment(meta.name)
            else:
                self.put_segment(meta)
        for destination, segment, remote in synced:
            self.mark_synced(destination, segment, remote)

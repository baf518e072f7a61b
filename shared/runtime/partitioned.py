"""Per-partition output that keeps the causal order of what a handler produced.

Items about a profile travel on the subject of its partition (`partition_of(profile_id)`),
so that each partition's messages can be consumed on their own and in order. A handler
adds its items in the order it decided them; `PartitionedOutput` groups them into
messages of one partition each (at most `max_items` per message) and orders the messages
so that, whoever reads them (one consumer of every partition, or one consumer per
partition), nothing about a profile is read before something that came earlier:

- `add(partition, item)`: an item about one profile goes into that partition's open
  message, after the partition's earlier items.
- `add_across(host, others, item)`: an item about several profiles (a merge: the folded
  profiles and the survivor; identities that move from one profile to another; a privacy
  delete, which reaches records anywhere) is placed behind every earlier item of every
  partition it involves and before every later one: the open messages of the `others`
  are closed first (so they are published before it), the item goes into the `host`
  partition's message, and that message is closed right after it.
  A message is also bounded in bytes (`max_bytes`): one past it is split in order.
- `add_everywhere(make)`: one item per partition behind all of that partition's earlier
  items (a probe that follows the data to know when it has landed).

`messages()` returns the (subject, payload) pairs in publication order: the closed
messages in the order they were closed, then the still open ones. Published in that order
(the runtime's outbox keeps it), a consumer of all partitions reads a causally ordered
stream, and each partition's own stream is in order as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from shared.messages import MAX_ITEMS_PER_MESSAGE, MAX_MESSAGE_BYTES, encode_fitting

T = TypeVar("T")


class PartitionedOutput(Generic[T]):
    def __init__(
        self,
        subject: Callable[[int], str],
        encode: Callable[[list[T]], bytes],
        partitions: int,
        max_items: int = MAX_ITEMS_PER_MESSAGE,
        max_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        if partitions < 1 or max_items < 1:
            raise ValueError("partitions and max_items must be at least 1")
        self._subject = subject
        self._encode = encode
        self.partitions = partitions
        self._max = max_items
        self._max_bytes = max_bytes
        self._open: dict[int, list[T]] = {}
        self._closed: list[tuple[int, list[T]]] = []

    def __bool__(self) -> bool:
        return bool(self._closed) or any(self._open.values())

    def _check(self, partition: int) -> None:
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} not in 0..{self.partitions - 1}")

    def _close(self, partition: int) -> None:
        items = self._open.pop(partition, None)
        if items:
            self._closed.append((partition, items))

    def add(self, partition: int, item: T) -> None:
        self._check(partition)
        items = self._open.setdefault(partition, [])
        items.append(item)
        if len(items) >= self._max:
            self._close(partition)

    def add_across(self, host: int, others: Iterable[int], item: T) -> None:
        self._check(host)
        for p in sorted(set(others)):
            self._check(p)
            if p != host:
                self._close(p)
        self._open.setdefault(host, []).append(item)
        self._close(host)

    def add_everywhere(self, make: Callable[[int], T]) -> None:
        for p in range(self.partitions):
            self.add(p, make(p))

    def messages(self) -> list[tuple[str, bytes]]:
        """(subject, payload) in publication order; a message past `max_bytes` is split
        into several, in order (raises `MessageTooLarge` if one item alone is)."""
        ordered = [*self._closed, *((p, items) for p, items in sorted(self._open.items()) if items)]
        return [
            (self._subject(p), data)
            for p, items in ordered
            for data in encode_fitting(
                items, self._encode, max_items=len(items), max_bytes=self._max_bytes
            )
        ]

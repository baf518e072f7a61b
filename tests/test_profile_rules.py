"""The profile actor's rules, pure (in memory): what they decide and the messages the
service publishes."""

from __future__ import annotations

import time

from services.profile.merge import default_policy
from services.profile.rules import Loaded, StoredEvent, apply_items
from shared.messages import ExperienceEvent, Identity, Reassigned
from shared.subjects import MAX_PAYLOAD

PARTITIONS = 8


def test_a_device_that_moves_with_many_events_fits_in_messages_nats_accepts() -> None:
    """A family tablet's cookie has browsed a lot (2,000 page views of 4.5 kB, well within
    the 10 kB event limit and the 5,000 events a profile keeps). P2 logs in on it: the cookie
    and its anonymous views move to P2. The profile service's change for P2 carries every
    view in one message of about 9 MB, above the 8 MB NATS accepts: the publish fails, is
    retried from the outbox forever, and the profile service applies nothing more, for
    anyone."""
    now = time.time()
    loaded = Loaded(known={"p-one", "p-two"})
    loaded.identities["p-one"] = {("crm_id", "P1"), ("ecid", "tab")}
    loaded.identities["p-two"] = {("crm_id", "P2")}
    for i in range(2000):
        event = ExperienceEvent(
            record_id=f"r{i:05d}",
            dataset="web",
            event_type="web.pageview",
            timestamp=now - 86400.0 + i,
            payload={"ecid": "tab", "page": {"url": f"/p/{i}", "name": "x" * 4500}},
        )
        loaded.anchored["ecid:tab"].append(StoredEvent("p-one", "ecid:tab", event))
    fx = apply_items(
        loaded,
        [Reassigned("p-one", "p-two", [Identity("ecid", "tab")], "moved", now)],
        policy=default_policy([]),
        partitions=PARTITIONS,
    )
    sizes = [len(payload) for _, payload in fx.messages]
    assert sum(sizes) > MAX_PAYLOAD, "the moved views are all published"
    assert max(sizes) <= MAX_PAYLOAD, sizes

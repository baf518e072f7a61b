"""What the identity service refuses to do on purpose."""

from __future__ import annotations

from shared.errors import CdpError


class ReplayImpossible(CdpError):
    """The identity graph is gone and the records stream no longer holds what rebuilt it."""

    code = "replay_impossible"

    def __init__(self, stream: str, first_seq: int, db_path: str) -> None:
        super().__init__(
            f"{db_path} holds no identity graph and {stream} no longer starts at its first "
            f"record (it starts at {first_seq}: retention removed the older ones), so a replay "
            "cannot rebuild the graphs the profile service holds; restore identity.db from a "
            "backup, or rebuild every service's state (see README: Recovering identity.db)"
        )
        self.stream = stream
        self.first_seq = first_seq
        self.db_path = db_path


class WriterLeaseLost(CdpError):
    """A commit or a publish of an instance that is no longer the writer (its lease ran
    out, e.g. while the process was stopped): refused, and the process stops."""

    code = "writer_lease_lost"

    def __init__(self, instance: str, token: int) -> None:
        super().__init__(f"{instance}: the writer lease {token} is no longer held")
        self.instance = instance
        self.token = token

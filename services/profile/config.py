"""The configuration the profile service follows, held in memory: datasets (event
expiration, from ingest), identity namespaces (how a lookup reads an identity, from
ingest) and merge policies (its own). The wiring loads it from the store at start; the
config handlers update it after each commit."""

from __future__ import annotations

import time
from collections.abc import Iterable

from services.profile.merge import default_policy
from shared.normalize import Unusable, normalized
from shared.resources import BUILTIN_NAMESPACES, Dataset, MergePolicy, Namespace

DAY = 86400.0


class ProfileConfig:
    """Datasets, namespaces and merge policies by name."""

    def __init__(self, phone_region: str = "US") -> None:
        self.phone_region = phone_region
        self.datasets: dict[str, Dataset] = {}
        self.namespaces: dict[str, Namespace] = {n.symbol: n for n in BUILTIN_NAMESPACES}
        self.policies: dict[str, MergePolicy] = {}

    def update(
        self,
        *,
        datasets: Iterable[Dataset] = (),
        namespaces: Iterable[Namespace] = (),
        policies: Iterable[MergePolicy] = (),
    ) -> None:
        self.datasets.update((d.name, d) for d in datasets)
        self.namespaces.update((n.symbol, n) for n in namespaces)
        self.policies.update((p.name, p) for p in policies)

    # -- merge policies --------------------------------------------------------------
    def policy_list(self) -> list[MergePolicy]:
        """Every merge policy, by name."""
        return [self.policies[k] for k in sorted(self.policies)]

    def default_policy(self) -> MergePolicy:
        return default_policy(self.policy_list())

    def other_policies(self) -> list[MergePolicy]:
        """The policies other than the default, by name (segmentation gets their views)."""
        default = self.default_policy().name
        return [p for p in self.policy_list() if p.name != default]

    # -- namespaces ------------------------------------------------------------------
    def normalized(self, symbol: str, value: str) -> str | Unusable:
        """`symbol:value` as the identity service links it, or why it cannot be used."""
        return normalized(self.namespaces.get(symbol), symbol, value, self.phone_region)

    # -- datasets --------------------------------------------------------------------
    def expired(self, dataset: str, ts: float, now: float | None = None) -> bool:
        """Whether an event of `dataset` at `ts` is older than the dataset keeps events."""
        ds = self.datasets.get(dataset)
        if ds is None or not ds.expiration_days:
            return False
        return ts < (time.time() if now is None else now) - ds.expiration_days * DAY

    def expirations(self, now: float) -> list[tuple[str, float]]:
        """(dataset, the time before which its events go), for the datasets that expire."""
        return [
            (ds.name, now - ds.expiration_days * DAY)
            for ds in self.datasets.values()
            if ds.expiration_days
        ]

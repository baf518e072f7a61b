"""The profile service's admin API (for people and the CLI): merge policies, configured
with `cdp apply` (kind merge_policy) and read with `cdp get`.

Like every configured object they travel on `CDP_CONFIG` (`cdp.config.merge_policy.<name>`):
an applied policy is stored in SQLite and published there in one step (outbox), and the
service follows that subject with a consumer of its own (`handlers.on_policies`), so a
profile.db rebuilt from the streams gets its merge policies back; other services read
them there."""

from __future__ import annotations

import time

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from services.profile.config import ProfileConfig
from services.profile.merge import PolicyError, check_policies
from services.profile.store import ProfileStore
from shared import subjects
from shared.admin import (
    AdminFailure,
    ApplyMany,
    ApplyManyResult,
    ApplyResult,
    GetRequest,
    GetResult,
    apply_result,
    decode_object,
)
from shared.resources import PLURALS, MergePolicy, to_builtins
from shared.runtime.actor import Outgoing, publish_outbox

_encoder = msgspec.json.Encoder()
KIND = "merge_policy"


class ProfileAdmin:
    """`cdp.admin.profile.apply` and `cdp.admin.profile.get`."""

    def __init__(
        self,
        store: ProfileStore,
        config: ProfileConfig,
        js: JetStreamContext,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.js = js
        self.log = log or structlog.get_logger(service="profile")

    async def publish_stored(self) -> None:
        """Publish the stored policies on the config stream: those stored before they
        travelled there reach it now (the stream drops the ones it holds already)."""
        out = [
            self._outgoing(p.decoded(), p.spec, p.updated_at) for p in await self.store.policies()
        ]
        await publish_outbox(self.js, self.store.db, out, self.log, lambda: False)

    async def apply(self, request: ApplyMany) -> ApplyManyResult:
        current_policies = self.config.policies
        scratch = dict(current_policies)
        results: list[ApplyResult] = []
        for obj in request.objects:
            policy = decode_object(obj, KIND, "profile", MergePolicy)
            current = scratch.get(policy.name)
            if policy.default:  # one default: the newly applied one
                for other in list(scratch.values()):
                    if other.default and other.name != policy.name:
                        scratch[other.name] = msgspec.structs.replace(other, default=False)
            scratch[policy.name] = policy
            results.append(apply_result(KIND, policy.name, current, policy))
        ordered = [scratch[k] for k in sorted(scratch)]
        known = set(self.config.datasets) | request.known("dataset")  # a dry run's too
        for name in {d for p in ordered for d in p.datasets} - known:
            if await self._dataset_exists(name):  # applied a moment ago, not seen here yet
                known.add(name)
        try:
            check_policies(ordered, known)
        except PolicyError as exc:
            index_name = _policy_at(exc.path, ordered)
            field = exc.path.split(".", 1)[1] if "." in exc.path else None
            raise AdminFailure(
                "invalid", exc.reason, kind=KIND, name=index_name, field=field
            ) from None
        if not request.dry_run and any(r.action != "unchanged" for r in results):
            now = time.time()
            changed = [p for p in ordered if current_policies.get(p.name) != p]
            payloads = [(p.name, _encoder.encode(p)) for p in changed]
            out = [
                self._outgoing(p, payload, now)
                for p, (_, payload) in zip(changed, payloads, strict=True)
            ]
            await self.store.save_policies(payloads, out, now)
            self.config.update(policies=ordered)
            await publish_outbox(self.js, self.store.db, out, self.log, lambda: False)
        return ApplyManyResult(results)

    @staticmethod
    def _outgoing(policy: MergePolicy, payload: bytes, at: float) -> Outgoing:
        return Outgoing(
            f"config:{KIND}:{policy.name}:{at}", subjects.config(KIND, policy.name), payload
        )

    async def _dataset_exists(self, name: str) -> bool:
        """Ask the configuration stream itself, the source every service follows."""
        try:
            await self.js.get_last_msg(
                subjects.STREAM_CONFIG.name, subjects.config("dataset", name)
            )
        except NotFoundError:
            return False
        return True

    async def get(self, request: GetRequest) -> GetResult:
        kind = PLURALS.get(request.kind, request.kind)
        if kind != KIND:
            raise AdminFailure(
                "unknown_kind", f"the profile service does not own {kind!r}", kind=kind
            )
        if request.name is not None:
            policy = self.config.policies.get(request.name)
            if policy is None:
                raise AdminFailure(
                    "not_found", f"no merge policy named {request.name!r}", kind=KIND
                )
            return GetResult(KIND, [to_builtins(policy)])
        return GetResult(KIND, [to_builtins(p) for p in self.config.policy_list()])


def _policy_at(path: str, ordered: list[MergePolicy]) -> str | None:
    """`policies[2].datasets[0]` -> the name of the third policy."""
    if path.startswith("policies[") and "]" in path:
        try:
            return ordered[int(path[len("policies[") : path.index("]")])].name
        except (ValueError, IndexError):
            return None
    return None

"""Merge policies: configured with `cdp apply` (kind merge_policy), owned by this service.

Like every configured object they travel on `CDP_CONFIG` (`cdp.config.merge_policy.<name>`):
an applied policy is stored in SQLite and published there in one step (outbox), and the
service follows that subject with a consumer of its own, so a profile.db rebuilt from the
streams gets its merge policies back."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec
from nats.aio.subscription import Subscription
from nats.js.errors import NotFoundError

from services.profile.merge import PolicyError, check_policies
from services.profile.store import UPSERT_POLICY
from shared import admin, subjects
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
from shared.db import Tx, apply
from shared.resources import PLURALS, MergePolicy, to_builtins
from shared.runtime import ConsumerSpec, Step
from shared.runtime.actor import Outgoing, publish_outbox

if TYPE_CHECKING:
    from services.profile.service import ProfileService

_policy_decoder = msgspec.json.Decoder(MergePolicy)
_encoder = msgspec.json.Encoder()
KIND = "merge_policy"
_OUTBOX_INSERT = "INSERT INTO rt_outbox (msg_id, subject, payload, created_at) VALUES (?, ?, ?, ?)"


class MergePolicies:
    def __init__(self, service: ProfileService) -> None:
        self.svc = service
        self._policies: dict[str, MergePolicy] = {}
        self._subs: list[Subscription] = []

    def items(self) -> list[MergePolicy]:
        return [self._policies[k] for k in sorted(self._policies)]

    def get(self, name: str) -> MergePolicy | None:
        return self._policies.get(name)

    def consumer(self) -> ConsumerSpec:
        return ConsumerSpec(
            "profile-policies",
            subjects.STREAM_CONFIG,
            self.handle_policies,
            filter_subjects=(subjects.config(KIND, "*"),),
            description="merge policies, as this service published them on the config stream",
        )

    async def handle_policies(self, batch: Step) -> None:
        updates: dict[str, MergePolicy] = {}
        now = time.time()
        for d in batch.deliveries:
            try:
                policy = _policy_decoder.decode(d.data)
            except msgspec.DecodeError:
                self.svc.log.warning("undecodable merge policy configuration", subject=d.subject)
                continue
            if d.subject != subjects.config(KIND, policy.name):
                self.svc.log.warning("merge policy on another name's subject", subject=d.subject)
                continue
            updates[policy.name] = policy
            batch.tx.add(UPSERT_POLICY, (policy.name, d.data, now))
        batch.after_commit(lambda: self._policies.update(updates))

    async def start(self) -> None:
        rows = await self.svc.db.execute_fetchall(
            "SELECT name, spec, updated_at FROM merge_policies"
        )
        out: list[Outgoing] = []
        for _name, spec, updated_at in rows:
            policy = _policy_decoder.decode(spec)
            self._policies[policy.name] = policy
            # Policies stored before they travelled on the config stream reach it now.
            out.append(self._outgoing(policy, bytes(spec), float(updated_at)))
        await publish_outbox(self.svc.js, self.svc.db, out, self.svc.log, lambda: False)
        nc = self.svc.nc
        self._subs = [
            await admin.serve(nc, subjects.admin("profile", "apply"), ApplyMany, self.apply),
            await admin.serve(nc, subjects.admin("profile", "get"), GetRequest, self.get_request),
        ]

    async def stop(self) -> None:
        await admin.unsubscribe_all(self._subs)

    async def apply(self, request: ApplyMany) -> ApplyManyResult:
        scratch = dict(self._policies)
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
        known = set(self.svc.datasets) | request.known("dataset")  # a dry run's too
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
            tx = Tx()
            out: list[Outgoing] = []
            for p in ordered:
                if self._policies.get(p.name) != p:
                    payload = _encoder.encode(p)
                    tx.add(UPSERT_POLICY, (p.name, payload, now))
                    out.append(self._outgoing(p, payload, now))
            tx.add_many(_OUTBOX_INSERT, ((o.msg_id, o.subject, o.payload, now) for o in out))
            await apply(self.svc.db, tx)
            self._policies = scratch
            await publish_outbox(self.svc.js, self.svc.db, out, self.svc.log, lambda: False)
        return ApplyManyResult(results)

    @staticmethod
    def _outgoing(policy: MergePolicy, payload: bytes, at: float) -> Outgoing:
        return Outgoing(
            f"config:{KIND}:{policy.name}:{at}", subjects.config(KIND, policy.name), payload
        )

    async def _dataset_exists(self, name: str) -> bool:
        """Ask the configuration stream itself, the source every service follows."""
        try:
            await self.svc.js.get_last_msg(
                subjects.STREAM_CONFIG.name, subjects.config("dataset", name)
            )
        except NotFoundError:
            return False
        return True

    async def get_request(self, request: GetRequest) -> GetResult:
        kind = PLURALS.get(request.kind, request.kind)
        if kind != KIND:
            raise AdminFailure(
                "unknown_kind", f"the profile service does not own {kind!r}", kind=kind
            )
        if request.name is not None:
            policy = self._policies.get(request.name)
            if policy is None:
                raise AdminFailure(
                    "not_found", f"no merge policy named {request.name!r}", kind=KIND
                )
            return GetResult(KIND, [to_builtins(policy)])
        return GetResult(KIND, [to_builtins(p) for p in self.items()])


def _policy_at(path: str, ordered: list[MergePolicy]) -> str | None:
    """`policies[2].datasets[0]` -> the name of the third policy."""
    if path.startswith("policies[") and "]" in path:
        try:
            return ordered[int(path[len("policies[") : path.index("]")])].name
        except (ValueError, IndexError):
            return None
    return None

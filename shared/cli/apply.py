"""`cdp apply -f FILE` and `cdp get`: configuration as code."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nats.errors
import yaml
from nats.aio.client import Client

from shared import admin, subjects
from shared.admin import (
    AdminFailure,
    ApplyBatch,
    ApplyBatchResult,
    ApplyResult,
    ConfigObject,
    object_name,
)
from shared.cli.client import ClientError
from shared.resources import APPLY_ORDER, KINDS, OWNERS, PLURALS


class ConfigFileError(ClientError):
    """A configuration file is not readable or not shaped as expected."""

    def __init__(self, file: str, message: str) -> None:
        super().__init__(f"{file}: {message}")
        self.file = file


def load_file(path: Path) -> list[ConfigObject]:
    """Objects of a configuration file, in dependency order."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError(file, f"cannot read ({exc.strerror})") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigFileError(file, f"not valid YAML: {exc}") from None
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for doc in docs:
        if not isinstance(doc, dict):
            raise ConfigFileError(file, "expected a mapping of kinds (namespaces, schemas, ...)")
        for key, items in doc.items():
            kind = PLURALS.get(str(key)) or (str(key) if str(key) in KINDS else None)
            if kind is None:
                raise ConfigFileError(
                    file, f"unknown kind {key!r} (expected one of {', '.join(PLURALS)})"
                )
            if not isinstance(items, list):
                raise ConfigFileError(file, f"{key}: expected a list of objects")
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise ConfigFileError(file, f"{key}[{i}]: expected a mapping")
                by_kind[kind].append(_plain(item))
    return [ConfigObject(kind, spec) for kind in APPLY_ORDER for spec in by_kind.get(kind, [])]


def _plain(value: Any) -> Any:
    """YAML dates and the like become strings, as they would be in JSON."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def load_files(paths: Sequence[Path]) -> tuple[list[ConfigObject], dict[tuple[str, str], str]]:
    """Objects of several configuration files as one, in dependency order, and the file
    each object comes from (by kind and name)."""
    objects: list[ConfigObject] = []
    sources: dict[tuple[str, str], str] = {}
    for path in paths:
        for obj in load_file(path):
            objects.append(obj)
            name = object_name(obj.kind, obj.spec)
            if name is not None:
                sources[obj.kind, name] = str(path)
    rank = {kind: i for i, kind in enumerate(APPLY_ORDER)}
    return sorted(objects, key=lambda o: rank[o.kind]), sources


async def apply_objects(
    nc: Client,
    objects: list[ConfigObject],
    dry_run: bool,
    file: str,
    sources: Mapping[tuple[str, str], str] | None = None,
) -> list[ApplyResult]:
    """Send each owning service its objects, in order. Errors name file, object, field
    (the object's own file when `sources` says which it is).

    A dry run stores nothing, so each owner also gets the objects sent before its own as
    `context`: a merge policy may name a dataset of the same file, a segment a merge policy,
    a destination a segment."""
    groups: dict[str, list[ConfigObject]] = defaultdict(list)
    order: list[str] = []
    for obj in objects:
        owner = OWNERS[obj.kind]
        if owner not in groups:
            order.append(owner)
        groups[owner].append(obj)
    results: list[ApplyResult] = []
    earlier: list[ConfigObject] = []
    for owner in order:
        try:
            reply = await admin.request(
                nc,
                subjects.admin(owner, "apply"),
                ApplyBatch(groups[owner], dry_run, context=list(earlier) if dry_run else []),
                ApplyBatchResult,
            )
        except AdminFailure as exc:
            where = exc.where()
            origin = (sources or {}).get((exc.kind or "", exc.name or ""), file)
            raise ClientError(f"{origin}: {where + ': ' if where else ''}{exc.message}") from None
        except nats.errors.NoRespondersError:
            raise ClientError(f"the {owner} service is not running") from None
        except nats.errors.TimeoutError:
            raise ClientError(f"the {owner} service did not answer in time") from None
        results += reply.results
        earlier += groups[owner]
    return results

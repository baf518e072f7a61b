"""`cdp apply -f FILE` and `cdp get`: configuration as code."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
import nats.errors
import yaml
from nats.aio.client import Client

from ops.cli.client import ClientError
from shared import admin, subjects
from shared.admin import (
    AdminFailure,
    ApplyMany,
    ApplyManyResult,
    ApplyResult,
    ConfigObject,
    object_name,
)
from shared.resources import APPLY_ORDER, KINDS, OWNERS, PLURALS

_encoder = msgspec.json.Encoder()


class ConfigFileError(ClientError):
    """A configuration file is not readable or not shaped as expected."""

    def __init__(self, file: str, message: str) -> None:
        super().__init__(f"{file}: {message}")
        self.file = file


MAX_FILE_BYTES: Final = 4 * 1024 * 1024
"""The largest configuration file `cdp apply` reads (4 MiB; the retail example is 10 KB).
Each service's share must also fit in one NATS message (8 MiB under `cdp up`)."""


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors and aliases: a few hundred bytes of nested aliases expand
    to gigabytes (a "billion laughs"), and configuration never needs them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            what = "aliases" if isinstance(event, yaml.AliasEvent) else "anchors"
            raise yaml.composer.ComposerError(
                None,
                None,
                f"YAML {what} (&name, *name) are not accepted: write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"not valid YAML: {exc}"


def load_file(path: Path) -> list[ConfigObject]:
    """Objects of a configuration file, in dependency order."""
    file = str(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigFileError(file, f"cannot read ({exc.strerror})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigFileError(
            file, f"larger than {MAX_FILE_BYTES} bytes: split it into several files (-f ... -f)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(file, f"not UTF-8 text (byte {exc.start})") from None
    try:
        docs = [d for d in yaml.load_all(text, Loader=_NoAliasLoader) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigFileError(file, _yaml_error(exc)) from None
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
        batch = ApplyMany(groups[owner], dry_run, context=list(earlier) if dry_run else [])
        size = len(_encoder.encode(batch))
        if size > nc.max_payload:
            raise ClientError(
                f"{file}: the {owner} objects ({', '.join(sorted({o.kind for o in groups[owner]}))}"
                f") encode to {size} bytes, more than the {nc.max_payload} bytes one NATS "
                "message may carry: split them into several files applied one after another"
            )
        try:
            reply = await admin.request(nc, subjects.admin(owner, "apply"), batch, ApplyManyResult)
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

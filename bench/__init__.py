"""The benchmark: what this machine does at the physical floor (raw NATS, JetStream,
SQLite, one bare actor hop), and later the platform measured against those floors.

`scripts/bench` runs the sections it has registered. A section is an async function that
returns a list of `Result`; it gets a `Progress` callback to say what it is doing.
"""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path

import msgspec

from ops.natsd import nats_server_binary


class Result(msgspec.Struct, frozen=True, kw_only=True):
    """One measurement: `value` in `unit`, and what was measured, in words."""

    name: str
    unit: str
    value: float
    detail: str
    count: int = 0
    """How much work was done (messages, rows, records), if the value is a rate."""
    seconds: float = 0.0
    """How long that work took (the rate is count / seconds)."""


def rate(name: str, unit: str, count: int, seconds: float, detail: str) -> Result:
    return Result(
        name=name,
        unit=unit,
        value=count / seconds if seconds > 0 else 0.0,
        detail=detail,
        count=count,
        seconds=round(seconds, 4),
    )


Progress = Callable[[str], None]
Section = Callable[[Progress], Awaitable[list[Result]]]


class Machine(msgspec.Struct, frozen=True, kw_only=True):
    cores: int
    cpu_model: str
    python: str
    nats_server: str
    nats_py: str
    sqlite: str
    platform: str
    tmp_fs: str
    """Filesystem of the temporary folder where JetStream and SQLite write (tmpfs is RAM)."""


class Report(msgspec.Struct, frozen=True, kw_only=True):
    started_at: str
    duration_s: float
    machine: Machine
    sections: dict[str, list[Result]]


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Processor", "cpu model"):
            return value.strip()
    return platform.processor() or "unknown"


def nats_server_version() -> str:
    try:
        out = subprocess.run(
            [nats_server_binary(), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({type(exc).__name__})"
    # "nats-server: v2.10.22"
    return out.strip().rpartition(" ")[2] or "unknown"


def filesystem_of(path: Path) -> str:
    """The filesystem type `path` lives on, from /proc/mounts (longest mount point wins)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    target = str(path.resolve())
    best, fs = "", "unknown"
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, fs = point, fields[2]
    return fs


def machine_info() -> Machine:
    return Machine(
        cores=os.cpu_count() or 0,
        cpu_model=cpu_model(),
        python=platform.python_version(),
        nats_server=nats_server_version(),
        nats_py=metadata.version("nats-py"),
        sqlite=sqlite3.sqlite_version,
        platform=f"{platform.system()} {platform.machine()}",
        tmp_fs=filesystem_of(Path(tempfile.gettempdir())),
    )

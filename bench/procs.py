"""Where the time and the memory go: CPU time and peak resident memory of each process of
a measure (nats-server and each service), read from /proc.

- CPU: utime + stime of `/proc/<pid>/stat` (clock ticks), read before and after a measure;
  the difference over the events of the measure is the CPU microseconds each event cost
  in that process (`cpu_results`).
- Memory: VmHWM of `/proc/<pid>/status`, the peak resident set since the process started,
  read after each measure (`memory_results`): it only grows, so the measure where it
  jumps is the one that made it.

Both become `bench.Result`s in the section's list (the JSON stays one list per section);
`cpu_tables` and `memory_table` turn them back into one table per measure and one table of
processes x measures for printing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bench import Result

CPU_PREFIX = "CPU per event"
"""Result names `CPU per event, <measure>: <process>` (unit `CPU_UNIT`)."""
CPU_UNIT = "µs/event"
MEMORY_PREFIX = "peak memory after"
"""Result names `peak memory after <measure>: <process>` (unit `MEMORY_UNIT`)."""
MEMORY_UNIT = "MiB"
TOTAL = "total"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PROC = Path("/proc")


# -- /proc parsing (pure) -------------------------------------------------------------------
def cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from the text of `/proc/<pid>/stat`.

    The second field (the command) is in parentheses and may hold spaces and parentheses
    itself, so the fields are counted from the last `)`: after it come state (field 3),
    ... utime (field 14) and stime (field 15)."""
    _, sep, rest = stat.rpartition(")")
    if not sep:
        raise ValueError("not a /proc/<pid>/stat line")
    fields = rest.split()
    return int(fields[11]) + int(fields[12])


def status_kib(status: str, key: str) -> int | None:
    """The value in kB of `key` (e.g. `VmHWM`) in the text of `/proc/<pid>/status`."""
    for line in status.splitlines():
        name, sep, value = line.partition(":")
        if sep and name == key:
            number = value.split()
            return int(number[0]) if number else None
    return None


# -- reading a process --------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) of `pid` so far, in seconds; None if it is gone."""
    try:
        return cpu_ticks((PROC / str(pid) / "stat").read_text()) / CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM of `pid`, in MiB; None if it is gone (or no /proc)."""
    try:
        kib = status_kib((PROC / str(pid) / "status").read_text(), "VmHWM")
    except OSError:
        return None
    return None if kib is None else kib / 1024


# -- CPU per event --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuSample:
    """CPU seconds of each process at one moment, with the pid they were read from."""

    seconds: dict[str, tuple[int, float]]

    @classmethod
    def take(cls, pids: Mapping[str, int | None]) -> CpuSample:
        out: dict[str, tuple[int, float]] = {}
        for name, pid in pids.items():
            if pid is None:
                continue
            spent = cpu_seconds(pid)
            if spent is not None:
                out[name] = (pid, spent)
        return cls(out)


@dataclass(frozen=True)
class ProcessCpu:
    process: str
    seconds: float
    restarted: bool = False
    """The process was replaced during the measure: its time is the new one's only."""


def cpu_spent(before: CpuSample, after: CpuSample) -> list[ProcessCpu]:
    """Each process's CPU seconds between two samples, in the order of `after`."""
    out: list[ProcessCpu] = []
    for name, (pid, spent) in after.seconds.items():
        was = before.seconds.get(name)
        if was is not None and was[0] == pid:
            out.append(ProcessCpu(name, max(0.0, spent - was[1])))
        else:
            out.append(ProcessCpu(name, spent, restarted=True))
    return out


def cpu_results(measure: str, spent: list[ProcessCpu], events: int) -> list[Result]:
    """One Result per process and one for their total: CPU µs per event, the CPU seconds
    (`seconds`) over the events (`count`), and the share of the total in the detail."""
    total = sum(p.seconds for p in spent)
    rows = [*spent, ProcessCpu(TOTAL, total)]
    return [
        Result(
            name=f"{CPU_PREFIX}, {measure}: {p.process}",
            unit=CPU_UNIT,
            value=round(p.seconds / events * 1e6, 2) if events else 0.0,
            detail=(
                f"{p.seconds:.2f} CPU s (user + system, /proc/<pid>/stat) over {events:,} "
                f"events, {p.seconds / total if total else 0.0:.1%} of the total"
                + (" (the process was restarted during the measure)" if p.restarted else "")
            ),
            count=events,
            seconds=round(p.seconds, 4),
        )
        for p in rows
    ]


# -- peak memory --------------------------------------------------------------------------------
def memory_results(measure: str, pids: Mapping[str, int | None]) -> list[Result]:
    """Each process's peak resident memory so far (VmHWM), after `measure`."""
    out: list[Result] = []
    for name, pid in pids.items():
        mib = None if pid is None else peak_rss_mib(pid)
        if mib is None:
            continue
        out.append(
            Result(
                name=f"{MEMORY_PREFIX} {measure}: {name}",
                unit=MEMORY_UNIT,
                value=round(mib, 1),
                detail="peak resident memory since the process started (VmHWM)",
            )
        )
    return out


# -- back into tables -------------------------------------------------------------------------
def is_process_row(r: Result) -> bool:
    """Whether `r` is a per-process row (CPU or memory) rather than a measure."""
    return (r.unit == CPU_UNIT and r.name.startswith(CPU_PREFIX)) or (
        r.unit == MEMORY_UNIT and r.name.startswith(MEMORY_PREFIX)
    )


def _split(name: str, prefix: str) -> tuple[str, str]:
    """`<prefix><sep><measure>: <process>` -> (measure, process)."""
    measure, _, process = name[len(prefix) :].rpartition(": ")
    return measure.lstrip(", ").strip(), process


@dataclass(frozen=True)
class CpuRow:
    process: str
    cpu_s: float
    us_per_event: float
    share: float


def cpu_tables(results: list[Result]) -> dict[str, list[CpuRow]]:
    """The CPU rows of `results`, by measure, in their order (the total last)."""
    out: dict[str, list[CpuRow]] = {}
    totals: dict[str, float] = {}
    for r in results:
        if r.unit == CPU_UNIT and r.name.startswith(CPU_PREFIX):
            measure, process = _split(r.name, CPU_PREFIX)
            out.setdefault(measure, []).append(CpuRow(process, r.seconds, r.value, 0.0))
            if process == TOTAL:
                totals[measure] = r.seconds
    return {
        measure: [
            CpuRow(
                row.process,
                row.cpu_s,
                row.us_per_event,
                row.cpu_s / totals[measure] if totals.get(measure) else 0.0,
            )
            for row in rows
        ]
        for measure, rows in out.items()
    }


def memory_table(results: list[Result]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The memory rows of `results`: the measures in order, and process -> measure -> MiB."""
    measures: list[str] = []
    by_process: dict[str, dict[str, float]] = {}
    for r in results:
        if r.unit == MEMORY_UNIT and r.name.startswith(MEMORY_PREFIX):
            measure, process = _split(r.name, MEMORY_PREFIX)
            if measure not in measures:
                measures.append(measure)
            by_process.setdefault(process, {})[measure] = r.value
    return measures, by_process

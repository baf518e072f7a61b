"""The benchmark's /proc readings: CPU time and peak memory of a process, and the tables
they are printed as."""

from __future__ import annotations

import os

import pytest

from bench import procs

# A /proc/<pid>/stat line whose command holds a space and parentheses: utime 1234, stime 56.
STAT = (
    "4242 (python (worker) x) S 1 4242 4242 0 -1 4194560 9000 0 12 0 1234 56 7 8 20 0 3 0 "
    "100 200000000 5000 18446744073709551615 1 1 0 0 0 0 0 16781312 16386 0 0 0 17 1 0 0 0 0 0"
)

STATUS = """Name:\tpython
VmPeak:\t  300000 kB
VmHWM:\t   204800 kB
VmRSS:\t   102400 kB
"""


def test_cpu_ticks_are_user_plus_system_counted_after_the_command() -> None:
    assert procs.cpu_ticks(STAT) == 1234 + 56


def test_a_stat_line_without_a_command_is_refused() -> None:
    with pytest.raises(ValueError):
        procs.cpu_ticks("4242 S 1")


def test_status_fields_are_read_in_kib_by_name() -> None:
    assert procs.status_kib(STATUS, "VmHWM") == 204_800
    assert procs.status_kib(STATUS, "VmRSS") == 102_400
    assert procs.status_kib(STATUS, "VmSwap") is None


def test_this_process_can_be_read() -> None:
    spent = procs.cpu_seconds(os.getpid())
    peak = procs.peak_rss_mib(os.getpid())
    assert spent is not None and spent > 0
    assert peak is not None and peak > 1


def test_cpu_spent_is_the_difference_unless_the_process_was_replaced() -> None:
    before = procs.CpuSample({"ingest": (10, 1.0), "profile": (11, 2.0)})
    after = procs.CpuSample({"ingest": (10, 1.5), "profile": (99, 0.25)})
    assert procs.cpu_spent(before, after) == [
        procs.ProcessCpu("ingest", 0.5),
        procs.ProcessCpu("profile", 0.25, restarted=True),
    ]


def test_cpu_results_give_microseconds_per_event_and_come_back_as_a_table() -> None:
    spent = [procs.ProcessCpu("ingest", 0.3), procs.ProcessCpu("nats-server", 0.1)]
    results = procs.cpu_results("end to end", spent, 1_000)
    assert [(r.name, r.value) for r in results] == [
        ("CPU per event, end to end: ingest", 300.0),
        ("CPU per event, end to end: nats-server", 100.0),
        ("CPU per event, end to end: total", 400.0),
    ]
    assert all(procs.is_process_row(r) for r in results)
    rows = procs.cpu_tables(results)["end to end"]
    assert [(r.process, r.cpu_s, r.us_per_event) for r in rows] == [
        ("ingest", 0.3, 300.0),
        ("nats-server", 0.1, 100.0),
        ("total", 0.4, 400.0),
    ]
    assert [round(r.share, 2) for r in rows] == [0.75, 0.25, 1.0]


def test_memory_rows_pivot_into_processes_by_measure() -> None:
    me = os.getpid()
    results = [
        *procs.memory_results("batch ingestion", {"profile": me, "gone": None}),
        *procs.memory_results("throughput", {"profile": me}),
    ]
    assert [r.name for r in results] == [
        "peak memory after batch ingestion: profile",
        "peak memory after throughput: profile",
    ]
    measures, by_process = procs.memory_table(results)
    assert measures == ["batch ingestion", "throughput"]
    assert set(by_process) == {"profile"}
    assert by_process["profile"]["throughput"] >= by_process["profile"]["batch ingestion"]

"""Run services as separate OS processes; restart a crashed one with backoff.

Children run in their own session, so a terminal's Ctrl-C reaches only the supervisor,
which then stops them in order with SIGTERM (SIGKILL after a grace period). On Linux a
child also gets SIGTERM if the supervisor itself dies, so nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import structlog

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    env: Mapping[str, str] = field(default_factory=dict)
    log_file: Path | None = None


@dataclass
class _Child:
    spec: ProcessSpec
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0
    last_exit: int | None = None
    task: asyncio.Task[None] | None = None
    running: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    def __init__(
        self,
        specs: list[ProcessSpec],
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        stable_after: float = 30.0,
        grace: float = 15.0,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self._children = {s.name: _Child(s) for s in specs}
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._stable_after = stable_after
        self._grace = grace
        self._stopping = False
        self._on_event = on_event or (lambda _name, _what: None)
        self._log = structlog.get_logger(component="supervisor")

    def pid(self, name: str) -> int | None:
        proc = self._children[name].proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def starts(self, name: str) -> int:
        return self._children[name].starts

    def last_exit(self, name: str) -> int | None:
        """The exit status of the last process of `name` that ended (None: none has)."""
        return self._children[name].last_exit

    async def wait_running(self, name: str) -> int:
        """Wait until `name` has a live process; returns its pid."""
        child = self._children[name]
        while True:
            await child.running.wait()
            pid = self.pid(name)
            if pid is not None:
                return pid
            child.running.clear()

    async def start(self) -> None:
        for child in self._children.values():
            await self._spawn(child)
            child.task = asyncio.create_task(self._watch(child), name=f"watch:{child.spec.name}")

    async def _spawn(self, child: _Child) -> None:
        spec = child.spec
        env = {**os.environ, **spec.env}
        out: int | IO[bytes] = asyncio.subprocess.DEVNULL
        log = None
        if spec.log_file is not None:
            spec.log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(spec.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            log = open(fd, "ab")  # noqa: SIM115, ASYNC230 - start-up only; handed to the child
            out = log
        try:
            child.proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            if log is not None:
                log.close()
        child.starts += 1
        child.running.set()
        self._log.info("started", process=spec.name, pid=child.proc.pid, start=child.starts)
        self._on_event(spec.name, "started" if child.starts == 1 else "restarted")

    async def _watch(self, child: _Child) -> None:
        backoff = self._backoff_initial
        while True:
            assert child.proc is not None
            began = time.monotonic()
            code = await child.proc.wait()
            child.last_exit = code
            child.running.clear()
            if self._stopping:
                return
            if time.monotonic() - began > self._stable_after:
                backoff = self._backoff_initial
            self._log.warning(
                "exited, restarting", process=child.spec.name, status=code, retry_in=backoff
            )
            self._on_event(child.spec.name, f"exited with status {code}")
            await asyncio.sleep(backoff)  # stop() cancels this task while it sleeps
            backoff = min(backoff * 2, self._backoff_max)
            await self._spawn(child)

    async def stop(self) -> dict[str, int | None]:
        """SIGTERM every child, wait (SIGKILL after the grace period). Idempotent."""
        self._stopping = True
        for child in self._children.values():
            if child.task is not None:
                child.task.cancel()
        for child in self._children.values():
            if child.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await child.task
                child.task = None
        for child in self._children.values():
            proc = child.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, child in self._children.items():
            proc = child.proc
            if proc is None:
                codes[name] = child.last_exit
                continue
            try:
                codes[name] = await asyncio.wait_for(proc.wait(), self._grace)
            except TimeoutError:
                self._log.error("did not stop in time, killing", process=name)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                codes[name] = await proc.wait()
        return codes

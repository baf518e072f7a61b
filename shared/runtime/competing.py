"""Competing consumers: several processes of one service share one durable pull consumer,
each applying what it fetches (ingest, when it runs as several instances).

The single-process contract of `ConsumerRunner` (an offset committed with the writes,
AckAll, the consumer re-created from the offset after a gap) cannot hold here: the
processes see interleaved parts of the stream, and re-creating the consumer would take
the others' messages away. Instead:

- each message is acknowledged on its own (AckExplicit), after the step that applied it
  committed and its outbox was published; what is not acknowledged (a process killed
  mid-step) is delivered again after `ack_wait`, to whichever process asks;
- the durable consumer is created when missing and never deleted or re-created; a failed
  fetch is asked again of the same consumer;
- what a step emits must have a message id that depends only on the input messages it
  carries (`Step.emit(..., key=...)`, or a step of one message), so that a message
  applied by two processes (one killed after publishing, before acknowledging) publishes
  the same ids twice and JetStream keeps one copy;
- the messages of a fetch are applied in stream order; a message on a barrier subject
  (`ConsumerSpec.barriers`: probes, privacy deletes) is a step alone, applied only once
  every earlier message of the stream was acknowledged by whoever took it (the
  consumer's ack floor reached the sequence before it). The process first applies and
  acknowledges its own earlier messages, so it never waits on itself, and the lowest
  barrier held anywhere can always go on, so two processes holding barriers never wait
  on each other. The wait is bounded (`barrier_wait`): past it, the barrier and what
  follows it in the fetch are given back (nak, redelivered shortly), and the process
  fetches again, so that it can take over the earlier messages of a process that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError
from prometheus_client import Counter

from shared.runtime.actor import ConsumerRunner, Delivery
from shared.runtime.puller import Puller

GIVE_BACK_DELAY_S = 0.2
"""How long a barrier given back waits before it is delivered again."""
FLOOR_POLL_S = (0.02, 0.25)
"""The first and the longest pause between two looks at the consumer's ack floor."""


def barrier_wait(ack_wait: float) -> float:
    """How long a barrier waits for the messages before it: well within `ack_wait` (the
    barrier and what follows it are held meanwhile), at most 5 s."""
    return max(0.2, min(5.0, ack_wait / 3))


class CompetingRunner(ConsumerRunner):
    """Feeds this process's share of a durable consumer that several processes share."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._given_back: set[int] = set()
        self._taken_over = Counter(
            "cdp_messages_taken_over_total",
            "Messages applied here after another process took them and did not acknowledge "
            "them (it died, was too slow, or gave them back behind a barrier).",
            ["service", "consumer"],
            registry=self._metrics.registry,
        )

    def _committed(self, seq: int) -> None:
        self._offset = max(self._offset, seq)

    async def _resync(self) -> None:
        """Open the pull inbox; create the shared consumer first if nobody has yet."""
        if self._puller is not None:
            await self._puller.close()
        spec = self.spec
        stream = spec.stream.name
        try:
            await self._js.consumer_info(stream, spec.name)
        except NotFoundError:
            config = ConsumerConfig(
                durable_name=spec.name,
                description=spec.description or None,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self._ack_wait,
                max_ack_pending=max(10_000, self._max_batch * 16),
                max_waiting=512,
                deliver_policy=(
                    DeliverPolicy.BY_START_SEQUENCE if self._offset else DeliverPolicy.ALL
                ),
                opt_start_seq=self._offset + 1 if self._offset else None,
            )
            subjects = list(spec.filter_subjects)
            if len(subjects) == 1:
                config.filter_subject = subjects[0]
            elif subjects:
                config.filter_subjects = subjects
            try:
                await self._js.add_consumer(stream, config)
            except BadRequestError:
                # Another process created it meanwhile (perhaps from another start): use it.
                await self._js.consumer_info(stream, spec.name)
        self._puller = Puller(self._nc, stream, spec.name)
        await self._puller.start()
        self._resync_needed = False
        self._log.info("shared consumer ready", stream=stream)

    async def _process(
        self, msgs: list[Msg], limit: int | None = None, one_step: bool = False
    ) -> None:
        # A competing runner never follows another instance: `limit` and `one_step` (a
        # standby's) do not apply.
        del limit, one_step
        started = time.perf_counter()
        msgs = sorted(msgs, key=lambda m: m.metadata.sequence.stream)
        barriers = self.spec.barriers
        held: list[Msg] = []
        for i, msg in enumerate(msgs):
            if msg.subject not in barriers:
                held.append(msg)
                continue
            await self._apply(held)
            held = []
            if not await self._wait_floor(msg.metadata.sequence.stream - 1):
                await self._give_back(msgs[i:])
                break
            await self._apply([msg])
        else:
            await self._apply(held)
        self._metrics.lag.labels(*self._labels).set(msgs[-1].metadata.num_pending)
        self._metrics.batch_size.labels(*self._labels).observe(len(msgs))
        self._metrics.latency.labels(*self._labels).observe(time.perf_counter() - started)

    async def _apply(self, msgs: list[Msg]) -> None:
        """Apply `msgs` (in stream order), publish what they emit, then ack each."""
        if not msgs:
            return
        taken = 0
        for m in msgs:
            seq = m.metadata.sequence.stream
            if seq in self._given_back:
                self._given_back.discard(seq)
            elif m.metadata.num_delivered > 1:
                taken += 1
        if taken:
            self._taken_over.labels(*self._labels).inc(taken)
        await self._commit([_delivery(m) for m in msgs])
        for msg in msgs:
            try:
                await msg.ack()
            except nats.errors.Error as exc:
                # Delivered again after ack_wait, perhaps elsewhere: the same ids go out.
                self._log.warning("ack failed", error=repr(exc))

    async def _wait_floor(self, seq: int) -> bool:
        """Whether every message of the stream up to `seq` was acknowledged within the
        barrier's wait (looked up on the consumer's ack floor, less and less often)."""
        if seq <= 0:
            return True
        spec = self.spec
        deadline = time.monotonic() + barrier_wait(self._ack_wait)
        pause, longest = FLOOR_POLL_S
        while True:
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                info = await self._js.consumer_info(spec.stream.name, spec.name, timeout=2)
                floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
                if (floor or 0) >= seq:
                    return True
            if time.monotonic() + pause > deadline or self._stopping:
                self._log.info("barrier waits for earlier messages", before_seq=seq + 1)
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest)

    async def _give_back(self, msgs: list[Msg]) -> None:
        if len(self._given_back) > 100_000:  # taken by others meanwhile: forget them
            self._given_back.clear()
        for msg in msgs:
            self._given_back.add(msg.metadata.sequence.stream)
            with contextlib.suppress(nats.errors.Error):
                await msg.nak(delay=GIVE_BACK_DELAY_S)


def _delivery(msg: Msg) -> Delivery:
    headers = msg.headers
    return Delivery(
        msg.subject,
        msg.data,
        msg.metadata.sequence.stream,
        headers.get("Nats-Msg-Id") if headers else None,
    )

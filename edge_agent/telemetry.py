"""Fleet telemetry from the edge: each answer's record, pushed to the cloud in the background.

``record`` is all an answer does: it appends to a bounded list in memory and returns (answers never wait for
disk or network). One task moves records to the outbox on disk (``outbox.py``) and sends the oldest in
batches on the edge's authenticated cloud client; the cloud acknowledges a batch once it is committed and only
then are its records deleted (at least once; the cloud stores each answer id once). Failures back off with the
project's own ``RetryPolicy`` (jittered exponential, capped): many edges coming back after a cloud outage do
not return in lockstep (R6). A refused record (400: a body this cloud does not accept) is isolated by sending
one record at a time and then dropped and counted, so one bad record cannot block the rest forever.
On shutdown the remaining records are sent within ``flush_timeout_s``; what is left stays on disk for the
next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from datetime import UTC, datetime

import httpx

from edge_agent.answer import Summary
from edge_agent.metrics import EdgeMetrics
from edge_agent.outbox import Outbox
from edge_agent.resilience import RetryPolicy
from shared.telemetry import MAX_BATCH, TELEMETRY_PATH, AnswerRecord

log = logging.getLogger("gkt.telemetry")
_REFUSED = (400, 413, 422)  # the records themselves are the problem; anything else is the cloud's or the link's


def answer_record(summary: Summary) -> AnswerRecord:
    """The fleet's view of one answer, from the books that ended it."""
    info, t = summary.info, summary.info.timings
    return AnswerRecord(
        id=uuid.uuid4().hex, mode=info.mode, policy=info.policy["name"] if info.policy else None,
        student_tokens=info.usage.student_tokens, student_prompt_s=t.student_prompt_s or 0.0,
        student_generation_s=t.student_generation_s or 0.0, student_cost=info.cost.student,
        teacher_cost=info.cost.teacher, teacher_only_cost=info.cost.teacher_only, currency=info.cost.currency,
        fallback=info.fallback, partial=info.partial, finish=summary.finish_reason, at=datetime.now(UTC),
    )


class Telemetry:
    """The outbox and the task that empties it into the cloud."""

    def __init__(self, outbox: Outbox, client: httpx.AsyncClient, metrics: EdgeMetrics, *, batch: int = 200,
                 interval_s: float = 5.0, policy: RetryPolicy | None = None) -> None:
        self.outbox = outbox
        self.client = client
        self.metrics = metrics
        self.batch = min(batch, MAX_BATCH)
        self.interval_s = interval_s
        self.policy = policy or RetryPolicy(base_s=1.0, cap_s=60.0)  # only its delays: telemetry never gives up
        self._pending: deque[AnswerRecord] = deque()
        self._wake = asyncio.Event()
        self._failures = 0
        self._next_try = 0.0  # time.monotonic() before which nothing is sent (backing off)
        self._isolate = False  # a batch was refused: send one record at a time until the bad one is found
        metrics.telemetry_buffered.set_function(lambda: self.outbox.size + len(self._pending))

    def record(self, summary: Summary) -> None:
        """Queue the answer's record; never blocks and never raises into the answer."""
        try:
            self._pending.append(answer_record(summary))
        except Exception:  # a record the wire model refuses must not fail the answer that was already sent
            log.exception("telemetry: answer record not made")
            return
        while len(self._pending) > self.outbox.max_records:  # the disk is stuck too: the bound still holds
            self._pending.popleft()
            self.metrics.telemetry_dropped.labels("full").inc()
        self._wake.set()

    async def run(self) -> None:
        """Forever: persist new records at once; send every ``interval_s`` (sooner once a batch is full),
        later while backing off."""
        last_send = time.monotonic()
        while True:
            self._wake.clear()
            await self._persist()
            now = time.monotonic()
            due = now - last_send >= self.interval_s or self.outbox.size >= self.batch
            if self.outbox.size and due and now >= self._next_try:
                await self._send_due(deadline=None)
                last_send = time.monotonic()
            wait = max(0.05, max(last_send + self.interval_s, self._next_try) - time.monotonic())
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when the wake-up and a
            # cancel arrive together, swallowing the cancel, and the shutdown that awaits this task hangs.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def flush(self, timeout_s: float) -> None:
        """Shutdown: persist everything, then send until the outbox is empty or ``timeout_s`` has passed."""
        deadline = time.monotonic() + timeout_s
        await self._persist()
        self._next_try = 0.0
        while self.outbox.size and time.monotonic() < deadline:
            if not await self._send_due(deadline):
                await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        if self.outbox.size:
            log.warning("telemetry: %d record(s) not delivered yet; kept in %s for the next start",
                        self.outbox.size, self.outbox.path)

    async def _persist(self) -> None:
        if not self._pending:
            return
        records = list(self._pending)
        try:
            dropped = await asyncio.to_thread(self.outbox.add, [(r.id, r.model_dump_json()) for r in records])
        except Exception as exc:  # disk full or unwritable: keep them in memory (bounded) and try again later
            log.error("telemetry: outbox write failed (%s); %d record(s) held in memory", exc, len(self._pending))
            return
        for _ in records:
            self._pending.popleft()
        if dropped:
            self.metrics.telemetry_dropped.labels("full").inc(dropped)
            log.warning("telemetry: outbox full (%d records); dropped the %d oldest", self.outbox.max_records,
                        dropped)

    async def _send_due(self, deadline: float | None) -> bool:
        """Send batches until the outbox is empty or a send fails; True when everything queued went."""
        while self.outbox.size:
            rows = await asyncio.to_thread(self.outbox.oldest, 1 if self._isolate else self.batch)
            if not rows:
                return True
            status = await self._post(rows, deadline)
            if status == 200:
                await asyncio.to_thread(self.outbox.remove, [i for i, _ in rows])
                self.metrics.telemetry_sent.inc(len(rows))
                self._failures = 0
            elif status in _REFUSED and len(rows) > 1:
                self._isolate = True  # find the record the cloud refuses, one at a time
            elif status in _REFUSED:
                log.error("telemetry: the cloud refused record %s (HTTP %d); dropped", rows[0][0], status)
                await asyncio.to_thread(self.outbox.remove, [rows[0][0]])
                self.metrics.telemetry_dropped.labels("refused").inc()
                self._isolate = False
            else:
                self._backoff(status)
                return False
        return True

    async def _post(self, rows: list[tuple[str, str]], deadline: float | None) -> int:
        """One batch; its HTTP status, or 0 when the cloud could not be reached."""
        content = '{"records":[' + ",".join(body for _, body in rows) + "]}"
        timeout = None if deadline is None else max(0.1, deadline - time.monotonic())
        try:
            kwargs = {} if timeout is None else {"timeout": timeout}
            # Connection: close: a batch goes every few seconds at most, so a kept-alive socket would sit idle
            # in the answers' pool between batches (the load and slow-reader scenarios, C4 and N2, saw the
            # edge's descriptors up by one); a handshake per batch is cheap at that rate.
            resp = await self.client.post(TELEMETRY_PATH, content=content, headers={
                "Content-Type": "application/json", "Connection": "close"}, **kwargs)
        except httpx.HTTPError as exc:
            log.debug("telemetry: cloud unreachable (%s)", type(exc).__name__)
            return 0
        if resp.status_code != 200:
            log.info("telemetry: the cloud answered %d: %s", resp.status_code, resp.text[:200])
        return resp.status_code

    def _backoff(self, status: int) -> None:
        wait = self.policy.delay(self._failures)
        self._failures += 1
        self._next_try = time.monotonic() + wait
        if self._failures == 1:
            log.warning("telemetry: delivery failed (%s); %d record(s) kept on disk, retrying with backoff",
                        status or "unreachable", self.outbox.size)

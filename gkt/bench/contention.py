"""The bench's ``contention`` section: the handoff gap on cold prompts, quiet and with the edge's core taken.

An edge device also runs its owner's programs. With one CPU-bound process pinned on the edge's core, the
student's share of the core halves at best; the request's own prefill (its prompt, then its guidance) must
still keep up, because whatever it has not evaluated at the handoff the generation evaluates while the user
waits (issue #22: at background priority it got 6-13 % of the core and the gap became the whole prefill).

Prompts are cold: each carries a line of its own before the few-shot block (as exemplars that change per
question, a new conversation or a retrieved document do), so neither the student's nor the teacher's cache
holds any of it. The line compares the median gap under contention with the quiet one, in the same run.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from gkt.bench.client import edge_stream
from gkt.bench.report import Line, median, ratio
from shared.tasks import GSM8K

if TYPE_CHECKING:
    from gkt.bench.suite import Bench

# The competitor: one Python busy loop, as CPU-bound as a training step and with nothing to install.
BUSY_LOOP = "while True: pass"


@contextmanager
def busy_core(core: int | None) -> Iterator[subprocess.Popen[bytes]]:
    """A CPU-bound process at normal priority, pinned on ``core`` (anywhere when None), for the block."""
    argv = [sys.executable, "-c", BUSY_LOOP]
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def cold_body(bench: Bench, i: int, tag: str, k: int | None = None) -> dict[str, Any]:
    """A whole-answer request whose prompt neither side has cached: a unique first line, then the task; k
    guidance tokens (default: the bench's ``work_k``)."""
    prompt = f"Request {tag}-{i}: answer the last question.\n\n{GSM8K.build_prompt(bench.question(i))}"
    return {"messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": bench.cfg.answer_tokens, "guidance_tokens": k or bench.cfg.work_k}


async def gaps(bench: Bench, tag: str) -> tuple[list[float], list[int]]:
    """Handoff gaps (s) and tokens left uncached at the handoff, one per cold question, on the fast edge."""
    gap, uncached = [], []
    for i in range(max(2, bench.cfg.questions)):
        s = await edge_stream(bench.http, bench.edge.url, cold_body(bench, 60 + i, tag))
        gap.append(s.final["timings"]["handoff_gap_s"])
        u = s.final["usage"]
        uncached.append(u["student_prompt_tokens"] + u["guidance_student_tokens"] - u["student_cached_tokens"])
    return gap, uncached


async def handoff_under_contention(bench: Bench) -> None:
    """The contention line: median handoff gap with a busy loop on the edge's core / quiet. Target <= 2."""
    quiet, quiet_left = await gaps(bench, "quiet")
    with busy_core(bench.edge_core):
        busy, busy_left = await gaps(bench, "busy")
    q, b = median(quiet), median(busy)
    bench.add(Line("handoff gap on cold prompts, edge core contended / quiet", ratio(b, q), 2.0, "<=",
                   measured={"quiet_s": q, "contended_s": b, "uncached_tokens_at_handoff_quiet": median(quiet_left),
                             "uncached_tokens_at_handoff_contended": median(busy_left),
                             "competitor": f"{BUSY_LOOP!r} on core {bench.edge_core}"},
                   note="one CPU-bound process pinned on the edge's core; prompts unseen by either cache"))

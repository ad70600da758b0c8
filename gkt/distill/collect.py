"""``gkt distill collect``: the teacher answers every ``train`` question under each priming strategy.

Requests go to a live cloud's ``/v1/guidance`` (non-streaming) with an edge's key, so they are rate-limited,
batched by the scheduler with whatever else the cloud serves, and billed to that key by the ledger; ``workers``
requests are in flight at once so the scheduler has sequences to batch. Every answer, kept or not, becomes one
line of the transfer set (transfer.py) keyed by (task, question, strategy): a rerun reads the file and asks only
what is missing, so a killed collection continues where it stopped. An answer is a lesson only when its answer
line states the gold answer (``correct``; the extractor's fallback guess does not count); the trainer reads
only those.
"""

from __future__ import annotations

import asyncio
import random
import re
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from gkt.distill import transfer
from gkt.distill.priming import Strategy, stop_sequences, student_prompt, teacher_prompt
from gkt.eval.progress import Progress
from shared.splits import seeded_train
from shared.tasks import Example, PromptStyle, Task

RETRY_STATUSES = {429, 502, 503, 504}  # the cloud's "busy" and "try again" answers (shared/errors.py)


class CollectError(RuntimeError):
    """The collection cannot go on (the cloud refuses the key, the request is invalid)."""


@dataclass(frozen=True)
class Job:
    """One question under one strategy."""

    example: Example
    strategy: Strategy


class StudentVocab:
    """The student's tokenizer (its GGUF, vocabulary only): does it read the teacher's answer as the teacher's ids?"""

    def __init__(self, gguf: Path) -> None:
        import llama_cpp

        self._llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        self.n_vocab = self._llm.n_vocab()

    def ids(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def close(self) -> None:
        self._llm.close()


def teacher_logprobs(answer: str, tokens: list[dict[str, Any]] | None, vocab: StudentVocab | None
                     ) -> tuple[str, dict[str, Any] | None]:
    """("match", logprobs) when the student's tokenizer turns ``answer`` into the teacher's own ids (those the
    teacher sent; tokens past the text, removed by a stop sequence, are dropped); otherwise ("mismatch" or
    "none", None)."""
    if vocab is None or not tokens or not answer:
        return "none", None
    mine = vocab.ids(answer)
    theirs = [t["id"] for t in tokens]
    if not mine or theirs[: len(mine)] != mine:
        return "mismatch", None
    kept = tokens[: len(mine)]
    if any(i >= vocab.n_vocab for t in kept for i, _ in t["top"]):
        return "mismatch", None
    return "match", {"ids": mine, "logprob": [t["logprob"] for t in kept], "top": [t["top"] for t in kept]}


class Collector:
    """Asks the cloud for each job's answer and appends one transfer-set line per answer."""

    def __init__(self, task: Task, cloud_url: str, api_key: str, *, max_tokens: int, top_logprobs: int | None,
                 style: PromptStyle, teacher_style: PromptStyle, vocab: StudentVocab | None, timeout: float,
                 retries: int = 5) -> None:
        self.task, self.max_tokens, self.top_logprobs = task, max_tokens, top_logprobs
        self.style, self.teacher_style, self.vocab, self.retries = style, teacher_style, vocab, retries
        self._client = httpx.AsyncClient(base_url=cloud_url.rstrip("/"), timeout=timeout,
                                         headers={"Authorization": f"Bearer {api_key}"})
        # One Idempotency-Key per answer and run: a retry of an answer the cloud already generated (a timeout,
        # a reset after the work) is billed once. Per run, not per question: asking again later is new work.
        self._run = uuid.uuid4().hex[:12]
        self.retried = 0  # requests sent again (the summary says so: a timed-out try may still be billed)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def ask(self, job: Job) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": teacher_prompt(self.task, job.example, job.strategy, self.teacher_style),
            "max_tokens": self.max_tokens, "temperature": 0.0,
            "stop": stop_sequences(self.task, job.strategy), "stream": False,
        }
        if self.top_logprobs is not None:
            body["top_logprobs"] = self.top_logprobs
        key = re.sub(r"[^A-Za-z0-9._:-]", "_", f"distill:{self._run}:{self.task.name}:{job.example.id}:{job.strategy}")
        for attempt in range(self.retries + 1):
            self.retried += attempt > 0
            try:
                resp = await self._client.post("/v1/guidance", json=body, headers={"Idempotency-Key": key[:128]})
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                await asyncio.sleep(min(30.0, 2**attempt) * random.uniform(0.5, 1.0))
                continue
            if resp.status_code in RETRY_STATUSES and attempt < self.retries:
                wait = float(resp.headers.get("retry-after") or min(30.0, 2**attempt))
                await asyncio.sleep(wait * random.uniform(0.5, 1.0))
                continue
            if resp.status_code != 200:
                message = (resp.json().get("error") or {}).get("message") if resp.headers.get(
                    "content-type", "").startswith("application/json") else resp.text[:200]
                raise CollectError(f"the cloud answered {resp.status_code}: {message}")
            return self.record(job, resp.json())
        raise AssertionError("unreachable")

    def record(self, job: Job, result: dict[str, Any]) -> dict[str, Any]:
        text = lesson_text(self.task, result["text"])
        stated = self.task.stated_answer(text)
        state, logprobs = teacher_logprobs(text, result.get("logprobs"), self.vocab)
        return {
            "v": transfer.VERSION, "task": self.task.name, "id": job.example.id, "strategy": job.strategy,
            "prompt_style": self.style, "prompt": student_prompt(self.task, job.example, self.style),
            "answer": text, "gold": job.example.gold, "extracted": self.task.extract(result["text"]),
            # A lesson must state the gold answer in the answer line: a guess of the extractor's fallback (the
            # last number of an answer cut at the budget) would teach answers without their answer line.
            "correct": stated == job.example.gold, "teacher": result["model"],
            "finish_reason": result["finish_reason"], "usage": result["usage"], "cost": result.get("cost"),
            "tokenizer": state, "logprobs": logprobs,
        }


def lesson_text(task: Task, text: str) -> str:
    """The answer up to the end of its first answer line ("... The answer is 72."): what the teacher wrote after
    it (another question, a recap) is not part of the lesson. Unchanged when there is no answer line."""
    text = re.split(r"\n\s*Q:", text, maxsplit=1)[0]  # an invented next question is never part of it
    m = task.answer_is.search(text)
    if m is None:
        return text
    end = m.end()
    if text[end : end + 1] == ")":
        end += 1
    if text[end : end + 1] == ".":
        end += 1
    return text[:end]


def plan(task: Task, data: Path, strategies: list[Strategy], n: int | None, seed: int) -> list[Job]:
    """The train questions (a seeded sample of n, or all), each under every strategy, question by question."""
    return [Job(e, s) for e in seeded_train(task, task.load(data), seed)[:n] for s in strategies]


async def run(collector: Collector, jobs: list[Job], out: Path, workers: int,
              log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Counter[str]:
    """Answer the jobs not yet in ``out``; returns counts of this run's outcomes."""
    if transfer.repair_tail(out):
        log(f"gkt distill collect: cut a torn last line in {out} (that answer is asked again)")
    done = {lesson.key for lesson in transfer.read(out)} if out.exists() else set()
    todo = [j for j in jobs if (collector.task.name, j.example.id, j.strategy) not in done]
    progress = Progress(len(jobs), len(jobs) - len(todo))
    counts: Counter[str] = Counter()
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in todo:
        queue.put_nowait(job)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as fh:

        async def worker() -> None:
            while not queue.empty():
                job = queue.get_nowait()
                rec = await collector.ask(job)
                transfer.append(fh, rec)  # one line per answer, on disk before it counts
                counts[f"{job.strategy}:{'kept' if rec['correct'] else 'dropped'}"] += 1
                counts[f"tokenizer:{rec['tokenizer']}"] += 1
                progress.advance(f"{job.strategy}: {'kept' if rec['correct'] else 'wrong'}")

        tasks = [asyncio.create_task(worker()) for _ in range(max(1, workers))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return counts


def yields(out: Path, strategies: list[Strategy], task: str) -> list[dict[str, Any]]:
    """Per strategy: answers, kept (correct), yield, and how many kept lessons carry the teacher's top-k."""
    lessons = [x for x in transfer.read(out) if x.task == task]
    rows = []
    for s in strategies:
        mine = [x for x in lessons if x.strategy == s]
        kept = [x for x in mine if x.correct]
        rows.append({"strategy": s, "answers": len(mine), "kept": len(kept),
                     "yield": len(kept) / len(mine) if mine else 0.0,
                     "with_logprobs": sum(x.logprobs is not None for x in kept),
                     "teacher_tokens": sum(int((x.raw.get("usage") or {}).get("completion_tokens", 0)) for x in mine)})
    return rows

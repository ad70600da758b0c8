"""Lessons as token sequences: the unprimed prompt, then the answer (the loss is only on the answer).

A lesson comes from a transfer set (the teacher's answer, correct ones only) or, for the plain fine-tuning
baseline, from the dataset's gold solutions (train split only). The teacher's top-k is attached to an answer
only when the student's tokenizer turns the answer into exactly the teacher's token ids; otherwise that lesson
is learned from its text (CE).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gkt.distill import transfer
from shared.splits import seeded_train
from shared.tasks import TASKS, PromptStyle


@dataclass
class Sample:
    """One training sequence: ``inputs`` predict ``targets`` (-100 outside the answer), with the teacher's top-k
    at some target positions."""

    inputs: list[int]
    targets: list[int]
    top: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # target position -> teacher top-k


@dataclass
class Text:
    prompt: str
    answer: str
    logprobs: transfer.TeacherLogprobs | None = None


def from_transfer(paths: list[Path], task: str, strategies: list[str] | None) -> list[Text]:
    """The correct answers of the given strategies (all when None), in file order."""
    texts = []
    for path in paths:
        for lesson in transfer.read(path):
            if lesson.task == task and lesson.correct and (strategies is None or lesson.strategy in strategies):
                texts.append(Text(lesson.prompt, lesson.answer, lesson.logprobs))
    return texts


def from_gold(task_name: str, data: Path, style: PromptStyle, seed: int = 0) -> list[Text]:
    """Plain fine-tuning: the train split's gold solutions (the answer line alone where there is none), in the
    order ``collect`` asks the questions with the same seed, so the first n are the same n questions."""
    task = TASKS[task_name]
    return [Text(task.build_prompt(e.question, style), " " + (e.solution or task.answer_line(e.gold)))
            for e in seeded_train(task, task.load(data), seed)]


def tokenize(texts: list[Text], tokenizer: Any, max_len: int) -> tuple[list[Sample], dict[str, int]]:
    """Token sequences ending in the end-of-text token (the student learns to stop); too long ones are dropped
    rather than cut (a cut answer teaches an answer without its answer line)."""
    eos = tokenizer.eos_token_id
    samples: list[Sample] = []
    stats = {"lessons": len(texts), "too_long": 0, "with_top": 0, "top_mismatch": 0}
    for t in texts:
        prompt = tokenizer(t.prompt, add_special_tokens=True)["input_ids"]
        answer = tokenizer(t.answer, add_special_tokens=False)["input_ids"]
        seq = prompt + answer + [eos]
        if len(seq) - 1 > max_len:
            stats["too_long"] += 1
            continue
        targets = [-100] * (len(prompt) - 1) + answer + [eos]
        sample = Sample(seq[:-1], targets)
        if t.logprobs is not None:
            if t.logprobs.ids == answer:
                sample.top = {len(prompt) - 1 + i: top for i, top in enumerate(t.logprobs.top) if top}
                stats["with_top"] += 1
            else:
                stats["top_mismatch"] += 1  # same text, other ids: the teacher's ids mean other tokens here
        samples.append(sample)
    return samples, stats


def fingerprint(samples: list[Sample]) -> str:
    """Identifies the training data, so a checkpoint is never resumed on other data."""
    h = hashlib.sha256()
    for s in samples:
        h.update(repr((s.inputs, s.targets, sorted(s.top.items()))).encode())
    return h.hexdigest()


def collate(batch: list[Sample], pad: int, k: int) -> dict[str, Any]:
    """Right-padded tensors for one micro-batch (pad positions are masked and carry no loss)."""
    import torch

    width = max(len(s.inputs) for s in batch)
    n = len(batch)
    ids = torch.full((n, width), pad, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    top_ids = torch.zeros((n, width, max(1, k)), dtype=torch.long)
    top_lp = torch.zeros((n, width, max(1, k)), dtype=torch.float32)
    top_mask = torch.zeros((n, width, max(1, k)), dtype=torch.bool)
    for i, s in enumerate(batch):
        ids[i, : len(s.inputs)] = torch.tensor(s.inputs)
        attn[i, : len(s.inputs)] = 1
        labels[i, : len(s.targets)] = torch.tensor(s.targets)
        for pos, top in s.top.items():
            for j, (tok, lp) in enumerate(top[:k]):
                top_ids[i, pos, j], top_lp[i, pos, j], top_mask[i, pos, j] = tok, lp, True
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "top_ids": top_ids, "top_lp": top_lp,
            "top_mask": top_mask}

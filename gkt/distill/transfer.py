"""Transfer sets: one JSON object per line, one teacher answer per (task, question, strategy).

Standard library only: ``gkt distill collect`` writes it in the main environment and the trainer reads it in
``.venv-distill``. Every line is checked when read; a bad one stops the reader with ``TransferSetError`` naming
``file:line`` and what is wrong, because training on a silently skipped or misread lesson is worse than not
starting. The collector writes whole lines only (one write, then fsync) and cuts a torn last line left by a kill
before it appends (``repair_tail``).

A line::

    {"v": 1, "task": "gsm8k", "id": "...", "strategy": "ground_truth", "prompt_style": "zero_shot",
     "prompt": "<the unprimed prompt the student learns from>", "answer": "<the teacher's text>",
     "gold": "72", "extracted": "72", "correct": true, "teacher": "qwen2.5-coder-1.5b-instruct",
     "finish_reason": "stop", "usage": {...}, "cost": {...}, "tokenizer": "match",
     "logprobs": {"ids": [...], "logprob": [...], "top": [[[id, logprob], ...], ...]} or null}

``logprobs`` is kept only when the student's tokenizer turns ``answer`` into the teacher's own token ids
(``tokenizer`` says "match"; "mismatch" or "none" otherwise): the ids of a different vocabulary mean other
tokens.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSION = 1
TOKENIZER_STATES = ("match", "mismatch", "none")


class TransferSetError(ValueError):
    """A transfer-set line that cannot be used; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class TeacherLogprobs:
    """The teacher's tokens for one answer: sampled ids, their log-probabilities and the top-k at each step."""

    ids: list[int]
    logprob: list[float]
    top: list[list[tuple[int, float]]]


@dataclass(frozen=True)
class Lesson:
    """One transfer-set line, checked."""

    task: str
    id: str
    strategy: str
    prompt_style: str
    prompt: str
    answer: str
    gold: str
    extracted: str | None
    correct: bool
    teacher: str
    logprobs: TeacherLogprobs | None
    raw: dict[str, Any]

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task, self.id, self.strategy)


def _need(obj: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise ValueError(f"missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"field {name!r} must be {names}, got {type(value).__name__}")
    return value


def _logprob(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value > 1e-4:
        raise ValueError(f"{where} must be a finite log-probability (<= 0), got {value!r}")
    return float(value)


def _token(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be a token id (integer >= 0), got {value!r}")
    return value


def _logprobs(obj: Any) -> TeacherLogprobs | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ValueError("field 'logprobs' must be an object or null")
    ids, lps, top = _need(obj, "ids", list), _need(obj, "logprob", list), _need(obj, "top", list)
    if not (len(ids) == len(lps) == len(top)) or not ids:
        raise ValueError(f"logprobs.ids, .logprob and .top must be non-empty and of one length "
                         f"(got {len(ids)}, {len(lps)}, {len(top)})")
    steps: list[list[tuple[int, float]]] = []
    for i, alts in enumerate(top):
        if not isinstance(alts, list):
            raise ValueError(f"logprobs.top[{i}] must be a list of [id, logprob] pairs")
        pairs = []
        for j, pair in enumerate(alts):
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise ValueError(f"logprobs.top[{i}][{j}] must be an [id, logprob] pair")
            pairs.append((_token(pair[0], f"logprobs.top[{i}][{j}][0]"),
                          _logprob(pair[1], f"logprobs.top[{i}][{j}][1]")))
        steps.append(pairs)
    return TeacherLogprobs([_token(t, f"logprobs.ids[{i}]") for i, t in enumerate(ids)],
                           [_logprob(v, f"logprobs.logprob[{i}]") for i, v in enumerate(lps)], steps)


def parse_line(text: str) -> Lesson:
    """One line -> a ``Lesson``; ``ValueError`` says what is wrong (the reader adds where)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if obj.get("v") != VERSION:
        raise ValueError(f"unknown transfer-set version {obj.get('v')!r} (this gkt reads {VERSION})")
    tokenizer = _need(obj, "tokenizer", str)
    if tokenizer not in TOKENIZER_STATES:
        raise ValueError(f"field 'tokenizer' must be one of {', '.join(TOKENIZER_STATES)}, got {tokenizer!r}")
    logprobs = _logprobs(obj.get("logprobs"))
    if (logprobs is not None) != (tokenizer == "match"):
        raise ValueError("field 'logprobs' is kept exactly when 'tokenizer' is \"match\"")
    extracted = obj.get("extracted")
    if extracted is not None and not isinstance(extracted, str):
        raise ValueError("field 'extracted' must be a string or null")
    answer = _need(obj, "answer", str)
    lesson = Lesson(
        task=_need(obj, "task", str), id=_need(obj, "id", str), strategy=_need(obj, "strategy", str),
        prompt_style=_need(obj, "prompt_style", str), prompt=_need(obj, "prompt", str), answer=answer,
        gold=_need(obj, "gold", str), extracted=extracted, correct=_need(obj, "correct", bool),
        teacher=_need(obj, "teacher", str), logprobs=logprobs, raw=obj,
    )
    if not lesson.prompt.strip():
        raise ValueError("field 'prompt' is empty")
    if lesson.correct and not answer.strip():
        raise ValueError("an empty answer cannot be correct")
    return lesson


def read(path: str | Path) -> list[Lesson]:
    """Every line of a transfer set, checked; the first bad line raises ``TransferSetError`` (file:line)."""
    path = Path(path)
    lessons: list[Lesson] = []
    seen: dict[tuple[str, str, str], int] = {}
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise TransferSetError(f"{path}: cannot read the transfer set ({exc.strerror})") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TransferSetError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                if not line.endswith("\n"):
                    raise ValueError("torn line (no newline at the end: a write cut short); rerun "
                                     "`gkt distill collect` on this file to repair it")
                lesson = parse_line(line)
            except ValueError as exc:
                raise TransferSetError(f"{path}:{lineno}: {exc}") from None
            if lesson.key in seen:
                raise TransferSetError(f"{path}:{lineno}: duplicate of line {seen[lesson.key]} "
                                       f"(task {lesson.task}, id {lesson.id}, strategy {lesson.strategy})")
            seen[lesson.key] = lineno
            lessons.append(lesson)
    return lessons


def repair_tail(path: Path) -> bool:
    """Cut a last line that a kill left without its newline (it is asked again); True when one was cut."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return False
        fh.seek(0)
        data = fh.read()
        fh.truncate(data.rfind(b"\n") + 1)
    return True


def append(fh: Any, record: dict[str, Any]) -> None:
    """One whole line, on disk before the next question counts as done."""
    fh.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
    fh.flush()
    os.fsync(fh.fileno())

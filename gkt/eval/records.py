"""What one evaluation run is (a config), and the resumable store of per-question results.

Every answered question becomes one JSON line keyed by the config and the question id. A rerun reads the
file first and skips what is there, so an interrupted evaluation continues where it stopped; a line torn by
a kill mid-write is ignored (that question is simply asked again).
"""

from __future__ import annotations

import gzip
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from shared.splits import Split, select
from shared.tasks import Example, Task

Mode = Literal["teacher", "student", "gkt"]


def model_label(name_or_path: str) -> str:
    """The name the services report for a model: the registry name, or a GGUF file's stem."""
    return Path(name_or_path).stem if name_or_path.endswith(".gguf") else name_or_path


# The first guidance of a ``reguide`` config whose spec names no k (the edge API's own default is 40).
REGUIDE_K = 20
# Policy parameters that are words, not numbers (``verify:draft_tokens=auto``).
WORD_VALUES = frozenset({"auto"})


def parse_policy(spec: str) -> tuple[str, int | None]:
    """``NAME[:PARAM=VALUE...]`` -> (canonical spec without k, k). ``k`` is the first guidance's length
    (``guidance_tokens``); other parameters are the policy's own, checked against the edge's models.
    ``reguide`` without k uses ``REGUIDE_K``; ``adaptive`` takes no k (it has ``min_tokens``/``max_tokens``), nor
    does ``verify`` (the student drafts from the start);
    ``fixed`` is what ``--k`` runs."""
    from pydantic import TypeAdapter, ValidationError

    from edge_agent.policies import GuidancePolicy

    name, *parts = spec.strip().split(":")
    params: dict[str, int | float | str] = {}
    k: int | None = None
    for part in parts:
        key, eq, raw = part.partition("=")
        if not eq or not key:
            raise ValueError(f"policy parameters are NAME=VALUE, got {part!r} in {spec!r}")
        try:
            value: int | float | str = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                if raw not in WORD_VALUES:
                    raise ValueError(f"policy parameter {key} must be a number or one of {sorted(WORD_VALUES)}, "
                                     f"got {raw!r}") from None
                value = raw
        if key == "k":
            k = int(value)
        else:
            params[key] = value
    if name == "fixed":
        raise ValueError("the fixed policy is what --k runs")
    try:
        TypeAdapter(GuidancePolicy).validate_python({"name": name, **params})
    except ValidationError as err:
        raise ValueError(f"policy {spec!r}: {err.errors()[0]['msg']} ({err.errors()[0]['loc']})") from None
    if name == "adaptive" and k is not None:
        raise ValueError("adaptive takes no k: give min_tokens and max_tokens")
    if name == "verify" and k is not None:
        raise ValueError("verify takes no k: the student drafts from the start (give draft_tokens)")
    if name == "reguide" and k is None:
        k = REGUIDE_K
    if k is not None and k < 1:
        raise ValueError("k must be at least 1")
    return ":".join([name, *(f"{p}={v}" for p, v in sorted(params.items()))]), k


def policy_body(spec: str) -> dict[str, Any]:
    """The request's ``guidance_policy`` object for a canonical spec."""
    name, *parts = spec.split(":")
    body: dict[str, Any] = {"name": name}
    for part in parts:
        key, _, raw = part.partition("=")
        body[key] = raw if raw in WORD_VALUES else float(raw) if any(c in raw for c in ".eE") else int(raw)
    return body


@dataclass(frozen=True)
class RunConfig:
    """One row of the tables: a task, a mode (with k in gkt mode), an answer budget and a model pair; in gkt
    mode optionally a guidance policy (canonical spec, see ``parse_policy``)."""

    task: str
    mode: Mode
    k: int | None
    max_tokens: int
    teacher: str
    student: str
    policy: str | None = None

    @property
    def key(self) -> str:
        k = f"k={self.k}" if self.mode == "gkt" else self.mode
        if self.policy:
            k = f"policy={self.policy}|{k}"
        return f"{self.task}|{self.mode}|{k}|max={self.max_tokens}|{self.teacher}|{self.student}"

    @property
    def label(self) -> str:
        if self.policy:
            return f"gkt {self.policy}" + (f" k={self.k}" if self.k else "")
        return f"gkt k={self.k}" if self.mode == "gkt" else f"{self.mode} only"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def configs(task: str, modes: list[Mode], ks: list[int], max_tokens: int, teacher: str, student: str,
            policies: list[tuple[str, int | None]] | None = None) -> list[RunConfig]:
    """Teacher, student, gkt for each k (ascending), then each policy (gkt mode, whatever ``modes`` says):
    the order of the tables."""
    out: list[RunConfig] = []
    for mode in ("teacher", "student"):
        if mode in modes:
            out.append(RunConfig(task, mode, None, max_tokens, teacher, student))
    if "gkt" in modes:
        out += [RunConfig(task, "gkt", k, max_tokens, teacher, student) for k in sorted(set(ks))]
    for spec, k in policies or []:
        out.append(RunConfig(task, "gkt", k, max_tokens, teacher, student, spec))
    return out


def sample(task: Task, path: str | Path, n: int, seed: int, split: Split | None = None) -> list[Example]:
    """n questions drawn with ``seed``, exemplars excluded; only from ``split`` (shared/splits.py) when given.

    The whole file is shuffled with the seed and the first n taken, so a smaller sample with the same seed is a
    prefix of a larger one (rows run on different n still share their first questions).
    """
    examples = task.load(path)
    pool = list(select(task, examples, split)) if split else [e for e in examples if not task.is_exemplar(e.question)]
    random.Random(seed).shuffle(pool)
    return pool[:n]


class ResultStore:
    """Append-only jsonl of per-question results, indexed by (config key, question id)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.torn_lines = 0
        if self.path.exists():
            # A published run is kept gzipped (docs/results/); it is read as it is (and never appended to).
            opener = gzip.open if self.path.suffix == ".gz" else open
            with opener(self.path, "rt", encoding="utf-8") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        self.torn_lines += 1
                        continue
                    self.records[(rec["key"], rec["qid"])] = rec

    def done(self, config: RunConfig, qid: str) -> bool:
        return (config.key, qid) in self.records

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False)
        with open(self.path, "a+b") as fh:
            # A torn line from an earlier kill has no newline: start on a fresh line so this record survives.
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(line.encode("utf-8") + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records[(record["key"], record["qid"])] = record

    def for_task(self, task: str, qids: set[str]) -> list[dict[str, Any]]:
        return [r for r in self.records.values() if r["config"]["task"] == task and r["qid"] in qids]

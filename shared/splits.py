"""The held-out split every part of gkt uses: ``train`` for transfer sets, training and healing, ``dev`` for results.

An example is in ``dev`` when ``int(sha256(f"{task}:{id}").hexdigest(), 16) % 5 == 0`` (about a fifth), else in
``train``. The rule depends only on the task name and the example's id, so it is the same on every machine, for
every file order and every sample size, and an example never moves between the parts. The few-shot exemplars
are in neither part: they are in every few-shot prompt, so a result on them, or training on them, would say
nothing about unseen questions.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator
from typing import Literal

from shared.tasks import Example, Task

Split = Literal["train", "dev"]
SPLITS: tuple[Split, ...] = ("train", "dev")
DEV_MODULUS = 5  # one example in five is held out


def split_of(task: str, example_id: str) -> Split:
    """``dev`` or ``train`` for an example of ``task`` (exemplars are not checked here: see ``select``)."""
    digest = hashlib.sha256(f"{task}:{example_id}".encode()).hexdigest()
    return "dev" if int(digest, 16) % DEV_MODULUS == 0 else "train"


def select(task: Task, examples: Iterable[Example], split: Split) -> Iterator[Example]:
    """The examples of ``split``, the task's few-shot exemplars left out."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    for example in examples:
        if not task.is_exemplar(example.question) and split_of(task.name, example.id) == split:
            yield example


def seeded_train(task: Task, examples: Iterable[Example], seed: int = 0) -> list[Example]:
    """The ``train`` part in one seeded order: ``gkt distill collect -n N --seed S`` asks the first N, and
    ``gkt distill train --source gold -n N --seed S`` learns the gold solutions of the same N (paired runs)."""
    pool = list(select(task, examples, "train"))
    random.Random(seed).shuffle(pool)
    return pool

"""The held-out split (shared/splits.py): the lead's rule, stable, disjoint, exemplars in neither part."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gkt.eval.records import sample
from shared.splits import seeded_train, select, split_of
from shared.tasks import CSQA, GSM8K, TASKS, Example

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K_DATA = DATA / "gsm8k" / "train.jsonl"


def test_the_rule_is_the_lead_s() -> None:
    for i in range(200):
        qid = f"q{i}"
        expected = "dev" if int(hashlib.sha256(f"gsm8k:{qid}".encode()).hexdigest(), 16) % 5 == 0 else "train"
        assert split_of("gsm8k", qid) == expected
    # The task is part of the key: the same id may fall in different parts of two tasks.
    assert {split_of("gsm8k", f"q{i}") == split_of("csqa", f"q{i}") for i in range(200)} == {True, False}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_real_files_split_about_one_in_five_disjoint_and_without_exemplars(name: str) -> None:
    task = TASKS[name]
    examples = list(task.load(DATA / name / "train.jsonl"))
    train = list(select(task, examples, "train"))
    dev = list(select(task, examples, "dev"))
    assert not {e.id for e in train} & {e.id for e in dev}
    assert 0.18 < len(dev) / len(examples) < 0.22
    exemplars = [e for e in examples if task.is_exemplar(e.question)]
    assert len(train) + len(dev) + len(exemplars) == len(examples)
    assert not any(task.is_exemplar(e.question) for e in train + dev)
    # Order does not matter: the part is a function of the id alone.
    assert [e.id for e in select(task, reversed(examples), "dev")] == [e.id for e in reversed(dev)]


def test_an_exemplar_is_in_neither_part_whatever_its_hash() -> None:
    shot = Example(id="x", question=GSM8K.shots[0][0], gold="6")
    assert list(select(GSM8K, [shot], "train")) == list(select(GSM8K, [shot], "dev")) == []
    with pytest.raises(ValueError, match="unknown split"):
        list(select(CSQA, [], "test"))  # type: ignore[arg-type]


def test_eval_draws_only_from_the_requested_split() -> None:
    path = DATA / "gsm8k" / "train.jsonl"
    dev = sample(GSM8K, path, 50, 0, "dev")
    assert len(dev) == 50 and all(split_of("gsm8k", e.id) == "dev" for e in dev)
    assert sample(GSM8K, path, 20, 0, "dev") == dev[:20]  # a smaller sample is still a prefix
    assert all(split_of("gsm8k", e.id) == "train" for e in sample(GSM8K, path, 50, 0, "train"))


def test_gold_lessons_are_the_questions_collect_asks_first() -> None:
    """`gkt distill train --source gold -n N` and `gkt distill collect -n N` (same seed) use the same N
    questions, so plain fine-tuning and distillation are compared on the same data."""
    from gkt.distill import collect, data

    jobs = collect.plan(GSM8K, GSM8K_DATA, ["ground_truth"], 20, 0)
    gold = data.from_gold("gsm8k", GSM8K_DATA, "zero_shot")[:20]
    assert [GSM8K.build_prompt(j.example.question, "zero_shot") for j in jobs] == [t.prompt for t in gold]
    assert {j.example.id for j in jobs} == {e.id for e in seeded_train(GSM8K, GSM8K.load(GSM8K_DATA))[:20]}
    assert all(split_of("gsm8k", j.example.id) == "train" for j in jobs)
    assert seeded_train(GSM8K, GSM8K.load(GSM8K_DATA), 1)[:20] != seeded_train(GSM8K, GSM8K.load(GSM8K_DATA))[:20]
    # Another seed: both sides move together.
    jobs = collect.plan(GSM8K, GSM8K_DATA, ["ground_truth"], 20, 1)
    gold = data.from_gold("gsm8k", GSM8K_DATA, "zero_shot", 1)[:20]
    assert [GSM8K.build_prompt(j.example.question, "zero_shot") for j in jobs] == [t.prompt for t in gold]

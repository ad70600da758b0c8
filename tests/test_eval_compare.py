"""``gkt compare``: paired accuracy of eval runs, with the exact McNemar test (its p-values checked against
values computed by hand from the binomial distribution)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from gkt.eval.compare import compare, load, markdown, mcnemar_exact
from gkt.eval.records import RunConfig

CONFIG = RunConfig("gsm8k", "student", None, 256, "t", "s").as_dict()


def write(path: Path, correct: dict[str, bool], adapter: dict | None = None, config: dict = CONFIG) -> Path:
    with path.open("a", encoding="utf-8") as f:
        for qid, ok in correct.items():
            f.write(json.dumps({"key": RunConfig(**config).key, "qid": qid, "correct": ok, "config": config,
                                "adapter": adapter}) + "\n")
    return path


def test_mcnemar_exact_is_the_two_sided_binomial_test() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 2**6)
    assert mcnemar_exact(2, 10) == pytest.approx(2 * sum(math.comb(12, i) for i in range(3)) / 2**12)
    assert mcnemar_exact(10, 2) == mcnemar_exact(2, 10)


def test_runs_are_paired_on_their_shared_questions(tmp_path: Path) -> None:
    base = write(tmp_path / "base.jsonl", {f"q{i}": i < 3 for i in range(10)})  # 3 of 10
    adapter = {"name": "gold", "sha256": "ab" * 32, "scale": 1.0}
    gold = write(tmp_path / "gold.jsonl", {f"q{i}": i < 8 for i in range(12)}, adapter)  # 2 extra questions
    rows = compare([load(f"base={base}"), load(f"gold={gold}")])
    assert [r.n for r in rows] == [10, 10]
    assert rows[0].accuracy == pytest.approx(0.3) and rows[1].accuracy == pytest.approx(0.8)
    assert (rows[1].only_this, rows[1].only_reference) == (5, 0)
    assert rows[1].p_value == pytest.approx(2 / 2**5) and rows[0].p_value is None
    table = markdown(rows)
    assert "| gold | 10 | 80.0 %" in table and "gold (abababababab)" in table and "5 / 0" in table
    with gold.open("a", encoding="utf-8") as f:
        f.write('{"qid": "q11", "corr')  # an eval killed mid-line: that line is skipped, as eval itself does
    assert load(f"gold={gold}").correct == {f"q{i}": i < 8 for i in range(12)}
    packed = tmp_path / "gold.jsonl.gz"  # as published under docs/results/
    packed.write_bytes(gzip.compress(gold.read_bytes()))
    assert load(f"gold={packed}").correct == load(f"gold={gold}").correct


def test_mixed_or_empty_inputs_are_refused_by_name(tmp_path: Path) -> None:
    mixed = write(tmp_path / "mixed.jsonl", {"q1": True})
    write(mixed, {"q1": False}, config=RunConfig("gsm8k", "gkt", 40, 256, "t", "s").as_dict())
    with pytest.raises(ValueError, match="name one with @CONFIG"):
        load(f"a={mixed}")
    assert load(f"a={mixed}@gkt k=40").correct == {"q1": False}
    with pytest.raises(ValueError, match="no configuration 'teacher only'"):
        load(f"a={mixed}@teacher only")
    with pytest.raises(ValueError, match="expected LABEL=results.jsonl"):
        load(str(mixed))
    other = write(tmp_path / "other.jsonl", {"q9": True})
    with pytest.raises(ValueError, match="share no question"):
        compare([load(f"a={mixed}@student only"), load(f"b={other}")])


def test_verify_runs_show_their_drafts(tmp_path: Path) -> None:
    config = RunConfig("gsm8k", "gkt", None, 256, "t", "s", "verify").as_dict()
    path = tmp_path / "verify.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for qid, accepted in (("q1", [4, 4, 2]), ("q2", [4])):  # drafts of 4 characters; 3 of 4 kept whole
            calls = [{"kind": "verify", "draft": "abcd", "draft_accepted": a, "draft_student_tokens": 2}
                     for a in accepted]
            f.write(json.dumps({"key": RunConfig(**config).key, "qid": qid, "correct": True, "config": config,
                                "calls": calls, "wall_s": 5.0 * len(calls),
                                "usage": {"teacher_draft_tokens": 10 * len(calls), "teacher_tokens": len(calls),
                                          "student_discarded_tokens": 3 * len(calls)}}) + "\n")
    base = write(tmp_path / "base.jsonl", {"q1": False, "q2": True})
    rows = compare([load(f"base={base}"), load(f"verify={path}")])
    assert rows[0].checked is None and rows[1].checked is not None
    table = markdown(rows)
    assert "| verify | 2.00 | 75.0 % | 20.0 | 2.0 | 6.0 | 10.0 | 2.0 |" in table, table

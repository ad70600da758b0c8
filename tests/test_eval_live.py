"""``gkt eval`` against live cloud and edge processes: the CLI end to end, resume, split-machine pinning."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gkt import cli
from gkt.eval.records import ResultStore, configs, sample
from gkt.eval.runner import EdgeClient, EvalError, run
from gkt.eval.stack import local_stack, split_possible
from gkt.launcher import Service
from shared.models import DEFAULT_STUDENT, DEFAULT_TEACHER
from shared.tasks import CSQA, GSM8K
from shared.words import WORD_ALLOWANCE
from tests.conftest import CLIENT_KEY

pytestmark = pytest.mark.models

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_cli_end_to_end_gsm8k(edge: Service, tmp_path: Path) -> None:
    """Three GSM8K questions, teacher-only, student-only and gkt k=10, through the live services."""
    out = tmp_path / "out"
    argv = ["eval", "--task", "gsm8k", "--data", str(DATA / "gsm8k" / "train.jsonl"), "-n", "3", "--k", "10",
            "--max-tokens", "160", "--edge-url", edge.url, "--api-key", CLIENT_KEY, "--out", str(out)]
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 0

    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 9 and len({(r["key"], r["qid"]) for r in records}) == 9
    golds = {e.id: e.gold for e in sample(GSM8K, DATA / "gsm8k" / "train.jsonl", 3, 0)}
    for r in records:
        mode, u = r["config"]["mode"], r["usage"]
        assert r["timing"] == "external" and r["gold"] == golds[r["qid"]]
        assert r["answer"] == r["edge_answer"] == GSM8K.extract(r["text"])  # the harness scores what the edge said
        assert r["correct"] == (r["answer"] == r["gold"])
        if mode == "teacher":
            assert u["teacher_tokens"] > 0 and u["student_tokens"] == 0 and r["teacher_model"] == DEFAULT_TEACHER
        elif mode == "student":
            assert u["teacher_tokens"] == 0 and u["student_tokens"] > 0 and r["guidance"] == ""
        else:
            assert 10 <= u["teacher_tokens"] <= 10 + WORD_ALLOWANCE + 1 and r["text"].startswith(r["guidance"])
            assert r["guidance_answer"] == GSM8K.stated_answer(r["guidance"])
            assert [c["kind"] for c in r["calls"]] == ["first"] and r["calls"][0]["text"] == r["guidance"]
            assert r["calls"][0]["teacher_tokens"] == u["teacher_tokens"] and r["calls"][0]["cost"]

    result = json.loads((out / "gsm8k.json").read_text())
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == ["teacher only", "student only", "gkt k=10"]
    for label, mode in (("teacher only", "teacher"), ("student only", "student"), ("gkt k=10", "gkt")):
        mine = [r for r in records if r["config"]["mode"] == mode]
        assert rows[label]["n"] == 3 and rows[label]["correct"] == sum(r["correct"] for r in mine)
        assert rows[label]["ci_low"] <= rows[label]["accuracy"] <= rows[label]["ci_high"]
    assert rows["teacher only"]["teacher_token_share"] == 1.0 and rows["student only"]["teacher_token_share"] == 0
    assert 0 < rows["gkt k=10"]["teacher_token_share"] < 1
    assert rows["teacher only"]["speedup_vs_teacher"] == pytest.approx(1.0)
    assert result["meta"]["timing_modes"] == ["external"] and result["meta"]["teacher"] == DEFAULT_TEACHER
    md = (out / "gsm8k.md").read_text()
    assert "| gkt k=10 | 3 |" in md and "timing: external" in md
    assert (out / "gsm8k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class CountingClient(EdgeClient):
    """The real client, counting which (question, config) pairs it asked (the warm-up apart)."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        super().__init__(url, api_key=api_key)
        self.asked: list[tuple[str, str]] = []
        self.warm_ups = 0

    def ask(self, question, config):  # type: ignore[no-untyped-def]
        if question == CSQA.shots[0][0]:
            self.warm_ups += 1
        else:
            self.asked.append((question, config.key))
        return super().ask(question, config)


def test_resume_after_interruption_repeats_nothing(edge: Service, tmp_path: Path) -> None:
    examples = sample(CSQA, DATA / "csqa" / "train.jsonl", 3, seed=7)
    order = configs("csqa", ["student", "gkt"], [5], 40, DEFAULT_TEACHER, DEFAULT_STUDENT)
    path = tmp_path / "results.jsonl"

    first = CountingClient(edge.url, api_key=CLIENT_KEY)
    seen = 0

    def stop_after_two(_: dict) -> None:
        nonlocal seen
        seen += 1
        if seen == 2:
            raise KeyboardInterrupt  # as Ctrl-C would, between two questions' configs

    with pytest.raises(KeyboardInterrupt):
        run(examples, order, first, ResultStore(path), "external", on_record=stop_after_two)
    assert len(first.asked) == 2 and first.warm_ups == 1

    second = CountingClient(edge.url, api_key=CLIENT_KEY)
    written = run(examples, order, second, ResultStore(path), "external")
    assert written == 4 and not set(first.asked) & set(second.asked)

    store = ResultStore(path)
    assert len(store.records) == 6 and len(path.read_text().splitlines()) == 6
    assert {(c.key, e.id) for e in examples for c in order} == set(store.records)
    third = CountingClient(edge.url, api_key=CLIENT_KEY)
    assert run(examples, order, third, ResultStore(path), "external") == 0 and third.asked == []
    assert third.warm_ups == 0  # nothing left to do: not even a warm-up


def test_refuses_results_from_another_model_pair(edge: Service, tmp_path: Path) -> None:
    examples = sample(CSQA, DATA / "csqa" / "train.jsonl", 1, seed=0)
    order = configs("csqa", ["student"], [], 8, DEFAULT_TEACHER, "some-other-student")
    with pytest.raises(EvalError, match="--student"):
        run(examples, order, EdgeClient(edge.url, api_key=CLIENT_KEY), ResultStore(tmp_path / "r.jsonl"), "external")
    assert not (tmp_path / "r.jsonl").exists()


def test_split_stack_pins_cloud_and_edge_to_separate_cores(tmp_path: Path) -> None:
    if (why := split_possible()) is not None:
        pytest.skip(why)
    smol = "smollm2-135m-instruct"
    examples = sample(CSQA, DATA / "csqa" / "train.jsonl", 1, seed=0)
    order = configs("csqa", ["gkt"], [5], 24, smol, smol)
    store = ResultStore(tmp_path / "r.jsonl")
    with local_stack(smol, smol, split=True, log_dir=tmp_path / "logs") as stack:
        assert os.sched_getaffinity(stack.cloud.proc.pid) == {0}
        assert os.sched_getaffinity(stack.edge.proc.pid) == {1}
        assert run(examples, order, EdgeClient(stack.edge.url), store, stack.timing) == 1
    assert stack.cloud.proc.poll() is not None and stack.edge.proc.poll() is not None
    (record,) = store.records.values()
    assert record["timing"] == "split" and record["usage"]["teacher_tokens"] > 0

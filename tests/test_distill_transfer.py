"""Transfer sets (gkt/distill/transfer.py): every bad line is refused with its file:line; a torn tail is cut.
Priming prompts (priming.py): the teacher's differ, the student's is always the unprimed one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gkt.distill import transfer
from gkt.distill.collect import Collector, Job, lesson_text, teacher_logprobs
from gkt.distill.priming import STRATEGIES, stop_sequences, student_prompt, teacher_prompt
from shared.tasks import CSQA, GSM8K, Example


def good(**over: object) -> dict:
    rec = {"v": 1, "task": "gsm8k", "id": "q1", "strategy": "base", "prompt_style": "zero_shot",
           "prompt": "Q: 2+2?\nA:", "answer": " 2 + 2 = 4. The answer is 4.", "gold": "4", "extracted": "4",
           "correct": True, "teacher": "t", "tokenizer": "match",
           "logprobs": {"ids": [5, 6], "logprob": [-0.1, -0.2], "top": [[[5, -0.1], [7, -2.5]], [[6, -0.2]]]}}
    rec.update(over)
    return rec


def write(tmp_path: Path, *records: object) -> Path:
    path = tmp_path / "set.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_a_good_set_reads_back() -> None:
    lesson = transfer.parse_line(json.dumps(good()))
    assert lesson.key == ("gsm8k", "q1", "base") and lesson.logprobs is not None
    assert lesson.logprobs.top[0] == [(5, -0.1), (7, -2.5)]
    assert transfer.parse_line(json.dumps(good(tokenizer="mismatch", logprobs=None))).logprobs is None


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    (good(v=2), "unknown transfer-set version 2"),
    ({k: v for k, v in good().items() if k != "answer"}, "missing field 'answer'"),
    (good(correct="yes"), "field 'correct' must be bool"),
    (good(id=7), "field 'id' must be str"),
    (good(tokenizer="maybe"), "field 'tokenizer' must be one of"),
    (good(tokenizer="mismatch"), "kept exactly when 'tokenizer' is \"match\""),
    (good(logprobs={"ids": [5], "logprob": [-0.1, -0.2], "top": [[]]}), "of one length"),
    (good(logprobs={"ids": [-5], "logprob": [-0.1], "top": [[]]}), "logprobs.ids[0] must be a token id"),
    (good(logprobs={"ids": [5], "logprob": [0.7], "top": [[]]}), "logprobs.logprob[0] must be a finite"),
    (good(logprobs={"ids": [5], "logprob": [-0.1], "top": [[[5]]]}), "logprobs.top[0][0] must be an [id, logprob]"),
    (good(logprobs={"ids": [5], "logprob": [-0.1], "top": [[[5, "x"]]]}), "logprobs.top[0][0][1] must be a finite"),
    (good(prompt="  "), "field 'prompt' is empty"),
    (good(answer=""), "an empty answer cannot be correct"),
])
def test_bad_lines_are_refused_naming_file_and_line(tmp_path: Path, bad: object, message: str) -> None:
    path = write(tmp_path, good(id="a"), good(id="b"), bad)
    with pytest.raises(transfer.TransferSetError) as err:
        transfer.read(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


def test_duplicates_torn_lines_and_non_utf8_are_named(tmp_path: Path) -> None:
    path = write(tmp_path, good(), good())
    with pytest.raises(transfer.TransferSetError, match=r"set\.jsonl:2: duplicate of line 1"):
        transfer.read(path)
    path.write_text(json.dumps(good()) + "\n" + json.dumps(good(id="q2"))[:40])
    with pytest.raises(transfer.TransferSetError, match=r"set\.jsonl:2: torn line"):
        transfer.read(path)
    path.write_bytes(json.dumps(good()).encode() + b"\n\xff\xfe\n")
    with pytest.raises(transfer.TransferSetError, match=r"set\.jsonl:2: not UTF-8"):
        transfer.read(path)
    with pytest.raises(transfer.TransferSetError, match="cannot read"):
        transfer.read(tmp_path / "missing.jsonl")


def test_repair_cuts_only_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    whole = json.dumps(good()) + "\n"
    path.write_text(whole + json.dumps(good(id="q2"))[:30])
    assert transfer.repair_tail(path) and path.read_text() == whole
    assert not transfer.repair_tail(path) and path.read_text() == whole
    assert [x.id for x in transfer.read(path)] == ["q1"]


class FakeVocab:
    """A tokenizer stand-in: one id per character (the real check runs in test_distill_live.py)."""

    n_vocab = 1000

    def ids(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_teacher_logprobs_kept_only_when_the_student_reads_the_same_ids() -> None:
    tokens = [{"id": ord(c), "logprob": -0.1, "top": [[ord(c), -0.1]]} for c in " 4."]
    state, kept = teacher_logprobs(" 4", tokens, FakeVocab())  # the "." was cut by a stop sequence
    assert state == "match" and kept is not None and kept["ids"] == [32, 52] and len(kept["top"]) == 2
    assert teacher_logprobs(" 5", tokens, FakeVocab()) == ("mismatch", None)
    assert teacher_logprobs(" 4", None, FakeVocab()) == ("none", None)
    assert teacher_logprobs(" 4", tokens, None) == ("none", None)
    big = [{"id": 32, "logprob": -0.1, "top": [[5000, -0.1]]}]
    assert teacher_logprobs(" ", big, FakeVocab()) == ("mismatch", None)  # an id past the student's vocabulary


def test_priming_wraps_only_the_teacher_prompt() -> None:
    ex = next(GSM8K.load(Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"))
    plain = student_prompt(GSM8K, ex)
    prompts = {s: teacher_prompt(GSM8K, ex, s) for s in STRATEGIES}
    assert prompts["base"] == plain and len(set(prompts.values())) == len(STRATEGIES)
    assert "72 clips altogether" in prompts["ground_truth"] and "72 clips" not in plain
    assert all(p.endswith("\nA:") for p in prompts.values())
    choice = Example(id="c", question="Where? Answer Choices: (A) here (B) there", gold="B")
    assert "So the answer is (B)." in teacher_prompt(CSQA, choice, "ground_truth")
    with pytest.raises(ValueError, match="unknown priming strategy"):
        teacher_prompt(GSM8K, ex, "socratic")  # type: ignore[arg-type]


def test_ground_truth_stops_at_the_priming_s_answer_template() -> None:
    """The template the priming quotes ends the teacher's answer (it was seen repeating it to the budget); the
    template never states a number, so no lesson could have ended there."""
    assert stop_sequences(GSM8K, "ground_truth") == [*GSM8K.stop, "The answer is N."]
    assert stop_sequences(CSQA, "ground_truth") == [*CSQA.stop, "So the answer is (X)."]
    assert all(stop_sequences(GSM8K, s) == list(GSM8K.stop) for s in STRATEGIES if s != "ground_truth")
    assert GSM8K.stated_answer(" 3 + 4 = 7. The answer is 7. ") == "7"
    assert GSM8K.stated_answer(" The answer is N.") is None


def test_a_lesson_ends_with_its_answer_line_and_must_state_the_gold_answer() -> None:
    assert lesson_text(GSM8K, " 3 + 4 = 7. The answer is 7. Let me recap: 7!") == " 3 + 4 = 7. The answer is 7."
    assert lesson_text(GSM8K, " 7 apples.\nQ: The answer is 9.") == " 7 apples."
    assert lesson_text(CSQA, " Ink. So the answer is (E). Also (A).") == " Ink. So the answer is (E)."
    collector = Collector(GSM8K, "http://127.0.0.1:9", "key", max_tokens=8, top_logprobs=None, style="zero_shot",
                          teacher_style="few_shot", vocab=None, timeout=1)
    job = Job(Example(id="q", question="3 + 4?", gold="7"), "base")
    result = {"model": "t", "finish_reason": "length", "usage": {}, "cost": None}
    cut = collector.record(job, {**result, "text": " First 3, then 4, so 7"})  # cut at the budget: a guess
    assert cut["extracted"] == "7" and cut["correct"] is False
    kept = collector.record(job, {**result, "text": " 3 + 4 = 7. The answer is 7.\n\nMore", "finish_reason": "stop"})
    assert kept["correct"] is True and kept["answer"] == " 3 + 4 = 7. The answer is 7."
    assert kept["prompt"] == GSM8K.build_prompt("3 + 4?", "zero_shot") and kept["tokenizer"] == "none"
    transfer.parse_line(json.dumps(kept))  # what the collector writes, the reader accepts

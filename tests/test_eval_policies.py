"""``gkt eval --policies``: guidance policies as configs, their rows, the frontier plot, and a live run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gkt import cli
from gkt.eval.plots import frontier
from gkt.eval.records import REGUIDE_K, configs, parse_policy, policy_body
from gkt.eval.report import markdown
from gkt.eval.stats import policy_comparisons, rows
from gkt.launcher import Service
from shared.cost import PriceTable
from shared.tasks import GSM8K
from tests.conftest import CLIENT_KEY

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_policy_specs_parse_to_canonical_configs_and_request_bodies() -> None:
    assert parse_policy("reguide") == ("reguide", REGUIDE_K)
    assert parse_policy("reguide:tokens=8:k=10:threshold=-2.5") == ("reguide:threshold=-2.5:tokens=8", 10)
    assert parse_policy("adaptive:min_tokens=24") == ("adaptive:min_tokens=24", None)
    assert policy_body("reguide:threshold=-2.5:tokens=8") == {"name": "reguide", "threshold": -2.5, "tokens": 8}
    assert parse_policy("verify:draft_tokens=4") == ("verify:draft_tokens=4", None)
    assert parse_policy("verify:draft_tokens=auto") == ("verify:draft_tokens=auto", None)
    assert policy_body("verify:draft_tokens=auto") == {"name": "verify", "draft_tokens": "auto"}
    for bad in ("fixed", "nope", "reguide:tokens=0", "reguide:tokens", "adaptive:k=5", "reguide:span=x",
                "verify:k=4", "verify:draft_tokens=0", "verify:draft_tokens=long", "reguide:tokens=auto"):
        with pytest.raises(ValueError):
            parse_policy(bad)


def test_policy_configs_follow_the_fixed_ones_with_their_own_keys_and_labels() -> None:
    order = configs("gsm8k", ["teacher", "gkt"], [40], 256, "T", "S",
                    [parse_policy("reguide"), parse_policy("adaptive")])
    assert [c.label for c in order] == ["teacher only", "gkt k=40", f"gkt reguide k={REGUIDE_K}", "gkt adaptive"]
    assert len({c.key for c in order}) == 4
    # Keys of configs without a policy are unchanged, so earlier results files stay valid.
    assert order[1].key == "gsm8k|gkt|k=40|max=256|T|S"


def _rec(config, qid: str, correct: bool, teacher_tokens: int, student_tokens: int, calls: int) -> dict:  # noqa: ANN001
    return {
        "key": config.key, "qid": qid, "config": config.as_dict(), "timing": "split", "correct": correct,
        "wall_s": 1.0, "guidance_answer": None, "guidance_answer_correct": False, "fallback": None,
        "partial": False, "guidance_calls": calls,
        "usage": {"teacher_prompt_tokens": 100, "teacher_tokens": teacher_tokens, "student_prompt_tokens": 100,
                  "guidance_student_tokens": 0, "student_tokens": student_tokens},
        "timings": {"student_queue_s": 0.0, "teacher": {"queue_s": 0.0}},
    }


def test_policy_rows_report_share_accuracy_and_calls_and_plot_on_the_frontier(tmp_path: Path) -> None:
    t, s, g, r = configs("gsm8k", ["teacher", "student", "gkt"], [20], 256, "T", "S", [parse_policy("reguide")])
    recs = []
    for i, q in enumerate("abcd"):
        recs += [_rec(t, q, True, 100, 0, 1), _rec(s, q, i == 0, 0, 100, 0), _rec(g, q, i < 2, 20, 80, 1),
                 _rec(r, q, i < 3, 36, 64, 1 + i % 3)]
    table = rows(recs, [t, s, g, r], PriceTable())
    reguide = table[3]
    assert reguide.policy == "reguide" and reguide.k == REGUIDE_K and reguide.accuracy == 0.75
    assert reguide.teacher_token_share == pytest.approx(0.36)
    assert reguide.guidance_calls_mean == pytest.approx((1 + 2 + 3 + 1) / 4)
    assert table[0].guidance_calls_mean is None and table[2].guidance_calls_mean == 1.0
    md = markdown(table, {"task": "gsm8k", "teacher": "T", "student": "S", "max_tokens": 256,
                          "timing_modes": ["split"], "prices": PriceTable().as_dict()})
    assert f"| gkt reguide k={REGUIDE_K} | 4 | 75.0% (" in md and md.rstrip().count("| 1.75 |") == 1
    png = frontier(table, "test", tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_policies_are_compared_with_every_other_row_on_their_own_questions() -> None:
    """A policy run on fewer questions than the fixed rows is compared on exactly its questions."""
    t, g, r = configs("gsm8k", ["teacher", "gkt"], [20], 256, "T", "S", [parse_policy("reguide")])
    recs = []
    for i, q in enumerate("abcdef"):  # teacher and fixed k on six questions, the policy on the first two
        recs += [_rec(t, q, i != 1, 100, 0, 1), _rec(g, q, i >= 2, 20, 80, 1)]
    recs += [_rec(r, "a", True, 30, 70, 2), _rec(r, "b", True, 50, 50, 3)]
    (c,) = policy_comparisons(recs, [t, g, r])
    assert (c.label, c.n, c.accuracy, c.guidance_calls_mean) == (f"gkt reguide k={REGUIDE_K}", 2, 1.0, 2.5)
    assert c.teacher_token_share == pytest.approx(0.4)
    assert [(o.label, o.accuracy, o.teacher_token_share) for o in c.others] == [
        ("teacher only", 0.5, 1.0), ("gkt k=20", 0.0, pytest.approx(0.2))]
    assert c.fraction_of_teacher_accuracy == 2.0  # 100 % against the teacher's 50 % on these two
    md = markdown(rows(recs, [t, g, r], PriceTable()), {
        "task": "gsm8k", "teacher": "T", "student": "S", "max_tokens": 256, "timing_modes": ["split"],
        "prices": PriceTable().as_dict()}, [c])
    assert f"| gkt reguide k={REGUIDE_K} | 2 | 100.0% | 40.0% | 2.50 | 200.0% | teacher only 50.0% at 100.0%, " \
           "gkt k=20 0.0% at 20.0% |" in md


@pytest.mark.models
def test_cli_runs_policies_through_the_live_edge(edge_smol: Service, tmp_path: Path) -> None:
    """Two GSM8K questions with a forced re-guidance policy: the records carry every call, the table a row."""
    out = tmp_path / "out"
    spec = "reguide:k=6:tokens=6:threshold=0:span=1:min_gap=4:max_calls=1:max_wait_s=600"
    argv = ["eval", "--task", "gsm8k", "--data", str(DATA / "gsm8k" / "train.jsonl"), "-n", "2", "--modes", "gkt",
            "--k", "6", "--policies", spec, "--max-tokens", "60", "--edge-url", edge_smol.url, "--api-key", CLIENT_KEY,
            "--out", str(out),
            "--student", "smollm2-135m-instruct"]
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    policy = [r for r in records if r["config"]["policy"]]
    assert len(records) == 4 and len(policy) == 2
    for rec in policy:
        assert rec["guidance_calls"] == 2 and rec["config"]["k"] == 6
        assert rec["text"].startswith(rec["guidance"]) and len(rec["teacher_text"]) > len(rec["guidance"])
        assert rec["guidance_answer"] == GSM8K.stated_answer(rec["teacher_text"])
    result = json.loads((out / "gsm8k.json").read_text())
    labels = [row["label"] for row in result["rows"]]
    assert labels == ["gkt k=6", "gkt reguide:max_calls=1:max_wait_s=600:min_gap=4:span=1:threshold=0:tokens=6 k=6"]
    assert result["rows"][1]["guidance_calls_mean"] == 2.0
    assert (out / "gsm8k-frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

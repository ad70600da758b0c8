"""The evaluation's arithmetic: confidence intervals, prices, paired comparisons, sampling and the store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from gkt.eval.progress import Progress
from gkt.eval.records import ResultStore, RunConfig, configs, sample
from gkt.eval.report import markdown
from gkt.eval.stats import cost, rows, wilson
from shared.cost import PriceTable, StudentRates, TeacherRates
from shared.tasks import GSM8K

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize(
    "k, n, low, high",
    [  # Wilson score interval, z = 1.95996, worked by hand from the closed form
        (5, 10, 0.2366, 0.7634),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (81, 200, 0.3394, 0.4742),
        (1, 3, 0.0615, 0.7923),
    ],
)
def test_wilson_matches_reference(k: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_contains_the_estimate_and_narrows_with_n() -> None:
    widths = []
    for n in (10, 100, 1000):
        lo, hi = wilson(3 * n // 10, n)
        assert lo < 0.3 < hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert wilson(0, 0) == (0.0, 1.0)


def test_prices_are_the_services_prices() -> None:
    """#6: one price table (shared/cost.py): the eval reads the same variables the services do."""
    default = PriceTable.resolve([], environ={})
    assert default == PriceTable() and default.teacher == TeacherRates() and default.student == StudentRates()
    p = PriceTable.resolve(["teacher_output=1.5", "student-token=0.1"],
                           environ={"GKT_CLOUD_PRICE_INPUT_PER_MTOK": "0.3", "GKT_CLOUD_PRICE_OUTPUT_PER_MTOK": "9",
                                    "GKT_EDGE_PRICE_CPU_PER_HOUR": "3.6"})
    assert (p.teacher.input_per_mtok, p.teacher.output_per_mtok, p.student.per_mtok) == (0.3, 1.5, 0.1)  # CLI wins
    cost = p.answer(teacher_prompt_tokens=1_000_000, teacher_tokens=2_000_000, teacher_engine_s=0.0,
                    student_tokens=10_000_000, student_cpu_s=10.0)
    assert cost == pytest.approx(0.3 + 3.0 + 1.0 + 0.01)
    assert p.as_dict()["student_cpu_hour"] == 3.6
    cached = PriceTable.resolve(["teacher_cached_input=0.02"], environ={"GKT_CLOUD_PRICE_CACHED_INPUT_PER_MTOK": "9"})
    assert cached.teacher.cached_input_per_mtok == 0.02 and cached.as_dict()["teacher_cached_input"] == 0.02
    env = PriceTable.resolve([], environ={"GKT_CLOUD_PRICE_CACHED_INPUT_PER_MTOK": "0.03"})
    assert env.teacher.cached_input_per_mtok == 0.03
    for bad in (["teacher_output"], ["nope=1"], ["teacher_input=-1"], ["teacher_input=cheap"]):
        with pytest.raises(ValueError):
            PriceTable.resolve(bad, environ={})


def test_eval_cost_prices_cached_teacher_input_lower() -> None:
    """#22: the eval's cost columns bill the teacher's cached prompt tokens at the cached-input price; records
    written before the cloud counted them (no ``teacher_cached_tokens``) bill every prompt token in full."""
    prices = PriceTable.resolve(["teacher_input=1", "teacher_cached_input=0.1", "teacher_output=0",
                                 "student_cpu_hour=0"], environ={})
    rec = _rec(RunConfig("gsm8k", "teacher", None, 64, "t", "s"), "q1", True, 1.0, 0, 0)
    rec["usage"] |= {"teacher_prompt_tokens": 1_000, "teacher_draft_tokens": 200}
    full = cost(rec, prices)
    assert full == pytest.approx(1_200 / 1e6)
    rec["usage"]["teacher_cached_tokens"] = 1_000
    assert cost(rec, prices) == pytest.approx((200 + 1_000 * 0.1) / 1e6)


def _rec(config: RunConfig, qid: str, correct: bool, wall: float, teacher_tokens: int, student_tokens: int,
         guidance_answer: str | None = None, queue: float = 0.0) -> dict:
    return {
        "key": config.key, "qid": qid, "config": config.as_dict(), "timing": "split", "correct": correct,
        "wall_s": wall, "guidance_answer": guidance_answer, "guidance_answer_correct": guidance_answer == "1",
        "fallback": None, "partial": False,
        "usage": {"teacher_prompt_tokens": 100 if config.mode != "student" else 0, "teacher_tokens": teacher_tokens,
                  "student_prompt_tokens": 100, "guidance_student_tokens": 0, "student_tokens": student_tokens},
        "timings": {"student_queue_s": queue, "teacher": {"queue_s": 0.0}},
    }


def test_rows_pair_comparisons_on_shared_questions() -> None:
    t, s, g = configs("gsm8k", ["teacher", "student", "gkt"], [10], 256, "T", "S")
    qs = ["a", "b", "c", "d"]
    recs = [_rec(t, q, c, 10.0, 100, 0) for q, c in zip(qs, [True, True, True, False], strict=True)]
    recs += [_rec(s, q, c, 4.0, 0, 100) for q, c in zip(qs, [True, False, False, False], strict=True)]
    # gkt answered only a, b (a smaller sample): compared with the teacher and student on a, b alone.
    recs += [_rec(g, "a", True, 5.0, 10, 90, guidance_answer="1", queue=1.0), _rec(g, "b", False, 5.0, 10, 90)]
    prices = PriceTable(teacher=TeacherRates(input_per_mtok=0.0, output_per_mtok=1.0),
                        student=StudentRates(cpu_per_hour=0.0))
    teacher, student, gkt = rows(recs, [t, s, g], prices)
    assert (teacher.n, teacher.accuracy, teacher.teacher_token_share) == (4, 0.75, 1.0)
    assert student.teacher_token_share == 0.0 and student.cost_ratio_vs_teacher == 0.0
    assert student.speedup_vs_teacher == pytest.approx(2.5)
    assert student.gap_recovered == pytest.approx(0.0)
    assert gkt.n == 2 and gkt.paired_n_teacher == 2 and gkt.accuracy == 0.5
    assert gkt.fraction_of_teacher_accuracy == pytest.approx(0.5)      # teacher 2/2 on a, b
    assert gkt.gap_recovered == pytest.approx(0.0)                     # student 1/2 on a, b: no gain
    assert gkt.speedup_vs_teacher == pytest.approx(2.0)
    assert gkt.busy_speedup_vs_teacher == pytest.approx(20 / 9)        # one second of queueing left out
    assert gkt.teacher_token_share == pytest.approx(0.1)
    assert gkt.cost_ratio_vs_teacher == pytest.approx(0.1)
    assert gkt.guidance_has_answer == 0.5 and gkt.guidance_answer_correct == 0.5
    assert gkt.cost_per_answer_usd == pytest.approx(10 / 1e6)
    table = markdown([teacher, student, gkt], {"task": "gsm8k", "teacher": "T", "student": "S", "max_tokens": 256,
                                               "timing_modes": ["split"], "prices": prices.as_dict()})
    assert "| gkt k=10 | 2 | 50.0% (" in table and "| teacher only | 4 | 75.0%" in table


def test_gap_recovered_when_gkt_closes_the_gap() -> None:
    t, s, g = configs("csqa", ["teacher", "student", "gkt"], [20], 128, "T", "S")
    recs = []
    for i in range(10):
        q = str(i)
        recs += [_rec(t, q, i < 8, 3.0, 30, 0), _rec(s, q, i < 4, 1.0, 0, 30), _rec(g, q, i < 7, 1.5, 20, 10)]
    gkt = rows(recs, [t, s, g], PriceTable())[2]
    assert gkt.gap_recovered == pytest.approx(3 / 4)
    assert gkt.fraction_of_teacher_accuracy == pytest.approx(7 / 8)


def test_sample_is_seeded_prefix_stable_and_skips_exemplars(tmp_path: Path) -> None:
    lines = [{"question": f"Question {i}: how many?", "answer": f"x\n#### {i}"} for i in range(30)]
    lines.insert(5, {"question": GSM8K.shots[0][0], "answer": "#### 6"})  # an exemplar hidden in the data
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    big = sample(GSM8K, path, 100, seed=3)
    assert len(big) == 30 and not any(GSM8K.is_exemplar(e.question) for e in big)
    assert [e.id for e in sample(GSM8K, path, 10, seed=3)] == [e.id for e in big[:10]]
    assert [e.id for e in sample(GSM8K, path, 10, seed=4)] != [e.id for e in big[:10]]


def test_sample_of_the_real_data_excludes_the_exemplars() -> None:
    # The first GSM8K exemplar ("15 trees in the grove") is not in train, but CSQA's are: none may be drawn.
    from shared.tasks import CSQA

    drawn = sample(CSQA, DATA / "csqa" / "train.jsonl", 20000, seed=0)
    total = sum(1 for _ in CSQA.load(DATA / "csqa" / "train.jsonl"))
    assert 0 < total - len(drawn) <= len(CSQA.shots)
    assert not any(CSQA.is_exemplar(e.question) for e in drawn)


def test_store_survives_a_torn_line_and_appends_after_it(tmp_path: Path) -> None:
    c = configs("gsm8k", ["student"], [], 64, "T", "S")[0]
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.append({"key": c.key, "qid": "a", "config": c.as_dict()})
    with open(path, "a") as fh:
        fh.write('{"key": "' + c.key + '", "qid": "b", "con')  # killed mid-write
    again = ResultStore(path)
    assert again.torn_lines == 1 and again.done(c, "a") and not again.done(c, "b")
    again.append({"key": c.key, "qid": "b", "config": c.as_dict()})
    final = ResultStore(path)
    assert final.torn_lines == 1 and final.done(c, "b") and len(final.records) == 2


def test_progress_bar_counts_and_ends_with_the_total() -> None:
    out = io.StringIO()
    bar = Progress(4, done=1, stream=out)
    for _ in range(3):
        bar.advance("x")
    text = out.getvalue()
    assert "4/4" in text and "ETA" in text  # not a terminal: a line at the start and at the end


def test_wilson_bounds_hold_the_estimate_exactly_at_the_ends() -> None:
    for n in range(1, 120):
        assert wilson(0, n)[0] == 0.0 and wilson(n, n)[1] == 1.0
        for k in range(n + 1):
            lo, hi = wilson(k, n)
            assert lo <= k / n <= hi

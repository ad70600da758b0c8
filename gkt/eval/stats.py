"""The numbers of the tables, from per-question records.

Comparisons with teacher-only and student-only are paired: they use only the questions both rows answered,
so a row run on a smaller sample is compared with the teacher on that same sample.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from gkt.eval.records import RunConfig
from shared.cost import PriceTable

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95 % by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The bounds meet p exactly at 0 and 1; floating point can miss by an ulp, so pin them.
    return (0.0 if successes == 0 else max(0.0, centre - half), 1.0 if successes == n else min(1.0, centre + half))


def queue_s(rec: dict[str, Any]) -> float:
    """Seconds the request waited for an engine (teacher and student), not working."""
    t = rec["timings"]
    teacher = (t.get("teacher") or {}).get("queue_s") or 0.0
    return teacher + (t.get("student_queue_s") or 0.0)


def cost(rec: dict[str, Any], prices: PriceTable) -> float:
    """The answer's cost on both sides, priced as the services price it (``shared/cost.py``): the teacher's
    prompt and generated tokens and engine time, its prompt tokens found in its KV cache at the cached-input
    price (records from before the cloud counted them: none); the student's tokens (prompt, guidance, its
    own) and CPU-core seconds (one thread)."""
    u, t = rec["usage"], rec["timings"]
    teacher = t.get("teacher") or {}
    ran = rec["config"]["mode"] != "teacher"
    # Engine time: the first call's timings, or every call's as the cloud stated it where calls have no
    # first (verify: many short calls, each a prompt pass over a draft).
    engine_s = (teacher.get("prompt_s") or 0.0) + (teacher.get("generation_s") or 0.0)
    if not teacher and rec.get("calls"):
        engine_s = sum((c.get("cost") or {}).get("accelerator_s", 0.0) for c in rec["calls"])
    return prices.answer(
        teacher_prompt_tokens=u["teacher_prompt_tokens"] + u.get("teacher_draft_tokens", 0),
        teacher_tokens=u["teacher_tokens"], teacher_engine_s=engine_s,
        teacher_cached_tokens=u.get("teacher_cached_tokens", 0),
        student_tokens=u["student_prompt_tokens"] + u["guidance_student_tokens"] + u["student_tokens"] if ran else 0,
        student_cpu_s=(t.get("student_prompt_s") or 0.0) + (t.get("student_generation_s") or 0.0),
    )


def teacher_tokens(rec: dict[str, Any]) -> int:
    return rec["usage"]["teacher_tokens"]


def answer_tokens(rec: dict[str, Any]) -> int:
    """Tokens of the answer: the teacher's (in its tokenizer) plus those the student generated."""
    return rec["usage"]["teacher_tokens"] + rec["usage"]["student_tokens"]


@dataclass
class Row:
    """One line of the table."""

    key: str
    label: str
    mode: str
    k: int | None
    policy: str | None
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    guidance_has_answer: float | None
    guidance_answer_correct: float | None
    wall_mean_s: float
    wall_median_s: float
    busy_mean_s: float
    speedup_vs_teacher: float | None
    busy_speedup_vs_teacher: float | None
    teacher_token_share: float
    answer_tokens_mean: float
    cost_per_answer_usd: float
    cost_ratio_vs_teacher: float | None
    fraction_of_teacher_accuracy: float | None
    gap_recovered: float | None
    fallbacks: int
    partials: int
    timing: list[str]
    paired_n_teacher: int
    paired_n_student: int
    guidance_calls_mean: float | None = None  # gkt rows: calls to the cloud per answer (re-guidance adds)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _paired(a: dict[str, dict], b: dict[str, dict] | None) -> list[str]:
    return sorted(set(a) & set(b)) if b else []


def _grouped(records: list[dict[str, Any]], order: list[RunConfig]) -> tuple[
        dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, Any]], list[str]]:
    """Records by config key and question id, each key's config, and the keys in ``order`` then the rest."""
    by_key: dict[str, dict[str, dict[str, Any]]] = {}
    cfg: dict[str, dict[str, Any]] = {}
    for r in records:
        by_key.setdefault(r["key"], {})[r["qid"]] = r
        cfg[r["key"]] = r["config"]
    keys = [c.key for c in order if c.key in by_key] + sorted(k for k in by_key if k not in {c.key for c in order})
    return by_key, cfg, keys


def rows(records: list[dict[str, Any]], order: list[RunConfig], prices: PriceTable) -> list[Row]:
    """One row per config that has results, in ``order`` then any others found (sorted by key)."""
    by_key, cfg, keys = _grouped(records, order)
    teacher = next((by_key[k] for k in keys if cfg[k]["mode"] == "teacher"), None)
    student = next((by_key[k] for k in keys if cfg[k]["mode"] == "student"), None)
    return [_row(k, cfg[k], by_key[k], teacher, student, prices) for k in keys]


def _acc(recs: dict[str, dict], qids: list[str]) -> float:
    return sum(recs[q]["correct"] for q in qids) / len(qids)


def _row(key: str, config: dict[str, Any], recs: dict[str, dict], teacher: dict[str, dict] | None,
         student: dict[str, dict] | None, prices: PriceTable) -> Row:
    values = list(recs.values())
    n = len(values)
    correct = sum(r["correct"] for r in values)
    lo, hi = wilson(correct, n)
    walls = [r["wall_s"] for r in values]
    busy = [r["wall_s"] - queue_s(r) for r in values]
    is_gkt = config["mode"] == "gkt"

    with_t = _paired(recs, teacher)
    with_s = _paired(recs, student)
    speedup = busy_speedup = cost_ratio = frac = gap = None
    if with_t and teacher is not None:
        speedup = _ratio(sum(teacher[q]["wall_s"] for q in with_t), sum(recs[q]["wall_s"] for q in with_t))
        busy_speedup = _ratio(sum(teacher[q]["wall_s"] - queue_s(teacher[q]) for q in with_t),
                              sum(recs[q]["wall_s"] - queue_s(recs[q]) for q in with_t))
        cost_ratio = _ratio(sum(cost(recs[q], prices) for q in with_t), sum(cost(teacher[q], prices) for q in with_t))
        frac = _ratio(_acc(recs, with_t), _acc(teacher, with_t))
        both = sorted(set(with_t) & set(with_s))
        if both and student is not None:
            gap = _ratio(_acc(recs, both) - _acc(student, both), _acc(teacher, both) - _acc(student, both))

    answer_total = sum(answer_tokens(r) for r in values)
    return Row(
        key=key, label=RunConfig(**config).label, mode=config["mode"], k=config["k"], policy=config.get("policy"),
        n=n, correct=correct, accuracy=correct / n, ci_low=lo, ci_high=hi,
        guidance_has_answer=sum(r["guidance_answer"] is not None for r in values) / n if is_gkt else None,
        guidance_answer_correct=sum(r["guidance_answer_correct"] for r in values) / n if is_gkt else None,
        wall_mean_s=statistics.fmean(walls), wall_median_s=statistics.median(walls),
        busy_mean_s=statistics.fmean(busy), speedup_vs_teacher=speedup, busy_speedup_vs_teacher=busy_speedup,
        teacher_token_share=_ratio(sum(teacher_tokens(r) for r in values), answer_total) or 0.0,
        answer_tokens_mean=answer_total / n,
        cost_per_answer_usd=statistics.fmean(cost(r, prices) for r in values),
        cost_ratio_vs_teacher=cost_ratio, fraction_of_teacher_accuracy=frac, gap_recovered=gap,
        fallbacks=sum(r["fallback"] is not None for r in values), partials=sum(bool(r["partial"]) for r in values),
        timing=sorted({r["timing"] for r in values}), paired_n_teacher=len(with_t), paired_n_student=len(with_s),
        guidance_calls_mean=statistics.fmean(r.get("guidance_calls", 1) for r in values) if is_gkt else None,
    )


@dataclass
class PairedCell:
    """One row's accuracy and teacher share on a given set of questions."""

    label: str
    accuracy: float
    teacher_token_share: float


@dataclass
class PolicyComparison:
    """A policy row against every other row on exactly the policy's questions (all paired)."""

    label: str
    n: int
    accuracy: float
    teacher_token_share: float
    guidance_calls_mean: float
    fraction_of_teacher_accuracy: float | None
    others: list[PairedCell]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cell(label: str, recs: list[dict[str, Any]]) -> PairedCell:
    answer_total = sum(answer_tokens(r) for r in recs)
    return PairedCell(label, sum(r["correct"] for r in recs) / len(recs),
                      _ratio(sum(teacher_tokens(r) for r in recs), answer_total) or 0.0)


def policy_comparisons(records: list[dict[str, Any]], order: list[RunConfig]) -> list[PolicyComparison]:
    """For each policy row: its accuracy and teacher share next to those of the teacher, the student and each
    fixed k *on the same questions*, the comparison the frontier asks for (a policy run on fewer questions
    than the fixed rows would otherwise be compared with another sample)."""
    by_key, cfg, keys = _grouped(records, order)
    out = []
    for key in keys:
        if not cfg[key].get("policy"):
            continue
        qids = sorted(by_key[key])
        mine = [by_key[key][q] for q in qids]
        paired = [(k, _cell(RunConfig(**cfg[k]).label, [by_key[k][q] for q in qids])) for k in keys
                  if not cfg[k].get("policy") and set(qids) <= set(by_key[k])]
        others = [c for _, c in paired]
        teacher = next((c for k, c in paired if cfg[k]["mode"] == "teacher"), None)
        me = _cell(RunConfig(**cfg[key]).label, mine)
        out.append(PolicyComparison(
            label=me.label, n=len(qids), accuracy=me.accuracy, teacher_token_share=me.teacher_token_share,
            guidance_calls_mean=statistics.fmean(r.get("guidance_calls", 1) for r in mine),
            fraction_of_teacher_accuracy=_ratio(me.accuracy, teacher.accuracy) if teacher else None,
            others=others))
    return out

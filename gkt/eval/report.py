"""Results as JSON (everything) and as a Markdown table (the figures a reader compares)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gkt.eval.stats import PolicyComparison, Row


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def markdown(rows: list[Row], meta: dict[str, Any], comparisons: list[PolicyComparison] | None = None) -> str:
    head = ("| run | n | accuracy (95% CI) | guidance holds answer | wall mean / median s | speed-up | "
            "busy speed-up | teacher share of answer tokens | cost per 1k answers | cost vs teacher | "
            "of teacher accuracy | gap recovered | guidance calls per answer |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        held = "–" if r.guidance_has_answer is None else (
            f"{_pct(r.guidance_has_answer)} ({_pct(r.guidance_answer_correct)} right)")
        lines.append(
            f"| {r.label} | {r.n} | {_pct(r.accuracy)} ({_pct(r.ci_low)}–{_pct(r.ci_high)}) | {held} | "
            f"{r.wall_mean_s:.2f} / {r.wall_median_s:.2f} | {_x(r.speedup_vs_teacher)} | "
            f"{_x(r.busy_speedup_vs_teacher)} | {_pct(r.teacher_token_share)} | "
            f"${1000 * r.cost_per_answer_usd:.4f} | {_x(r.cost_ratio_vs_teacher)} | "
            f"{_pct(r.fraction_of_teacher_accuracy)} | {_pct(r.gap_recovered)} | "
            f"{'–' if r.guidance_calls_mean is None else f'{r.guidance_calls_mean:.2f}'} |")
    notes = [
        "",
        f"Task `{meta['task']}`, teacher `{meta['teacher']}`, student `{meta['student']}`, "
        f"max_tokens {meta['max_tokens']}, greedy; timing: {', '.join(meta['timing_modes'])}.",
        "Speed-up, cost ratio, fraction of teacher accuracy and gap recovered are paired: each row against "
        "teacher-only (and student-only) on the questions both answered. Busy speed-up leaves out time spent "
        "waiting for a busy engine.",
        "Prices (USD per 1M tokens; per hour for accelerator and CPU): "
        + ", ".join(f"{k} {v:g}" for k, v in meta["prices"].items()) + ".",
    ]
    if comparisons:
        notes += ["", "Policies against the other rows on the same questions (accuracy at teacher share of "
                  "answer tokens):", "",
                  "| policy | n | accuracy | teacher share | guidance calls per answer | of teacher accuracy | "
                  "the other rows on these questions |", "|" + "---|" * 7]
        notes += [f"| {c.label} | {c.n} | {_pct(c.accuracy)} | {_pct(c.teacher_token_share)} | "
                  f"{c.guidance_calls_mean:.2f} | {_pct(c.fraction_of_teacher_accuracy)} | "
                  + ", ".join(f"{o.label} {_pct(o.accuracy)} at {_pct(o.teacher_token_share)}" for o in c.others)
                  + " |" for c in comparisons]
    if meta.get("note"):
        notes.append(f"Note: {meta['note']}")
    if any(r.fallbacks or r.partials for r in rows):
        notes.append("Cloud trouble: " + "; ".join(f"{r.label}: {r.fallbacks} fallbacks, {r.partials} partial"
                                                   for r in rows if r.fallbacks or r.partials) + ".")
    return "\n".join(lines + notes) + "\n"


def write(out_dir: Path, stem: str, rows: list[Row], meta: dict[str, Any],
          comparisons: list[PolicyComparison] | None = None) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    body: dict[str, Any] = {"meta": meta, "rows": [r.as_dict() for r in rows]}
    if comparisons:
        body["policy_comparisons"] = [c.as_dict() for c in comparisons]
    js.write_text(json.dumps(body, indent=2) + "\n")
    md.write_text(markdown(rows, meta, comparisons))
    return js, md

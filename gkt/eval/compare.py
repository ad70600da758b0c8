"""``gkt compare``: runs of ``gkt eval`` side by side, paired on the questions they share.

    gkt compare base=runs/base/results.jsonl gold=runs/gold/results.jsonl gt=runs/gt/results.jsonl

Each argument is one run (LABEL=results.jsonl, or a gzipped results.jsonl.gz; a file may hold several
configurations, then add ``@CONFIG_LABEL``, e.g. ``base=results.jsonl@student``). The first run is the
reference. Every run is scored on the questions all runs answered, so the accuracies are paired; next to each:
its Wilson 95 % interval, the questions only it or only the reference got right, and the exact two-sided
McNemar p-value of that split (the binomial test on the discordant pairs), the test for two classifiers on the
same items.

Runs of the ``verify`` policy also get the drafts' side, on the same questions: guidance calls per answer,
the share of drafts the teacher kept whole, the teacher's tokens per answer (drafts read, tokens written), the
student's tokens thrown away per answer, the seconds per answer and the student tokens per draft.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gkt.eval.records import ResultStore, RunConfig
from gkt.eval.stats import wilson


@dataclass
class Checked:
    """One verify answer's drafts: calls, drafts checked and kept whole, teacher tokens read and written,
    student tokens thrown away (cut drafts' tails, drafts written ahead and dropped) and its wall time."""

    calls: int
    drafts: int
    whole: int
    read: int
    written: int
    discarded: int = 0
    wall_s: float = 0.0
    drafted: int = 0  # student tokens drafted (0: records from before the edge counted them)


@dataclass
class Run:
    label: str
    correct: dict[str, bool]  # question id -> right or not
    adapter: str | None  # the adapter that answered, as the records name it (None: the base model)
    checked: dict[str, Checked] | None = None  # verify runs: question id -> its drafts


def _checked(record: dict[str, Any]) -> Checked:
    drafts = [c for c in record.get("calls") or [] if c.get("kind") == "verify" and c.get("draft")]
    usage = record.get("usage") or {}
    return Checked(len(record.get("calls") or []), len(drafts),
                   sum(c.get("draft_accepted") == len(c["draft"]) for c in drafts),
                   int(usage.get("teacher_draft_tokens", 0)), int(usage.get("teacher_tokens", 0)),
                   int(usage.get("student_discarded_tokens", 0)), float(record.get("wall_s") or 0.0),
                   sum(int(c.get("draft_student_tokens") or 0) for c in drafts))


@dataclass
class Compared:
    label: str
    n: int
    accuracy: float
    ci: tuple[float, float]
    only_this: int  # right here, wrong in the reference
    only_reference: int  # right in the reference, wrong here
    p_value: float | None  # None for the reference itself
    adapter: str | None
    checked: list[Checked] | None = None  # verify runs, on the shared questions


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (1.0 when there are none)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def load(spec: str) -> Run:
    """``LABEL=path[@config label]``: the records of one configuration of a results file."""
    label, sep, rest = spec.partition("=")
    if not sep or not label or not rest:
        raise ValueError(f"{spec!r}: expected LABEL=results.jsonl[@CONFIG]")
    path_text, _, config = rest.partition("@")
    if not Path(path_text).is_file():
        raise ValueError(f"{path_text}: no such results file")
    records = list(ResultStore(path_text).records.values())  # torn lines skipped, one record per question
    labels = {RunConfig(**r["config"]).label for r in records}
    if config:
        records = [r for r in records if RunConfig(**r["config"]).label == config]
        if not records:
            raise ValueError(f"{path_text}: no configuration {config!r} (it holds {', '.join(sorted(labels))})")
    elif len(labels) > 1:
        raise ValueError(f"{path_text} holds {', '.join(sorted(labels))}: name one with @CONFIG")
    if not records:
        raise ValueError(f"{path_text}: no records")
    adapters = {json.dumps(r.get("adapter"), sort_keys=True) for r in records}
    if len(adapters) > 1:
        raise ValueError(f"{path_text}: answered by more than one adapter ({len(adapters)}); compare runs, not mixes")
    adapter = records[0].get("adapter")
    verify = all(((r.get("config") or {}).get("policy") or "").split(":")[0] == "verify" for r in records)
    return Run(label, {r["qid"]: bool(r["correct"]) for r in records},
               f"{adapter['name']} ({adapter['sha256'][:12]})" if adapter else None,
               {r["qid"]: _checked(r) for r in records} if verify else None)


def compare(runs: list[Run]) -> list[Compared]:
    """Each run against the first, on the questions every run answered."""
    shared = set.intersection(*(set(r.correct) for r in runs))
    if not shared:
        raise ValueError("the runs share no question")
    ref = runs[0].correct
    out = []
    for i, run in enumerate(runs):
        right = sum(run.correct[q] for q in shared)
        only_this = sum(run.correct[q] and not ref[q] for q in shared)
        only_ref = sum(ref[q] and not run.correct[q] for q in shared)
        out.append(Compared(run.label, len(shared), right / len(shared), wilson(right, len(shared)), only_this,
                            only_ref, None if i == 0 else mcnemar_exact(only_this, only_ref), run.adapter,
                            None if run.checked is None else [run.checked[q] for q in sorted(shared)]))
    return out


def markdown(rows: list[Compared]) -> str:
    ref = rows[0].label
    lines = [f"| run | n | accuracy | 95 % CI | right only here / only in {ref} | McNemar p | adapter |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = "-" if r.p_value is None else f"{r.p_value:.3g}"
        split = "-" if r.p_value is None else f"{r.only_this} / {r.only_reference}"
        lines.append(f"| {r.label} | {r.n} | {100 * r.accuracy:.1f} % | {100 * r.ci[0]:.1f}-{100 * r.ci[1]:.1f} % "
                     f"| {split} | {p} | {r.adapter or 'none'} |")
    checked = [r for r in rows if r.checked]
    if checked:
        lines += ["", "| verify run | calls per answer | drafts kept whole | teacher tokens read per answer "
                  "| teacher tokens written per answer | student tokens discarded per answer | seconds per answer "
                  "| student tokens per draft |", "|---|---|---|---|---|---|---|---|"]
        for r in checked:
            c = r.checked or []
            drafts = sum(x.drafts for x in c)
            whole = f"{100 * sum(x.whole for x in c) / drafts:.1f} %" if drafts else "-"
            drafted = sum(x.drafted for x in c)
            per_draft = f"{drafted / drafts:.1f}" if drafts and drafted else "-"
            lines.append(f"| {r.label} | {sum(x.calls for x in c) / len(c):.2f} | {whole} "
                         f"| {sum(x.read for x in c) / len(c):.1f} | {sum(x.written for x in c) / len(c):.1f} "
                         f"| {sum(x.discarded for x in c) / len(c):.1f} | {sum(x.wall_s for x in c) / len(c):.1f} "
                         f"| {per_draft} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        rows = compare([load(spec) for spec in args.runs])
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as err:
        print(f"gkt compare: {err}", file=sys.stderr)
        return 2
    print(markdown(rows))
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("compare", help="gkt eval runs side by side, paired on their shared questions (McNemar)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=results.jsonl[@CONFIG]; the first is the reference")
    p.set_defaults(func=main)

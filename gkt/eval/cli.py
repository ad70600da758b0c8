"""``gkt eval``: run a dataset through the live edge API and write tables and plots.

    gkt eval --task gsm8k --data path/to/train.jsonl -n 200 --k 10,20,40,80
    gkt eval --task gsm8k --data path/to/train.jsonl -n 200 --k 20,40 --policies reguide,adaptive

Without ``--edge-url`` it starts its own cloud and edge (split across two cores when it can). Results are
appended per question to ``OUT/results.jsonl``; running the same command again continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gkt.eval import plots, report, stats
from gkt.eval.records import REGUIDE_K, ResultStore, configs, model_label, parse_policy, sample
from gkt.eval.runner import EdgeClient, EvalError, run
from gkt.eval.stack import TIMING_MODES, local_stack, split_possible
from gkt.launcher import CLIENT_KEY_FILE, read_key
from shared.cost import PRICE_NAMES, PriceTable
from shared.models import DEFAULT_STUDENT, DEFAULT_TEACHER
from shared.splits import SPLITS, select
from shared.tasks import TASKS

# Long enough for the exemplars' style of answer (GSM8K teacher answers average ~117 tokens; CSQA ~35).
DEFAULT_MAX_TOKENS = {"gsm8k": 256, "csqa": 128}


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("teacher", "student", "gkt")]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"modes are teacher, student, gkt; got {text!r}")
    return modes


def _policies(text: str) -> list[tuple[str, int | None]]:
    try:
        return [parse_policy(spec) for spec in text.split(",") if spec.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy, speed and cost of teacher, student and gkt on a dataset",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--data", required=True, help="jsonl file in the dataset's usual format")
    p.add_argument("-n", "--sample", type=int, default=200, help="questions to draw (default 200)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; exemplar questions are never drawn")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="draw only from this part of the data (shared/splits.py); published results use dev, "
                   "the questions no transfer set or training ever sees (default: the whole file)")
    p.add_argument("--k", type=_ints, default=[10, 20, 40, 80], help="guidance lengths (default 10,20,40,80)")
    p.add_argument("--modes", type=_modes, default=["teacher", "student", "gkt"],
                   help="comma-separated subset of teacher,student,gkt (default all)")
    p.add_argument("--policies", type=_policies, default=[],
                   help="guidance policies to run as extra gkt configs, comma-separated, each NAME[:PARAM=VALUE...], "
                        f"e.g. reguide,adaptive or reguide:k=10:tokens=8,adaptive:min_tokens=24 (reguide's first "
                        f"guidance k defaults to {REGUIDE_K}; parameters as in the edge's guidance_policy)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"answer budget in tokens (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher: registry name or GGUF path")
    p.add_argument("--student", default=DEFAULT_STUDENT, help="student: registry name or GGUF path")
    p.add_argument("--edge-url", default=None, help="use a running edge instead of starting cloud and edge")
    p.add_argument("--api-key", default=None,
                   help="with --edge-url: the edge's client key (default: $GKT_EDGE_API_KEY, else the key "
                   "`gkt up` keeps)")
    p.add_argument("--no-split", dest="split", action="store_false",
                   help="do not pin cloud and edge to separate cores when starting them")
    p.add_argument("--out", type=Path, default=Path("eval-results"), help="output directory")
    p.add_argument("--results", type=Path, default=None, help="per-question jsonl (default OUT/results.jsonl)")
    p.add_argument("--price", action="append", default=[], metavar="NAME=VALUE",
                   help="override a price (shared/cost.py): " + ", ".join(
                       f"{name} ({var})" for name, (var, _, _) in PRICE_NAMES.items()))
    p.add_argument("--note", default=None,
                   help="free text kept with the results, e.g. what else ran on the machine during timing")
    p.add_argument("--report-only", action="store_true", help="write tables and plots from the results file")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.set_defaults(func=main)


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()}


def main(args: argparse.Namespace) -> int:
    task = TASKS[args.task]
    try:
        prices = PriceTable.resolve(args.price)
    except ValueError as err:
        print(f"gkt eval: {err}", file=sys.stderr)
        return 2
    max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS[args.task]
    teacher, student = model_label(args.teacher), model_label(args.student)
    order = configs(args.task, args.modes, args.k, max_tokens, teacher, student, args.policies)
    examples = sample(task, args.data, args.sample, args.seed, args.split)
    store = ResultStore(args.results or args.out / "results.jsonl")
    meta: dict[str, Any] = {
        "task": args.task, "data": str(args.data), "sample": len(examples), "seed": args.seed, "split": args.split,
        "teacher": teacher, "student": student, "max_tokens": max_tokens, "k": args.k, "modes": args.modes,
        "policies": [c.label for c in order if c.policy],
        "prices": prices.as_dict(), "command": shlex.join(["gkt", "eval", *sys.argv[2:]]) if sys.argv[1:2] == [
            "eval"] else None, "machine": _machine(), "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_before": os.getloadavg(), "note": args.note,
    }
    code = 0
    if not args.report_only:
        code = _run(args, order, examples, store, teacher, student)
    meta["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    meta["load_after"] = os.getloadavg()
    # The tables cover every result for this task, pair and budget whose question is in the data file.
    loaded = task.load(args.data)
    pool = {e.id for e in (select(task, loaded, args.split) if args.split else loaded)
            if not task.is_exemplar(e.question)}
    records = [r for r in store.for_task(args.task, pool)
               if (r["config"]["teacher"], r["config"]["student"], r["config"]["max_tokens"])
               == (teacher, student, max_tokens)]
    if not records:
        print("gkt eval: no results to report yet", file=sys.stderr)
        return code or 1
    table = stats.rows(records, order, prices)
    meta["timing_modes"] = sorted({t for r in table for t in r.timing})
    meta["timing_descriptions"] = {t: TIMING_MODES.get(t, t) for t in meta["timing_modes"]}
    js, md = report.write(args.out, args.task, table, meta, stats.policy_comparisons(records, order))
    png = plots.plot(table, f"{args.task}: {teacher} teaches {student}", args.out / f"{args.task}.png")
    front = plots.frontier(table, f"{args.task}: accuracy vs teacher share ({teacher} teaches {student})",
                           args.out / f"{args.task}-frontier.png")
    print(md.read_text())
    print(f"wrote {js}, {md}, {png}, {front}", file=sys.stderr)
    return code


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # `kill` stops a background run as cleanly as Ctrl-C: services stopped, results kept


def _run(args: argparse.Namespace, order: list, examples: list, store: ResultStore, teacher: str,
         student: str) -> int:
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # a shell's `cmd &` starts with SIGINT ignored
    if store.torn_lines:
        print(f"gkt eval: ignored {store.torn_lines} torn line(s) in {store.path}", file=sys.stderr)
    try:
        if args.edge_url:
            key = args.api_key or os.environ.get("GKT_EDGE_API_KEY") or read_key(CLIENT_KEY_FILE)
            client = EdgeClient(args.edge_url, args.timeout, api_key=key)
            try:
                run(examples, order, client, store, "external")
            finally:
                client.close()
        else:
            why_not = split_possible() if args.split else "--no-split"
            timing = "split" if why_not is None else "shared"
            if why_not and args.split:
                print(f"gkt eval: not splitting cores ({why_not}); times are for a shared machine", file=sys.stderr)
            with local_stack(args.teacher, args.student, timing == "split", args.out / "logs") as stack:
                client = EdgeClient(stack.edge.url, args.timeout)
                try:
                    run(examples, order, client, store, stack.timing)
                finally:
                    client.close()
    except KeyboardInterrupt:
        print(f"\ngkt eval: interrupted; results so far are in {store.path}; run the same command to continue",
              file=sys.stderr)
        return 130
    except EvalError as err:
        print(f"gkt eval: {err}", file=sys.stderr)
        return 1
    print(f"gkt eval: done in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return 0
